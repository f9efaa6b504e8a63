"""Video-LLaVA on the command line: videos (frames folders or .npy, see ``jaxdebias.eval.video``) into requests,
the figures of ``jaxdebias run --checkpoint DIR --video V`` (``run.run_video``), the video rows of ``jaxdebias eval``
and the GPT-judge step.

Axes: F frames (8), P patches per frame (16 x 16 at 224 / 14), N = F (P + 1) visual tokens of a video, each frame
its CLS token then its patches in raster order.

Frames are processed as Video-LLaVA's processor does: the shortest edge resized to the tower's side (bicubic),
a centre crop to a square, the CLIP normalisation; no letterbox, so there is no padding to suppress. The prompt is
the llava-hf template ``USER: <video>\\n{question} ASSISTANT:`` with the placeholder expanded to N tokens.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from matplotlib.figure import Figure

import jaxdebias as jd
from jaxdebias.cli import images as image_files
from jaxdebias.cli.figures import _save, figure_profile
from jaxdebias.cli.inputs import LoadedModel, Request, build_prompt
from jaxdebias.eval import video as video_eval
from jaxdebias.eval.files import write_json

UserError = jd.UserError


def preprocess_frames(frames, mean=image_files.CLIP_MEAN, std=image_files.CLIP_STD, side: int = 224):
    """Frames (PIL) -> (float32[F, 3, side, side], the cropped frames): shortest edge to ``side``, centre crop."""
    pixels, crops = [], []
    for frame in frames:
        w, h = frame.size
        scale = side / min(w, h)
        resized = frame.resize((max(side, int(w * scale)), max(side, int(h * scale))), resample=3)  # bicubic
        left, top = (resized.width - side) // 2, (resized.height - side) // 2
        crop = resized.crop((left, top, left + side, top + side))
        crops.append(crop)
        x = (np.asarray(crop, np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        pixels.append(x.transpose(2, 0, 1))
    return np.stack(pixels), crops


@dataclasses.dataclass
class VideoLoadedModel(LoadedModel):
    """A Video-LLaVA checkpoint with its tokenizer (whose placeholder is the video token) and normalisation:
    requests hold videos (centre-cropped frames, no letterbox padding)."""

    media = "video"
    placeholder = "video_token_id"

    @property
    def n_visual(self) -> int:
        """N = frames x (patches + CLS), the visual tokens of one video (2056 for Video-LLaVA-7B)."""
        return self.model.cfg.video_tokens

    @property
    def keep_scope(self) -> str:
        return "one video (frames x (patches + CLS))"

    @property
    def trend_length(self) -> int:
        """Trend "frame": one frame's CLS + patches (each frame a sample); "video": the whole video."""
        return self.model.cfg.frame_tokens if self.model.cfg.frame_trend == "frame" else self.n_visual

    def trend_record(self) -> dict:
        return {"frame_trend": self.model.cfg.frame_trend, "positions": self.trend_length}

    def check(self, spec: jd.PruneSpec) -> jd.PruneSpec:
        """``LoadedModel.check``, refusing what Video-LLaVA's frames cannot do: padding suppression (there is no
        letterbox) and encoder-side methods (they prune inside one CLIP view)."""
        if spec.debias.pad_tau is not None:
            raise UserError("Video-LLaVA's frames are centre-cropped: there is no letterbox padding to suppress. "
                            "Use --debias curve (with --curve online or a calibrated curve.json) or --debias off.")
        if spec.encoder(self.n_visual) is not None:
            raise UserError(f"{spec.method} prunes inside one CLIP view (encoder side); on Video-LLaVA's 8 frames "
                            "use a decoder-side method: fastv, pdrop, sparsevlm, himap or tokencarve.")
        return super().check(spec)

    @property
    def grid(self) -> int:
        return self.model.cfg.vision.grid

    def content_mask(self, size=None, tau: float = 0.5) -> np.ndarray:
        """Every token is content: frames are centre-cropped, never letterboxed."""
        return np.ones(self.n_visual, bool)

    def request(self, frames, question: str) -> Request:
        cfg = self.model.cfg
        if len(frames) != cfg.frames:
            raise UserError(f"Video-LLaVA takes {cfg.frames} frames per video, got {len(frames)}.")
        pixels, crops = preprocess_frames(frames, self.image_mean, self.image_std, cfg.vision.image_size)
        ids, instruction = build_prompt(self.tokenizer, question, self.n_visual)
        side = cfg.vision.image_size
        return Request(ids, pixels, (side, side), instruction, crops)

    @property
    def video_frames(self) -> int:
        return self.model.cfg.frames

    def video_request(self, frames, question: str) -> Request:
        return self.request(frames, question)

    def frame_patches(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Each frame is its CLS token, then its P patches: (patches int[F, P], cls int[F])."""
        cfg = self.model.cfg
        index = np.arange(cfg.frames * cfg.frame_tokens).reshape(cfg.frames, cfg.frame_tokens)
        return index[:, 1:], index[:, 0]

    def request_row(self, row, media_dir) -> Request:
        if "video" not in row:
            raise UserError(f"Question {row.get('question_id')} has no video; Video-LLaVA's evaluation answers "
                            "questions about videos (--bench msvd, msrvtt, tgif or activitynet).")
        source = video_eval.video_source(media_dir, row["video"])
        return self.request(video_eval.read_frames(source, self.model.cfg.frames), row["text"])


def check_rows(rows, media_dir) -> None:
    """Every video's frames (and every image) decode before the first answer is written."""
    images = [r for r in rows if "video" not in r]
    image_files.check_rows(images, media_dir)
    seen = set()
    for row in rows:
        if "video" in row and row["video"] not in seen:
            seen.add(row["video"])
            video_eval.read_frames(video_eval.video_source(media_dir, row["video"]), video_eval.FRAMES)


def figure_frames(crops, kept_by_name: dict, patches, cls, path: str) -> str:
    """Each frame with its kept patches clear and the rest shaded, one row per entry (name -> bool[N] over the
    video's span); ``patches`` int[F, P] and ``cls`` int[F] or None place each frame's tokens in the span (as
    ``LoadedModel.frame_patches`` gives them); a kept CLS token is noted in its frame's title. Returns ``path``."""
    F = len(crops)
    fig = Figure(figsize=(1.7 * F, 1.9 * len(kept_by_name)))
    axes = np.asarray(fig.subplots(len(kept_by_name), F)).reshape(len(kept_by_name), F)
    grid = int(round(patches.shape[1] ** 0.5))
    side = crops[0].size[0]
    for r, (name, kept) in enumerate(kept_by_name.items()):
        kept = np.asarray(kept, bool)
        for f in range(F):
            ax = axes[r, f]
            ax.imshow(crops[f])
            shade = np.ones((grid, grid, 4)) * np.array([0, 0, 0, 0.6])
            shade[kept[patches[f]].reshape(grid, grid)] = (0, 0, 0, 0)
            ax.imshow(shade, extent=(0, side, side, 0), interpolation="nearest")
            with_cls = cls is not None and kept[cls[f]]
            count = int(kept[patches[f]].sum() + with_cls)
            ax.set_title(f"{name if f == 0 else ''} f{f}: {count}{' +CLS' if with_cls else ''}", fontsize=7,
                         loc="left")
            ax.axis("off")
    _save(fig, path)
    return path


def frame_curve(series: dict, path: str, title: str) -> str:
    """Mean patch score per frame (float[F, P] per entry), normalised by its overall mean, log scale."""
    means = {name: np.nanmean(np.asarray(scores, np.float64), axis=1) for name, scores in series.items()}
    return figure_profile(means, path, title, "frame (later in the sequence ->)")


def judge(bench: str, out_dir: str, *, complete=None, model: str = video_eval.JUDGE_MODEL, api_key: str | None = None,
          base_url: str = "https://api.openai.com/v1", log=print) -> dict:
    """The optional GPT-judge step over ``out_dir/merge.jsonl`` (written by ``jaxdebias eval`` on a video
    benchmark): ``complete`` (messages, model) -> reply, by default an OpenAI-compatible endpoint called with the
    user's own key. Writes ``<bench>_gpt_judge.json`` (the scores and every verdict) and returns the scores."""
    path = os.path.join(out_dir, "merge.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"No {path}: run jaxdebias eval on a video benchmark (msvd, msrvtt, tgif, activitynet) "
                        "into this folder first.")
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    if complete is None:
        complete = video_eval.http_client(api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", ""),
                                          base_url)
    result = video_eval.gpt_judge(lines, complete, model, log=log)
    write_json(os.path.join(out_dir, f"{bench}_gpt_judge.json"), result)
    scores = {k: v for k, v in result.items() if k != "lines"}
    log(f"{bench} GPT judge ({model}): accuracy {scores['gpt_accuracy']}, score {scores['gpt_score']} over "
        f"{scores['judged']} pairs")
    return scores


def figure_by_index(series: dict, path: str, title: str) -> str:
    """Scores by token index (name -> float[N]), normalised by their mean, log scale: the calibration plot of a
    token layout that is not one square grid (a frame's CLS + patches, or a whole video)."""
    return figure_profile(series, path, title, "token index (later in the sequence ->)",
                          "score / mean", marker=False)
