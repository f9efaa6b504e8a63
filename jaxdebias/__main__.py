"""The ``jaxdebias`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxdebias", description="Debiased visual token pruning in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="debias + prune synthetic LLaVA-1.5 attention (no model needed)")
    demo.add_argument("--keep", type=int, default=64, help="visual tokens to keep (rounded up to a bucket)")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from jaxdebias import demo as demo_mod

        if not 0 < args.keep <= 576:
            parser.error(f"--keep must be in 1..576 (LLaVA-1.5 has 576 visual tokens), got {args.keep}")
        demo_mod.run(k=args.keep, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
