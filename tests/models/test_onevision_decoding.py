"""Decoding past the first token on LLaVA-OneVision (the tiny model of ``hf_tiny_onevision``), several greedy tokens
per sample checked against a reference at every step.

iLLaVA (images with left and right padding; video): decoding from the pruned KV caches equals re-running the pruned
prefill (``recompute_generate``: no cache) on the prompt and the tokens generated so far. As in ``test_decoding.py``,
the LLM stage votes with the prompt's last token given as the instruction row (``instruction_pos``) - the row the
release votes with at prefill - so the recomputed prefill merges exactly as the cached one did, and what is checked
is how decoding continues after OneVision's pruned span: the merged views (the prompt shorter than its
placeholders), the LLM stage's merged token, the positions of the new tokens, which caches hold what.

FastV at its defaults (decode "fast"): transformers' Qwen2 layers with the pruned image keys masked from layer 2 on.
"""

import dataclasses
import inspect

import numpy as np
import pytest

import jaxdebias as jd
from jaxdebias.models import generate as gen
from jaxdebias.models.llava_onevision import expand_prompt

from .hf_tiny import converted
from .hf_tiny_onevision import IMAGE_TOKEN, make_hf_onevision, onevision_prompts, video_prompts
from .test_onevision_pruning import LAYERS, R, SIZES

torch = pytest.importorskip("torch")

STEPS = 5
OPTIONS = {"vit_layers": LAYERS, "vit_r": R, "llm_layer": 2}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """test_onevision_pruning's pair at seed 0: its seed 3 answers these prompts with one token repeated."""
    return converted(make_hf_onevision(seed=0), tmp_path_factory.mktemp("onevision_decode"))


def image_batch(ours, hf, padding):
    """test_onevision_pruning's ``batch_of`` (4 x 4 tiles downscaled, 3 x 3 unpadded) at a prompt seed whose
    pruned answers move, voting with each prompt's last token."""
    ids, am, px, hw = onevision_prompts(hf, SIZES, seed=3, padding=padding)
    images = ours.images(px, hw[:, ::-1])
    ids2, am2 = expand_prompt(ids, am, images, ours.cfg)
    return gen.Batch(ids2, images, am2.astype(bool), image_sizes=hw[:, ::-1], instruction_pos=last_prompt_slot(am2))


def voting_the_instruction(spec, visual, model):
    """``spec`` with its decoder stages' query set to "instruction" (each stage as the method schedules it for this
    model, iLLaVA's release count ``llm_r`` included)."""
    stages = spec.schedule(model.num_visual(visual), model.cfg.text.num_layers, model.option_family(visual))
    return dataclasses.replace(spec, stages=tuple(dataclasses.replace(s, query="instruction") for s in stages))


def last_prompt_slot(am):
    am = np.asarray(am).astype(bool)
    return am.shape[1] - 1 - np.argmax(am[:, ::-1], axis=1)


def check_cached_equals_recomputed(model, batch, spec):
    cached = gen.generate(model, batch, prune=spec, max_new_tokens=STEPS, stop_at_eos=False)
    again = gen.generate(model, batch, prune=dataclasses.replace(spec, reselect="every_token"),
                         max_new_tokens=STEPS, stop_at_eos=False)
    np.testing.assert_allclose(cached.logits, again.logits, atol=1e-5)  # the same prefill
    for (raster, ok), (raster2, ok2) in zip(cached.kept, again.kept):  # the last recomputation kept the same set
        assert [sorted(r[o].tolist()) for r, o in zip(raster, ok)] == [sorted(r[o].tolist()) for r, o in
                                                                       zip(raster2, ok2)]
    np.testing.assert_array_equal(cached.tokens, again.tokens)
    for b in range(len(cached.tokens)):  # the answer moves: positions and caches matter
        assert len(set(cached.tokens[b].tolist())) > 1, cached.tokens
    return cached


@pytest.mark.parametrize("padding", ["left", "right"])
def test_illava_image_decoding_equals_the_pruned_prefill_recomputed_per_token(pair, padding):
    hf, ours = pair
    batch = image_batch(ours, hf, padding)
    spec = voting_the_instruction(jd.PruneSpec("illava", keep=1, options=OPTIONS), batch.pixel_values, ours)
    assert spec.stages[0].llm_r == 0.70  # the release's per-sample count
    r = check_cached_equals_recomputed(ours, batch, spec)
    assert len(r.kept) == 2  # the encoder stage and the LLM stage both ran


def test_illava_video_decoding_equals_the_pruned_prefill_recomputed_per_token(pair):
    hf, ours = pair
    ids, am, px = video_prompts(2, 4, seed=1)
    video = ours.videos(px)
    batch = gen.Batch(ids, video, am.astype(bool), instruction_pos=last_prompt_slot(am))
    spec = voting_the_instruction(jd.PruneSpec("illava", keep=1, options={"vit_layers": LAYERS, "vit_r": R}), video,
                                  ours)
    assert spec.stages[0].layer == 2  # the video default
    check_cached_equals_recomputed(ours, batch, spec)


def hf_fastv_fixed(hf, x0, img, candidates, keep, steps):
    """FastV decoding from the pruned caches (the spec's default decode), on transformers' Qwen2 layers run one by
    one over a DynamicCache: at prefill, the last prompt token's row of layer 1's attention (heads averaged) keeps
    the ``keep`` best ``candidates`` of the image slots ``img`` (lower index first on ties); layers >= 2 mask the
    others' keys for every query after (the prompt's and each generated token's). x0: float[1, T, D] the prompt's
    input embeddings (image features in place). Returns (greedy tokens, prefill logits float[V], kept int[keep])."""
    from transformers import DynamicCache

    lm = hf.model.language_model
    cache_kw = "cache" if "cache" in inspect.signature(lm.layers[0].forward).parameters else "past_key_values"
    cache, tokens, x, start, pruned, kept, first = DynamicCache(), [], x0, 0, None, None, None
    neg = torch.finfo(x0.dtype).min
    for _ in range(steps):
        T = x.shape[1]
        pos = torch.arange(start, start + T)[None]
        allowed = torch.arange(start + T)[None, :] <= pos[0][:, None]  # causal [T, S]
        pe = lm.rotary_emb(x, pos)
        h = x
        for i, layer in enumerate(lm.layers):
            mask = allowed.clone()
            if i >= 2:
                mask[:, torch.from_numpy(img[pruned])] = False
            seen = []
            hook = layer.self_attn.register_forward_hook(lambda mod, args, out: seen.append(out[1]))
            h = layer(h, attention_mask=torch.where(mask, 0.0, neg)[None, None], position_ids=pos,
                      position_embeddings=pe, **{cache_kw: cache})
            h = h[0] if isinstance(h, tuple) else h
            hook.remove()
            if i == 1 and pruned is None:
                s = seen[0][0, :, -1, torch.from_numpy(img)].mean(0).numpy()
                kept = np.sort(np.argsort(-np.where(candidates, s, -np.inf), kind="stable")[:keep])
                pruned = np.setdiff1d(np.arange(len(img)), kept)
        logits = hf.lm_head(lm.norm(h[:, -1]))[0]
        first = logits.numpy() if first is None else first
        tokens.append(int(logits.argmax(-1)))
        start += T
        x = hf.model.get_input_embeddings()(torch.tensor([[tokens[-1]]]))
    return tokens, first, kept


def test_fastv_decoding_equals_transformers_with_the_pruned_keys_masked(pair):
    """FastV at its defaults (``decode`` "fast": the prefill's selection, the pruned tokens removed from layer 2's
    caches on) generates transformers' tokens with those tokens' keys masked from layer 2 on; newlines are never
    kept."""
    hf, ours = pair
    ids, am, px, hw = onevision_prompts(hf, SIZES, seed=3, padding="left")
    batch = image_batch(ours, hf, "left")
    spec = jd.PruneSpec("fastv", keep=12, layer=2)
    assert (spec.decode, spec.mode, spec.reselect) == ("fast", "remove", "prefill")
    r = gen.generate(ours, dataclasses.replace(batch, instruction_pos=None), prune=spec, max_new_tokens=STEPS,
                     stop_at_eos=False)
    kind = np.asarray(batch.pixel_values.slot_kind)
    with torch.no_grad():
        x0 = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), image_sizes=torch.tensor(hw),
                attention_mask=torch.tensor(am), output_hidden_states=True).hidden_states[0]
    for b in range(len(SIZES)):
        real = am[b] == 1
        img = np.nonzero(ids[b][real] == IMAGE_TOKEN)[0]
        with torch.no_grad():
            want, logits, kept = hf_fastv_fixed(hf, x0[b:b + 1, torch.from_numpy(real)], img, kind[b][:len(img)] >= 0,
                                                12, STEPS)
        raster, valid = r.kept[0][:2]
        np.testing.assert_array_equal(np.sort(raster[b][valid[b]]), kept)
        np.testing.assert_allclose(r.logits[b], logits, atol=1e-4)
        assert r.tokens[b].tolist() == want, (b, r.tokens[b], want)
        assert len(set(want)) > 1, want  # the answer moves: positions and caches matter
