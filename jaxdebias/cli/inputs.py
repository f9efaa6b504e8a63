"""What goes into the model: images (checked, letterboxed, normalised), LLaVA-1.5 prompts, tokenizers, the
embedded default model, a converted checkpoint, batches, and the checks that turn user input into a
``jd.PruneSpec`` / ``jd.Debias`` / ``VarSpec`` or a UserError.

Axes: B batch, T prompt tokens, N visual tokens of one image (``model.cfg.vision.num_features``; 576 = 24 x 24
for LLaVA-1.5, raster order).

    loaded = load_model(None)                       # or a converted checkpoint's directory
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
from jaxdebias.cli import anyres
from jaxdebias.convert.load import load
from jaxdebias.convert.source import ConversionError
from jaxdebias.models.generate import Batch
from jaxdebias.models.interventions import VarSpec
from jaxdebias.models.llava import Llava
from jaxdebias.models.llava_next import LlavaNext
from jaxdebias.toy import model as toy

UserError = jd.UserError
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROMPT = "USER: <image>\n{} ASSISTANT:"
DEBIAS_MODES = ("off", "pad", "curve", "pad+curve")


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
    """A model with what it needs around it: its tokenizer and image normalisation. ``embedded``: the toy default
    (``jaxdebias.toy``)."""

    model: Llava
    tokenizer: ByteTokenizer | HFTokenizer
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    embedded: bool = False

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

    def content_mask(self, size, tau: float = 0.5) -> np.ndarray:
        """bool[N], True = content: the patches of the letterboxed image that are not padding (size: the
        original (width, height)); LLaVA-NeXT: over the image's span (``anyres.content_mask``)."""
        if isinstance(self.model, LlavaNext):
            return anyres.content_mask(self.model, size, tau)
        return np.asarray(jd.pad_mask_expand2square(*size, grid=self.grid, canvas=self.model.cfg.vision.image_size,
                                                    tau=tau))

    def request(self, image, question: str) -> Request:
        if isinstance(self.model, LlavaNext):  # base view + tiles; letterboxed: the base view, for figures
            pixels, base, size, count = anyres.preprocess(image, self.model.cfg, self.image_mean, self.image_std)
            ids, instruction = build_prompt(self.tokenizer, question, count)
            return Request(ids, pixels, size, instruction, base)
        pixels, square, size = preprocess(image, self.image_mean, self.image_std, self.model.cfg.vision.image_size)
        ids, instruction = build_prompt(self.tokenizer, question, self.n_visual)
        return Request(ids, pixels, size, instruction, square)

    def request_row(self, row, image_dir) -> Request:
        """The request of a benchmark row (its image from ``image_dir`` or its encoded bytes)."""
        return self.request(load_image(*row_image(row, image_dir)), row["text"])

    def batch(self, requests: list[Request]) -> Batch:
        if isinstance(self.model, LlavaNext):
            return anyres.make_batch(self.model, requests, self.tokenizer.pad)
        return make_batch(requests, self.tokenizer.pad)

    def decode(self, tokens) -> str:
        """Generated tokens as text, stripped (as LLaVA's evaluation scripts strip their outputs)."""
        return self.tokenizer.decode(tokens).strip()


def default_model() -> LoadedModel:
    """The embedded default: the toy LLaVA-1.5 shipped inside the package (``jaxdebias.toy``; CLIP 336/14 -> 576
    visual tokens, a 24-layer decoder so every method's published layer indices apply), trained on generated
    scenes of shapes. It has learned the language of their questions but not yet to read the image (README, "The
    toy world")."""
    return dataclasses.replace(load_model(toy.default_path()), embedded=True)


def load_model(checkpoint: str | None) -> LoadedModel:
    """A converted checkpoint (``jaxdebias-convert``) with its tokenizer and image normalisation, or the embedded
    default when ``checkpoint`` is None."""
    if checkpoint is None:
        return default_model()
    try:
        model = load(checkpoint)
    except ConversionError as e:
        raise UserError(str(e)) from None
    mean, std = CLIP_MEAN, CLIP_STD
    processor = os.path.join(checkpoint, "preprocessor_config.json")
    if os.path.isfile(processor):
        with open(processor) as f:
            config = json.load(f)
        mean, std = tuple(config.get("image_mean", mean)), tuple(config.get("image_std", std))
    return LoadedModel(model, HFTokenizer(checkpoint, model.cfg.image_token_id), mean, std)


def resolve_model(model: LoadedModel | str | None) -> LoadedModel:
    """A ``LoadedModel`` as given, or loaded from a checkpoint path (None: the embedded default)."""
    return model if isinstance(model, LoadedModel) else load_model(model)


def parse_debias(mode: str, pad_tau: float | str = "released", curve: str | None = None,
                 task: str = "gqa") -> jd.Debias:
    """--debias off|pad|curve|pad+curve, with --pad-tau (a fraction or "released": each method's own) and --curve
    FILE (a ``jaxdebias calibrate`` output), "online" or "released" (the default: the method's released curve for
    ``task``)."""
    if mode not in DEBIAS_MODES:
        raise UserError(f"--debias must be {', '.join(DEBIAS_MODES[:-1])} or {DEBIAS_MODES[-1]}, got {mode!r}.")
    chosen = None
    if "curve" in mode:
        chosen = "released" if curve is None else curve
        if chosen not in ("released", "online"):
            chosen = read_curve(chosen)
    try:
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


def prune_spec(method: str, keep: int, debias: jd.Debias = jd.Debias()) -> jd.PruneSpec:
    """A ``jd.PruneSpec`` from command-line values (a bad method name or keep becomes a UserError), with keep
    buckets up to 3072."""
    try:
        return jd.PruneSpec(method, keep=keep, debias=debias, buckets=jd.DEFAULT_BUCKETS + LARGE_BUCKETS)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None


def check_spec(spec: jd.PruneSpec, model: Llava, n: int | None = None) -> jd.PruneSpec:
    """``spec`` checked against the model once, before anything runs: keep within the model's visual tokens
    (``n``; default: one image's), the method's layers within its decoder."""
    n = model.visual_capacity() if n is None else n
    if not 0 < spec.keep <= n:
        what = "one image" if n == model.cfg.vision.num_features else "one video (frames x (patches + CLS))"
        if isinstance(model, LlavaNext):
            what = ("every LLaVA-NeXT image: its base view + the tile grid of the smallest tile bucket, newlines "
                    "excluded, so that each image's span holds the budget")
        raise UserError(f"--keep must be in 1..{n} (the visual tokens of {what}), got {spec.keep}.")
    try:
        spec.plan(n, model.cfg.text.num_layers)
        spec.debias.curve_for(spec.method)  # a released curve must exist for this method and task
    except (ValueError, KeyError) as e:
        raise UserError(str(e).strip("'\"")) from None
    return spec


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
