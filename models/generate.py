"""Generation with a KV cache: one entry, ``generate``, for dense, pruned and intervened (VAR, TriangleMix) runs.

Axes: B batch, T prompt slots (a bucket), V vocab, N visual tokens of an image, K kept slots.

    batch = Batch(input_ids, pixel_values, attention_mask, image_sizes=[[640, 480]])   # (width, height)
    result = generate(model, batch, prune=jd.PruneSpec("fastv", keep=128), max_new_tokens=32)
    result.tokens                                                                       # int32[B, 32]

The prompt is right-padded to a bucket length (``jd.bucket`` over ``PROMPT_BUCKETS``) so that prompts of different
lengths share one compiled prefill, and every layer's cache keeps room for the new tokens rounded up to 64 slots,
so one decode program serves them too. The prefill is ``pruning.prefill`` (dense without a spec); the decode
step donates its cache, which XLA then updates in place. How decoding continues is the spec's (``decode``,
``mode``, ``reselect``; the method's module says what its release does): from the pruned caches, re-selecting in
mask mode at every token (``sequence.MaskReselect``), or recomputing the pruned prefill per token
(``recompute_generate``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxdebias as jd
from jaxdebias.models import pruning, sequence
from jaxdebias.models.interventions import TriangleMix, VarSpec
from jaxdebias.models.family import VisualModel

PROMPT_BUCKETS = (64, 128, 256, 512, 640, 768, 1024, 1536, 2048, 4096)
CACHE_STEP = 64  # cache slots for generated tokens are rounded up to a multiple of this


@dataclasses.dataclass
class Batch:
    """input_ids int[B, T] (image placeholders expanded; left or right padding); pixel_values float[I, 3, H, W]
    (one image per sample when pruning) or None; attention_mask [B, T] (default all real); image_sizes int[B, 2]
    original (width, height) of each image, for the padding masks; instruction_pos int[B] slot of the last
    instruction token (PyramidDrop; default: the last real token)."""

    input_ids: Any
    pixel_values: Any = None
    attention_mask: Any = None
    image_sizes: Any = None
    instruction_pos: Any = None


@dataclasses.dataclass
class Result:
    """tokens int32[B, new]; kept: per stage, the encoder stage first (raster idx int[B, K] (-1: a merged token),
    kept bool[B, K]: the slots that hold a token of the stage's input) as numpy; kept_span: per stage the same slots
    as indices int[B, K] into that stage's input span (-1 for new, merged tokens); scores / debiased float32[B, N]
    first-stage scores (0 without pruning);
    stage_lengths: (first layer, stop layer, slots) per decoder segment; logits float32[B, V] of the prefill at
    the last prompt token."""

    tokens: np.ndarray
    kept: list
    kept_span: list
    scores: np.ndarray
    debiased: np.ndarray
    stage_lengths: list
    logits: np.ndarray


class StaticDef:
    """A GraphDef as a jit static argument whose hash is computed once: jit hashes its static arguments at every
    call, and hashing a model's GraphDef walks all its nodes (about 1 ms for an 8-layer LLaVA, 5 ms at 7B depth,
    per decode step). Equal to (and hashing like) another ``StaticDef`` of an equal GraphDef, so compiled programs
    are shared as before."""

    __slots__ = ("graphdef", "_hash")

    def __init__(self, graphdef):
        self.graphdef, self._hash = graphdef, hash(graphdef)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return isinstance(other, StaticDef) and (other.graphdef is self.graphdef or other.graphdef == self.graphdef)


def _merge(graphdef, state):
    return nnx.merge(graphdef.graphdef if isinstance(graphdef, StaticDef) else graphdef, state)


def pick_tokens(logits, temperature: float, key):
    """Greedy (temperature 0) or sampled next tokens int32[B] from logits float[B, V]."""
    if temperature == 0.0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "plan", "extra", "temperature", "var", "triangle"))
def prefill_step(graphdef, state, input_ids, pixel_values, real, image_sizes, instruction_pos, limits, key, *, plan,
                 extra, temperature, var=None, triangle=None):
    """The jitted prefill (``pruning.prefill`` of a ``jd.Plan``, None: dense) and the first new token:
    (int32[B], ``pruning.Prefill``)."""
    model = _merge(graphdef, state)
    out = pruning.prefill(model, input_ids, pixel_values, real, image_sizes, instruction_pos, limits, plan, extra,
                          var, triangle)
    return pick_tokens(out.logits, temperature, key), out


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "var"), donate_argnames=("cache",))
def decode_step(graphdef, state, tokens, cache, key, reselect=None, *, temperature, var=None):
    """One jitted decode step that donates (updates in place) the cache: (next tokens int32[B], cache).
    ``graphdef``: the model's GraphDef or a ``StaticDef`` of it (cheaper to call: decode_loop passes one);
    ``reselect``: FastV's mask-mode state from the prefill (``sequence.MaskReselect``) or None."""
    model = _merge(graphdef, state)
    logits, cache = model.decode(tokens, cache, var=var, reselect=reselect)
    return pick_tokens(logits, temperature, key), cache


def decode_loop(graphdef, state, first, cache, keys, *, eos: int, stop_at_eos: bool, temperature: float,
                var: VarSpec | None = None, reselect=None) -> np.ndarray:
    """Decoding from a prefilled cache: ``first`` int[B] is the first new token; one jitted, cache-donating step
    per further token. After a sample's EOS its tokens are EOS (with ``stop_at_eos`` the loop ends once every
    sample is done). Returns int32[B, len(keys)].

    One step stays in flight: step i is dispatched before step i - 1's tokens are read back, so the host's
    dispatch overlaps the device's work (with ``stop_at_eos`` at most one step runs after every sample is done).
    """
    static = graphdef if isinstance(graphdef, StaticDef) else StaticDef(graphdef)
    keys = list(keys)  # one split, not one slice op per step
    toks, first = [first], np.asarray(first)
    done = first == eos
    for i in range(1, len(keys)):
        if stop_at_eos and done.all():
            break
        tok, cache = decode_step(static, state, toks[-1], cache, keys[i], reselect, temperature=float(temperature),
                                 var=var)
        toks.append(tok)
        if stop_at_eos:  # the tokens of the step before, done by now or soon
            done = done | (np.asarray(toks[-2]) == eos)
    out = np.stack([np.asarray(t) for t in toks], 1).astype(np.int32)
    if stop_at_eos:  # every token after a sample's first EOS is EOS (the steps not run included)
        out = np.pad(out, ((0, 0), (0, len(keys) - out.shape[1])), constant_values=eos)
        out = np.where(np.maximum.accumulate(out == eos, axis=1), eos, out)
    return out


def prompt_arrays(model: VisualModel, batch: Batch, prompt_buckets=PROMPT_BUCKETS):
    """Checked numpy (input_ids int[B, T], real bool[B, T]), right-padded to a prompt bucket length."""
    input_ids = np.asarray(batch.input_ids)
    real = (np.ones(input_ids.shape, bool) if batch.attention_mask is None
            else np.asarray(batch.attention_mask).astype(bool))
    model.check_inputs(input_ids, batch.pixel_values, real)
    extra = jd.bucket(input_ids.shape[1], prompt_buckets, then_every=prompt_buckets[-1]) - input_ids.shape[1]
    return (np.pad(input_ids, ((0, 0), (0, extra)), constant_values=model.cfg.pad_token_id),
            np.pad(real, ((0, 0), (0, extra))))


def check_one_image(model: VisualModel, input_ids, pixel_values):
    """Pruning needs exactly one contiguous image span of N placeholders per sample."""
    n = model.num_visual(pixel_values)
    is_image = input_ids == model.visual_token_id(pixel_values)
    if not (is_image.sum(1) == n).all():
        raise ValueError(f"Pruning needs exactly one image ({n} placeholder tokens) per sample; got "
                         f"{is_image.sum(1).tolist()} image tokens.")
    starts = is_image.argmax(1)
    if not all(is_image[b, starts[b]:starts[b] + n].all() for b in range(len(input_ids))):
        raise ValueError("Each sample's image placeholders must be contiguous.")


@dataclasses.dataclass
class Prepared:
    """A checked, bucketed batch ready for ``prefill_step``: arrays (input_ids int[B, T], pixel_values, real
    bool[B, T], image_sizes int[B, 2], instruction_pos int[B] or None); the static ``jd.Plan`` (None: dense); the
    real per-stage budgets as ``sequence.limits_array``."""

    arrays: list
    plan: jd.Plan | None
    limits: jax.Array


def prepare(model: VisualModel, batch: Batch, prune: jd.PruneSpec | None = None, *, triangle: TriangleMix | None = None,
            mesh: jax.sharding.Mesh | None = None, prompt_buckets=PROMPT_BUCKETS) -> Prepared:
    """Checks a batch against the model and the spec (one schedule per request), pads it to its prompt bucket and
    places it on ``mesh``."""
    input_ids, real = prompt_arrays(model, batch, prompt_buckets)
    B = input_ids.shape[0]
    n, num_layers = model.num_visual(batch.pixel_values), model.cfg.text.num_layers
    if prune is None:
        plan, limits = None, ()
    else:
        if triangle is not None:
            raise ValueError("TriangleMix runs on dense prefills only; drop prune=... or triangle=....")
        check_one_image(model, input_ids, batch.pixel_values)
        plan, limits = prune.plan(n, num_layers, model.option_family(batch.pixel_values))  # checked, with the
                                                                                               # method's message
        if prune.debias.pad_tau is not None and batch.image_sizes is None:
            raise ValueError("Padding suppression (Debias pad_tau) needs batch.image_sizes, the original "
                             "(width, height) of each image.")
        if plan.pad_tau is not None:  # LLaVA-NeXT's images carry their padding mask: at the plan's threshold
            batch = dataclasses.replace(batch, pixel_values=model.at_tau(batch.pixel_values, plan.pad_tau))
        if plan.encoder is not None:  # LLaVA-OneVision lays out the views its encoder stage leaves
            batch = dataclasses.replace(batch, pixel_values=model.for_encoder(batch.pixel_values, plan.encoder,
                                                                                  plan.method))
    sizes = np.ones((B, 2), np.int32) if batch.image_sizes is None else np.asarray(batch.image_sizes,
                                                                                   np.int32).reshape(B, 2)
    arrays = [jnp.asarray(input_ids), jax.tree.map(jnp.asarray, batch.pixel_values),  # pixels or AnyresImages
              jnp.asarray(real), jnp.asarray(sizes),
              None if batch.instruction_pos is None else jnp.asarray(batch.instruction_pos, jnp.int32)]
    if mesh is not None:
        if B % mesh.shape["data"]:
            raise ValueError(f"Batch size {B} does not divide over the mesh's {mesh.shape['data']} 'data' devices; "
                             "pad the batch.")
        data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        arrays = [None if x is None else jax.device_put(x, data) for x in arrays]
    return Prepared(arrays, plan, sequence.limits_array(limits))


def generate(model: VisualModel, batch: Batch, *, prune: jd.PruneSpec | None = None, var: VarSpec | None = None,
             triangle: TriangleMix | None = None, max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
             stop_at_eos: bool = True, mesh: jax.sharding.Mesh | None = None,
             prompt_buckets=PROMPT_BUCKETS) -> Result:
    """Prefill (pruned by ``prune``, dense without it), then greedy or sampled decoding from the per-layer caches.

    Args:
      model: a ``Llava``; batch: a ``Batch``; prune: a ``jd.PruneSpec`` (one image per sample);
      var: ``interventions.VarSpec``, VAR at prefill (on the kept tokens when pruning) and decode;
      triangle: ``interventions.TriangleMix`` sparse prefill (dense runs only; decode stays dense);
      mesh: a ("data", ...) mesh (Auto axes) to split the batch over; place the model on it first with
        ``llava.shard_model``. The batch size must divide by the "data" axis.

    Returns:
      a ``Result``; ``tokens`` int32[B, max_new_tokens], EOS after a sample's EOS.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}.")
    model.check_interventions(batch.pixel_values, var, triangle)
    if prune is not None and prune.reselect == "every_token" and prune.mode == "remove":
        return recompute_generate(model, batch, prune, var=var, max_new_tokens=max_new_tokens,
                                  temperature=temperature, seed=seed, stop_at_eos=stop_at_eos, mesh=mesh,
                                  prompt_buckets=prompt_buckets)
    prep = prepare(model, batch, prune, triangle=triangle, mesh=mesh, prompt_buckets=prompt_buckets)
    extra = jd.bucket(max_new_tokens, (), then_every=CACHE_STEP)
    graphdef, state = nnx.split(model)
    keys = jax.random.split(jax.random.key(seed), max_new_tokens)
    first, out = prefill_step(graphdef, state, *prep.arrays, prep.limits, keys[0], plan=prep.plan, extra=extra,
                              temperature=float(temperature), var=var, triangle=triangle)
    tokens = decode_loop(graphdef, state, first, out.cache, keys, eos=model.cfg.eos_token_id,
                         stop_at_eos=stop_at_eos, temperature=temperature, var=var, reselect=out.reselect)
    return _result(model, batch, prep, tokens, out, np.asarray(out.logits))


def _result(model: VisualModel, batch: Batch, prep: Prepared, tokens, out, logits) -> Result:
    segs = sequence.segments(prep.arrays[0].shape[1], prep.plan, model.num_visual(batch.pixel_values),
                             model.cfg.text.num_layers)
    return Result(tokens, [(np.asarray(raster), np.asarray(ok)) for raster, ok, _ in out.kept],
                  [np.asarray(span) for _, _, span in out.kept], np.asarray(out.scores), np.asarray(out.debiased),
                  [tuple(seg) for seg in segs], logits)


def recompute_generate(model: VisualModel, batch: Batch, prune: jd.PruneSpec, *, var: VarSpec | None = None,
                       max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0, stop_at_eos: bool = True,
                       mesh: jax.sharding.Mesh | None = None, prompt_buckets=PROMPT_BUCKETS) -> Result:
    """Generation without a KV cache, as HiMAP's release decodes: every new token reruns the whole pruned prefill
    on the prompt and the tokens generated so far (which join the text rows that vote), so both stages re-select
    at every token. The prompt is bucketed with room for the new tokens: one compiled program serves every step.
    Each new token goes after its prompt's last real slot (left or right padding, masked span slots). Returns a ``Result`` whose ``kept`` / ``scores`` are the last
    step's and whose ``logits`` are the first step's (the prompt's)."""
    input_ids = np.asarray(batch.input_ids)
    real = (np.ones(input_ids.shape, bool) if batch.attention_mask is None
            else np.asarray(batch.attention_mask).astype(bool))
    end = np.where(real.any(1), real.shape[1] - np.argmax(real[:, ::-1], axis=1), 0)  # after each last real slot
    room = jd.bucket(input_ids.shape[1] + max_new_tokens, prompt_buckets, then_every=prompt_buckets[-1])
    pad = ((0, 0), (0, room - input_ids.shape[1]))
    input_ids = np.pad(input_ids, pad, constant_values=model.cfg.pad_token_id)
    real = np.pad(real, pad)
    graphdef, state = nnx.split(model)
    keys = jax.random.split(jax.random.key(seed), max_new_tokens)
    eos = model.cfg.eos_token_id
    tokens, done, out, first_logits = [], np.zeros(len(input_ids), bool), None, None
    for step in range(max_new_tokens):
        if stop_at_eos and done.all():
            tokens.append(np.full(done.shape, eos, np.int32))
            continue
        prep = prepare(model, dataclasses.replace(batch, input_ids=input_ids, attention_mask=real), prune, mesh=mesh,
                       prompt_buckets=(room,))
        tok, out = prefill_step(graphdef, state, *prep.arrays, prep.limits, keys[step], plan=prep.plan,
                                extra=CACHE_STEP, temperature=float(temperature), var=var)
        tok = np.asarray(tok)
        first_logits = np.asarray(out.logits) if first_logits is None else first_logits
        if stop_at_eos:
            tok = np.where(done, eos, tok)
            done = done | (tok == eos)
        tokens.append(tok.astype(np.int32))
        rows = np.arange(len(input_ids))
        input_ids[rows, end], real[rows, end] = tok, True  # positions come from the mask: any padding works
        end = end + 1
    return _result(model, batch, prep, np.stack(tokens, 1), out, first_logits)
