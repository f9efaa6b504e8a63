"""Pruned + debiased generation on Video-LLaVA (8 frames x (4 patches + CLS) = 40 visual tokens, taken from the
model): kept sets against NumPy re-derivations on transformers' attention, the per-frame and across-video trends,
and the visual count the methods see."""

import dataclasses

import numpy as np
import pytest

import jaxdebias as jd
from jaxdebias.methods import Stage
from jaxdebias.methods.sparsevlm import RecycleStage
from jaxdebias.methods.tokencarve import CarveStage
from jaxdebias.models import generate as gen

torch = pytest.importorskip("torch")

from .hf_tiny_video import FRAMES, FRAME_TOKENS, VIDEO_TOKEN, make_hf_video_llava, video_prompts  # noqa: E402

N = FRAMES * FRAME_TOKENS
BUCKETS = (4, 8, 12, 16, 24, 32, 40)
CURVE = {"form": "exp", "b": 0.3}  # strong enough to reorder tokens within a frame of 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from jaxdebias.convert import from_hf

    hf = make_hf_video_llava(seed=4, text_layers=4)
    path = tmp_path_factory.mktemp("video_prune")
    hf.save_pretrained(path)
    ids, am, videos, _ = video_prompts(padding="right")
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values_videos=torch.tensor(videos),
                 attention_mask=torch.tensor(am), position_ids=torch.tensor(np.where(am == 1, am.cumsum(-1) - 1, 0)),
                 output_attentions=True)
    return {"hf": hf, "model": from_hf(path), "ids": ids, "am": am, "videos": videos,
            "attn": [a.numpy() for a in ref.attentions]}


def np_select(scores, k):
    return sorted(np.lexsort((np.arange(len(scores)), -scores))[:k].tolist())


def np_weights(trend, b=CURVE["b"]):
    """The trend's weights over the video span: restarting at each frame, or one index over all frames."""
    i = np.arange(N)
    return np.exp(-b * (i % FRAME_TOKENS if trend == "frame" else i))


def kept_sets(result, stage=0):
    idx, slot = result.kept[stage]
    return [sorted(idx[b][slot[b]].tolist()) for b in range(idx.shape[0])]


def run(t, spec, trend="frame", instruction=None):
    model = t["model"].with_frame_trend(trend)
    return gen.generate(model, gen.Batch(t["ids"], t["videos"], t["am"], instruction_pos=instruction), prune=spec,
                        max_new_tokens=1)


@pytest.mark.parametrize("debias", ["off", "frame", "video"])
def test_fastv_on_video_equals_numpy(tiny, debias):
    spec = jd.PruneSpec("fastv", keep=12, layer=2, buckets=BUCKETS,
                        debias=jd.Debias() if debias == "off" else jd.Debias(curve=CURVE))
    r = run(tiny, spec, "frame" if debias == "off" else debias)
    for b in range(2):
        vid = np.nonzero(tiny["ids"][b] == VIDEO_TOKEN)[0]
        assert len(vid) == N
        last = np.nonzero(tiny["am"][b])[0].max()
        scores = tiny["attn"][1][b][:, last, vid].mean(0)  # layer K-1 = 1, the last token, heads averaged
        if debias != "off":
            scores = scores * np_weights(debias)
        assert kept_sets(r)[b] == np_select(scores, 12)
        np.testing.assert_allclose(r.scores[b], tiny["attn"][1][b][:, last, vid].mean(0), rtol=1e-4, atol=1e-7)
    assert r.stage_lengths[-1][2] == r.stage_lengths[0][2] - N + 12


def test_the_two_trends_differ_and_online_runs_per_frame(tiny):
    spec = jd.PruneSpec("fastv", keep=12, layer=2, buckets=BUCKETS, debias=jd.Debias(curve=CURVE))
    frame, video = run(tiny, spec, "frame"), run(tiny, spec, "video")
    assert kept_sets(frame) != kept_sets(video)
    online = run(tiny, dataclasses.replace(spec, debias=jd.Debias(curve="online")), "frame")
    # the online per-frame fit is the core's jd.debias_views on the same scores, one view per frame
    i = np.broadcast_to(np.arange(N), (2, N))
    expect = jd.debias_views(online.scores, i // FRAME_TOKENS, i % FRAME_TOKENS, (FRAME_TOKENS,) * FRAMES,
                             curve="online")
    np.testing.assert_allclose(online.debiased, np.asarray(expect), rtol=1e-5, atol=1e-8)
    assert all(len(k) == 12 for k in kept_sets(online))


def test_pdrop_first_stage_on_video_equals_numpy(tiny):
    instr = np.array([np.nonzero(tiny["am"][b])[0].max() - 1 for b in range(2)])
    spec = jd.PruneSpec("pdrop", stages=(Stage(2, 16, "instruction", "probe"), Stage(3, 8, "instruction", "probe")),
                        buckets=BUCKETS, debias=jd.Debias(curve=CURVE))
    r = run(tiny, spec, "frame", instr)
    for b in range(2):
        vid = np.nonzero(tiny["ids"][b] == VIDEO_TOKEN)[0]
        scores = tiny["attn"][2][b][:, instr[b], vid].mean(0) * np_weights("frame")
        assert kept_sets(r)[b] == np_select(scores, 16)
        assert set(kept_sets(r, 1)[b]) <= set(kept_sets(r)[b]) and len(kept_sets(r, 1)[b]) == 8


def test_keep_all_equals_dense_and_counts_come_from_the_model(tiny):
    batch = gen.Batch(tiny["ids"], tiny["videos"], tiny["am"])
    dense = gen.generate(tiny["model"], batch, max_new_tokens=4, stop_at_eos=False)
    full = gen.generate(tiny["model"], batch, prune=jd.PruneSpec("fastv", keep=N, layer=2, buckets=BUCKETS),
                        max_new_tokens=4, stop_at_eos=False)
    np.testing.assert_array_equal(full.tokens, dense.tokens)
    np.testing.assert_allclose(full.logits, dense.logits, atol=1e-5)
    assert tiny["model"].num_visual(tiny["videos"]) == N
    with pytest.raises(ValueError, match=str(N)):
        gen.generate(tiny["model"], batch, prune=jd.PruneSpec("fastv", keep=N + 1, buckets=BUCKETS + (48,)),
                     max_new_tokens=1)
    with pytest.raises(ValueError, match="no letterbox"):
        gen.generate(tiny["model"], dataclasses.replace(batch, image_sizes=[[28, 28]] * 2),
                     prune=jd.PruneSpec("fastv", keep=8, buckets=BUCKETS, debias=jd.Debias(pad_tau=0.5)),
                     max_new_tokens=1)
    with pytest.raises(ValueError, match="Video-LLaVA video"):
        gen.generate(tiny["model"], batch, prune=jd.PruneSpec("visionzip", keep=16, buckets=BUCKETS),
                     max_new_tokens=1)


def test_var_on_the_video_span_matches_the_torch_reference(tiny):
    """VAR with the video as the visual span (visual sinks among the 40 video tokens, the text after them edited)
    against test_var's PyTorch re-implementation of the released rule on transformers' attention."""
    import jax.numpy as jnp

    from jaxdebias.models.interventions import VarSpec
    from jaxdebias.models.layers import Taps

    from .hf_tiny import IMAGE_TOKEN
    from .test_var import TAU, torch_var_reference

    hf, ours, ids, am, videos = tiny["hf"], tiny["model"], tiny["ids"], tiny["am"], tiny["videos"]
    h2 = ours(ids, videos, am, taps=Taps(hidden_layers=(2,))).hidden_states[2]
    dims = tuple(int(d) for d in jd.discover_sink_dims(h2, top=2, valid=jnp.asarray(am, bool))[0])
    spec = VarSpec(sink_dims=dims, tau=TAU)
    sinks = np.asarray(jd.sink_tokens(h2, dims, TAU)) & am.astype(bool)
    assert (sinks & (ids == VIDEO_TOKEN)).any(), "the test needs visual sinks among the video tokens"
    plain = np.asarray(ours(ids, videos, am).logits)
    got = np.asarray(ours(ids, videos, am, var=spec).logits)
    # the reference marks visual keys by IMAGE_TOKEN: hand it the video positions under that id
    remove, real_holder = torch_var_reference(hf, np.where(ids == VIDEO_TOKEN, IMAGE_TOKEN, ids), spec, list(dims), 4)
    real_holder.append(am.astype(bool))
    try:
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor(ids), pixel_values_videos=torch.tensor(videos),
                     attention_mask=torch.tensor(am),
                     position_ids=torch.tensor(np.where(am == 1, am.cumsum(-1) - 1, 0))).logits.numpy()
    finally:
        remove()
    real = am.astype(bool)
    assert np.abs(got - plain)[real].max() > 1e-3  # VAR changed something
    assert np.abs(got - ref)[real].max() <= 1e-4


def test_himap_and_sparsevlm_first_stages_on_video_equal_numpy(tiny):
    """HiMAP: the text rows' layer-1 attention (heads and rows averaged) keeps 16; SparseVLM: the raters (from the
    decoder inputs) in layer 2's own attention keep 12 and 4 recycled tokens merge into 1; both debiased per
    frame (kept sets against NumPy on transformers' tensors). TokenCarve runs on video with the same count."""
    from .test_pruning import np_raters

    hf, ids, am = tiny["hf"], tiny["ids"], tiny["am"]
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), pixel_values_videos=torch.tensor(tiny["videos"]),
                 attention_mask=torch.tensor(am), position_ids=torch.tensor(np.where(am == 1, am.cumsum(-1) - 1, 0)),
                 output_hidden_states=True)
    w = np_weights("frame")
    himap = run(tiny, jd.PruneSpec("himap", stages=(Stage(2, 16, "text", "tap"), Stage(3, 8, "image", "tap")),
                                   buckets=BUCKETS, debias=jd.Debias(curve=CURVE)))
    sparse = run(tiny, jd.PruneSpec("sparsevlm", stages=(RecycleStage(2, 12, "raters", "self", recycle=4, clusters=1),),
                                    buckets=BUCKETS, debias=jd.Debias(curve=CURVE)))
    for b in range(2):
        vid = np.nonzero(ids[b] == VIDEO_TOKEN)[0]
        n_valid = am[b].sum()
        text = np.arange(vid.max() + 1, n_valid)
        scores = tiny["attn"][1][b][:, text][:, :, vid].mean((0, 1)) * w
        assert kept_sets(himap)[b] == np_select(scores, 16)
        assert len(kept_sets(himap, 1)[b]) == 8 and set(kept_sets(himap, 1)[b]) <= set(kept_sets(himap)[b])
        h0 = out.hidden_states[0][b].numpy()
        is_text = np.zeros(len(h0), bool)
        is_text[vid[-1] + 1:n_valid] = True
        rows = np.nonzero(np_raters(h0[vid], h0, is_text))[0]
        raw = tiny["attn"][2][b][:, rows][:, :, vid].mean(0).mean(0)
        kept = np_select(raw * w, 12)
        assert kept_sets(sparse)[b] == kept
    assert sparse.stage_lengths[-1][2] == sparse.stage_lengths[0][2] - N + 12 + 1
    carve = run(tiny, jd.PruneSpec("tokencarve", stages=(CarveStage(2, 12, "last", "tap", info_weight=0.5),),
                                   buckets=BUCKETS, debias=jd.Debias(curve=CURVE)))
    assert carve.scores.shape == (2, N) and carve.stage_lengths[-1][2] == carve.stage_lengths[0][2] - N + 12


def test_a_prompt_with_an_image_and_a_video_prunes_the_video(tiny):
    """Sample 0 holds an image (4 tokens, CLS dropped) before its video: pixels go in as (images, videos), the
    image tokens stay, FastV selects among the 40 video tokens (NumPy on transformers' attention)."""
    hf = tiny["hf"]
    ids, am, videos, images = video_prompts(padding="right", image=True)
    with torch.no_grad():
        attn = hf(input_ids=torch.tensor(ids), pixel_values_videos=torch.tensor(videos),
                  pixel_values=torch.tensor(images), attention_mask=torch.tensor(am),
                  position_ids=torch.tensor(np.where(am == 1, am.cumsum(-1) - 1, 0)),
                  output_attentions=True).attentions[1].numpy()
    spec = jd.PruneSpec("fastv", keep=12, layer=2, buckets=BUCKETS, debias=jd.Debias(curve=CURVE))
    r = gen.generate(tiny["model"].with_frame_trend("frame"), gen.Batch(ids, (images, videos), am), prune=spec,
                     max_new_tokens=1)
    for b in range(2):
        vid = np.nonzero(ids[b] == VIDEO_TOKEN)[0]
        last = np.nonzero(am[b])[0].max()
        assert kept_sets(r)[b] == np_select(attn[b][:, last, vid].mean(0) * np_weights("frame"), 12)
    assert r.stage_lengths[-1][2] == r.stage_lengths[0][2] - N + 12  # the 4 image tokens are still there
