"""What goes into the model: LLaVA-1.5 prompts, tokenizers, batches, ``LoadedModel`` (a model with its family's
input processing), and the checks of a prompt and a VAR spec against the model. Images are
``jaxdebias.cli.images``; command-line values into specs are ``jaxdebias.cli.specs``.

Axes: B batch, T prompt tokens, N visual tokens of one image (``model.cfg.vision.num_features``; 576 = 24 x 24
for LLaVA-1.5, raster order).

    loaded = families.load_model(None)              # or a converted checkpoint's directory
    request = loaded.request(load_image(default_image_path()), "What is in the picture?")
    result = generate(loaded.model, loaded.batch([request]), prune=jd.PruneSpec("fastv", keep=64))
    loaded.decode(result.tokens[0])
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
from PIL import Image

import jaxdebias as jd
from jaxdebias.cli.images import CLIP_MEAN, CLIP_STD, load_image, preprocess, row_image
from jaxdebias.models.generate import Batch
from jaxdebias.models.interventions import VarSpec
from jaxdebias.models.llava import Llava

UserError = jd.UserError
PROMPT = "USER: <image>\n{} ASSISTANT:"


def check_prompt_length(loaded: LoadedModel, question: str, max_new_tokens: int, what: str = "--prompt") -> None:
    """The prompt of ``question`` (the template and the model's most visual tokens around it) and ``max_new_tokens``
    answer tokens fit in the decoder's positions (``max_position_embeddings``), or UserError naming ``what``:
    past them a model answers from positions it never saw. Run before the first answer."""
    limit = loaded.model.cfg.text.max_position_embeddings
    length = len(build_prompt(loaded.tokenizer, question, loaded.n_visual)[0])
    if length + max_new_tokens > limit:
        raise UserError(f"The prompt of {what} is {length} tokens ({loaded.n_visual} of them visual) and up to "
                        f"{max_new_tokens} more are generated, past the model's {limit} positions "
                        "(max_position_embeddings). Shorten the question or lower --max-new-tokens.")


def check_var(var: VarSpec | None, loaded: LoadedModel) -> None:
    """VAR's sink dims and layers against the model, before anything runs: a dim past the decoder's width would
    be clamped silently to its last one inside jit."""
    if var is None:
        return
    text = loaded.model.cfg.text
    if var.sink_dims != "discover":
        bad = [d for d in var.sink_dims if not 0 <= d < text.hidden_size]
        if bad:
            raise UserError(f"--var-dims {', '.join(map(str, bad))}: the model's hidden size is {text.hidden_size}, so "
                            f"sink dims are 0..{text.hidden_size - 1}. Pass this model's sink dims or 'discover'.")
    try:
        var.layer_set(text.num_layers)
    except ValueError as e:
        raise UserError(f"--var-layers: {e}") from None


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

    media = "image"  # what a request holds: "image" or "video" (LLaVA-OneVision: either, "image" by default)
    video_frames = 0  # the frames a video is sampled to; 0: the model answers no videos
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

    def trend_samples(self, request: Request, scores: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
        """One input's first-stage scores (float[N]) as samples of the positional trend a calibration fits:
        (scores float[S, L], content bool[S, L]), L = ``trend_length`` (Video-LLaVA per frame: S = frames)."""
        n = self.trend_length
        return np.asarray(scores).reshape(-1, n), self.content_mask(request.size, tau).reshape(-1, n)

    def check_media(self, spec: jd.PruneSpec, videos: bool) -> None:
        """``spec`` against the kind of input it runs on (``videos``: videos, else images), once ``check`` passed;
        UserError if they do not go together. Nothing beyond ``check`` here."""

    def video_request(self, frames, question: str) -> Request:
        """The request of a video (its ``video_frames`` frames, PIL) on a model that answers videos."""
        raise UserError(f"{type(self.model).__name__} answers images, not videos: --video needs a Video-LLaVA or "
                        "LLaVA-OneVision checkpoint. Ask about an image with --image.")

    def frame_patches(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(patches int[F, P], cls int[F] or None): where each frame's patch tokens (raster order) and its CLS
        token (None: frames have none) sit in a video's span of ``n`` slots. Models that answer videos only."""
        raise UserError(f"{type(self.model).__name__} answers images, not videos.")

    def check(self, spec: jd.PruneSpec) -> jd.PruneSpec:
        """``spec`` checked against the model once, before anything runs: keep within the visual tokens of one
        input, the method's layers within the decoder, its released curve present. Returns ``spec``."""
        n = self.n_visual
        if not 0 < spec.keep <= n:
            raise UserError(f"--keep must be in 1..{n} (the visual tokens of {self.keep_scope}), got {spec.keep}.")
        try:
            spec.plan(n, self.model.cfg.text.num_layers, self.model.option_family())  # its release's defaults
            for m in self.span_sizes:  # every span a batch may have (a budget that fits one may not fit all)
                try:
                    spec.plan(m, self.model.cfg.text.num_layers, self.model.option_family())
                except ValueError as e:
                    raise ValueError(f"{str(e).rstrip('.')} (on a span of {m} slots, as images of its tile bucket "
                                     "are laid out).") from None
            spec.debias.curve_for(spec.method)  # a released curve must exist for this method and task
        except (ValueError, KeyError) as e:
            raise UserError(str(e).strip("'\"")) from None
        curve = spec.debias.curve
        if isinstance(curve, tuple) and curve and curve[0] == "views" and not self.view_curves:
            raise UserError("This curve has one part per view (form 'views': calibrated on LLaVA-NeXT's base view "
                            f"and tiles); {type(self.model).__name__} has one view. Calibrate a curve on this model "
                            "(jaxdebias calibrate) or use --curve online.")
        if spec.debias.curve == "released" and not self.released_curves_fit:
            warnings.warn(f"the released {spec.method} curve was fitted on LLaVA-1.5-7B; this model's positional "
                          "trend is its own - fit one with `jaxdebias calibrate` and pass --curve curve.json "
                          "(or --curve online).", stacklevel=2)
        return spec

    @property
    def span_sizes(self) -> tuple[int, ...]:
        """The visual span lengths a batch may have beyond ``n_visual`` (LLaVA-NeXT's tile buckets); none here."""
        return ()

    @property
    def released_curves_fit(self) -> bool:
        """Whether the published curves describe this model: LLaVA-1.5-7B's shape (they were fitted on it)."""
        text = self.model.cfg.text
        return (self.model.model_type == "llava" and not self.embedded
                and (text.hidden_size, text.num_layers, self.model.cfg.vision.num_features) == (4096, 32, 576))

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
