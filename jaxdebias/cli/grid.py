"""``jaxdebias eval-grid``: one benchmark evaluated for several pruning methods, each under the debias code's
three settings (``jd.Debias.preset``: paper, before, after) and unpruned as the reference, summarised in one
table (CSV + Markdown) and one plot in the layout of the paper's comparison: a row per method, the metric per
setting, and the changes.

Each cell is an ordinary ``evaluate`` run in its own folder (``<method>-<setting>/``, ``unpruned/``), so an
interrupted grid resumes where it stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os

import numpy as np
from matplotlib.figure import Figure

import jaxdebias as jd
from jaxdebias.cli.evaluate import evaluate
from jaxdebias.cli.inputs import LoadedModel
from jaxdebias.cli.specs import describe, prune_spec
from jaxdebias.cli.families import resolve_model
from jaxdebias.cli.video import check_rows
from jaxdebias.eval import benchmarks
from jaxdebias.eval.files import atomic_open, write_text

GRID_METHODS = jd.METHODS
# The number each benchmark is reported by (the first is the table's and the plot's).
HEADLINE = {"pope": ("f1", "accuracy"), "mme": ("perception", "cognition")}


def parse_methods(text: str) -> tuple[str, ...]:
    """"all" or comma-separated method names (aliases allowed), as canonical names."""
    if text == "all":
        return tuple(GRID_METHODS)
    try:
        methods = tuple(dict.fromkeys(jd.canonical_method(m.strip()) for m in text.split(",") if m.strip()))
    except ValueError as e:
        raise jd.UserError(str(e)) from None
    if not methods:
        raise jd.UserError("--methods names no method; give e.g. fastv,pdrop or all.")
    return methods


def _value(metrics: dict, name: str):
    value = metrics.get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _cell(value) -> str:
    return "-" if value is None else f"{value:.4f}"


LEGEND = ("paper: the method as its authors released it (no debiasing); before: letterbox padding suppressed as "
          "the debias code's patch does it, no positional curve; after: padding and the positional curve - the "
          "released one, or the model's own (the embedded toy model's, or --curve) - (intcomp/attention-bias@e75ebe7, "
          "the eval scripts' --tag). Which of paper and before gave the paper's "
          "'Original' bars is not published.")


def summary_tables(bench: str, cells: list[dict]) -> tuple[str, str]:
    """(CSV, Markdown) of the grid. ``cells``: {"method", "variant" (unpruned / paper / before / after),
    "debias", "keep", "decode", "metrics"}; a variant missing for a method is not applicable to it (a baseline
    that scores nothing) or the same setting as an earlier one (``"same_as"``)."""
    names = HEADLINE.get(bench, ("accuracy",))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["method", "variant", "keep", "decode", "debias", *names, "n"])
    for c in cells:
        writer.writerow([c["method"], c["variant"], c["keep"], c.get("decode", ""), c["debias"],
                         *[_cell(_value(c["metrics"], k)) for k in names], c["metrics"].get("n")])
    head = names[0]
    by = {(c["method"], c["variant"]): c for c in cells}
    lines = [f"{bench} ({head}), keep {cells[-1]['keep']} visual tokens, decode {cells[-1].get('decode', '-')}", "",
             "| method | paper | before | after | after - paper | after - before | after's debias |",
             "|---|---|---|---|---|---|---|"]
    if ("unpruned", "unpruned") in by:
        lines.append(f"| unpruned | {_cell(_value(by['unpruned', 'unpruned']['metrics'], head))} | | | | | |")
    for method in dict.fromkeys(c["method"] for c in cells if c["variant"] != "unpruned"):
        value = {}
        for v in jd.PRESETS:
            cell = by.get((method, v))
            value[v] = None if cell is None else _value(by.get((method, cell.get("same_as", v)), cell)["metrics"],
                                                         head)
        if (method, "after") not in by:  # a baseline that scores nothing: debiasing does not apply
            lines.append(f"| {method} | {_cell(value['paper'])} | n/a | n/a | | | not applicable |")
            continue
        def change(a, b):
            return "-" if a is None or b is None else f"{a - b:+.4f}"
        lines.append(f"| {method} | {_cell(value['paper'])} | {_cell(value['before'])} | {_cell(value['after'])} | "
                     f"{change(value['after'], value['paper'])} | {change(value['after'], value['before'])} | "
                     f"{by[method, 'after']['debias']} |")
    return out.getvalue(), "\n".join(lines + ["", LEGEND]) + "\n"


def summary_plot(bench: str, cells: list[dict], path: str) -> str:
    """A radar over the methods (three or more) or grouped bars: the headline metric per setting (paper, before,
    after), with the unpruned value as a dashed reference."""
    head = HEADLINE.get(bench, ("accuracy",))[0]
    methods = list(dict.fromkeys(c["method"] for c in cells if c["variant"] != "unpruned"))
    by = {(c["method"], c["variant"]): c for c in cells}
    values = {}
    for v in jd.PRESETS:
        row = []
        for m in methods:
            cell = by.get((m, v))
            cell = None if cell is None else by.get((m, cell.get("same_as", v)), cell)
            row.append(np.nan if cell is None or _value(cell["metrics"], head) is None
                       else _value(cell["metrics"], head))
        values[v] = np.array(row)
    unpruned = [_value(c["metrics"], head) for c in cells if c["variant"] == "unpruned"]
    polar = len(methods) >= 3
    fig = Figure(figsize=(5.6, 5.2) if polar else (6.0, 3.6))
    ax = fig.add_subplot(projection="polar" if polar else None)
    if polar:
        angles = np.linspace(0, 2 * np.pi, len(methods), endpoint=False)
        closed = np.append(angles, angles[0])
        for name, style in zip(jd.PRESETS, ("-o", "-^", "-s")):
            ax.plot(closed, np.append(values[name], values[name][0]), style, ms=4, label=name)
        if unpruned and unpruned[0] is not None:
            ax.plot(closed, np.full(len(closed), unpruned[0]), "k--", lw=1, label="unpruned")
        ax.set_xticks(angles)
        ax.set_xticklabels(methods)
    else:
        x = np.arange(len(methods))
        for i, name in enumerate(jd.PRESETS):
            ax.bar(x + (i - 1) * 0.27, values[name], 0.27, label=name)
        if unpruned and unpruned[0] is not None:
            ax.axhline(unpruned[0], color="k", ls="--", lw=1, label="unpruned")
        ax.set_xticks(x)
        ax.set_xticklabels(methods)
        ax.set_ylabel(head)
    ax.set_title(f"{bench} {head}, keep {cells[-1]['keep']}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right" if polar else "best")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    return path


def evaluate_grid(bench: str, data_dir: str, out_dir: str, *, methods=GRID_METHODS, keep: int = 64,
                  presets=jd.PRESETS, curve=None, task: str | None = None, decode: str = "released",
                  unpruned: bool = True, model: LoadedModel | str | None = None, limit: int | None = None,
                  batch_size: int = 4, max_new_tokens: int = 8, log=print, progress: bool = True,
                  devices=None) -> list[dict]:
    """Every method in ``methods`` at ``keep`` under each of the debias code's settings in ``presets``
    (``jd.Debias.preset``: paper, before, after; ``curve`` - a curve object, "online", a {method: curve} dict
    (a model's own calibrated curves) or None for the released one of ``task``, default the benchmark's -
    replaces the "after" curve), decoded as ``decode`` says, plus the
    unpruned model. A baseline that scores nothing (random, pool) runs "paper" only; a setting equal to an earlier
    one for a method (VisionZip's "after" is its "before": no curve was published) is not run again. Writes
    ``summary.csv``, ``summary.md`` and ``summary.png`` in ``out_dir`` and returns the cells. Every input and
    every spec is checked before the first answer is written."""
    unknown = [p for p in presets if p not in jd.PRESETS]
    if unknown or not presets:
        raise jd.UserError(f"--presets must name some of {', '.join(jd.PRESETS)}, got {', '.join(presets) or 'none'}.")
    benchmark = benchmarks.get(bench)
    rows, image_dir = benchmarks.read_any(data_dir, bench)
    check_rows(rows[:limit], image_dir)
    loaded = resolve_model(model)
    videos = loaded.media == "video" or any("video" in r for r in rows[:limit])
    task = task or bench
    plan = [("unpruned", "unpruned", None, None)] if unpruned else []
    for method in methods:
        seen = {}
        for preset in presets:
            debias = jd.Debias.preset(preset, method, task)
            own = curve.get(method) if isinstance(curve, dict) else curve
            if preset == "after" and own is not None and debias.enabled:
                debias = dataclasses.replace(debias, curve=own)
            if videos:  # video frames are not letterboxed: no padding to suppress ("before" is "paper")
                debias = dataclasses.replace(debias, pad_tau=None, pad_geometry=None)
            if not debias.enabled:
                debias = jd.Debias()  # nothing applies: the paper setting, whatever its task
            if not jd.methods.get(method).debias and preset != "paper":
                continue
            spec = loaded.check(prune_spec(method, keep, debias, decode))
            loaded.check_media(spec, videos)
            plan.append((method, preset, spec, seen.get(debias)))
            seen.setdefault(debias, preset)
    cells = []
    for method, variant, spec, same_as in plan:
        cell = {"method": method, "variant": variant, "keep": loaded.n_visual if spec is None else keep,
                "decode": "dense" if spec is None else spec.decode,
                "debias": "off" if spec is None else describe(spec)}
        if same_as is not None:
            cells.append(cell | {"same_as": same_as, "metrics": next(c for c in cells if (
                c["method"], c["variant"]) == (method, same_as))["metrics"]})
            continue
        folder = os.path.join(out_dir, method if spec is None else f"{method}-{variant}")
        metrics = evaluate(bench, data_dir, folder, spec=spec, model=loaded, limit=limit, batch_size=batch_size,
                           max_new_tokens=max_new_tokens, log=lambda *_: None, progress=progress, devices=devices)
        cells.append(cell | {"metrics": metrics})
        log(f"{method} {variant}: " + ", ".join(f"{k} {_cell(_value(metrics, k))}"
                                                for k in HEADLINE.get(benchmark.name, ("accuracy",))))
    table, markdown = summary_tables(bench, cells)
    paths = [write_text(os.path.join(out_dir, "summary.csv"), table, newline=""),
             write_text(os.path.join(out_dir, "summary.md"), markdown)]
    if benchmark.has_truth(rows[:limit]):
        paths.append(summary_plot(bench, cells, os.path.join(out_dir, "summary.png")))
    log(markdown + f"wrote {', '.join(paths)}")
    return cells


def evaluate_grids(benches, data_dir: str, out_dir: str, **kwargs) -> dict[str, list[dict]]:
    """``evaluate_grid`` over several benchmarks: ``data_dir`` holds one folder per benchmark (LLaVA's
    ``playground/data/eval/<bench>/`` layout; ``jaxdebias toy-bench`` writes the same), each grid goes to
    ``out_dir/<bench>/`` (resumable per cell), and ``radar.png`` in ``out_dir`` shows every method over the
    benchmarks. One benchmark: ``evaluate_grid`` on ``data_dir`` itself. Returns {bench: cells}."""
    benches = list(dict.fromkeys(benches))
    if len(benches) == 1:
        return {benches[0]: evaluate_grid(benches[0], data_dir, out_dir, **kwargs)}
    missing = [b for b in benches if not os.path.isdir(os.path.join(data_dir, b))]
    if missing:
        raise jd.UserError(f"With several benchmarks --data holds one folder per benchmark; {data_dir} has no "
                           f"{', '.join(missing)} folder.")
    cells = {b: evaluate_grid(b, os.path.join(data_dir, b), os.path.join(out_dir, b), **kwargs) for b in benches}
    log = kwargs.get("log", print)
    log(f"wrote {radar_over_benchmarks(cells, os.path.join(out_dir, 'radar.png'))}")
    return cells


def radar_over_benchmarks(cells_by_bench: dict[str, list[dict]], path: str) -> str:
    """The paper's radar: one panel per method, the benchmarks as axes, one polygon per setting (paper, before,
    after), each benchmark's headline metric relative to the unpruned model (1 = unpruned, the dashed reference;
    raw values where a benchmark has no unpruned cell); with fewer than three benchmarks a radar has no area, so
    each panel shows grouped bars instead. Returns ``path``."""
    benches = list(cells_by_bench)
    methods = list(dict.fromkeys(c["method"] for cells in cells_by_bench.values() for c in cells
                                 if c["variant"] != "unpruned"))

    def headline(bench, method, variant):
        by = {(c["method"], c["variant"]): c for c in cells_by_bench[bench]}
        cell = by.get((method, variant))
        cell = None if cell is None else by.get((method, cell.get("same_as", variant)), cell)
        value = None if cell is None else _value(cell["metrics"], HEADLINE.get(bench, ("accuracy",))[0])
        base = by.get(("unpruned", "unpruned"))
        base = None if base is None else _value(base["metrics"], HEADLINE.get(bench, ("accuracy",))[0])
        return np.nan if value is None else value / base if base else value

    cols = min(3, len(methods))
    rows = -(-len(methods) // cols)
    polar = len(benches) >= 3
    fig = Figure(figsize=(3.4 * cols, 3.4 * rows))
    angles = np.linspace(0, 2 * np.pi, len(benches), endpoint=False)
    closed = np.append(angles, angles[0])
    for i, method in enumerate(methods):
        ax = fig.add_subplot(rows, cols, i + 1, projection="polar" if polar else None)
        values = {v: np.array([headline(b, method, v) for b in benches]) for v in jd.PRESETS}
        top = max([1.05] + [float(np.nanmax(x)) * 1.05 for x in values.values() if not np.isnan(x).all()])
        for j, (variant, style) in enumerate(zip(jd.PRESETS, ("-o", "-^", "-s"))):
            if np.isnan(values[variant]).all():
                continue
            if polar:
                ax.plot(closed, np.append(values[variant], values[variant][0]), style, ms=3, lw=1, label=variant)
            else:
                ax.bar(np.arange(len(benches)) + (j - 1) * 0.27, values[variant], 0.27, label=variant)
        if polar:
            ax.plot(closed, np.ones(len(closed)), "k--", lw=0.8, label="unpruned")
            ax.set_xticks(angles)
        else:
            ax.axhline(1.0, color="k", ls="--", lw=0.8, label="unpruned")
            ax.set_xticks(np.arange(len(benches)))
        ax.set_ylim(0, top)
        ax.set_xticklabels(benches, fontsize=7)
        ax.set_title(method, fontsize=9)
        ax.tick_params(labelsize=6)
    fig.axes[0].legend(fontsize=6, loc="lower left", bbox_to_anchor=(-0.3, -0.3))
    fig.suptitle("headline metric relative to the unpruned model, per benchmark", fontsize=9)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    return path
