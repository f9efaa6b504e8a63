"""The ``jaxdebias`` command: all argument parsing. Each command is a function over library objects (a
``jd.PruneSpec``, a ``jd.Debias``, a ``VarSpec``, a loaded model) in its own module; this file turns flags into
those objects, calls it, and turns a ``jd.UserError`` into a message and exit code 2 (``main``: the machine's faults
into their own codes).

  run        one image unpruned, pruned and pruned + debiased, with figures       (jaxdebias.cli.run)
  eval       a benchmark in the LLaVA layout, with the official files and metric (jaxdebias.cli.evaluate)
  grade-mmvet  MM-Vet's official GPT-4 grading of eval's MM-Vet answers        (jaxdebias.cli.grade)
  eval-grid  eval over methods x {plain, debiased}: one summary table and plot   (jaxdebias.cli.grid)
  calibrate  fit a positional-debiasing curve over a data set                    (jaxdebias.cli.calibrate)
  bias       the bias report of a method's scores over a data set                (jaxdebias.cli.bias)
  demo       the core alone on synthetic attention                               (jaxdebias.cli.demo)
  toy-bench  generated POPE / GQA benchmark folders of the toy world              (jaxdebias.toy.scenes)
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import jax

import jaxdebias as jd
from jaxdebias.cli import demo, faults, families, grid, specs, video
from jaxdebias.cli.bias import bias_report
from jaxdebias.cli.calibrate import FORMS, calibrate
from jaxdebias.cli.evaluate import evaluate
from jaxdebias.cli.grade import grade_mmvet
from jaxdebias.cli.specs import DEBIAS_MODES, parse_debias, prune_spec, var_spec
from jaxdebias.cli.run import run, run_video
from jaxdebias.eval.benchmarks import BENCHES
from jaxdebias.toy import bench
from jaxdebias.toy import curves as toy_curves


def _add_model(p):
    p.add_argument("--checkpoint", help="a converted checkpoint (jaxdebias-convert); default: the embedded "
                                        "toy model (jaxdebias.toy)")
    p.add_argument("--frame-trend", choices=("frame", "video"), help="Video-LLaVA: fit the positional trend within "
                   "each frame (default) or across all frames")


def _model(args):
    """--checkpoint, or with --frame-trend the Video-LLaVA checkpoint loaded with that trend."""
    return args.checkpoint if args.frame_trend is None else families.with_frame_trend(args.checkpoint, args.frame_trend)


def _fraction(text: str) -> float:
    """A number in [0, 1] (a threshold on a patch's padded fraction)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def _pad_tau(text: str):
    if text == "released":
        return text
    try:
        return _fraction(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1] or 'released', got {text!r}") from None


def _count(text: str) -> int:
    """A whole number >= 1 (questions, a batch, tokens, runs)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is one --help away), as every other refusal of the command."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_debias(p):
    p.add_argument("--debias", default=None, help=f"{', '.join(DEBIAS_MODES)} (default pad+curve; off for the "
                                                  "baselines that score nothing: random, pool); paper, before and "
                                                  "after are the debias code's three settings")
    p.add_argument("--curve", default=None, help="curve.json from `jaxdebias calibrate`, 'online', or "
                                                 "'released' (default: the method's released curve)")
    p.add_argument("--task", default=None, help="benchmark whose released curve to use (default: --bench, "
                                                "else gqa)")
    p.add_argument("--pad-tau", type=_pad_tau, default="released",
                   help="padding threshold, or 'released' (default: each method's released one, 0.5; PyramidDrop 0.01)")


def _add_var(p):
    p.add_argument("--var", action="store_true", help="VAR attention redistribution (needs --var-dims on "
                                                      "models without published sink dims)")
    p.add_argument("--var-p", type=float, default=0.6)
    p.add_argument("--var-tau", type=float, default=20.0)
    p.add_argument("--var-rho", type=float, default=0.5)
    p.add_argument("--var-layers", default="released", help="released (2..L-1), intended (2..L-2) or 2,3,4")
    p.add_argument("--var-dims", default=None, help="sink dims, e.g. 1415,2533, a model name "
                                                    "(llava-1.5-7b), or 'discover'")


def _add_decode(p):
    p.add_argument("--decode", choices=jd.DECODES, default="released",
                   help="released (default): each method decodes as its release does (FastV re-selects in mask "
                        "mode at every token, HiMAP reruns the pruned prefill per token); fast: the prefill's "
                        "selection and pruned KV caches serve every token")


def _add_prune(p):
    p.add_argument("--method", default="fastv", help=f"{', '.join(jd.METHODS)} (default fastv)")
    p.add_argument("--keep", type=int, default=128,
                   help="visual tokens to keep (PyramidDrop, SparseVLM: layer average)")
    _add_debias(p)
    _add_decode(p)
    _add_var(p)


def _add_data(p, limit_help="answer only the first N questions"):
    p.add_argument("--data", required=True, help="the benchmark's folder in the LLaVA layout "
                                                 "(playground/data/eval/<bench>): question file, images, answers")
    p.add_argument("--limit", type=_count, help=limit_help)
    p.add_argument("--batch", type=_count, default=4)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxdebias", description="Debiased visual token pruning in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="answer a prompt about an image, pruned and debiased, with figures")
    _add_model(p)
    p.add_argument("--image", help="image file (default: an image shipped with the package)")
    p.add_argument("--video", help="a video as a folder of frames or an .npy [F, H, W, 3] (Video-LLaVA and LLaVA-OneVision checkpoints)")
    p.add_argument("--prompt", default=None, help="default: a question the embedded toy model answers, "
                                                  "'What is in the picture?' with --checkpoint")
    p.add_argument("--max-new-tokens", type=_count, default=24)
    p.add_argument("--out", default="jaxdebias-out", help="directory for kept.png, curve.png, run.json")
    _add_prune(p)
    p = sub.add_parser("eval", help="pruned inference over a benchmark in the LLaVA layout, with its metric")
    _add_model(p)
    p.add_argument("--bench", required=True, help=", ".join(BENCHES))
    _add_data(p)
    p.add_argument("--out", default=None, help="output folder (default: jaxdebias-eval/<bench>/<method>-keep<K>-"
                                               "<debias>-<decode>, one per setting)")
    p.add_argument("--overwrite", action="store_true", help="replace the answers already in --out (a resumed run "
                                                             "must have the same setting)")
    p.add_argument("--max-new-tokens", type=_count, default=8)
    p.add_argument("--distributed", action="store_true", help="run under jax.distributed, one process per host "
                   "(TPU pod slices and SLURM are detected; elsewhere give the three flags below)")
    p.add_argument("--coordinator", help="host:port of process 0 (with --distributed)")
    p.add_argument("--num-processes", type=_count)
    p.add_argument("--process-id", type=int)
    p.add_argument("--gpt-judge", action="store_true", help="video benchmarks: also score merge.jsonl with the "
                   "official GPT judge (your key in OPENAI_API_KEY; an OpenAI-compatible endpoint)")
    p.add_argument("--judge-model", default="gpt-3.5-turbo")
    p.add_argument("--judge-url", default="https://api.openai.com/v1", help="OpenAI-compatible base URL")
    _add_prune(p)
    p = sub.add_parser("eval-grid", help="eval over pruning methods x the debias settings {paper, before, after}: "
                                         "a summary table (CSV, Markdown) and plot per benchmark, a radar over them")
    _add_model(p)
    p.add_argument("--bench", required=True, help=f"one or several, comma-separated ({', '.join(BENCHES)}); with "
                                                  "several, --data holds one folder per benchmark")
    _add_data(p)
    p.add_argument("--out", default=None, help="output folder (default: jaxdebias-grid/<bench>-keep<K>-<decode>)")
    p.add_argument("--max-new-tokens", type=_count, default=8)
    p.add_argument("--methods", default="all", help=f"comma-separated, or all ({', '.join(grid.GRID_METHODS)})")
    p.add_argument("--keep", type=int, default=64, help="visual tokens to keep (default 64)")
    p.add_argument("--no-unpruned", action="store_true", help="skip the unpruned reference row")
    p.add_argument("--presets", default=",".join(jd.PRESETS), help="the debias code's settings to run, "
                   "comma-separated (default paper,before,after)")
    p.add_argument("--curve", default=None, help="curve.json from `jaxdebias calibrate` or 'online' for the 'after' "
                                                 "setting (default: each method's released curve)")
    p.add_argument("--task", default=None, help="benchmark whose released curve 'after' uses (default: --bench)")
    _add_decode(p)
    p = sub.add_parser("calibrate", help="fit a positional-debiasing curve over a data set")
    _add_model(p)
    _add_data(p, "use only the first N samples")
    p.add_argument("--bench", help="read --data as this benchmark (default: questions.jsonl or any known)")
    p.add_argument("--method", default="fastv")
    p.add_argument("--form", default="exp", help=", ".join(FORMS))
    p.add_argument("--out", default="curve.json")
    p.add_argument("--pad-tau", type=_fraction, default=0.5)
    p = sub.add_parser("bias", help="the bias report of a method's scores over a data set")
    _add_model(p)
    _add_data(p, "use only the first N samples")
    p.add_argument("--bench", help="read --data as this benchmark (default: questions.jsonl or any known)")
    p.add_argument("--method", default="fastv")
    p.add_argument("--out", default="jaxdebias-bias")
    p.add_argument("--pad-tau", type=_fraction, default=0.5)
    p = sub.add_parser("demo", help="debias + prune synthetic LLaVA-1.5 attention (the core alone, no model)")
    p.add_argument("--keep", type=int, default=64, help="visual tokens to keep (rounded up to a bucket)")
    p.add_argument("--seed", type=_seed, default=0)
    p = sub.add_parser("toy-bench", help="write generated toy-world benchmarks (POPE, GQA) in the LLaVA layout")
    p.add_argument("--out", required=True, help="output folder: one subfolder per benchmark")
    p.add_argument("--n", type=_count, default=200, help="questions per benchmark")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--bench", nargs="+", default=["pope", "gqa"], choices=["pope", "gqa"])
    p = sub.add_parser("grade-mmvet", help="MM-Vet's official GPT-4 grading of `eval --bench mmvet` answers")
    p.add_argument("--out", required=True, help="the folder `jaxdebias eval --bench mmvet` wrote (mmvet_results.json)")
    p.add_argument("--data", required=True, help="MM-Vet's folder, with mm-vet.json (from mm-vet.zip)")
    p.add_argument("--model", default="gpt-4-0613", help="grader model (default: the official gpt-4-0613)")
    p.add_argument("--runs", type=_count, default=1, help="grading runs (official default 1; the paper 5)")
    p.add_argument("--api-key", help="default: OPENAI_API_KEY")
    p.add_argument("--url", default="https://api.openai.com/v1", help="OpenAI-compatible base URL")
    return parser


def _var(args):
    """VAR from the flags; without a checkpoint the embedded model's sink dims are discovered."""
    if not args.var:
        return None
    return var_spec(args.var_dims or (None if args.checkpoint else "discover"), p=args.var_p, tau=args.var_tau,
                    rho=args.var_rho, layers=args.var_layers)


def _debias(args) -> jd.Debias:
    """--debias, --pad-tau, --curve; the released curve of --task, by default the benchmark's (gqa without one),
    except on the embedded toy model, whose own calibrated curve (``jaxdebias.toy.curves``) is the default: a
    released curve describes LLaVA-1.5-7B. Without --debias: pad+curve, or off for a --method that scores nothing
    (random, pool), or pad for one without a released curve (VisionZip, iLLaVA) unless --curve names one."""
    mode, method = args.debias, getattr(args, "method", None) or "fastv"
    task = args.task or getattr(args, "bench", None) or "gqa"
    if mode is None:
        try:
            scores = jd.methods.get(method).debias
            released = jd.Debias.preset("after", method, task).curve is not None
        except ValueError:  # an unknown --method: prune_spec names it
            scores = released = True
        mode = "off" if not scores else "pad+curve" if released or args.curve is not None else "pad"
    curve = args.curve
    if curve is None and args.checkpoint is None and jd.METHOD_ALIASES.get(method.lower(), method.lower()) in \
            toy_curves.METHODS:
        curve = toy_curves.own_curve(method)  # the embedded model's own
    return parse_debias(mode, args.pad_tau, curve, task, method)


def _command(args) -> None:
    if args.command == "calibrate":
        calibrate(args.data, args.out, method=args.method, form=args.form, model=_model(args), bench=args.bench,
                  limit=args.limit, batch_size=args.batch, pad_tau=args.pad_tau)
    elif args.command == "bias":
        bias_report(args.data, args.out, method=args.method, model=_model(args), bench=args.bench,
                    limit=args.limit, batch_size=args.batch, pad_tau=args.pad_tau)
    elif args.command == "eval-grid":
        curve = None if args.curve in (None, "released") else (
            "online" if args.curve == "online" else specs.read_curve(args.curve))
        if args.curve is None and args.checkpoint is None:  # the embedded model's own calibrated curves
            curve = {m: jd.curve_from_dict(toy_curves.own_curve(m)) for m in toy_curves.METHODS}
        benches = [b.strip() for b in args.bench.split(",") if b.strip()]
        out = args.out or os.path.join("jaxdebias-grid", f"{'_'.join(benches)}-keep{args.keep}-{args.decode}")
        grid.evaluate_grids(benches, args.data, out, methods=grid.parse_methods(args.methods),
                           keep=args.keep, presets=tuple(p.strip() for p in args.presets.split(",") if p.strip()),
                           curve=curve, task=args.task, decode=args.decode, unpruned=not args.no_unpruned,
                           model=_model(args), limit=args.limit, batch_size=args.batch,
                           max_new_tokens=args.max_new_tokens)
    elif args.command == "eval":
        spec, var = prune_spec(args.method, args.keep, _debias(args), args.decode), _var(args)
        if args.distributed:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; others ignore it
            jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        setting = f"{spec.method}-keep{spec.keep}-{(args.debias or 'default').replace('+', '_')}-{spec.decode}"
        out = args.out or os.path.join("jaxdebias-eval", args.bench, setting + ("-var" if var else ""))
        evaluate(args.bench, args.data, out, spec=spec, model=_model(args), limit=args.limit,
                 batch_size=args.batch, max_new_tokens=args.max_new_tokens, var=var, overwrite=args.overwrite)
        if args.gpt_judge:
            video.judge(args.bench, out, model=args.judge_model, base_url=args.judge_url)
    elif args.command == "grade-mmvet":
        grade_mmvet(args.out, args.data, model=args.model, runs=args.runs, api_key=args.api_key, base_url=args.url)
    elif args.video is not None:
        run_video(prune_spec(args.method, args.keep, _debias(args), args.decode), model=_model(args),
                  video=args.video, prompt=args.prompt, out_dir=args.out, max_new_tokens=args.max_new_tokens,
                  var=_var(args))
    else:
        run(prune_spec(args.method, args.keep, _debias(args), args.decode), model=_model(args), image=args.image,
            prompt=args.prompt, out_dir=args.out, max_new_tokens=args.max_new_tokens, var=_var(args))


def _toy_command(args) -> None:
    """demo and toy-bench: the core alone and the generated benchmarks (no model to load)."""
    if args.command == "demo":
        if not 0 < args.keep <= demo.N:
            raise jd.UserError(f"--keep must be in 1..{demo.N} (the synthetic LLaVA-1.5 image has {demo.N} visual "
                               f"tokens), got {args.keep}.")
        demo.run(k=args.keep, seed=args.seed)
        return
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise jd.UserError(f"--out {args.out} is a file; pass a folder.")
    for kind in args.bench:
        path = bench.write_bench(f"{args.out}/{kind}", kind, args.n, args.seed)
        print(f"wrote {args.n} {kind} questions to {path}  (jaxdebias eval --bench {kind} --data {path})")


def main(argv: list[str] | None = None) -> int:
    """The command line: one error boundary around every command (exit codes above), one line on stderr."""
    args = build_parser().parse_args(argv)
    try:
        _toy_command(args) if args.command in ("demo", "toy-bench") else _command(args)
    except jd.UserError as e:
        code, message = faults.EXIT_USER, "error: " + " ".join(line.strip() for line in str(e).splitlines())
    except (KeyboardInterrupt, OSError, MemoryError, jax.errors.JaxRuntimeError) as e:
        fault = faults.fault(args.command, args, e)
        if fault is None:
            raise  # a bug: its traceback is what mends it
        code, message = fault
    else:
        return 0
    sys.stdout.flush()
    print(f"jaxdebias {args.command}: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
