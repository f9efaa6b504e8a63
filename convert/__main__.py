"""``python -m jaxdebias.convert SRC DST`` / ``jaxdebias-convert SRC DST``."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from jaxdebias.convert import tables
from jaxdebias.convert.source import ConversionError
from jaxdebias.convert.write import convert


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="jaxdebias-convert",
        description="Convert a Hugging Face LLaVA (or Llama/Qwen2) checkpoint to an Orbax checkpoint, streaming, "
                    "without torch.")
    ap.add_argument("src", nargs="+", help="checkpoint directory (config.json + safetensors), or weight files "
                                           "with config.json beside them")
    ap.add_argument("dst", help="output directory (must not exist)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--layout", default="auto", choices=["auto", *tables.LAYOUTS])
    ap.add_argument("--vision", help="separate CLIP checkpoint directory (the original LLaVA release)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    src = args.src[0] if len(args.src) == 1 and not os.path.isfile(args.src[0]) else args.src
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            summary = convert(src, args.dst, dtype=args.dtype, layout=args.layout, vision=args.vision,
                              progress=not args.quiet)
    except ConversionError as e:
        print(f"jaxdebias-convert: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        done = "it was complete before the interrupt" if os.path.isdir(args.dst) else "nothing was written there"
        print(f"jaxdebias-convert: interrupted converting to {args.dst}; {done}.", file=sys.stderr)
        return 130
    for w in caught:
        if issubclass(w.category, RuntimeWarning):
            print(f"jaxdebias-convert: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    print(f"wrote {args.dst}: {summary['tensors']} tensors, {summary['parameters']:,} parameters, "
          f"{summary['dtype']}, layout {summary['layout']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
