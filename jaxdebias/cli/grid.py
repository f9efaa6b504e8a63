"""``jaxdebias eval-grid``: one benchmark evaluated for several pruning methods, each plain and debiased (and
unpruned as the reference), summarised in one table (CSV + Markdown) and one plot, in the layout of the paper's
comparison: a row per method, the metric without and with debiasing, and the change.

Each cell is an ordinary ``evaluate`` run in its own folder (``<method>-plain/``, ``<method>-debiased/``,
``unpruned/``), so an interrupted grid resumes where it stopped.
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
from jaxdebias.cli.inputs import LoadedModel, prune_spec
from jaxdebias.cli.video import check_rows, check_spec, resolve_model
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


def debias_for(method: str, debias: jd.Debias) -> jd.Debias:
    """``debias`` for ``method``; a method without a released curve keeps the rest of it (padding) only."""
    if debias.curve == "released":
        try:
            debias.curve_for(method)
        except KeyError:
            return dataclasses.replace(debias, curve=None)
    return debias


def describe(spec: jd.PruneSpec) -> str:
    """What debiasing ``spec`` applies, in words."""
    debias, tau = spec.debias, spec.debias.tau_for(spec.method)
    parts = [] if tau is None else [f"pad {tau:g}"]
    if debias.curve == "released":
        parts.append(f"released {debias.task} curve")
    elif debias.curve is not None:
        parts.append("online curve" if debias.curve == "online" else "calibrated curve")
    return " + ".join(parts) or "off"


def _value(metrics: dict, name: str):
    value = metrics.get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _cell(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def summary_tables(bench: str, cells: list[dict]) -> tuple[str, str]:
    """(CSV, Markdown) of the grid. ``cells``: {"method", "variant" (unpruned / plain / debiased), "debias",
    "keep", "metrics"}."""
    names = HEADLINE.get(bench, ("accuracy",))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["method", "variant", "keep", "debias", *names, "n"])
    for c in cells:
        writer.writerow([c["method"], c["variant"], c["keep"], c["debias"],
                         *[_cell(_value(c["metrics"], k)) for k in names], c["metrics"].get("n")])
    head = names[0]
    by = {(c["method"], c["variant"]): c for c in cells}
    lines = [f"{bench} ({head}), keep {cells[-1]['keep']} visual tokens", "",
             "| method | plain | debiased | change | debias |", "|---|---|---|---|---|"]
    if ("unpruned", "unpruned") in by:
        lines.append(f"| unpruned | {_cell(_value(by['unpruned', 'unpruned']['metrics'], head))} | | | |")
    for method in dict.fromkeys(c["method"] for c in cells if c["variant"] != "unpruned"):
        plain = _value(by[method, "plain"]["metrics"], head)
        if (method, "debiased") not in by:  # a baseline that scores nothing: debiasing does not apply
            lines.append(f"| {method} | {_cell(plain)} | n/a | | not applicable |")
            continue
        debiased = _value(by[method, "debiased"]["metrics"], head)
        change = None if plain is None or debiased is None else debiased - plain
        lines.append(f"| {method} | {_cell(plain)} | {_cell(debiased)} | "
                     f"{'-' if change is None else f'{change:+.4f}'} | {by[method, 'debiased']['debias']} |")
    return out.getvalue(), "\n".join(lines) + "\n"


def summary_plot(bench: str, cells: list[dict], path: str) -> str:
    """A radar over the methods (three or more) or grouped bars: the headline metric plain and debiased, with
    the unpruned value as a dashed reference."""
    head = HEADLINE.get(bench, ("accuracy",))[0]
    methods = list(dict.fromkeys(c["method"] for c in cells if c["variant"] != "unpruned"))
    values = {v: [_value(next((c for c in cells if c["method"] == m and c["variant"] == v),
                              {"metrics": {}})["metrics"], head) for m in methods] for v in ("plain", "debiased")}
    values = {k: np.array([np.nan if x is None else x for x in v]) for k, v in values.items()}
    unpruned = [_value(c["metrics"], head) for c in cells if c["variant"] == "unpruned"]
    polar = len(methods) >= 3
    fig = Figure(figsize=(5.6, 5.2) if polar else (6.0, 3.6))
    ax = fig.add_subplot(projection="polar" if polar else None)
    if polar:
        angles = np.linspace(0, 2 * np.pi, len(methods), endpoint=False)
        closed = np.append(angles, angles[0])
        for name, style in (("plain", "-o"), ("debiased", "-s")):
            ax.plot(closed, np.append(values[name], values[name][0]), style, ms=4, label=name)
        if unpruned and unpruned[0] is not None:
            ax.plot(closed, np.full(len(closed), unpruned[0]), "k--", lw=1, label="unpruned")
        ax.set_xticks(angles)
        ax.set_xticklabels(methods)
    else:
        x = np.arange(len(methods))
        ax.bar(x - 0.2, values["plain"], 0.4, label="plain")
        ax.bar(x + 0.2, values["debiased"], 0.4, label="debiased")
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
                  debias: jd.Debias = jd.Debias(curve="released", pad_tau="released"), unpruned: bool = True,
                  model: LoadedModel | str | None = None, limit: int | None = None, batch_size: int = 4,
                  max_new_tokens: int = 8, log=print, progress: bool = True, devices=None) -> list[dict]:
    """Every method in ``methods`` at ``keep``, without and with ``debias`` (a method without a released curve
    gets the padding part only; a baseline that scores nothing - random, pool - runs plain only), plus the
    unpruned model; writes ``summary.csv``, ``summary.md`` and
    ``summary.png`` in ``out_dir`` and returns the cells. Every input and every spec is checked before the
    first answer is written."""
    benchmark = benchmarks.get(bench)
    rows, image_dir = benchmarks.read_any(data_dir, bench)
    check_rows(rows[:limit], image_dir)
    loaded = resolve_model(model)
    plan = [("unpruned", "unpruned", None)] if unpruned else []
    for method in methods:
        plan.append((method, "plain", check_spec(prune_spec(method, keep), loaded)))
        if jd.methods.get(method).debias:
            plan.append((method, "debiased", check_spec(prune_spec(method, keep, debias_for(method, debias)),
                                                        loaded)))
    cells = []
    for method, variant, spec in plan:
        folder = os.path.join(out_dir, method if spec is None else f"{method}-{variant}")
        metrics = evaluate(bench, data_dir, folder, spec=spec, model=loaded, limit=limit, batch_size=batch_size,
                           max_new_tokens=max_new_tokens, log=lambda *_: None, progress=progress, devices=devices)
        cells.append({"method": method, "variant": variant, "keep": loaded.n_visual if spec is None else keep,
                      "debias": "off" if spec is None else describe(spec), "metrics": metrics})
        log(f"{method} {variant}: " + ", ".join(f"{k} {_cell(_value(metrics, k))}"
                                                for k in HEADLINE.get(benchmark.name, ("accuracy",))))
    table, markdown = summary_tables(bench, cells)
    paths = [write_text(os.path.join(out_dir, "summary.csv"), table, newline=""),
             write_text(os.path.join(out_dir, "summary.md"), markdown)]
    if benchmark.has_truth(rows[:limit]):
        paths.append(summary_plot(bench, cells, os.path.join(out_dir, "summary.png")))
    log(markdown + f"wrote {', '.join(paths)}")
    return cells
