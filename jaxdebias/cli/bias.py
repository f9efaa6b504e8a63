"""``jaxdebias bias``: the bias of a method's first-stage scores over a data set, before and after debiasing."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import jaxdebias as jd
from jaxdebias.cli.figures import figure_curve
from jaxdebias.cli.families import resolve_model
from jaxdebias.cli.calibrate import check_counts
from jaxdebias.cli.images import check_rows
from jaxdebias.cli.inputs import LoadedModel, check_prompt_length
from jaxdebias.cli.specs import prune_spec
from jaxdebias.cli.runner import Runner
from jaxdebias.eval.benchmarks import read_any
from jaxdebias.eval.files import write_json
from jaxdebias.models.llava import layer_input


def _numbers(scores, pads, grid: int) -> dict:
    strength = jd.bias_strength(scores, content=pads)
    by_grid = scores.reshape(-1, grid, grid)
    return {"slope": float(np.mean(strength["slope"])), "trend_ratio": float(np.mean(strength["trend_ratio"])),
            "pad_ratio": float(np.nanmean(np.asarray(strength["pad_ratio"]))),
            "row_means": by_grid.mean(axis=(0, 2)).round(6).tolist(),
            "col_means": by_grid.mean(axis=(0, 1)).round(6).tolist()}


def bias_report(data_dir: str, out_dir: str, *, method: str = "fastv", model: LoadedModel | str | None = None,
                bench: str | None = None, limit: int | None = None, batch_size: int = 4, pad_tau: float = 0.5,
                sink_dims=None, log=print, progress: bool = True, devices=None) -> dict:
    """Mean score by grid row and column, fitted slope and padding-to-content ratio of ``method``'s first-stage
    scores, before and after debiasing (padding + the method's released GQA curve where there is one), and the
    visual sink tokens VAR would find (on layer 2's input; ``sink_dims`` or discovered per image). Writes
    ``bias.json`` and ``bias.png`` in ``out_dir``; returns the report. On LLaVA-NeXT the numbers are its base
    view's (the square G x G grid; "positions" says which)."""
    check_counts(limit, batch_size, pad_tau)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise jd.UserError(f"--out {out_dir} is a file; pass a folder for bias.json and bias.png.")
    rows, image_dir = read_any(data_dir, bench)
    rows = rows[:limit]
    if any("video" in r for r in rows):
        raise jd.UserError("jaxdebias bias reports on one image's square patch grid; for Video-LLaVA's frames use "
                           "jaxdebias calibrate --frame-trend frame|video (the trend and its fit) or run --video.")
    check_rows(rows, image_dir)
    loaded = resolve_model(model)
    g = loaded.model.cfg.vision.grid  # the square grid reported: LLaVA-1.5's image, LLaVA-NeXT's base view
    spec = loaded.check(prune_spec(method, g * g))
    for row in rows:
        check_prompt_length(loaded, row["text"], 1, f"question {row['question_id']!r}")
    runner = Runner(loaded, spec, batch_size, devices=devices)
    released = {*jd.RELEASED_EXP_B, *jd.RELEASED_POLY3_INVERSE}
    curve = jd.released_curve(spec.method, "gqa") if spec.method in released else None
    before, after, pads, sinks = [], [], [], []
    for _, request, result, i in tqdm(runner(rows, image_dir, 1), total=len(rows), desc="bias", disable=not progress):
        pad = loaded.content_mask(request.size, pad_tau)[:g * g]
        scores = result.scores[i][:g * g]
        before.append(scores)
        after.append(np.asarray(jd.debias(scores, curve=curve, content=pad)))
        pads.append(pad)
        one = loaded.batch([request])  # the request alone (LLaVA-NeXT: its span padded to its tile bucket)
        real = np.asarray(one.attention_mask, bool)
        hidden = layer_input(loaded.model, jnp.asarray(one.input_ids), one.pixel_values, jnp.asarray(real), 2)
        dims = sink_dims if sink_dims is not None else jd.discover_sink_dims(hidden, top=2)[0]
        is_sink = np.asarray(jd.sink_tokens(hidden, dims))[0]
        sinks.append(int((is_sink & real[0] & (np.asarray(one.input_ids)[0] == loaded.tokenizer.image)).sum()))
    before, after, pads = np.stack(before), np.stack(after), np.stack(pads)
    report = {"method": spec.method, "samples": len(rows), "before": _numbers(before, pads, g),
              "after": _numbers(np.where(pads, after, 0.0), pads, g),
              "positions": "base view" if g * g != loaded.n_visual else "image",
              "visual_sinks_per_image": float(np.mean(sinks))}
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "bias.json"), report)
    figure_curve({"before": before, "after (padding + released curve)": np.where(pads, after, np.nan)},
                 os.path.join(out_dir, "bias.png"), f"{spec.method}: score by position over {len(rows)} samples")
    b, a = report["before"], report["after"]
    log(f"slope {b['slope']:.5f} -> {a['slope']:.5f}; padding/content {b['pad_ratio']:.2f} -> {a['pad_ratio']:.2f}; "
        f"visual sinks per image {report['visual_sinks_per_image']:.1f}; wrote {out_dir}/bias.json, bias.png")
    return report
