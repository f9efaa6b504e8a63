"""The debiasing paper's experiment at toy scale, on a CPU: ``python -m jaxdebias.toy.experiment --out DIR``.

1. Calibrate: run each method's first stage (FastV, PyramidDrop, SparseVLM) unpruned over a calibration split of
   generated questions, average the first-stage scores position by position (padding excluded, as
   ``jaxdebias calibrate`` does) and fit the exponential trend ``exp(b i)``; also record the bias numbers
   (per-sample slope b, padding-to-content score ratio).
2. Evaluate on a held-out split (half POPE-style yes/no, half GQA-style short answers): unpruned, then every
   method at 64 / 128 / 192 kept visual tokens, each plain, with padding suppression, with the calibrated curve,
   and with both.
3. Write ``results.json``, ``table.md`` and ``accuracy.png`` (accuracy against kept tokens, one panel per method)
   with ``curves.png`` (the calibrated row means and fits).

Answers are the greedy first token (every toy answer is one word); POPE-style accuracy counts yes/no exactly,
GQA-style accuracy is exact match, as LLaVA's scripts score them.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import jaxdebias as jd
from jaxdebias.models import generate
from jaxdebias.toy import evaluate, model as toy_model

METHODS = ("fastv", "pdrop", "sparsevlm")
KEEPS = (64, 128, 192)
VARIANTS = ("plain", "pad", "curve", "pad+curve")


def items(n: int, seed: int, split: str) -> list[dict]:
    """``n`` questions of ``split``: half yes/no existence ("pope"), half colour/count/position ("gqa")."""
    yn = evaluate.yes_no_set(n // 2, seed, split)
    sa = evaluate.short_answer_set(n - n // 2, seed, split)
    return ([{"image": im, "text": t, "answer": a, "bench": "pope"} for im, t, a in yn]
            + [{"image": im, "text": t, "answer": a, "bench": "gqa"} for im, t, a, _ in sa])


def run(model, tok, qs, spec, batch_size: int = 8):
    """(answers [str], first-stage scores float[Q, N] or None, image sizes int[Q, 2]) of ``spec`` (None:
    unpruned) over the questions, in batches of one shape (the last padded by repetition)."""
    answers, scores, sizes = [], [], []
    for lo in range(0, len(qs), batch_size):
        chunk = list(qs[lo:lo + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)
        ids, px, am, instr, wh = evaluate.prompts(model, tok, [(q["image"], q["text"]) for q in chunk])
        batch = generate.Batch(ids, px, am, image_sizes=wh, instruction_pos=instr)
        res = generate.generate(model, batch, prune=spec, max_new_tokens=1)
        answers += [tok.decode([int(t)], skip_special_tokens=True) for t in res.tokens[:real, 0]]
        scores.append(np.asarray(res.scores)[:real])
        sizes.append(wh[:real])
    return answers, (np.concatenate(scores) if spec is not None else None), np.concatenate(sizes)


def accuracy(qs, answers) -> dict:
    out = {}
    for bench in ("pope", "gqa"):
        pairs = [(q["answer"], a) for q, a in zip(qs, answers) if q["bench"] == bench]
        out[bench] = sum(t == a for t, a in pairs) / max(len(pairs), 1)
    out["mean"] = (out["pope"] + out["gqa"]) / 2
    return out


def content_masks(sizes, grid: int, tau: float = 0.5) -> np.ndarray:
    """bool[Q, N]: True where a patch of the ``grid`` x ``grid`` image is content (not letterbox padding) for each
    (width, height)."""
    return np.stack([np.asarray(jd.pad_mask_expand2square(int(w), int(h), grid=grid, tau=tau)) for w, h in sizes])


def calibrate(model, tok, qs, method: str, batch_size: int, keep: int) -> dict:
    """The calibrated curve of ``method`` and the bias numbers of its first-stage scores (run at budget ``keep``:
    the first stage's scores do not depend on it)."""
    spec = jd.PruneSpec(method, keep=keep)
    _, scores, sizes = run(model, tok, qs, spec, batch_size)
    grid = model.cfg.vision.grid
    content = content_masks(sizes, grid)
    cal = jd.Calibration.init(scores.shape[1]).update(scores, content)
    curve = cal.fit("exp")
    strength = jd.bias_strength(scores, content=content)
    mean = np.asarray(cal.mean())
    rows = np.nanmean(np.where(content, scores / scores.mean(1, keepdims=True), np.nan).reshape(-1, grid, grid),
                      axis=(0, 2))
    return {"curve": jd.curve_to_dict(curve), "curve_object": curve,
            "slope_of_mean": float(jd.bias_strength(mean, np.asarray(cal.count) > 0)["slope"]),
            "slope_per_sample": float(np.mean(np.asarray(strength["slope"]))),
            "pad_ratio": float(np.nanmean(np.asarray(strength["pad_ratio"]))),
            "row_means": rows.round(5).tolist(), "samples": len(qs)}


def spec_for(method: str, keep: int, variant: str, curve) -> jd.PruneSpec:
    debias = jd.Debias(curve=curve if "curve" in variant else None,
                       pad_tau="released" if "pad" in variant else None)
    return jd.PruneSpec(method, keep=keep, debias=debias)


def table(results: dict) -> str:
    """Markdown: accuracy (POPE-style / GQA-style) per method, budget and variant; then the bias numbers."""
    u = results["unpruned"]
    lines = [f"Unpruned (576 visual tokens): POPE-style {u['pope']:.3f}, GQA-style {u['gqa']:.3f}, mean "
             f"{u['mean']:.3f} ({results['n_eval']} held-out questions).", "",
             "| method | keep | " + " | ".join(VARIANTS) + " |", "|---|---|" + "---|" * len(VARIANTS)]
    for method in results["methods"]:
        for keep in results["keeps"]:
            cells = [results["pruned"][f"{method}/{keep}/{v}"] for v in VARIANTS]
            lines.append(f"| {method} | {keep} | " + " | ".join(f"{c['pope']:.3f} / {c['gqa']:.3f}" for c in cells)
                         + " |")
    lines += ["", "Cells: POPE-style / GQA-style accuracy. plain: the released method; pad: padding patches' scores "
              "zeroed (tau 0.5, PyramidDrop 0.01); curve: scores divided by the calibrated trend; pad+curve: both.",
              "", f"First-stage scores over {results['n_calib']} calibration questions:", "",
              "| method | slope b of the mean curve | mean per-sample slope b | padding / content score |",
              "|---|---|---|---|"]
    for method in results["methods"]:
        c = results["calibration"][method]
        lines.append(f"| {method} | {c['slope_of_mean']:.5f} | {c['slope_per_sample']:.5f} | {c['pad_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def plots(results: dict, out_dir: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, keeps = results["methods"], results["keeps"]
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.6), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, method in zip(axes, methods):
        for v in VARIANTS:
            ax.plot(keeps, [results["pruned"][f"{method}/{k}/{v}"]["mean"] for k in keeps], marker="o", label=v)
        ax.axhline(results["unpruned"]["mean"], color="k", ls="--", lw=1, label="unpruned")
        ax.set_title(method)
        ax.set_xlabel("visual tokens kept")
        ax.set_xticks(keeps)
    axes[0].set_ylabel("accuracy (mean of POPE, GQA)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "accuracy.png"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for method in methods:
        c = results["calibration"][method]
        ax.plot(np.arange(len(c["row_means"])), c["row_means"], marker="o", ms=3,
                label=f"{method} (b = {c['slope_of_mean']:.4f})")
    ax.set_xlabel("grid row (later in the sequence ->)")
    ax.set_ylabel("mean first-stage score / sample mean")
    ax.set_yscale("log")
    ax.set_title(f"first-stage scores by row, {results['n_calib']} calibration questions", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.png"), dpi=110)
    plt.close(fig)


def experiment(model, tok, out_dir, *, n_calib=200, n_eval=200, seed=0, methods=METHODS, keeps=KEEPS,
               batch_size=8, log=print) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    calib, held = items(n_calib, seed, "calib"), items(n_eval, seed, "heldout")
    results = {"methods": list(methods), "keeps": list(keeps), "n_calib": n_calib, "n_eval": n_eval,
               "seed": seed, "calibration": {}, "pruned": {}}
    answers, _, _ = run(model, tok, held, None, batch_size)
    results["unpruned"] = accuracy(held, answers)
    log(f"unpruned: {results['unpruned']}")
    for method in methods:
        cal = calibrate(model, tok, calib, method, batch_size, max(keeps))
        curve = cal.pop("curve_object")
        results["calibration"][method] = cal
        log(f"{method}: calibrated slope {cal['slope_of_mean']:.5f}, padding/content {cal['pad_ratio']:.3f}")
        for keep in keeps:
            for v in VARIANTS:
                answers, _, _ = run(model, tok, held, spec_for(method, keep, v, curve), batch_size)
                results["pruned"][f"{method}/{keep}/{v}"] = accuracy(held, answers)
                log(f"{method} keep {keep} {v}: {results['pruned'][f'{method}/{keep}/{v}']}")
    results["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table(results))
    plots(results, out_dir)
    log(f"wrote {out_dir}/results.json, table.md, accuracy.png, curves.png in {results['seconds']:.0f} s")
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxdebias.toy.experiment", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", default=None, help="a toy model directory (default: the shipped one)")
    p.add_argument("--n-calib", type=int, default=200)
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--keeps", nargs="+", type=int, default=list(KEEPS))
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args(argv)
    model, tok = toy_model.load_default() if args.checkpoint is None else toy_model.load(args.checkpoint)
    experiment(model, tok, args.out, n_calib=args.n_calib, n_eval=args.n_eval, seed=args.seed,
               methods=tuple(args.methods), keeps=tuple(args.keeps), batch_size=args.batch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
