"""``jaxdebias run``: one image (or, on Video-LLaVA and LLaVA-OneVision, one video) answered unpruned, pruned and pruned + debiased,
with figures and timings."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

import jaxdebias as jd
from jaxdebias.cli.families import resolve_model
from jaxdebias.cli.figures import figure_curve, figure_kept
from jaxdebias.cli.images import default_image_path, load_image
from jaxdebias.cli.inputs import LoadedModel, check_prompt_length, check_var
from jaxdebias.cli.specs import describe
from jaxdebias.cli.video import figure_frames, frame_curve
from jaxdebias.eval import video as video_eval
from jaxdebias.eval.files import write_json
from jaxdebias.models.generate import generate
from jaxdebias.models.interventions import VarSpec

EMBEDDED_NOTE = ("no --checkpoint: the embedded default, a toy LLaVA-1.5 trained here on generated scenes of shapes "
                 "(jaxdebias.toy; yes/no accuracy 0.97 on held-out scenes). Its answers "
                 "and attention are learned; it knows only that world.")
TOY_PROMPT = "Is there a star in the image?\nAnswer the question using a single word or phrase."
PROMPT = "What is in the picture?"


def _log_times(log, seconds: dict, max_new_tokens: int) -> None:
    base = seconds["unpruned"]
    log(f"time for prefill + {max_new_tokens} tokens: " + ", ".join(
        f"{k} {v * 1e3:.0f} ms ({v / base:.2f}x)" for k, v in seconds.items()))


def _three_ways(loaded, batch, spec, var, max_new_tokens):
    """({name: GenerateResult}, {name: seconds}) of the batch answered unpruned, pruned by ``spec`` without its
    debiasing, and with it; each timed after a first call that compiles it."""
    specs = {"unpruned": None, "pruned": dataclasses.replace(spec, debias=jd.Debias()), "pruned + debiased": spec}
    results, seconds = {}, {}
    for name, s in specs.items():
        def once(s=s):
            return generate(loaded.model, batch, prune=s, var=var, max_new_tokens=max_new_tokens)
        once()  # compile
        start = time.perf_counter()
        results[name] = once()
        seconds[name] = time.perf_counter() - start
    return results, seconds


def run(spec: jd.PruneSpec, *, model: LoadedModel | str | None = None, image: str | None = None,
        prompt: str | None = None, out_dir: str = "jaxdebias-out", max_new_tokens: int = 24,
        var: VarSpec | None = None, log=print) -> dict:
    """Answers ``prompt`` about ``image`` (default: the image shipped with the package) unpruned, pruned by
    ``spec`` without its debiasing, and with it; writes ``kept.png`` (the kept patches of both), ``curve.png``
    (first-stage scores by position before and after debiasing) and ``run.json`` in ``out_dir``.

    ``model``: a ``LoadedModel``, a converted checkpoint's directory, or None for the embedded default.
    ``prompt``: default a question the toy default answers (with it), else "What is in the picture?".
    Returns the summary written to run.json."""
    if not jd.methods.get(spec.method).debias:
        raise jd.UserError(f"`jaxdebias run` shows a method pruned and pruned + debiased; {spec.method} scores no "
                           "token, so there is nothing to debias. Evaluate it with `jaxdebias eval --method "
                           f"{spec.method}`.")
    picture = load_image(image or default_image_path())  # cheap checks first: nothing is built for a bad request
    loaded = resolve_model(model)
    if loaded.media == "video":
        raise jd.UserError("This is a Video-LLaVA checkpoint: ask about a video with --video FRAMES_DIR (or an .npy "
                           "[F, H, W, 3]); image questions on Video-LLaVA are not wired to `jaxdebias run`.")
    loaded.check(spec)
    prompt = prompt or (TOY_PROMPT if loaded.embedded else PROMPT)
    check_var(var, loaded)
    check_prompt_length(loaded, prompt, max_new_tokens)
    request = loaded.request(picture, prompt)
    batch = loaded.batch([request])
    results, seconds = _three_ways(loaded, batch, spec, var, max_new_tokens)
    if loaded.embedded:
        log(EMBEDDED_NOTE)
    n = results["pruned"].scores.shape[1]  # the image's visual span (LLaVA-NeXT: its tile bucket's slots)
    pad = loaded.content_mask(request.size, spec.debias.tau_for(spec.method) or 0.5)
    kept = {name: np.asarray(jd.kept_mask(*results[name].kept[0], n))[0] for name in ("pruned", "pruned + debiased")}
    g = loaded.model.cfg.vision.grid ** 2  # the figures draw the square grid of the (base) view: the first g tokens
    os.makedirs(out_dir, exist_ok=True)
    label = f"{spec.method} keep {spec.keep}"
    panels = {label: kept["pruned"][:g], f"{label}, debiased": kept["pruned + debiased"][:g]}
    figures = [figure_kept(request.letterboxed, panels, os.path.join(out_dir, "kept.png"), pad[:g])]
    before, after = results["pruned + debiased"].scores[0], results["pruned + debiased"].debiased[0]
    figures.append(figure_curve({"scores": before[:g], "debiased": np.where(after > 0, after, np.nan)[:g]},
                                os.path.join(out_dir, "curve.png"), f"{spec.method} first-stage scores by position"))
    bias_before = {k: float(v) for k, v in jd.bias_strength(before, content=pad).items()}
    bias_after = {k: float(v) for k, v in jd.bias_strength(np.where(pad, after, 0.0), content=pad).items()}
    summary = {
        "answers": {k: loaded.decode(r.tokens[0]) for k, r in results.items()},
        "kept": {k: int(v.sum()) for k, v in kept.items()},
        "padding_kept": {k: int((v & ~pad).sum()) for k, v in kept.items()},
        "bias_before": bias_before, "bias_after": bias_after,
        "seconds": seconds, "stage_lengths": {k: r.stage_lengths for k, r in results.items()},
        "decode": spec.decode, "debias": describe(spec), "figures": figures,
    }
    write_json(os.path.join(out_dir, "run.json"), summary)
    log(f"answer (pruned + debiased): {summary['answers']['pruned + debiased']!r}")
    log(f"kept {spec.keep} of {n} visual tokens with {spec.method}; padding patches kept: "
        f"{summary['padding_kept']['pruned']} without debias, {summary['padding_kept']['pruned + debiased']} with")
    log(f"debiasing: {summary['debias']}")
    log(f"positional slope b: {bias_before['slope']:.5f} before, {bias_after['slope']:.5f} after debiasing; "
        f"padding/content score ratio {bias_before['pad_ratio']:.2f}")
    _log_times(log, seconds, max_new_tokens)
    log(f"figures: {', '.join(figures)}")
    return summary


def run_video(spec: jd.PruneSpec, *, model: LoadedModel | str, video: str, prompt: str = "What happens in the video?",
              out_dir: str = "jaxdebias-out", max_new_tokens: int = 24, var: VarSpec | None = None,
              log=print) -> dict:
    """``jaxdebias run`` for a video (a frames folder or an .npy array) on Video-LLaVA or LLaVA-OneVision: answered
    unpruned, pruned by ``spec`` without its debiasing, and with it; writes ``kept.png`` (each frame's kept
    patches), ``curve.png`` (mean patch score by frame; CLS tokens and newlines excluded) and ``run.json`` in
    ``out_dir``. Returns the summary written to run.json."""
    if not os.path.exists(video):
        raise jd.UserError(f"--video {video} does not exist.")
    if not (os.path.isdir(video) or video.endswith(".npy")):
        raise jd.UserError(f"--video {video}: expected a folder of frame images or an .npy array [F, H, W, 3] (extract "
                        f"frames with: ffmpeg -i {video} frames/%05d.png).")
    loaded = resolve_model(model)
    if not loaded.video_frames:
        loaded.video_request([], prompt)  # the model's own refusal
    if spec.debias.pad_tau is not None:
        spec = dataclasses.replace(spec, debias=dataclasses.replace(spec.debias, pad_tau=None))
        log("video frames are not letterboxed: no padding to suppress (the curve part of --debias runs)")
    loaded.check(spec)
    loaded.check_media(spec, videos=True)
    check_var(var, loaded)
    check_prompt_length(loaded, prompt, max_new_tokens)
    frames = video_eval.read_frames(video, loaded.video_frames)
    request = loaded.video_request(frames, prompt)
    batch = loaded.batch([request])
    results, seconds = _three_ways(loaded, batch, spec, var, max_new_tokens)
    n = results["pruned"].scores.shape[1]  # the video's span
    patches, cls = loaded.frame_patches(n)
    F, per = patches.shape
    kept = {k: np.asarray(jd.kept_mask(*results[k].kept[0], n))[0] for k in ("pruned", "pruned + debiased")}
    os.makedirs(out_dir, exist_ok=True)
    label = f"{spec.method} {spec.keep}"
    figures = [figure_frames(request.letterboxed, {label: kept["pruned"], f"{label} debiased":
                                                   kept["pruned + debiased"]}, patches, cls,
                             os.path.join(out_dir, "kept.png"))]
    r = results["pruned + debiased"]
    after = np.where(r.debiased[0] > 0, r.debiased[0], np.nan)
    figures.append(frame_curve({"scores": np.asarray(r.scores[0])[patches], "debiased": after[patches]},
                               os.path.join(out_dir, "curve.png"), f"{spec.method}: mean patch score by frame"))
    per_frame = {k: (v[patches].sum(1) + (v[cls] if cls is not None else 0)).tolist() for k, v in kept.items()}
    summary = {"answers": {k: loaded.decode(v.tokens[0]) for k, v in results.items()},
               "kept": {k: int(v.sum()) for k, v in kept.items()}, "kept_per_frame": per_frame,
               "visual_tokens": n, "frames": F, "seconds": seconds, "decode": spec.decode, "debias": describe(spec),
               "stage_lengths": {k: v.stage_lengths for k, v in results.items()}, "figures": figures}
    summary |= loaded.trend_record()
    write_json(os.path.join(out_dir, "run.json"), summary)
    log(f"answer (pruned + debiased): {summary['answers']['pruned + debiased']!r}")
    log(f"kept {spec.keep} of {n} visual tokens ({F} frames x {per} patches) with {spec.method}; per frame: "
        f"{per_frame['pruned']} without debias, {per_frame['pruned + debiased']} with")
    _log_times(log, seconds, max_new_tokens)
    return summary
