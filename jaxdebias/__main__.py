"""The ``jaxdebias`` command: ``run`` (pruned + debiased inference with figures), ``eval``, ``calibrate``, ``bias``
and ``demo`` (the core alone)."""

from __future__ import annotations

import argparse
import sys


def _add_prune_args(p):
    p.add_argument("--method", default="fastv",
                   help="fastv, pdrop, sparsevlm, himap, tokencarve or visionzip (default fastv)")
    p.add_argument("--keep", type=int, default=128, help="visual tokens to keep (PyramidDrop, SparseVLM: layer average)")
    p.add_argument("--debias", default="pad+curve", help="off, pad, curve or pad+curve (default pad+curve)")
    p.add_argument("--curve", default=None, help="curve.json from `jaxdebias calibrate`, 'online', or "
                                                 "'released' (default: the method's released curve)")
    p.add_argument("--task", default="gqa", help="benchmark whose released curve to use (default gqa)")
    p.add_argument("--pad-tau", type=float, default=0.5, help="padding threshold (default 0.5; PyramidDrop 0.01)")
    p.add_argument("--var", action="store_true", help="VAR attention redistribution (needs --var-dims on "
                                                      "models without published sink dims)")
    p.add_argument("--var-p", type=float, default=0.6)
    p.add_argument("--var-tau", type=float, default=20.0)
    p.add_argument("--var-rho", type=float, default=0.5)
    p.add_argument("--var-layers", default="released", help="released (2..L-1), intended (2..L-2) or 2,3,4")
    p.add_argument("--var-dims", default=None, help="sink dims, e.g. 1415,2533, a model name "
                                                    "(llava-1.5-7b), or 'discover'")


def _var_spec(args, model_name_hint: str | None):
    if not args.var:
        return None
    import jaxdebias as jd
    from jaxdebias.app import UserError
    from jaxdebias.models.attention import VarSpec

    dims = args.var_dims or model_name_hint
    if dims is None:
        raise UserError("--var needs the model's sink dimensions: --var-dims 1415,2533, a model name "
                        f"({', '.join(jd.KNOWN_SINK_DIMS)}) or 'discover'.")
    if dims != "discover":
        dims = tuple(int(d) for d in dims.split(",")) if dims[0].isdigit() else jd.known_sink_dims(dims)
    layers = args.var_layers if args.var_layers in ("released", "intended") else tuple(
        int(x) for x in args.var_layers.split(","))
    try:
        return VarSpec(sink_dims=dims, p=args.var_p, tau=args.var_tau, rho=args.var_rho, layers=layers)
    except ValueError as e:
        raise UserError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxdebias", description="Debiased visual token pruning in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer a prompt about an image, pruned and debiased, with figures")
    run.add_argument("--checkpoint", help="a converted checkpoint (jaxdebias-convert); default: the embedded "
                                          "untrained tiny model")
    run.add_argument("--image", help="image file (default: an image shipped with the package)")
    run.add_argument("--prompt", default="What is in the picture?")
    run.add_argument("--max-new-tokens", type=int, default=24)
    run.add_argument("--out", default="jaxdebias-out", help="directory for kept.png, curve.png, run.json")
    _add_prune_args(run)
    ev = sub.add_parser("eval", help="pruned inference over a benchmark in the LLaVA layout, with its metric")
    ev.add_argument("--checkpoint")
    ev.add_argument("--bench", required=True, help="pope, mme, gqa, textvqa, scienceqa, mmbench, vqav2 or vizwiz")
    ev.add_argument("--data", required=True, help="the benchmark's folder in the LLaVA layout "
                                                  "(playground/data/eval/<bench>): question file, images, answers")
    ev.add_argument("--out", default="jaxdebias-eval")
    ev.add_argument("--limit", type=int)
    ev.add_argument("--batch", type=int, default=4)
    ev.add_argument("--max-new-tokens", type=int, default=8)
    ev.add_argument("--distributed", action="store_true", help="run under jax.distributed, one process per host "
                    "(TPU pod slices and SLURM are detected; elsewhere give the three flags below)")
    ev.add_argument("--coordinator", help="host:port of process 0 (with --distributed)")
    ev.add_argument("--num-processes", type=int)
    ev.add_argument("--process-id", type=int)
    _add_prune_args(ev)
    cal = sub.add_parser("calibrate", help="fit a positional-debiasing curve over a data set")
    cal.add_argument("--checkpoint")
    cal.add_argument("--data", required=True)
    cal.add_argument("--bench", help="read --data as this benchmark (default: questions.jsonl or any known)")
    cal.add_argument("--method", default="fastv")
    cal.add_argument("--form", default="exp", help="exp, exp+c or poly3_inverse")
    cal.add_argument("--out", default="curve.json")
    cal.add_argument("--limit", type=int)
    cal.add_argument("--batch", type=int, default=4)
    cal.add_argument("--pad-tau", type=float, default=0.5)
    bias = sub.add_parser("bias", help="the bias report of a method's scores over a data set")
    bias.add_argument("--checkpoint")
    bias.add_argument("--data", required=True)
    bias.add_argument("--bench", help="read --data as this benchmark (default: questions.jsonl or any known)")
    bias.add_argument("--method", default="fastv")
    bias.add_argument("--out", default="jaxdebias-bias")
    bias.add_argument("--limit", type=int)
    bias.add_argument("--batch", type=int, default=4)
    bias.add_argument("--pad-tau", type=float, default=0.5)
    demo = sub.add_parser("demo", help="debias + prune synthetic LLaVA-1.5 attention (the core alone, no model)")
    demo.add_argument("--keep", type=int, default=64, help="visual tokens to keep (rounded up to a bucket)")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from jaxdebias import demo as demo_mod

        if not 0 < args.keep <= 576:
            parser.error(f"--keep must be in 1..576 (LLaVA-1.5 has 576 visual tokens), got {args.keep}")
        demo_mod.run(k=args.keep, seed=args.seed)
        return 0
    from jaxdebias import app

    try:
        if args.command == "calibrate":
            app.calibrate(args.checkpoint, args.data, args.out, args.method, args.form, bench=args.bench,
                          limit=args.limit,
                          batch_size=args.batch, pad_tau=args.pad_tau)
            return 0
        if args.command == "bias":
            app.bias_report(args.checkpoint, args.data, args.out, args.method, bench=args.bench, limit=args.limit,
                            batch_size=args.batch, pad_tau=args.pad_tau)
            return 0
        debias = app.parse_debias(args.debias, args.pad_tau, args.curve, args.task)
        var = _var_spec(args, None if args.checkpoint else "discover")
        if args.command == "eval":
            if args.distributed:
                import jax

                jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; others ignore it
                jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
            app.evaluate(args.checkpoint, args.bench, args.data, args.out, (args.method, args.keep, debias),
                         limit=args.limit, batch_size=args.batch, max_new_tokens=args.max_new_tokens, var=var)
        else:
            app.run(args.checkpoint, args.image or app.default_image_path(), args.prompt, args.method, args.keep,
                    debias, args.out, max_new_tokens=args.max_new_tokens, var=var)
    except app.UserError as e:
        print(f"jaxdebias {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
