"""Released decoding against the fast path: whole ``generate`` calls per method, side by side in one run.

    python benchmarks/bench_decode.py [--method fastv[,himap..]] [--keep 64] [--tokens 16] [--repeats 3] [--model small|mid|tiny]

``jd.PruneSpec(decode=...)`` picks how a pruned model goes on after its prefill: "fast" serves every generated
token from the pruned KV caches with the prefill's selection; "released" decodes as the method's release does -
FastV in mask mode (nothing removed, every new token re-selects its kept image tokens from its own layer-(K-1)
attention row: ``sequence.MaskReselect``), HiMAP without a KV cache (the whole pruned prefill rerun per token:
``generate.recompute_generate``), the others from their pruned caches, as "fast".

On a random LLaVA-1.5 (``--model small``, the default: CLIP 2 x 256 at 336/14 -> 576 visual tokens, decoder
8 x 512, vocab 32064; ``--model mid``: ``bench_prune.py``'s CLIP 4 x 512 and decoder 8 x 1024, about three times
slower; fp32 on a CPU, bf16 elsewhere), prompt 576 visual + 64 text tokens, batch 1,
greedy, EOS ignored (every call makes exactly the tokens asked for), this times ``generate(..., max_new_tokens=N)``
and ``generate(..., max_new_tokens=1)`` for the unpruned model and for every method at ``--keep`` with both decode
settings, all round-robin in one loop (``_timing.interleaved_times``, after one compile call each; medians).
Debiasing as in ``bench_prune.py``: released padding + the method's released curve where it has one; multi-stage
methods' layers scaled to the decoder's depth (``accelerator.prune_spec``).

Reported per method: prefill + N tokens in ms for fast and released, released / fast, the per-token decode cost
``(t(N) - t(1)) / (N - 1)`` - t(1) is a call that makes only the prefill's token, so this is what each further
token adds - and both the totals and the per-token costs over the unpruned model's. ``--model tiny``: the tiny
LLaVA of ``accelerator.py --small`` (a smoke run: methods deeper than its 2 decoder layers get a row saying so).
Only the table and its header line go to stdout; each of the 2 + 4 per method calls compiles once (on a CPU the
compiles take about half of the default run).
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxdebias as jd
from jaxdebias.models import generate as gen
from jaxdebias.models import llava
from jaxdebias.models.clip import ClipVisionConfig
from jaxdebias.models.llama import LlamaConfig
from _timing import interleaved_times
from accelerator import device_name, llava_configs, prompt_batch, prune_spec

METHODS = ("fastv", "himap", "pdrop", "sparsevlm", "tokencarve", "visionzip", "illava")
DECODES = ("fast", "released")
COLUMNS = ("method", "released decoding", "fast ms", "released ms", "released / fast", "fast ms/token",
           "released ms/token", "total vs unpruned (fast / released)", "per token vs unpruned (fast / released)")


def model_config(size: str, dtype) -> tuple[str, llava.LlavaConfig]:
    """(name, config) of the random LLaVA-1.5 to time: "mid" is ``bench_prune.py``'s (``accelerator.py``'s mid
    one), "tiny" ``accelerator.py --small``'s, "small" a decoder of the mid one's depth at half its width under a
    2 x 256 CLIP tower (the same 576 visual tokens), so that every method fits and the run stays short on a CPU."""
    if size == "small":
        return "small llava (CLIP 2x256, decoder 8x512)", llava.LlavaConfig(
            ClipVisionConfig(hidden_size=256, intermediate_size=1024, num_layers=2, num_heads=4, dtype=dtype,
                             param_dtype=dtype),
            LlamaConfig(vocab_size=32064, hidden_size=512, intermediate_size=int(512 * 2.6875), num_layers=8,
                        num_heads=8, num_kv_heads=8, dtype=dtype, param_dtype=dtype))
    configs = llava_configs(dtype, size == "tiny")
    name = next(k for k in configs if size == "tiny" or k.startswith("mid"))
    return name, configs[name]


def decode_specs(method: str, keep: int, model) -> tuple[dict, str]:
    """({"fast": spec, "released": spec}, setting) for ``method`` at ``keep`` on ``model``: ``bench_prune``'s
    debiasing and depth-scaled stages (``accelerator.prune_spec``); iLLaVA merges in the last (up to) four layers
    of the vision tower that run, 288 tokens in all, as ``bench_prune.py`` sets it. Raises ValueError where the
    method does not fit the model."""
    spec, setting = prune_spec(method, keep, model.cfg.text.num_layers)
    if jd.canonical_method(method) == "illava":  # its CLIP layers 5-8 (of 23) do not exist on a shallow tower
        run = model.cfg.vision.layers_run
        k = min(4, run)
        spec = dataclasses.replace(spec, options={"vit_layers": tuple(range(run - k, run)), "vit_r": 288 // k})
        setting += f", encoder merges in CLIP layers {run - k}..{run - 1}"
    # mode / reselect were filled in from the spec's decode: clear them so each decode picks its own
    specs = {d: dataclasses.replace(spec, decode=d, mode=None, reselect=None) for d in DECODES}
    specs["released"].plan(576, model.cfg.text.num_layers)
    return specs, setting


def released_decoding(spec: jd.PruneSpec) -> str:
    """What the released decode of ``spec`` does, in words."""
    if spec.mode == "mask":
        return "mask mode, re-selects per token"
    if spec.reselect == "every_token":
        return "no KV cache, pruned prefill per token"
    return "pruned caches (= fast)"


def generate_fn(model, batch, spec: jd.PruneSpec | None, tokens: int):
    """A call of ``generate`` making exactly ``tokens`` tokens (EOS ignored); returns its tokens."""
    return lambda: gen.generate(model, batch, prune=spec, max_new_tokens=tokens, stop_at_eos=False).tokens


def per_token(times: dict, key, n: int) -> float:
    """The cost of each token after the first: (t(n) - t(1)) / (n - 1)."""
    return (times[(*key, n)] - times[(*key, 1)]) / (n - 1)


def table(args, times: dict, rows: dict, skipped: dict) -> str:
    """The Markdown table: an unpruned row, one row per timed method (``rows``: method -> its released decoding)
    and one per skipped one (``skipped``: method -> why)."""
    n = args.tokens
    base, base_tok = times[("unpruned", "-", n)], per_token(times, ("unpruned", "-"), n)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * (len(COLUMNS) - 2),
             f"| unpruned | - | {base * 1e3:.1f} | - | - | {base_tok * 1e3:.2f} | - | 1 | 1 |"]
    for method, row in rows.items():
        fast, rel = times[(method, "fast", n)], times[(method, "released", n)]
        tok_f, tok_r = per_token(times, (method, "fast"), n), per_token(times, (method, "released"), n)
        lines.append(f"| {method} | {row} | {fast * 1e3:.1f} | {rel * 1e3:.1f} | {rel / fast:.2f} | "
                     f"{tok_f * 1e3:.2f} | {tok_r * 1e3:.2f} | {fast / base:.2f} / {rel / base:.2f} | "
                     f"{tok_f / base_tok:.2f} / {tok_r / base_tok:.2f} |")
    for method, why in skipped.items():
        lines.append(f"| {method} | skipped: {why} |" + " - |" * (len(COLUMNS) - 2))
    return "\n".join(lines)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default=",".join(METHODS), help="one method or a comma-separated list")
    ap.add_argument("--keep", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=16, help="max_new_tokens of the timed calls (>= 2)")
    ap.add_argument("--repeats", type=int, default=3, help="round-robin rounds after the compile call")
    ap.add_argument("--model", choices=("small", "mid", "tiny"), default="small",
                    help="small: decoder 8 x 512, CLIP 2 x 256 (default); mid: bench_prune.py's; tiny: a smoke run")
    args = ap.parse_args(argv)
    if args.tokens < 2:
        ap.error("--tokens must be at least 2 (the per-token cost subtracts a 1-token call)")
    dev = jax.devices()[0]
    dtype = jnp.float32 if dev.platform == "cpu" else jnp.bfloat16
    name, cfg = model_config(args.model, dtype)
    model = llava.Llava(cfg, rngs=nnx.Rngs(0))
    batch = prompt_batch(cfg)
    fns = {("unpruned", "-", n): generate_fn(model, batch, None, n) for n in (1, args.tokens)}
    rows, skipped = {}, {}
    for method in args.method.split(","):
        try:
            specs, _ = decode_specs(method, args.keep, model)
        except ValueError as e:
            skipped[method] = str(e).split(";")[0].replace("|", "/")
            continue
        rows[method] = released_decoding(specs["released"])
        for d, spec in specs.items():
            for n in (1, args.tokens):
                fns[(method, d, n)] = generate_fn(model, batch, spec, n)
    times = interleaved_times(fns, args.repeats)
    out = table(args, times, rows, skipped)
    print(f"device: {device_name(dev)} ({dev.platform}); {name}, {jnp.dtype(dtype).name}; prompt "
          f"{batch.input_ids.shape[1]} tokens (576 visual), batch 1, greedy, {args.tokens} new tokens (EOS ignored); "
          f"keep {args.keep}; debias: released padding + the released curve where the method has one; "
          f"{args.repeats} round-robin rounds after a compile call, medians; ms/token = (t({args.tokens}) - t(1)) / "
          f"{args.tokens - 1}\n")
    print(out)
    return out


if __name__ == "__main__":
    main()
