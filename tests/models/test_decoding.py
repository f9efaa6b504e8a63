"""Decoding past the first token, for every method: greedy decoding from the pruned KV caches equals re-running the
pruned prefill on the prompt and the tokens generated so far (no cache) at every step.

The kept set must not depend on the generated tokens for the two to agree, so each method's stages vote with the
prompt's last token given as the instruction row (``instruction_pos``): a prompt token's attention cannot see
what comes after it, so the recomputed prefill selects and merges exactly as the cached one did, and what is
checked is how decoding continues - the positions of the new tokens, which caches hold what, the merged tokens.
The releases' own per-token decodes (FastV's mask-mode re-selection, HiMAP's recomputation) are checked against
transformers in ``test_pruning.py``.
"""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import jaxdebias as jd
from jaxdebias.methods import Stage
from jaxdebias.methods.illava import MergeStage
from jaxdebias.methods.sparsevlm import RecycleStage
from jaxdebias.methods.tokencarve import CarveStage
from jaxdebias.models import generate as gen

pytest.importorskip("torch")

from .hf_tiny import IMAGE_TOKEN  # noqa: E402
from .test_pruning import SIZES, np_tokencarve, run_layers_from, tiny  # noqa: E402,F401  (tiny: the fixture)

STEPS = 8
BUCKETS = tuple(range(1, 10))
SPECS = {  # each method's rule at this 4-layer, 9-patch model's scale; stages vote with the instruction row
    "fastv": dict(stages=(Stage(2, 4, "instruction", "tap"),)),
    "pdrop": dict(stages=(Stage(1, 6, "instruction", "probe"), Stage(3, 3, "instruction", "probe"))),
    "sparsevlm": dict(stages=(RecycleStage(1, 5, "instruction", "self", recycle=3, clusters=1),)),
    "himap": dict(stages=(Stage(1, 6, "instruction", "tap"), Stage(3, 3, "image", "tap"))),
    "tokencarve": dict(stages=(CarveStage(2, 4, "instruction", "tap"),)),
    "visionzip": dict(keep=6, options={"contextual": 2}),
    "illava": dict(stages=(MergeStage(2, 4, "instruction", "tap"),), options={"vit_layers": (1,), "vit_r": 2}),
    "random": dict(keep=5, options={"seed": 3}),
    "pool": dict(keep=4),
}


def request(t):
    last = t["am"].sum(1) - 1  # right-padded: the prompt's last slot
    return gen.Batch(t["ids"], t["px"], t["am"], image_sizes=SIZES, instruction_pos=last)


@pytest.mark.parametrize("method", sorted(set(SPECS) - {"tokencarve"}))  # TokenCarve: its own test below
def test_cached_decoding_equals_the_pruned_prefill_recomputed_per_token(tiny, method):  # noqa: F811
    kw = {"keep": 4, **SPECS[method]}
    debias = jd.Debias() if method in ("random", "pool") else jd.Debias(curve={"form": "exp", "b": 0.1}, pad_tau=0.5)
    spec = jd.PruneSpec(method, buckets=BUCKETS, debias=debias, **kw)
    cached = gen.generate(tiny["model"], request(tiny), prune=spec, max_new_tokens=STEPS, stop_at_eos=False)
    again = gen.generate(tiny["model"], request(tiny), prune=dataclasses.replace(spec, reselect="every_token"),
                         max_new_tokens=STEPS, stop_at_eos=False)
    np.testing.assert_allclose(cached.logits, again.logits, atol=1e-5)  # the same prefill
    np.testing.assert_array_equal(cached.tokens, again.tokens)
    assert len(set(cached.tokens.ravel().tolist())) > 1  # the answer moves: positions and caches matter
    for (raster, ok), (raster2, ok2) in zip(cached.kept, again.kept):  # the recomputation kept the same tokens
        assert [sorted(r[o].tolist()) for r, o in zip(raster, ok)] == [sorted(r[o].tolist()) for r, o in
                                                                       zip(raster2, ok2)]


def test_dense_cached_decoding_equals_the_full_forward_per_token(tiny):  # noqa: F811
    """Without pruning: each cached step's token = the argmax of the full forward (no cache) over the prompt and
    the tokens so far (right-padded to one length, so one compiled forward serves every step)."""
    r = gen.generate(tiny["model"], gen.Batch(tiny["ids"], tiny["px"], tiny["am"]), max_new_tokens=STEPS,
                     stop_at_eos=False)
    forward = nnx.jit(lambda m, ids, px, am: m(ids, px, am).logits)
    ids = np.pad(tiny["ids"], ((0, 0), (0, STEPS)))
    am = np.pad(tiny["am"], ((0, 0), (0, STEPS)))
    n = tiny["am"].sum(1)
    for step in range(STEPS):
        logits = np.asarray(forward(tiny["model"], ids, tiny["px"], am))
        for b in range(2):
            token = int(logits[b, n[b] - 1].argmax())
            assert r.tokens[b, step] == token, (b, step)
            ids[b, n[b]], am[b, n[b]] = token, 1
        n = n + 1


def test_illava_decodes_after_the_merged_prompt(tiny):  # noqa: F811
    """The encoder stage shortens the prompt by 2 tokens: the first generated token's position is the merged
    prompt's length (not the placeholders'), in every layer."""
    spec = jd.PruneSpec("illava", keep=4, layer=2, options={"vit_layers": (1,), "vit_r": 2}, buckets=BUCKETS)
    prep = gen.prepare(tiny["model"], request(tiny), spec)
    graphdef, state = nnx.split(tiny["model"])
    _, out = gen.prefill_step(graphdef, state, *prep.arrays, prep.limits, jax.random.key(0), plan=prep.plan,
                              extra=64, temperature=0.0)
    n_real = tiny["am"].sum(1)
    for layer_pos in out.cache.next_pos:
        np.testing.assert_array_equal(np.asarray(layer_pos), n_real - 2)


def hf_logits_with_block(t, blocks):
    """transformers' LLaVA with each sample's image span replaced by ``blocks[b]`` (tower-space features, projected
    by transformers' projector) at contiguous positions: the last prompt token's logits [2, V]."""
    import torch

    hf, ids, am = t["hf"], t["ids"], t["am"]
    embeds, masks = [], []
    with torch.no_grad():
        for b in range(2):
            img = np.nonzero(ids[b] == IMAGE_TOKEN)[0]
            proj = hf.model.multi_modal_projector(torch.tensor(blocks[b]))
            tok = hf.model.get_input_embeddings()(torch.tensor(ids[b]))
            embeds.append(torch.cat([tok[:img[0]], proj, tok[img[-1] + 1:]]))
            masks.append(np.concatenate([am[b][:img[0]], np.ones(len(blocks[b]), int), am[b][img[-1] + 1:]]))
        am2 = np.stack(masks)
        logits = hf(inputs_embeds=torch.stack(embeds), attention_mask=torch.tensor(am2),
                    position_ids=torch.tensor(np.where(am2 == 1, am2.cumsum(-1) - 1, 0))).logits.numpy()
    return logits[[0, 1], [np.nonzero(am2[b])[0].max() for b in range(2)]]


def test_pool_and_random_equal_transformers_fed_their_blocks(tiny):  # noqa: F811
    """pool: transformers' CLIP features (layer -2, CLS dropped) average-pooled by torch's adaptive pooling to
    2 x 2; random: the kept patches in raster order; each projected by transformers and run through its decoder
    at contiguous positions gives our logits."""
    import torch

    with torch.no_grad():
        feats = tiny["hf"].model.vision_tower(torch.tensor(tiny["px"]), output_hidden_states=True)
        feats = feats.hidden_states[-2][:, 1:]  # [2, 9, Dv]
    grid = feats.reshape(2, 3, 3, -1).permute(0, 3, 1, 2)
    pooled = torch.nn.functional.adaptive_avg_pool2d(grid, (2, 2)).permute(0, 2, 3, 1).reshape(2, 4, -1).numpy()
    r = gen.generate(tiny["model"], request(tiny), prune=jd.PruneSpec("pool", keep=4), max_new_tokens=1)
    np.testing.assert_allclose(r.logits, hf_logits_with_block(tiny, pooled), atol=1e-4)
    r = gen.generate(tiny["model"], request(tiny), prune=jd.PruneSpec("random", keep=5, buckets=BUCKETS),
                     max_new_tokens=1)
    kept = [sorted(raster[ok].tolist()) for raster, ok in zip(*r.kept[0])]
    assert all(len(k) == 5 for k in kept) and kept[0] != kept[1]
    blocks = [feats[b, kept[b]].numpy() for b in range(2)]
    np.testing.assert_allclose(r.logits, hf_logits_with_block(tiny, blocks), atol=1e-4)


def test_tokencarve_decodes_with_the_lower_caches_gathered(tiny):  # noqa: F811
    """TokenCarve's release gathers the caches of the layers below its work layer W = 2 to the kept tokens, so a
    generated token sees only them there, and the merged sequence (original positions) from W on. Reference, on
    transformers' layers per step without a cache: layers 0-1 over prompt + tokens so far with the pruned image
    keys masked for the generated rows, then layers 2-3 on the merged sequence (the NumPy rule of
    ``test_pruning.np_tokencarve`` on the prompt's layer-2 input and last-row layer-1 attention)."""
    import torch

    spec = jd.PruneSpec("tokencarve", stages=(CarveStage(2, 4, "instruction", "tap"),), buckets=BUCKETS)
    r = gen.generate(tiny["model"], request(tiny), prune=spec, max_new_tokens=STEPS, stop_at_eos=False)
    hf, ids, am = tiny["hf"], tiny["ids"], tiny["am"]
    lm = hf.model.language_model
    with torch.no_grad():
        for b in range(2):
            n_valid = int(am[b].sum())
            img = np.nonzero(ids[b] == IMAGE_TOKEN)[0]
            out = hf(input_ids=torch.tensor(ids[b:b + 1, :n_valid]), pixel_values=torch.tensor(tiny["px"][b:b + 1]),
                     output_attentions=True, output_hidden_states=True)
            av = out.attentions[1][0][:, n_valid - 1, img].mean(0).numpy()
            kept, feats = np_tokencarve(av, out.hidden_states[2][0].numpy()[img], 4)
            pruned = np.setdiff1d(np.arange(len(img)), kept)
            seq = list(ids[b][:n_valid])
            x0 = out.hidden_states[0]  # the prompt's input embeddings (image features in place)
            for step in range(STEPS):
                T = len(seq)
                x = torch.cat([x0, hf.model.get_input_embeddings()(torch.tensor([seq[n_valid:]], dtype=torch.long))],
                              1) if T > n_valid else x0
                allowed = torch.ones(T, T).tril().bool()
                allowed[n_valid:, torch.tensor(img[pruned])] = False  # generated rows: the gathered lower caches
                mask = torch.where(allowed, 0.0, torch.finfo(x.dtype).min)[None, None]
                pos = torch.arange(T)[None]
                pe = lm.rotary_emb(x, pos)
                for layer in lm.layers[:2]:
                    x = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=pe)
                    x = x[0] if isinstance(x, tuple) else x
                x = torch.cat([x[0, :img[0]], torch.tensor(feats), x[0, img[-1] + 1:]])[None]
                positions = np.concatenate([np.arange(img[0]), img[kept], np.arange(img[-1] + 1, T)])
                seq.append(int(run_layers_from(lm, hf, x, positions, 2).argmax()))
                assert r.tokens[b, step] == seq[-1], (b, step)
