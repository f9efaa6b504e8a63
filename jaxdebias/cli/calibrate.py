"""``jaxdebias calibrate``: fit a positional-debiasing curve to a method's first-stage scores over a data set."""

from __future__ import annotations

import math
import os

import numpy as np
from tqdm.auto import tqdm

import jaxdebias as jd
from jaxdebias.cli.figures import figure_curve
from jaxdebias.cli.inputs import LoadedModel, check_prompt_length
from jaxdebias.cli.specs import prune_spec
from jaxdebias.cli.runner import Runner
from jaxdebias.cli.families import resolve_model
from jaxdebias.cli.video import check_rows, figure_by_index
from jaxdebias.eval.benchmarks import read_any
from jaxdebias.eval.files import write_json

FORMS = ("exp", "exp+c", "poly3_inverse")


def check_counts(limit: int | None, batch_size: int, pad_tau: float) -> None:
    """--limit, --batch and --pad-tau of calibrate and bias, checked before anything is read."""
    if limit is not None and limit < 1:
        raise jd.UserError(f"--limit must be >= 1, got {limit}.")
    if batch_size < 1:
        raise jd.UserError(f"--batch must be >= 1, got {batch_size}.")
    if not 0.0 <= pad_tau <= 1.0:
        raise jd.UserError(f"--pad-tau must be a fraction in [0, 1], got {pad_tau}.")


def calibrate(data_dir: str, out: str, *, method: str = "fastv", form: str = "exp",
              model: LoadedModel | str | None = None, bench: str | None = None, limit: int | None = None,
              batch_size: int = 4, pad_tau: float = 0.5, log=print, progress: bool = True, devices=None) -> dict:
    """Streams a data set through the model, averages ``method``'s first-stage scores position by position with
    ``jd.Calibration`` (padding excluded), fits ``form`` and writes the curve with its statistics (``out``) and a
    plot beside it (``out`` with .png). ``model``: a ``LoadedModel``, a checkpoint directory or None (the
    embedded default). Returns the record written."""
    if form not in FORMS:
        raise jd.UserError(f"--form must be one of {', '.join(FORMS)}, got {form!r}.")
    check_counts(limit, batch_size, pad_tau)
    if os.path.isdir(out):
        raise jd.UserError(f"--out {out} is a folder; pass the curve file to write "
                           f"({os.path.join(out, 'curve.json')}, say).")
    rows, image_dir = read_any(data_dir, bench)
    rows = rows[:limit]
    check_rows(rows, image_dir)
    if not rows:
        raise jd.UserError(f"{data_dir} holds no questions to calibrate on.")
    videos = {"video" in row for row in rows}
    if len(videos) > 1:
        raise jd.UserError(f"{data_dir} holds images and videos; a curve is fitted over one layout. Calibrate on "
                           "an image benchmark and on a video benchmark apart.")
    videos = videos.pop()
    loaded = resolve_model(model)
    spec = loaded.check(prune_spec(method, loaded.calibration_keep))  # only the first stage's scores are wanted
    loaded.check_media(spec, videos)
    for row in rows:
        check_prompt_length(loaded, row["text"], 1, f"question {row['question_id']!r}")
    runner = Runner(loaded, spec, batch_size, devices=devices)
    if loaded.view_curves and not videos:
        return _calibrate_views(loaded, runner, rows, image_dir, out, spec, form, pad_tau, log, progress)
    calibration = None  # over the trend's positions (Video-LLaVA per frame: each frame a sample of the trend)
    for _, request, result, i in tqdm(runner(rows, image_dir, 1), total=len(rows), desc="calibrating",
                                      disable=not progress):
        x, ok = loaded.trend_samples(request, result.scores[i], pad_tau)
        calibration = (calibration or jd.Calibration.init(x.shape[1])).update(x, ok)
    n = calibration.mean().shape[0]
    curve = calibration.fit(form)
    mean = np.asarray(calibration.mean())
    stats = {k: float(v) for k, v in jd.bias_strength(mean, np.asarray(calibration.count) > 0).items()
             if k != "pad_ratio"}
    record = {"curve": jd.curve_to_dict(curve), "method": spec.method, "form": form,
              "samples": int(calibration.n_samples), "fit_of_mean": stats, "positions": n}
    record |= loaded.trend_record()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_json(out, record)
    trend = np.asarray(1.0 / curve.weights(n)) * mean[mean > 0].mean()  # the fit, on the mean's scale
    draw = figure_curve if math.isqrt(n) ** 2 == n else figure_by_index  # a video's frames are not square grids
    plot = draw({"mean score": mean, "fitted trend": trend}, os.path.splitext(out)[0] + ".png",
                f"{spec.method}: calibrated over {int(calibration.n_samples)} samples ({form})")
    log(f"wrote {out} ({form}, {int(calibration.n_samples)} samples, slope {stats['slope']:.5f}) and {plot}")
    return record


def _calibrate_views(loaded, runner, rows, image_dir, out, spec, form, pad_tau, log, progress) -> dict:
    """LLaVA-NeXT: one ``jd.Calibration`` per view (the base view, the tile grid), each over its own raster
    (``jd.view_rasters``: the index restarts in each view), padding and newlines excluded. The file's "curve" is
    of form "views" (both curves; ``--curve FILE`` applies each to its view)."""
    sizes = loaded.view_sizes
    cals = [jd.Calibration.init(n) for n in sizes]
    for _, request, result, i in tqdm(runner(rows, image_dir, 1), total=len(rows), desc="calibrating",
                                      disable=not progress):
        view, local, content = loaded.image_views(request, result.scores.shape[1], pad_tau)
        parts = jd.view_rasters(result.scores[i][None], view[None], local[None], sizes, valid=content[None])
        cals = [c.update(x, ok) for c, (x, ok) in zip(cals, parts)]
    curves = [c.fit(form) for c in cals]
    record = {"curve": jd.curve_to_dict(tuple(curves)), "view_names": ["base", "tiles"], "method": spec.method,
              "form": form, "samples": int(cals[0].n_samples)}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_json(out, record)
    mean = np.asarray(cals[0].mean())
    trend = np.asarray(1.0 / curves[0].weights(sizes[0])) * mean[mean > 0].mean()
    plot = figure_curve({"base view: mean score": mean, "fitted trend": trend}, os.path.splitext(out)[0] + ".png",
                        f"{spec.method}: base view calibrated over {record['samples']} samples ({form})")
    log(f"wrote {out} ({form}, {record['samples']} samples; one curve per view: base, tiles) and {plot}")
    return record
