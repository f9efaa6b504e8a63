"""Released decoding against the fast path: whole ``generate`` calls per method, side by side in one run.

    python benchmarks/bench_decode.py [--method fastv[,himap..]] [--keep 64] [--tokens 16] [--repeats 5]
                                      [--model small|mid|tiny] [--cache-dir DIR]

``jd.PruneSpec(decode=...)`` picks how a pruned model goes on after its prefill: "fast" serves every generated
token from the pruned KV caches with the prefill's selection; "released" decodes as the method's release does -
FastV in mask mode (nothing removed, every new token re-selects its kept image tokens from its own layer-(K-1)
attention row: ``sequence.MaskReselect``), HiMAP without a KV cache (the whole pruned prefill rerun per token:
``generate.recompute_generate``), the others from their pruned caches, as "fast".

On a random LLaVA-1.5 (``--model small``, the default: CLIP 2 x 256 at 336/14 -> 576 visual tokens, decoder
8 x 512, vocab 32064; ``--model mid``: ``bench_prune.py``'s CLIP 4 x 512 and decoder 8 x 1024, several times
slower; fp32 on a CPU, bf16 elsewhere), prompt 576 visual + 64 text tokens, batch 1, greedy, EOS ignored (every call
makes exactly the tokens asked for), this times ``generate(..., max_new_tokens=N)`` and ``max_new_tokens=1`` for the
unpruned model and for every method at ``--keep`` with both decode settings, all round-robin in one loop (after one
compile call each; medians over the rounds). Debiasing as in ``bench_prune.py``: released padding + the method's
released curve where it has one; multi-stage methods' layers scaled to the decoder's depth
(``accelerator.prune_spec``).

Reported per method: prefill + N tokens in ms for fast and released, released / fast, the per-token decode cost
- the median over rounds of ``(t(N) - t(1)) / (N - 1)``, the two calls run back to back in each round; t(1) makes
only the prefill's token, so this is what each further token adds - and both the totals and the per-token costs
over the unpruned model's. Where a method's released decoding is its fast path (same mode and reselect: the same
``generate`` calls) it is timed once and shown in both columns. ``--model tiny``: the tiny LLaVA of
``accelerator.py --small`` (a smoke run: methods deeper than its 2 decoder layers get a row saying so).
Only a header line and the table go to stdout. Every distinct prefill and decode program compiles once, in the
first call (on a CPU the compiles take about half of the default run; ``--cache-dir`` keeps them for a rerun).
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
from _timing import round_times
from accelerator import N_VISUAL, device_name, llava_configs, prompt_batch, prune_spec

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


def decode_specs(method: str, keep: int, model) -> dict:
    """{"fast": spec, "released": spec} for ``method`` at ``keep`` on ``model``: ``bench_prune``'s
    debiasing and depth-scaled stages (``accelerator.prune_spec``); iLLaVA merges in the last (up to) four layers
    of the vision tower that run, 288 tokens in all, as ``bench_prune.py`` sets it. Raises ValueError where the
    method does not fit the model."""
    spec, _ = prune_spec(method, keep, model.cfg.text.num_layers)
    if jd.canonical_method(method) == "illava":  # its CLIP layers 5-8 (of 23) do not exist on a shallow tower
        run = model.cfg.vision.layers_run
        k = min(4, run)
        spec = dataclasses.replace(spec, options={"vit_layers": tuple(range(run - k, run)), "vit_r": 288 // k})
    # mode / reselect were filled in from the spec's decode: clear them so each decode picks its own
    specs = {d: dataclasses.replace(spec, decode=d, mode=None, reselect=None) for d in DECODES}
    specs["released"].plan(N_VISUAL, model.cfg.text.num_layers)
    return specs


def released_decoding(spec: jd.PruneSpec) -> str:
    """What the released decode of ``spec`` does, in words."""
    if spec.mode == "mask":
        return "mask mode, re-selects per token"
    if spec.reselect == "every_token":
        return "no KV cache, pruned prefill per token"
    return "pruned caches: the fast path itself (timed once)"


def generate_fn(model, batch, spec: jd.PruneSpec | None, tokens: int):
    """A call of ``generate`` making exactly ``tokens`` tokens (EOS ignored); returns its tokens."""
    return lambda: gen.generate(model, batch, prune=spec, max_new_tokens=tokens, stop_at_eos=False).tokens


def total(ts: dict, key, n: int) -> float:
    """Median time of the n-token call."""
    return float(np.median(ts[(*key, n)]))


def per_token(ts: dict, key, n: int) -> float:
    """The cost of each token after the first: the median over rounds of (t(n) - t(1)) / (n - 1), each round's
    two calls run back to back."""
    return float(np.median((np.array(ts[(*key, n)]) - np.array(ts[(*key, 1)])) / (n - 1)))


def table(n: int, times: dict, rows: dict, skipped: dict) -> str:
    """The Markdown table for ``n`` new tokens: an unpruned row, one row per timed method (``rows``: method ->
    (its released decoding, the timing key of each decode)) and one per skipped one (``skipped``: method -> why)."""
    base, base_tok = total(times, ("unpruned", "-"), n), per_token(times, ("unpruned", "-"), n)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * (len(COLUMNS) - 2),
             f"| unpruned | - | {base * 1e3:.1f} | - | - | {base_tok * 1e3:.2f} | - | 1 | 1 |"]
    for method, (what, keys) in rows.items():
        fast, rel = total(times, keys["fast"], n), total(times, keys["released"], n)
        tok_f, tok_r = per_token(times, keys["fast"], n), per_token(times, keys["released"], n)
        lines.append(f"| {method} | {what} | {fast * 1e3:.1f} | {rel * 1e3:.1f} | {rel / fast:.2f} | "
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
    ap.add_argument("--repeats", type=int, default=5, help="round-robin rounds after the compile call")
    ap.add_argument("--model", choices=("small", "mid", "tiny"), default="small",
                    help="small: decoder 8 x 512, CLIP 2 x 256 (default); mid: bench_prune.py's; tiny: a smoke run")
    ap.add_argument("--cache-dir", help="persistent compilation cache (a rerun skips the compiles)")
    args = ap.parse_args(argv)
    if args.tokens < 2:
        ap.error("--tokens must be at least 2 (the per-token cost subtracts a 1-token call)")
    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    dev = jax.devices()[0]
    dtype = jnp.float32 if dev.platform == "cpu" else jnp.bfloat16
    name, cfg = model_config(args.model, dtype)
    model = llava.Llava(cfg, rngs=nnx.Rngs(0))
    batch = prompt_batch(cfg)
    fns = {("unpruned", "-", n): generate_fn(model, batch, None, n) for n in (1, args.tokens)}
    rows, skipped = {}, {}
    for method in args.method.split(","):
        try:
            specs = decode_specs(method, args.keep, model)
        except ValueError as e:
            skipped[method] = str(e).split(";")[0].replace("|", "/")
            continue
        fast, rel = specs["fast"], specs["released"]
        same = (rel.mode, rel.reselect) == (fast.mode, fast.reselect)  # then generate runs the very same calls
        keys = {"fast": (method, "fast"), "released": (method, "fast" if same else "released")}
        rows[method] = (released_decoding(rel), keys)
        for d in dict.fromkeys((keys["fast"][1], keys["released"][1])):  # one or both, in this order
            for n in (1, args.tokens):
                fns[(method, d, n)] = generate_fn(model, batch, specs[d], n)
    times = round_times(fns, args.repeats)
    out = table(args.tokens, times, rows, skipped)
    print(f"device: {device_name(dev)}; {name}, {jnp.dtype(dtype).name}; prompt {batch.input_ids.shape[1]} tokens "
          f"(576 visual), batch 1, greedy, {args.tokens} new tokens (EOS ignored); keep {args.keep}; debias: released "
          f"padding + the released curve where the method has one; {args.repeats} round-robin rounds after a "
          f"compile call, medians; ms/token = median over rounds of (t({args.tokens}) - t(1)) / {args.tokens - 1}\n")
    print(out)
    return out


if __name__ == "__main__":
    main()
