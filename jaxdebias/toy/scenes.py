"""Generated scenes and questions: the toy world the embedded model is trained and evaluated on.

A scene is a background (solid, vertical gradient, two-tone "horizon" or noisy) of some width x height (many
aspect ratios, so LLaVA-1.5's letterbox padding occurs) with 1-3 non-overlapping objects (5 shapes, each with its
own fill pattern, 6 colours, several sizes, anywhere in the image including its top rows). Questions have one-word answers and use LLaVA's
prompt suffixes: POPE-style existence (yes/no, negatives balanced: an absent shape, or a present shape in a colour
it does not have), the colour of an object, a count, left/right and top/bottom.

Everything is a function of integer seeds: ``scene(rng)`` with ``rng = stream(seed, split, index)``, so the same
(seed, split, index) gives the same scene and questions on every machine. The benchmark folders in the LLaVA
evaluation layouts that ``jaxdebias eval`` reads (POPE, GQA) are written by ``bench``.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
COLORS = {"red": (220, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 225), "yellow": (240, 210, 40),
          "purple": (145, 60, 195), "orange": (245, 135, 30)}
NUMBERS = ("zero", "one", "two", "three", "four", "five")
ASPECTS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16), (2, 1), (1, 2), (5, 4), (4, 5))
BACKGROUNDS = ("solid", "gradient", "horizon", "noise")
MAX_OBJECTS = 3

SHORT = "Answer the question using a single word or phrase."  # LLaVA's short-answer suffix (POPE, GQA, ...)
PROMPT = "USER: <image>\n{} ASSISTANT:"  # LLaVA-1.5's conversation template (v1) as the CLI builds it
TURN = "USER: {} ASSISTANT:"  # a later turn of a multi-turn conversation (training only)

# Streams of scenes: the same index gives different scenes in different splits.
SPLITS = {"train": 0, "pope": 1, "gqa": 2, "test": 3, "calib": 4, "heldout": 5, "vision": 6, "text": 7}


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    cx: float  # centre, in pixels of the original image
    cy: float
    size: float  # radius of the circumscribed circle, pixels
    angle: float  # rotation in degrees (squares, triangles, stars, crosses)


@dataclasses.dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: str
    colors: tuple  # background colours (1 or 2 RGB tuples)
    noise_seed: int
    objects: tuple[Obj, ...]


def stream(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one scene: a pure function of (seed, split, index)."""
    return np.random.default_rng([int(seed), SPLITS[split], int(index)])


def _muted(rng) -> tuple:
    """A background colour: low saturation, any brightness (never one of the object colours)."""
    v = rng.uniform(35, 225)
    tint = rng.normal(0, 12, 3)
    return tuple(int(np.clip(v + t, 0, 255)) for t in tint)


def scene(rng: np.random.Generator) -> Scene:
    """A random scene: size and aspect ratio, background, 1-3 objects that do not overlap (fewer when they do not
    fit)."""
    aw, ah = ASPECTS[rng.integers(len(ASPECTS))]
    long_side = int(rng.integers(320, 641))
    scale = long_side / max(aw, ah)
    width, height = max(32, round(aw * scale)), max(32, round(ah * scale))
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    colors = (_muted(rng), _muted(rng))
    noise_seed = int(rng.integers(2**31))
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    short = min(width, height)
    objects: list[Obj] = []
    for _ in range(200):  # rejection sampling of non-overlapping placements
        if len(objects) == n:
            break
        r = short * rng.uniform(0.13, 0.26)
        cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
        if any(math.hypot(cx - o.cx, cy - o.cy) < r + o.size + 4 for o in objects):
            continue
        objects.append(Obj(SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))],
                           float(cx), float(cy), float(r), float(rng.uniform(-20, 20))))
    return Scene(width, height, background, colors, noise_seed, tuple(objects))


def _polygon(o: Obj) -> list[tuple[float, float]]:
    a0 = math.radians(o.angle)

    def ring(radii, count, offset=0.0):
        return [(o.cx + rad * math.cos(a0 + offset + 2 * math.pi * i / count),
                 o.cy + rad * math.sin(a0 + offset + 2 * math.pi * i / count))
                for i, rad in enumerate(radii)]

    if o.shape == "square":
        return ring([o.size] * 4, 4, math.pi / 4)
    if o.shape == "triangle":
        return ring([o.size] * 3, 3, -math.pi / 2)
    if o.shape == "star":
        return ring([o.size, o.size * 0.45] * 5, 10, -math.pi / 2)
    if o.shape == "cross":  # a plus sign of arm half-width w
        w, s = o.size * 0.33, o.size * 0.95
        pts = [(w, s), (w, w), (s, w), (s, -w), (w, -w), (w, -s), (-w, -s), (-w, -w), (-s, -w), (-s, w),
               (-w, w), (-w, s)]
        c, sn = math.cos(a0), math.sin(a0)
        return [(o.cx + x * c - y * sn, o.cy + x * sn + y * c) for x, y in pts]
    raise ValueError(f"No polygon for shape {o.shape!r}.")


# Each shape kind has its own fill pattern (its colour, alternating with a half-bright shade): a 14-pixel patch of
# an object shows what kind of object it is, as texture does for real objects. Period in pixels of the 336-pixel
# letterboxed image (``PATTERN_PERIOD``), so that every patch sees about two periods whatever the image size.
PATTERNS = {"circle": "solid", "square": "horizontal stripes", "triangle": "vertical stripes", "star": "checkers",
            "cross": "diagonal stripes"}
PATTERN_PERIOD = 8.0


def _pattern(shape: str, x, y, half: float):
    """bool[H, W]: True where the pattern shows the object's full colour (x, y pixel grids, ``half`` the
    half-period in pixels of the original image)."""
    kind = PATTERNS[shape]
    if kind == "solid":
        return np.ones(x.shape, bool)
    if kind == "horizontal stripes":
        return (y // half) % 2 == 0
    if kind == "vertical stripes":
        return (x // half) % 2 == 0
    if kind == "checkers":
        return ((x // half) + (y // half)) % 2 == 0
    return ((x + y) // (half * 1.4)) % 2 == 0


def render(s: Scene):
    """The scene as an RGB PIL image of its own size (width x height)."""
    from PIL import Image

    c0, c1 = np.asarray(s.colors[0], np.float32), np.asarray(s.colors[1], np.float32)
    if s.background == "solid":
        arr = np.broadcast_to(c0, (s.height, s.width, 3)).copy()
    elif s.background == "gradient":
        t = np.linspace(0, 1, s.height, dtype=np.float32)[:, None, None]
        arr = np.broadcast_to(c0 * (1 - t) + c1 * t, (s.height, s.width, 3)).copy()
    elif s.background == "horizon":
        arr = np.broadcast_to(c0, (s.height, s.width, 3)).copy()
        arr[int(s.height * 0.55):] = c1
    else:  # noise: a solid colour with per-pixel grain
        grain = np.random.default_rng(s.noise_seed).normal(0, 14, (s.height, s.width, 1)).astype(np.float32)
        arr = c0 + grain
    labels = np.asarray(label_map(s))
    half = PATTERN_PERIOD / 2 * max(s.width, s.height) / 336
    for k, o in enumerate(s.objects):  # each object's bounding box only
        x0, x1 = max(0, int(o.cx - o.size) - 1), min(s.width, int(o.cx + o.size) + 2)
        y0, y1 = max(0, int(o.cy - o.size) - 1), min(s.height, int(o.cy + o.size) + 2)
        y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        inside = labels[y0:y1, x0:x1] == k + 1
        full = np.asarray(COLORS[o.color], np.float32)
        bright = _pattern(o.shape, x - o.cx, y - o.cy, half)
        box = arr[y0:y1, x0:x1]
        box[inside] = np.where(bright[inside][:, None], full, full * 0.5)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def label_map(s: Scene):
    """The scene's objects as an "L" PIL image of its size: 0 background, k + 1 where object k is drawn (the
    dense targets of the vision tower's pretraining)."""
    from PIL import Image, ImageDraw

    image = Image.new("L", (s.width, s.height), 0)
    draw = ImageDraw.Draw(image)
    for k, o in enumerate(s.objects):
        if o.shape == "circle":
            draw.ellipse([o.cx - o.size, o.cy - o.size, o.cx + o.size, o.cy + o.size], fill=k + 1)
        else:
            draw.polygon(_polygon(o), fill=k + 1)
    return image


# --- questions ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QA:
    question: str  # without the suffix
    answer: str
    kind: str  # exist, exist_color, color, count, count_all, horizontal, vertical

    @property
    def text(self) -> str:
        """The prompt text as LLaVA's evaluation files give it (question, newline, short-answer suffix)."""
        return f"{self.question}\n{SHORT}"


def _name(s: Scene, o: Obj) -> str | None:
    """How to refer to ``o`` unambiguously: "shape" when unique, "colour shape" when that is unique, else None."""
    same_shape = [p for p in s.objects if p.shape == o.shape]
    if len(same_shape) == 1:
        return o.shape
    if sum(p.color == o.color for p in same_shape) == 1:
        return f"{o.color} {o.shape}"
    return None


def exist_question(s: Scene, rng, answer: str | None = None, adversarial: bool | None = None) -> QA:
    """POPE-style: "Is there a {shape} in the image?" (or "{colour} {shape}", the adversarial form whose negative is a
    present shape in a colour it does not have). ``answer`` "yes"/"no" (default: a coin flip)."""
    answer = answer or ("yes" if rng.random() < 0.5 else "no")
    present = {o.shape for o in s.objects}
    pairs = {(o.color, o.shape) for o in s.objects}
    if adversarial is None:
        adversarial = rng.random() < 0.5
    if answer == "yes":
        o = s.objects[rng.integers(len(s.objects))]
        obj = f"{o.color} {o.shape}" if adversarial else o.shape
    elif adversarial:
        options = [(c, sh) for sh in sorted(present) for c in COLORS if (c, sh) not in pairs]
        c, sh = options[rng.integers(len(options))]
        obj = f"{c} {sh}"
    else:
        absent = [sh for sh in SHAPES if sh not in present]
        if not absent:  # every shape is present: ask the colour form instead
            return exist_question(s, rng, "no", True)
        obj = absent[rng.integers(len(absent))]
    article = "an" if obj[0] in "aeiou" else "a"
    return QA(f"Is there {article} {obj} in the image?", answer, "exist_color" if " " in obj else "exist")


def other_questions(s: Scene) -> list[QA]:
    """Every colour / count / position question the scene answers unambiguously."""
    out = []
    for o in s.objects:
        if sum(p.shape == o.shape for p in s.objects) == 1:
            out.append(QA(f"What color is the {o.shape}?", o.color, "color"))
        name = _name(s, o)
        if name is None:
            continue
        dx, dy = o.cx / s.width - 0.5, o.cy / s.height - 0.5
        if abs(dx) > 0.1:
            out.append(QA(f"Is the {name} on the left or on the right?", "left" if dx < 0 else "right",
                          "horizontal"))
        if abs(dy) > 0.1:
            out.append(QA(f"Is the {name} at the top or at the bottom?", "top" if dy < 0 else "bottom",
                          "vertical"))
    for shape in sorted({o.shape for o in s.objects}):
        out.append(QA(f"How many {PLURALS[shape]} are there?", NUMBERS[sum(o.shape == shape for o in s.objects)],
                      "count"))
    out.append(QA("How many shapes are there?", NUMBERS[len(s.objects)], "count_all"))
    return out


def caption(s: Scene) -> QA:
    """"What objects are in the image?" answered with every object, left to right: "red star , blue circle"."""
    names = [f"{o.color} {o.shape}" for o in sorted(s.objects, key=lambda o: o.cx)]
    return QA("What objects are in the image?", " , ".join(names), "caption")


def questions(s: Scene, rng, k: int) -> list[QA]:
    """``k`` distinct questions for training (fewer when the scene has fewer): the caption question in half of the
    samples (at a random turn; LLaVA's own training data mixes captions and VQA), otherwise existence questions
    (half yes, half no) with probability 1/2, else one of the scene's other questions not asked yet."""
    others = other_questions(s)
    out, seen = [], set()
    if rng.random() < 0.5:
        out.append(caption(s))
        seen.add(out[0].question)
    for _ in range(4 * k):
        if len(out) == k:
            break
        if rng.random() < 0.5 or not others:
            qa = exist_question(s, rng)
        else:
            qa = others.pop(int(rng.integers(len(others))))
        if qa.question not in seen:
            seen.add(qa.question)
            out.append(qa)
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def vocabulary() -> list[str]:
    """Every word the generator and LLaVA's template can produce, lower-cased and split as the tokenizer splits
    them (letters/digits runs and punctuation runs), sorted."""
    texts = [PROMPT.format("").replace("<image>", " "), TURN.format(""), SHORT, "How many shapes are there? an",
             "What objects are in the image? ,"]
    for shape in SHAPES:
        for color in COLORS:
            texts += [f"Is there a {color} {shape} in the image?", f"What color is the {shape}?",
                      f"Is the {color} {shape} on the left or on the right?",
                      f"Is the {shape} at the top or at the bottom?", f"How many {PLURALS[shape]} are there?"]
    texts += ["yes no top bottom"] + list(NUMBERS)
    words = set()
    for t in texts:
        words.update(_split_words(t.lower()))
    return sorted(words)


def _split_words(text: str) -> list[str]:
    """The tokenizer's pre-tokenisation (tokenizers' ``Whitespace``: ``\\w+|[^\\w\\s]+``), for the vocabulary."""
    return re.findall(r"\w+|[^\w\s]+", text)
