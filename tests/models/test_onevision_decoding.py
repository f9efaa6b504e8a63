"""Decoding past the first token on LLaVA-OneVision: greedy decoding from the pruned KV caches equals re-running the
pruned prefill on the prompt and the tokens generated so far (no cache) at every step, for iLLaVA (images, left and
right padding; video) and FastV.

As in ``test_decoding.py``, each stage votes with the prompt's last token given as the instruction row
(``instruction_pos``), so the recomputed prefill selects and merges exactly as the cached one did and what is
checked is how decoding continues after OneVision's pruned span: iLLaVA's merged views (the prompt shorter than its
placeholders), the LLM stage's merged token, the positions of the new tokens and which caches hold what.
"""

import dataclasses

import numpy as np
import pytest

import jaxdebias as jd
from jaxdebias.methods import Stage
from jaxdebias.models import generate as gen

from .hf_tiny_onevision import video_prompts
from .test_onevision_pruning import LAYERS, R, batch_of, pair  # noqa: F401  (pair: the fixture)

pytest.importorskip("torch")

STEPS = 5
OPTIONS = {"vit_layers": LAYERS, "vit_r": R, "llm_layer": 2}


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
def test_illava_image_decoding_equals_the_pruned_prefill_recomputed_per_token(pair, padding):  # noqa: F811
    hf, ours = pair
    batch, _, _ = batch_of(ours, hf, padding=padding)
    batch = dataclasses.replace(batch, instruction_pos=last_prompt_slot(batch.attention_mask))
    spec = voting_the_instruction(jd.PruneSpec("illava", keep=1, options=OPTIONS), batch.pixel_values, ours)
    assert spec.stages[0].llm_r == 0.70  # the release's per-sample count
    r = check_cached_equals_recomputed(ours, batch, spec)
    assert len(r.kept) == 2  # the encoder stage and the LLM stage both ran


def test_illava_video_decoding_equals_the_pruned_prefill_recomputed_per_token(pair):  # noqa: F811
    hf, ours = pair
    ids, am, px = video_prompts(2, 4)
    video = ours.videos(px)
    batch = gen.Batch(ids, video, am.astype(bool), instruction_pos=last_prompt_slot(am))
    spec = voting_the_instruction(jd.PruneSpec("illava", keep=1, options={"vit_layers": LAYERS, "vit_r": R}), video,
                                  ours)
    assert spec.stages[0].layer == 2  # the video default
    check_cached_equals_recomputed(ours, batch, spec)


def test_fastv_decoding_equals_the_pruned_prefill_recomputed_per_token(pair):  # noqa: F811
    hf, ours = pair
    batch, _, _ = batch_of(ours, hf, padding="left")
    batch = dataclasses.replace(batch, instruction_pos=last_prompt_slot(batch.attention_mask))
    spec = jd.PruneSpec("fastv", keep=12, stages=(Stage(2, 12, "instruction", "tap"),),
                        buckets=tuple(range(1, 100)))
    assert (spec.mode, spec.reselect) == ("remove", "prefill")  # the spec's default decode
    check_cached_equals_recomputed(ours, batch, spec)
