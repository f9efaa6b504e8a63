"""Images and prompts of the toy world as model inputs: LLaVA-1.5 preprocessing, prompts, training batches.

Axes: B batch, T tokens, S image side (336), N visual tokens.

A training sample is one generated scene and several questions about it, each exactly the single-turn prompt
the CLI builds (``prompt_ids``, LLaVA-1.5's v1 template), packed behind one shared image prefix with a mask that
keeps the questions from seeing each other (``branched``, ``branch_mask``); the loss is on the answer words and
their ``</s>``. (A multi-turn conversation would let later answers be read off earlier ones: a model trained so
learns to ignore the image.) Batch ``step`` of a run is a pure function of (seed, step), so a resumed run sees the same
data in the same order.
"""

from __future__ import annotations

import dataclasses
import queue
import threading

import jax.numpy as jnp
import numpy as np

from jaxdebias.toy import scenes

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # openai/clip-vit-large-patch14-336's processor
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def letterbox(image, side: int, mean=CLIP_MEAN) -> np.ndarray:
    """LLaVA-1.5's ``expand2square`` (pad the short side with the mean colour, image centred) and the resize to
    ``side`` (bicubic). Returns uint8[S, S, 3]."""
    from PIL import Image

    w, h = image.size
    s = max(w, h)
    canvas = Image.new("RGB", (s, s), tuple(int(255 * m) for m in mean))
    canvas.paste(image, ((s - w) // 2, (s - h) // 2))
    return np.asarray(canvas.resize((side, side), Image.BICUBIC), np.uint8)


def normalize(square_u8, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """uint8[..., S, S, 3] -> float32[..., 3, S, S] (CLIP normalisation, channels first)."""
    x = (np.asarray(square_u8, np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.moveaxis(x, -1, -3)


def pixel_values(image, side: int) -> np.ndarray:
    """float32[3, S, S] for a PIL image, as LLaVA-1.5's processor with ``image_aspect_ratio="pad"``."""
    return normalize(letterbox(image, side))


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def prompt_ids(tok, question_text: str, n_image: int, image_id: int) -> tuple[np.ndarray, int]:
    """(int32[T] ids, position of the last instruction token) of the single-turn prompt
    ``<s>USER: <image>\\n{question_text} ASSISTANT:`` with the image placeholder expanded to ``n_image`` ids."""
    pre, post = scenes.PROMPT.format(question_text).split("<image>")
    head = [tok.bos_token_id] + _ids(tok, pre)
    question = _ids(tok, post.rsplit(" ASSISTANT:", 1)[0])
    ids = head + [image_id] * n_image + _ids(tok, post)
    return np.asarray(ids, np.int32), len(head) + n_image + len(question) - 1


@dataclasses.dataclass(frozen=True)
class DataConfig:
    side: int = 336  # image side after letterboxing
    n_image: int = 576  # visual tokens per image
    max_len: int = 768  # T: conversations are cut to whole turns that fit, then right-padded
    turns: int = 8  # questions per image (at most)

    @property
    def grid(self) -> int:
        """Patches per side of the square image (N = grid * grid)."""
        return int(round(self.n_image**0.5))


def branched(tok, qas, n_image: int, image_id: int, max_len: int):
    """One image's questions as independent single-turn prompts sharing the image prefix, packed in one row.

    The row is ``<s>USER: <image...>`` then, for each question, the rest of its single-turn prompt and its answer
    (``{question} ASSISTANT: {answer}</s>``); ``turns`` says which question a token belongs to (0: the shared
    prefix, j: question j, -1: padding) and a question's tokens see only the prefix and themselves
    (``branch_mask``), at the positions they would have alone. So each question is trained exactly as the
    single-turn prompt the CLI builds, without seeing the other answers, and the image is encoded once for all.

    Returns (ids int32[T], targets int32[T], weights float32[T] (1 on answer words and their ``</s>``),
    positions int32[T], turns int32[T], questions used)."""
    first = list(prompt_ids(tok, qas[0].text, n_image, image_id)[0])
    cut = first.index(image_id) + n_image
    ids, turns, positions, answer = first[:cut], [0] * cut, list(range(cut)), [False] * cut
    used = 0
    for j, qa in enumerate(qas):
        rest = list(prompt_ids(tok, qa.text, n_image, image_id)[0])[cut:]
        reply = _ids(tok, qa.answer) + [tok.eos_token_id]
        if len(ids) + len(rest) + len(reply) > max_len:
            if j == 0:
                raise ValueError(f"max_len {max_len} is shorter than one question ({cut + len(rest) + len(reply)} "
                                 "tokens).")
            break
        ids += rest + reply
        turns += [j + 1] * (len(rest) + len(reply))
        positions += list(range(cut, cut + len(rest) + len(reply)))
        answer += [False] * len(rest) + [True] * len(reply)
        used = j + 1
    T = len(ids)
    out = np.full((4, max_len), [[tok.pad_token_id], [tok.pad_token_id], [0], [-1]], np.int32)
    out[0, :T], out[2, :T], out[3, :T] = ids, positions, turns
    out[1, :T - 1] = ids[1:]
    weights = np.zeros(max_len, np.float32)
    weights[:T - 1] = answer[1:]
    # a token's target is the next token of its own question: never the first token of the next question
    same = np.zeros(max_len, bool)
    same[:T - 1] = out[3, 1:T] == out[3, :T - 1]
    weights *= same
    return out[0], out[1], weights, out[2], out[3], used


def branch_mask(turns):
    """bool[B, T, T] for turns int[B, T] (``branched``): causal, real keys only, and a question's tokens see the
    shared prefix (turn 0) and their own question; the diagonal is always on."""
    turns = jnp.asarray(turns)
    T = turns.shape[-1]
    causal = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
    q, k = turns[:, :, None], turns[:, None, :]
    visible = (k >= 0) & ((k == 0) | (k == q))
    return (causal[None] & visible) | jnp.eye(T, dtype=bool)[None]


def sample(tok, cfg: DataConfig, image_id: int, seed: int, split: str, index: int):
    """One training sample of ``split`` (a pure function of its arguments): (uint8[S, S, 3] letterboxed image,
    ids, targets, weights, positions, turns) of its ``branched`` questions, then the word ids that name each patch
    (``patch_words``) and the row positions of the N image tokens."""
    rng = scenes.stream(seed, split, index)
    s = scenes.scene(rng)
    qas = scenes.questions(s, rng, cfg.turns)
    row = branched(tok, qas, cfg.n_image, image_id, cfg.max_len)[:5]
    return (letterbox(scenes.render(s), cfg.side), *row, patch_words(tok, s, cfg), np.flatnonzero(row[0] == image_id))


def batch(tok, cfg: DataConfig, image_id: int, seed: int, step: int, size: int) -> dict:
    """Training batch ``step``: samples ``step * size ... step * size + size - 1`` of the train split.

    Returns numpy arrays: input_ids int32[B, T], attention_mask bool[B, T], targets int32[B, T],
    weights float32[B, T], positions int32[B, T], turns int32[B, T] (``branched``), pixel_values
    float32[B, 3, S, S], patch_words int32[B, 2, N] (``patch_words``) and image_positions int32[B, N]."""
    items = [sample(tok, cfg, image_id, seed, "train", step * size + b) for b in range(size)]
    col = lambda k: np.stack([it[k] for it in items])  # noqa: E731
    return {"input_ids": col(1), "attention_mask": col(5) >= 0, "targets": col(2), "weights": col(3),
            "positions": col(4), "turns": col(5), "pixel_values": normalize(col(0)), "patch_words": col(6),
            "image_positions": col(7).astype(np.int32)}


def patch_labels(s: scenes.Scene, side: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """(colour int32[N], shape int32[N]) class of the object under each patch centre of the letterboxed image
    (0: background or padding; else 1 + index in ``scenes.COLORS`` / ``scenes.SHAPES``)."""
    from PIL import Image

    labels = scenes.label_map(s)
    big = max(s.width, s.height)
    canvas = Image.new("L", (big, big), 0)
    canvas.paste(labels, ((big - s.width) // 2, (big - s.height) // 2))
    idx = np.asarray(canvas.resize((side, side), Image.NEAREST), np.int32)
    half = side // grid // 2
    idx = idx[half::side // grid, half::side // grid][:grid, :grid].reshape(-1)
    colors = np.asarray([0] + [1 + list(scenes.COLORS).index(o.color) for o in s.objects], np.int32)
    shapes = np.asarray([0] + [1 + scenes.SHAPES.index(o.shape) for o in s.objects], np.int32)
    return colors[idx], shapes[idx]


def patch_words(tok, s: scenes.Scene, cfg: DataConfig) -> np.ndarray:
    """int32[2, N]: the token ids of the colour word and the shape word of the object under each patch centre
    (``patch_labels``), -1 on background and padding patches."""
    colors, shapes = patch_labels(s, cfg.side, cfg.grid)
    words = lambda names: np.asarray([-1] + [_ids(tok, w)[0] for w in names], np.int32)  # noqa: E731
    return np.stack([words(list(scenes.COLORS))[colors], words(scenes.SHAPES)[shapes]])


def presence(s: scenes.Scene) -> np.ndarray:
    """float32[5 + 30]: 1 where the scene holds a shape (``scenes.SHAPES`` order), then a (colour, shape) pair
    (colour-major over ``scenes.COLORS`` x ``scenes.SHAPES``)."""
    out = np.zeros(len(scenes.SHAPES) * (1 + len(scenes.COLORS)), np.float32)
    for o in s.objects:
        k = scenes.SHAPES.index(o.shape)
        out[k] = 1.0
        out[len(scenes.SHAPES) * (1 + list(scenes.COLORS).index(o.color)) + k] = 1.0
    return out


def vision_batch(cfg: DataConfig, seed: int, step: int, size: int) -> dict:
    """Batch ``step`` of the vision tower's pretraining: pixel_values float32[B, 3, S, S], colour and shape
    classes int32[B, N] of every patch, and what the image holds, float32[B, 35] (``presence``)."""
    images, colors, shapes, present = [], [], [], []
    for b in range(size):
        s = scenes.scene(scenes.stream(seed, "vision", step * size + b))
        images.append(letterbox(scenes.render(s), cfg.side))
        c, sh = patch_labels(s, cfg.side, cfg.grid)
        colors.append(c)
        shapes.append(sh)
        present.append(presence(s))
    return {"pixel_values": normalize(np.stack(images)), "colors": np.stack(colors), "shapes": np.stack(shapes),
            "present": np.stack(present)}


def described(tok, s: scenes.Scene) -> list[int]:
    """The scene in words, the text stage's stand-in for its image: every object left to right as "{colour}
    {shape} {left|right} {top|bottom}" (the side of the image its centre is in), comma-separated."""
    words = [f"{o.color} {o.shape} {'left' if o.cx < s.width / 2 else 'right'} "
             f"{'top' if o.cy < s.height / 2 else 'bottom'}" for o in sorted(s.objects, key=lambda o: o.cx)]
    return _ids(tok, " , ".join(words))


def text_batch(tok, cfg: DataConfig, image_id: int, seed: int, step: int, size: int) -> dict:
    """Batch ``step`` of the decoder's language stage: the same single-turn questions as the LLaVA stage
    (``branched``, the loss on the answers), about a scene described in words (``described``) where the image
    would be. A stand-in for the LLM's pretraining: the decoder learns to answer a question from a context before
    it ever sees an image. Rows are ``max_len - n_image + 64`` tokens; the keys of ``batch`` minus the pixels and
    the patches."""
    rows, length = [], cfg.max_len - cfg.n_image + 64
    for b in range(size):
        rng = scenes.stream(seed, "text", step * size + b)
        s = scenes.scene(rng)
        context = described(tok, s)
        ids, tg, w, pos, turns, _ = branched(tok, scenes.questions(s, rng, cfg.turns), len(context), image_id,
                                             length)
        at = np.flatnonzero(ids == image_id)
        ids[at] = context
        tg[at - 1] = context
        rows.append((ids, tg, w, pos, turns))
    col = lambda k: np.stack([r[k] for r in rows])  # noqa: E731
    return {"input_ids": col(0), "attention_mask": col(4) >= 0, "targets": col(1), "weights": col(2),
            "positions": col(3), "turns": col(4)}


class Prefetch:
    """Builds batches ``start, start + 1, ...`` in a background thread (``depth`` ahead); ``next()`` returns
    (step, batch) in order."""

    def __init__(self, make, start: int, stop: int, depth: int = 2):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()

        def work():
            for step in range(start, stop):
                if self._stop.is_set():
                    return
                item = (step, make(step))
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue

        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()

    def next(self):
        return self._q.get()

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
