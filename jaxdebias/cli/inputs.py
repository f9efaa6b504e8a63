"""What goes into the model: images (checked, letterboxed, normalised), LLaVA-1.5 prompts, tokenizers, the
embedded default model, a converted checkpoint, batches, and the checks that turn user input into a
``jd.PruneSpec`` / ``jd.Debias`` / ``VarSpec`` or a UserError.

Axes: B batch, T prompt tokens, N visual tokens of one image (``model.cfg.vision.num_features``; 576 = 24 x 24
for LLaVA-1.5, raster order).

    loaded = families.load_model(None)              # or a converted checkpoint's directory
    request = loaded.request(load_image(default_image_path()), "What is in the picture?")
    result = generate(loaded.model, loaded.batch([request]), prune=jd.PruneSpec("fastv", keep=64))
    loaded.decode(result.tokens[0])
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from importlib import resources

import numpy as np
from PIL import Image, UnidentifiedImageError

import jaxdebias as jd
from jaxdebias.models.generate import Batch
from jaxdebias.models.interventions import VarSpec
from jaxdebias.models.llava import Llava

UserError = jd.UserError
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROMPT = "USER: <image>\n{} ASSISTANT:"
DEBIAS_MODES = ("off", "pad", "curve", "pad+curve") + jd.PRESETS  # the last three: jd.Debias.preset


def default_image_path() -> str:
    """An image shipped with the package: a toy-world scene (``jaxdebias.toy.scenes``, split "test", index 2) of
    618 x 348, letterboxed, so padding suppression has work to do."""
    return str(resources.files("jaxdebias") / "assets" / "default.png")


def _open(path, data: bytes | None):
    if data is None and not os.path.isfile(path):
        raise UserError(f"Image {path} does not exist.")
    return Image.open(path if data is None else io.BytesIO(data))


def load_image(path, data: bytes | None = None) -> Image.Image:
    """An RGB PIL image from a file (or from encoded ``data``, ``path`` naming it), or UserError saying what is
    wrong with it."""
    try:
        with _open(path, data) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"Image {path} cannot be read ({e.__class__.__name__}: {e}).") from None


def check_image(path, data: bytes | None = None) -> None:
    """Decodes the whole image (a truncated file fails here, not mid-run); JPEGs cheaply, at 1/8 scale."""
    try:
        with _open(path, data) as image:
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"Image {path} cannot be read ({e.__class__.__name__}: {e}).") from None


def row_image(row: dict, image_dir: str) -> tuple[str, bytes | None]:
    """(a name for the image of a benchmark row, its encoded bytes or None when it is a file)."""
    if "image_b64" in row:
        return f"of question {row['question_id']}", row["image_b64"]
    return os.path.join(image_dir, row["image"]), None


def check_rows(rows, image_dir) -> None:
    """Every row's image exists and decodes: run before the first answer, so a bad file stops the run before
    anything is written (each distinct file is decoded once)."""
    seen = set()
    for row in rows:
        name, data = row_image(row, image_dir)
        if data is None:
            if name in seen:
                continue
            seen.add(name)
            if not os.path.isfile(name):
                raise UserError(f"Image {row['image']} of question {row['question_id']} is missing from {image_dir}.")
        check_image(name, data)


def preprocess(image, mean=CLIP_MEAN, std=CLIP_STD, side: int = 336):
    """LLaVA-1.5 preprocessing: expand2square with the mean colour, resize to ``side``, normalise.

    Returns (pixel_values float32[3, side, side], the letterboxed PIL image, (width, height))."""
    width, height = image.size
    square_side = max(width, height)
    canvas = Image.new("RGB", (square_side, square_side), tuple(int(255 * m) for m in mean))
    canvas.paste(image, ((square_side - width) // 2, (square_side - height) // 2))  # as expand2square
    square = canvas.resize((side, side), Image.BICUBIC)
    pixels = (np.asarray(square, np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return pixels.transpose(2, 0, 1), square, (width, height)


class ByteTokenizer:
    """A byte-level tokenizer for in-memory test models: 0 pad, 1 bos, 2 eos, bytes at 3..258, 259 the image token."""

    pad, bos, eos, image = 0, 1, 2, 259
    vocab = 260

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return ([self.bos] if bos else []) + [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if 3 <= int(i) < 259).decode("utf-8", errors="replace")


class HFTokenizer:
    """A checkpoint's own tokenizer (copied beside the weights by the converter)."""

    def __init__(self, path, image_token_id: int):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.image, self.eos = image_token_id, self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id or 0

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=bos).input_ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def build_prompt(tokenizer, question: str, n_image: int):
    """(input_ids int[T], instruction position): LLaVA-1.5's conversation template with the image expanded to
    ``n_image`` placeholders; the instruction position is the question's last token (PyramidDrop's query)."""
    before, after = PROMPT.format(question).split("<image>")
    question_part = tokenizer.encode(after.rsplit(" ASSISTANT:", 1)[0])
    prefix = tokenizer.encode(before, bos=True)
    ids = prefix + [tokenizer.image] * n_image + tokenizer.encode(after)
    return np.asarray(ids, np.int32), len(prefix) + n_image + len(question_part) - 1


@dataclasses.dataclass
class Request:
    """One prompt + image, ready to batch. size: the original (width, height); letterboxed: the square image
    the model sees (for figures)."""

    input_ids: np.ndarray
    pixel_values: np.ndarray
    size: tuple[int, int]
    instruction_pos: int
    letterboxed: Image.Image | None = None


def make_batch(requests: list[Request], pad_id: int) -> Batch:
    """Right-pads requests into a ``Batch`` (image_sizes as (width, height))."""
    length = max(len(r.input_ids) for r in requests)
    input_ids = np.full((len(requests), length), pad_id, np.int32)
    attention_mask = np.zeros((len(requests), length), bool)
    for b, r in enumerate(requests):
        input_ids[b, :len(r.input_ids)] = r.input_ids
        attention_mask[b, :len(r.input_ids)] = True
    return Batch(input_ids, np.stack([r.pixel_values for r in requests]), attention_mask,
                 image_sizes=np.asarray([r.size for r in requests], np.int32),
                 instruction_pos=np.asarray([r.instruction_pos for r in requests], np.int32))


@dataclasses.dataclass
class LoadedModel:
    """A model with what it needs around it - its tokenizer and image normalisation - and its family's input
    processing: how a picture becomes a request and a batch, which patches are content, what ``--keep`` may be,
    how its positional trend is calibrated. This class is LLaVA-1.5's (letterboxed 336 px images); LLaVA-NeXT's
    (``anyres.NextLoadedModel``) and Video-LLaVA's (``video.VideoLoadedModel``) override it, and
    ``families.load_model`` picks the class by the checkpoint's ``model_type``, so that the commands ask the loaded
    model instead of checking its class. ``embedded``: the toy default (``jaxdebias.toy``)."""

    model: Llava
    tokenizer: ByteTokenizer | HFTokenizer
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    embedded: bool = False
    identity: dict = dataclasses.field(default_factory=dict)  # the checkpoint's, for run records

    media = "image"  # what a request holds: "image" or "video"
    placeholder = "image_token_id"  # the config field of the prompt's placeholder (the tokenizer's image token)
    view_curves = False  # calibration fits one curve per view (LLaVA-NeXT) instead of one over the span

    @property
    def n_visual(self) -> int:
        """N, the most visual tokens of one image (576 for LLaVA-1.5; base view + largest tile grid for NeXT)."""
        return self.model.visual_capacity()

    @property
    def grid(self) -> int:
        """The side of the square patch grid (24 for LLaVA-1.5)."""
        side = math.isqrt(self.n_visual)
        if side * side != self.n_visual:
            raise UserError(f"The model's {self.n_visual} visual tokens are not a square grid; the padding masks "
                            "and figures need one.")
        return side

    @property
    def keep_scope(self) -> str:
        """What ``--keep`` counts against, for the message when it is out of range."""
        return "one image"

    @property
    def calibration_keep(self) -> int:
        """The budget a calibration prunes with (only the first stage's scores are wanted): everything."""
        return self.n_visual

    @property
    def trend_length(self) -> int:
        """The positions one sample of the positional trend spans (a calibration's curve length)."""
        return self.n_visual

    def trend_record(self) -> dict:
        """What a calibration file records about the trend's layout beyond the curve."""
        return {}

    def check(self, spec: jd.PruneSpec) -> jd.PruneSpec:
        """``spec`` checked against the model once, before anything runs: keep within the visual tokens of one
        input, the method's layers within the decoder, its released curve present. Returns ``spec``."""
        n = self.n_visual
        if not 0 < spec.keep <= n:
            raise UserError(f"--keep must be in 1..{n} (the visual tokens of {self.keep_scope}), got {spec.keep}.")
        try:
            spec.plan(n, self.model.cfg.text.num_layers)
            spec.debias.curve_for(spec.method)  # a released curve must exist for this method and task
        except (ValueError, KeyError) as e:
            raise UserError(str(e).strip("'\"")) from None
        return spec

    def content_mask(self, size, tau: float = 0.5) -> np.ndarray:
        """bool[N], True = content: the patches of the letterboxed image that are not padding (size: the
        original (width, height))."""
        return np.asarray(jd.pad_mask_expand2square(*size, grid=self.grid, canvas=self.model.cfg.vision.image_size,
                                                    tau=tau))

    def request(self, image, question: str) -> Request:
        pixels, square, size = preprocess(image, self.image_mean, self.image_std, self.model.cfg.vision.image_size)
        ids, instruction = build_prompt(self.tokenizer, question, self.n_visual)
        return Request(ids, pixels, size, instruction, square)

    def request_row(self, row, image_dir) -> Request:
        """The request of a benchmark row (its image from ``image_dir`` or its encoded bytes)."""
        return self.request(load_image(*row_image(row, image_dir)), row["text"])

    def batch(self, requests: list[Request]) -> Batch:
        return make_batch(requests, self.tokenizer.pad)

    def decode(self, tokens) -> str:
        """Generated tokens as text, stripped (as LLaVA's evaluation scripts strip their outputs)."""
        return self.tokenizer.decode(tokens).strip()


def parse_debias(mode: str, pad_tau: float | str = "released", curve: str | None = None,
                 task: str = "gqa", method: str = "fastv") -> jd.Debias:
    """--debias off|pad|curve|pad+curve, with --pad-tau (a fraction or "released": each method's own) and --curve
    FILE (a ``jaxdebias calibrate`` output), "online" or "released" (the default: the method's released curve for
    ``task``); or one of the debias code's settings for ``method`` (``jd.Debias.preset``): paper, before, after
    (--curve replaces the released curve of "after"; --pad-tau does not apply)."""
    if mode not in DEBIAS_MODES:
        raise UserError(f"--debias must be {', '.join(DEBIAS_MODES[:-1])} or {DEBIAS_MODES[-1]}, got {mode!r}.")
    chosen = None
    if "curve" in mode or (mode == "after" and curve is not None):
        chosen = "released" if curve is None else curve
        if chosen not in ("released", "online"):
            chosen = read_curve(chosen)
    try:
        if mode in jd.PRESETS:
            preset = jd.Debias.preset(mode, method, task)
            return preset if chosen is None else dataclasses.replace(preset, curve=chosen)
        return jd.Debias(curve=chosen, pad_tau=pad_tau if "pad" in mode else None, task=task)
    except ValueError as e:
        raise UserError(str(e)) from None


def read_curve(path: str):
    """The curve in a file written by ``jaxdebias calibrate``."""
    if not os.path.isfile(path):
        raise UserError(f"Curve file {path} does not exist (write one with jaxdebias calibrate).")
    with open(path) as f:
        try:
            return jd.curve_from_dict(json.load(f)["curve"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path} is not a curve file written by jaxdebias calibrate ({e}).") from None


# keep buckets past LLaVA-1.5's 576 (a video's 2056, LLaVA-NeXT's 2880 tokens): a large budget is rounded up to the
# next of these, not to the whole span (a bucket only shapes the program; the kept count is the one asked for)
LARGE_BUCKETS = (640, 768, 896, 1024, 1280, 1536, 1792, 2048, 2560, 3072)


def prune_spec(method: str, keep: int, debias: jd.Debias = jd.Debias(), decode: str = "released") -> jd.PruneSpec:
    """A ``jd.PruneSpec`` from command-line values (a bad method name or keep becomes a UserError), with keep
    buckets up to 3072 and, by default, each method's released decoding (``--decode``)."""
    try:
        return jd.PruneSpec(method, keep=keep, debias=debias, buckets=jd.DEFAULT_BUCKETS + LARGE_BUCKETS,
                            decode=decode)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None


def var_spec(dims: str | None, *, p: float = 0.6, tau: float = 20.0, rho: float = 0.5,
             layers: str = "released") -> VarSpec:
    """A VAR spec from command-line values. ``dims``: "1415,2533", a model name with published sink dims
    ("llava-1.5-7b"), or "discover"; ``layers``: "released", "intended" or "2,3,4"."""
    if dims is None:
        raise UserError("--var needs the model's sink dimensions: --var-dims 1415,2533, a model name "
                        f"({', '.join(jd.KNOWN_SINK_DIMS)}) or 'discover'.")
    try:
        if dims != "discover":
            dims = tuple(int(d) for d in dims.split(",")) if dims[0].isdigit() else jd.known_sink_dims(dims)
        chosen = layers if layers in ("released", "intended") else tuple(int(x) for x in layers.split(","))
        return VarSpec(sink_dims=dims, p=p, tau=tau, rho=rho, layers=chosen)
    except (ValueError, KeyError) as e:
        raise UserError(str(e)) from None
