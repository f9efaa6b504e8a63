"""LLaVA-OneVision on the command line: images (base view + anyres_max_9 tiles) and videos, in the llava-hf chat
template, batched into ``OnevisionVisual`` spans padded to their tile bucket.

Axes: V views of an image (the base view, then the tiles row by row), F frames of a video, S the tower's side (384),
G the patch grid of one view (27), N visual slots of a span (an image's tile bucket; a video's F x ceil(G/2)^2 + 1).

Preprocessing equals transformers' ``LlavaOnevisionImageProcessor`` (its PIL backend, the one picked without
torchvision): the base view is the image squashed to S x S (bicubic); the tiles are the image resized into its best
pinpoint resolution keeping its aspect ratio (the scaled side rounded up), centred on black and cut into S x S tiles
(``anyres.preprocess``, as LLaVA-NeXT's processor does); every view is rescaled by 1/255 and normalised with the
checkpoint's mean and std (0.5 / 0.5 for llava-hf OneVision). Video frames equal ``LlavaOnevisionVideoProcessor``
(torchvision-backed): each RGB uint8 frame squashed to S x S with torch's CPU uint8 antialiased bicubic, reproduced
bit for bit in NumPy (``resample.resize_bicubic_aa``), then normalised in float32 as (x - 255 mean) / (255 std).

The prompt is the llava-hf OneVision chat template for one user turn and the generation prompt,
``<|im_start|>user <image>\\n{question}<|im_end|><|im_start|>assistant\\n`` (``<video>`` for a video), with the
placeholder expanded to the input's real token count, as the processor expands it; ``make_batch`` pads each image
span to its batch's tile bucket with masked placeholders (``llava_onevision.expand_prompt``).

    loaded = families.load_model("out/llava-onevision-0.5b")
    request = loaded.request(load_image("photo.jpg"), "What is in the picture?")
    result = generate(loaded.model, loaded.batch([request]), prune=jd.PruneSpec("fastv", keep=256,
                      debias=jd.Debias(curve="online", pad_tau=0.5)))
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

import jaxdebias as jd
from jaxdebias.cli import anyres
from jaxdebias.cli.images import load_image, row_image
from jaxdebias.cli.inputs import Request
from jaxdebias.cli.resample import resize_bicubic_aa
from jaxdebias.eval import video as video_eval
from jaxdebias.models.generate import Batch
from jaxdebias.models.llava_next import EMPTY
from jaxdebias.models.llava_onevision import LlavaOnevision, LlavaOnevisionConfig, expand_prompt, image_layout

UserError = jd.UserError
# transformers' llava-hf OneVision chat template, one user turn + the generation prompt: the placeholder, then text
BEFORE, AFTER = "<|im_start|>user ", "<|im_end|><|im_start|>assistant\n"
CLS_METHODS = ("visionzip",)  # encoder stages that read the CLS token's attention (SigLIP has no CLS token)


def build_prompt(tokenizer, question: str, n_visual: int, token: int):
    """(input_ids int[T], instruction position): the llava-hf OneVision template with the placeholder ``token`` (the
    image or the video token) expanded to ``n_visual`` ids; the instruction position is the question's last token
    (PyramidDrop's query). The parts are tokenized apart, as the tokenizer splits the text at its special tokens."""
    prefix, question_part = tokenizer.encode(BEFORE), tokenizer.encode("\n" + question)
    ids = prefix + [token] * n_visual + question_part + tokenizer.encode(AFTER)
    return np.asarray(ids, np.int32), len(prefix) + n_visual + len(question_part) - 1


def bucket_of(cfg: LlavaOnevisionConfig, width: int, height: int) -> int:
    """The tile-count bucket of a (width, height) image: its best pinpoint's tile count."""
    th, tw = jd.pad_mask_anyres(width, height, grid_pinpoints=[list(p) for p in cfg.grid_pinpoints],
                                tile=cfg.vision.image_size, grid=cfg.vision.grid).best_resolution
    return (th // cfg.vision.image_size) * (tw // cfg.vision.image_size)


def image_token_count(cfg: LlavaOnevisionConfig, width: int, height: int) -> int:
    """The tokens a (width, height) image really has (transformers' placeholder count): base view + the unpadded,
    anyres_max-downscaled tile grid with one newline per row."""
    source = image_layout(cfg, width, height, cfg.slots(bucket_of(cfg, width, height)), 0.5)[0]
    return int(np.sum(source[:, 0] != EMPTY))


def preprocess_frames(frames, mean, std, side: int):
    """Frames (PIL) -> (float32[F, 3, side, side], the resized frames as PIL images, for figures), as
    ``LlavaOnevisionVideoProcessor`` computes them: each RGB uint8 frame squashed to side x side by torch's uint8
    antialiased bicubic (``resample.resize_bicubic_aa``), then rescaled and normalised in one float32 step with the
    rescale fused into mean and std (transformers' ``TorchvisionBackend.rescale_and_normalize``)."""
    scale = np.float32(1.0 / (1 / 255))  # 1 / rescale_factor, multiplied into mean and std in float32
    m255 = np.asarray(mean, np.float32) * scale
    s255 = np.asarray(std, np.float32) * scale
    resized = np.stack([resize_bicubic_aa(np.asarray(f.convert("RGB")), (side, side)) for f in frames])
    pixels = (resized.astype(np.float32) - m255) / s255
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)), [Image.fromarray(f) for f in resized]


@dataclasses.dataclass
class OnevisionRequest(Request):
    """A ``Request`` that says whether it holds a video (pixel_values float32[F, 3, S, S], size (S, S)) or an image
    (pixel_values float32[V, 3, S, S], base view + tiles; size the original (width, height))."""

    video: bool = False


def make_batch(model: LlavaOnevision, requests: list[OnevisionRequest], pad_id: int) -> Batch:
    """Right-padded requests into a ``Batch``: images share one tile bucket (their spans padded to it, as
    ``anyres.make_batch`` does), videos share one frame count; one kind per batch. image_sizes (width, height)."""
    kinds = {bool(r.video) for r in requests}
    if len(kinds) > 1:
        raise UserError("A batch mixes images and videos; LLaVA-OneVision runs one kind per batch. Put image and "
                        "video questions in separate benchmark folders.")
    if not kinds.pop():
        return anyres.make_batch(model, requests, pad_id)
    frames = {len(r.pixel_values) for r in requests}
    if len(frames) > 1:
        raise UserError(f"The videos of one batch have {sorted(frames)} frames; they must have the same count.")
    visual = model.videos(np.stack([r.pixel_values for r in requests]))
    length = max(len(r.input_ids) for r in requests)
    ids = np.full((len(requests), length), pad_id, np.int32)
    am = np.zeros((len(requests), length), np.int32)
    for b, r in enumerate(requests):
        ids[b, :len(r.input_ids)], am[b, :len(r.input_ids)] = r.input_ids, 1
    ids, am = expand_prompt(ids, am, visual, model.cfg, pad_id)  # a video's span has no padded slots
    return Batch(ids, visual, am.astype(bool), image_sizes=np.asarray([r.size for r in requests], np.int32),
                 instruction_pos=np.asarray([r.instruction_pos for r in requests], np.int32))


@dataclasses.dataclass
class OnevisionLoadedModel(anyres.NextLoadedModel):
    """A LLaVA-OneVision checkpoint: anyres_max requests (base view + tiles) and video requests (``frames``
    frames), the llava-hf chat template, batches padded to a tile bucket, content masks over an image's span, one
    positional curve per view (base view, tile grid). No curve was released for OneVision: ``--curve released``
    is refused (calibrate one), and so are methods that read the tower's CLS attention (SigLIP has none)."""

    video_frames = video_eval.FRAMES  # frames sampled from a video (uniformly), as Video-LLaVA's evaluation samples

    @property
    def keep_scope(self) -> str:
        return ("every LLaVA-OneVision image: its base view + the tile grid of the one-tile bucket, newlines "
                "excluded (model.visual_capacity())")

    def check(self, spec: jd.PruneSpec) -> jd.PruneSpec:
        """``LoadedModel.check``, refusing what OneVision cannot do: a released curve (they were fitted on
        LLaVA-1.5-7B; none exists for OneVision) and CLS-attention methods (VisionZip)."""
        if spec.debias.curve == "released":
            raise UserError(f"No positional curve was released for LLaVA-OneVision (the released {spec.method} "
                            "curves were fitted on LLaVA-1.5-7B). Fit this model's own with `jaxdebias calibrate "
                            "--checkpoint CKPT --data DIR --method "
                            f"{spec.method} --out curve.json` and pass --curve curve.json, or use --curve online "
                            "(or --debias pad, paper or before: no curve).")
        if spec.method in CLS_METHODS:
            raise UserError(f"{spec.method} selects tokens by the CLS token's attention in the vision tower; "
                            "LLaVA-OneVision's SigLIP tower has no CLS token. Use illava (merges in every view) or "
                            "a decoder-side method: fastv, pdrop, sparsevlm, himap or tokencarve.")
        return super().check(spec)

    def check_media(self, spec: jd.PruneSpec, videos: bool) -> None:
        """A video is one view (its pooled frames in order): a curve of one part per image view is refused."""
        curve = spec.debias.curve
        if videos and isinstance(curve, tuple) and curve and curve[0] == "views":
            raise UserError("This curve has one part per image view (base view, tile grid: calibrated on images); "
                            "a LLaVA-OneVision video is one view, its frames' pooled patches in order. Calibrate "
                            "on a video benchmark (jaxdebias calibrate --bench msvd ...) or use --curve online.")

    def _pooled(self) -> int:
        """Patches of one video frame after the 2 x 2 pooling: ceil(G / 2) ** 2 (196 at G = 27)."""
        return (-(-self.model.cfg.vision.grid // 2)) ** 2

    def frame_patches(self, n: int) -> tuple[np.ndarray, None]:
        """A video's span is its frames' pooled patches in order, then one newline: (patches int[F, P], None)."""
        per = self._pooled()
        return np.arange((n - 1) // per * per).reshape(-1, per), None

    def trend_samples(self, request, scores, tau):
        """A video is one sample of its frames' pooled patches in order (no padding; the newline left out); an
        image, as ``LoadedModel`` (its views are calibrated apart: ``_calibrate_views``)."""
        if not getattr(request, "video", False):
            return super().trend_samples(request, scores, tau)
        n = len(request.pixel_values) * self._pooled()
        return np.asarray(scores)[None, :n], np.ones((1, n), bool)

    def content_mask(self, size, tau: float = 0.5) -> np.ndarray:
        """bool[N] over the image's span in its own tile bucket: True for the base view and the content patches of
        the packed tile grid (a downscaled patch is content when most of its bilinear weight is), False for
        padding patches, newlines and empty slots."""
        cfg, (w, h) = self.model.cfg, size
        return image_layout(cfg, int(w), int(h), cfg.slots(bucket_of(cfg, int(w), int(h))), tau)[4]

    @property
    def view_sizes(self) -> tuple[int, int]:
        return anyres.view_sizes(self.model)  # the base view, the largest packed tile grid

    def image_views(self, request: Request, slots: int, tau: float = 0.5):
        """(view int[N], local int[N], content bool[N]) of an image request laid out over ``slots`` span slots
        (the batch's N), as ``OnevisionVisual`` holds them. A video has no base view and no tiles: refused."""
        if getattr(request, "video", False):
            raise UserError("Per-view calibration on LLaVA-OneVision fits its image views (base view, tile grid); "
                            "this data set holds videos. Calibrate on an image benchmark (pope, gqa, ...).")
        _, _, view, local, content = image_layout(self.model.cfg, int(request.size[0]), int(request.size[1]),
                                                  slots, tau)
        return view, local, content

    def request(self, image, question: str) -> OnevisionRequest:
        """Base view + tiles; ``letterboxed`` holds the base view (for figures)."""
        cfg = self.model.cfg
        pixels, base, size, _ = anyres.preprocess(image, cfg, self.image_mean, self.image_std)
        ids, instruction = build_prompt(self.tokenizer, question, image_token_count(cfg, *size), cfg.image_token_id)
        return OnevisionRequest(ids, pixels, size, instruction, base)

    def video_request(self, frames, question: str) -> OnevisionRequest:
        """A video's frames (PIL), each squashed to S x S; ``letterboxed`` holds the resized frames."""
        cfg = self.model.cfg
        side = cfg.vision.image_size
        pixels, resized = preprocess_frames(frames, self.image_mean, self.image_std, side)
        ids, instruction = build_prompt(self.tokenizer, question, cfg.video_slots(len(frames)), cfg.video_token_id)
        return OnevisionRequest(ids, pixels, (side, side), instruction, resized, video=True)

    def request_row(self, row, media_dir) -> OnevisionRequest:
        """An image row (its file or encoded bytes) or a video row (``frames`` frames of its video)."""
        if "video" in row:
            source = video_eval.video_source(media_dir, row["video"])
            return self.video_request(video_eval.read_frames(source, self.video_frames), row["text"])
        return self.request(load_image(*row_image(row, media_dir)), row["text"])

    def batch(self, requests: list[OnevisionRequest]) -> Batch:
        return make_batch(self.model, requests, self.tokenizer.pad)
