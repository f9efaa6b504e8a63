"""Pruning on LLaVA-OneVision against transformers' tensors: iLLaVA stage by stage at the release's rules (the
encoder merge in every SigLIP view with no CLS, the merged views packed as transformers packs a view, the LLM
stage's per-sample count of the span, newlines included), FastV's first-stage selection against NumPy on
transformers' attention, keep-all = unpruned, VisionZip refused."""

import numpy as np
import pytest

import jaxdebias as jd
from jaxdebias.methods import illava
from jaxdebias.models.generate import Batch, generate
from jaxdebias.models.layers import abstract
from jaxdebias.models.llava_next import EMPTY, NEWLINE
from jaxdebias.models.llava_onevision import expand_prompt

from tests.jaxdebias.test_illava_rules import ref_encoder_merge, ref_llm_merge

from .hf_tiny import converted
from .hf_tiny_onevision import IMAGE_TOKEN, make_hf_onevision, onevision_prompts, video_prompts

torch = pytest.importorskip("torch")

SIZES = [(120, 118), (30, 70)]  # (width, height): 4 x 4 tiles (downscaled) and 3 x 3 tiles (unpadded)
LAYERS, R = (0, 1), 8  # 25 -> 9 tokens per view: a 3 x 3 grid (the release: (5, 6, 7, 8), 92: 729 -> 361)
ILLAVA = jd.PruneSpec("illava", keep=1, options={"vit_layers": LAYERS, "vit_r": R, "llm_layer": 2})


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return converted(make_hf_onevision(seed=3), tmp_path_factory.mktemp("onevision_prune"))


def batch_of(ours, hf, padding="right"):
    ids, am, px, hw = onevision_prompts(hf, SIZES, padding=padding)
    images = ours.images(px, hw[:, ::-1])
    ids2, am2 = expand_prompt(ids, am, images, ours.cfg)
    return Batch(ids2, images, am2.astype(bool), image_sizes=hw[:, ::-1]), px, hw


def hf_merged_views(hf, views):
    """transformers' SigLIP layers one by one with the NumPy rule (no CLS: protected=0) between the attention
    residual and the MLP. views float32[V, 3, S, S] -> float32[V, 25 - len(LAYERS) R, Dv]."""
    tower = hf.model.vision_tower  # transformers 5: SiglipVisionModel without a vision_model level
    with torch.no_grad():
        x = tower.embeddings(torch.from_numpy(views))
        for i, layer in enumerate(tower.encoder.layers):
            h, attn = layer.self_attn(layer.layer_norm1(x), attention_mask=None)
            x = x + h
            if i in LAYERS:
                x = torch.from_numpy(np.stack([ref_encoder_merge(x[v].numpy(), attn[v].numpy(), R, protected=0)[0]
                                               for v in range(len(x))]).astype(np.float32))
            x = x + layer.mlp(layer.layer_norm2(x))
    return x.numpy()


def test_illava_defaults_are_the_releases_per_family():
    spec = jd.PruneSpec("illava")
    assert spec.resolved_options("llava_onevision") == {"vit_layers": (5, 6, 7, 8), "vit_r": 92, "llm_r": 0.70,
                                                        "llm_layer": 8}
    assert spec.resolved_options("llava_onevision_video") == {"vit_layers": (3, 4, 5, 6), "vit_r": 92,
                                                              "llm_r": 0.70, "llm_layer": 2}
    assert spec.resolved_options()["vit_r"] == 72 and spec.resolved_options()["llm_r"] is None  # LLaVA-1.5: ours
    explicit = jd.PruneSpec("illava", options={"vit_r": 80})
    assert explicit.resolved_options("llava_onevision")["vit_r"] == 80  # what the user gives wins
    assert 729 - 4 * 92 == 19 ** 2


def test_illava_encoder_stage_and_packing_are_the_releases(pair):
    """Each view merged as the release merges SigLIP tokens, the kept tokens laid out as a 3 x 3 grid per view and
    packed (unpad, anyres_max downscale, newlines) exactly as transformers packs views of that grid."""
    hf, ours = pair
    batch, px, hw = batch_of(ours, hf)
    enc = ILLAVA.encoder(ours.num_visual(batch.pixel_values), "llava_onevision")
    visual = ours.for_encoder(batch.pixel_values, enc, "illava")
    block, h, merged = ours.encoder_stage(enc, visual, None, 0, "illava")
    assert merged.grid == 3 and merged.num_slots == enc.size
    hf.config.vision_config.patch_size = 10  # transformers packs a view of 32 // 10 = 3 x 3 features
    try:
        for b in range(len(SIZES)):
            views = px[b][:int(np.asarray(batch.pixel_values.pixels[b]).any((1, 2, 3)).sum())]
            with torch.no_grad():
                feats = hf.model.multi_modal_projector(torch.from_numpy(hf_merged_views(hf, views)))
                want, lens = hf.model.pack_image_features([feats], torch.tensor(hw[b:b + 1]),
                                                          image_newline=hf.model.image_newline)
            n = int(lens[0])
            assert int(np.asarray(block.valid[b]).sum()) == n
            np.testing.assert_allclose(np.asarray(h[b, :n]), want[0].numpy(), atol=2e-5)
    finally:
        hf.config.vision_config.patch_size = 6


def test_illava_llm_stage_keeps_the_releases_count_and_set(pair):
    """The LLM stage at layer 2: s = mean_h A^1[last, span] on transformers' Qwen2 over the merged sequence;
    r = round(n (1 - 0.70)) of the n merged span tokens (newlines included, as the release counts them)."""
    hf, ours = pair
    batch, _, _ = batch_of(ours, hf)
    out = generate(ours, batch, prune=ILLAVA, max_new_tokens=1)
    enc = ILLAVA.encoder(ours.num_visual(batch.pixel_values), "llava_onevision")
    visual = ours.for_encoder(batch.pixel_values, enc, "illava")
    _, h, merged = ours.encoder_stage(enc, visual, None, 0, "illava")
    ids, newlines = np.asarray(batch.input_ids), 0
    for b in range(len(SIZES)):
        n = int(np.sum(np.asarray(merged.slot_kind[b]) != EMPTY))
        first = int(np.argmax(ids[b] == IMAGE_TOKEN))
        real = ids[b][np.asarray(batch.attention_mask[b])]
        seq = np.concatenate([real[:first], np.full(n, IMAGE_TOKEN), real[first + int((real == IMAGE_TOKEN).sum()):]])
        with torch.no_grad():
            emb = hf.model.language_model.embed_tokens(torch.tensor(np.where(seq == IMAGE_TOKEN, 0, seq))[None])
            emb[0, first:first + n] = torch.from_numpy(np.asarray(h[b, :n]))
            o = hf.model.language_model(inputs_embeds=emb, output_attentions=True, output_hidden_states=True)
        s = o.attentions[1][0, :, -1, first:first + n].mean(0).numpy()
        r = round(n * (1 - 0.70))
        want, _ = ref_llm_merge(o.hidden_states[2][0, first:first + n].numpy(), s, r)
        raster, valid = out.kept[1][:2]
        got = np.asarray(raster[b])[np.asarray(valid[b])]
        np.testing.assert_array_equal(np.sort(got), want)
        assert len(got) == n - r
        newlines += int(np.sum(np.asarray(merged.slot_kind[b])[:n] == NEWLINE))
    assert newlines > 0  # the span the count is taken of holds newlines


def test_illava_video_runs_at_the_video_defaults(pair):
    hf, ours = pair
    ids, am, px = video_prompts(2, 4)
    video = ours.videos(px)
    spec = jd.PruneSpec("illava", keep=1, options={"vit_layers": LAYERS, "vit_r": R})  # llm_layer: video's 2
    assert spec.plan(ours.num_visual(video), 3, ours.option_family(video))[0].stages[0].layer == 2
    out = generate(ours, Batch(ids, video, am.astype(bool)), prune=spec, max_new_tokens=3, stop_at_eos=False)
    enc_valid, llm_valid = (np.asarray(k[1]).sum(1) for k in out.kept)
    frames_tokens = 4 * 2 * 2  # 3 x 3 merged frames pooled to 2 x 2; the newline is not a candidate
    np.testing.assert_array_equal(enc_valid, frames_tokens + 1)
    np.testing.assert_array_equal(llm_valid, frames_tokens - round(frames_tokens * (1 - 0.70)))
    assert out.tokens.shape == (2, 3)


def test_fastv_first_stage_is_numpy_on_transformers_attention(pair):
    hf, ours = pair
    batch, px, hw = batch_of(ours, hf)
    spec = jd.PruneSpec("fastv", keep=12, layer=2, buckets=tuple(range(1, 100)))
    out = generate(ours, batch, prune=spec, max_new_tokens=1)
    ids = np.asarray(batch.input_ids)
    am = np.asarray(batch.attention_mask)
    hf_ids, hf_am, _, _ = onevision_prompts(hf, SIZES, padding="right")
    with torch.no_grad():
        o = hf(input_ids=torch.tensor(hf_ids), pixel_values=torch.tensor(px), image_sizes=torch.tensor(hw),
               attention_mask=torch.tensor(hf_am), output_attentions=True)
    kind = np.asarray(batch.pixel_values.slot_kind)
    for b in range(len(SIZES)):
        first = int(np.argmax(hf_ids[b] == IMAGE_TOKEN))
        n = int((hf_ids[b] == IMAGE_TOKEN).sum())
        last = int(hf_am[b].sum()) - 1
        s = o.attentions[1][b, :, last, first:first + n].mean(0).numpy()
        s = np.where(kind[b][:n] >= 0, s, -np.inf)  # newlines are never kept
        want = np.sort(np.argsort(-s, kind="stable")[:12])
        raster, valid = out.kept[0][:2]
        np.testing.assert_array_equal(np.sort(np.asarray(raster[b])[np.asarray(valid[b])]), want)
        assert ids.shape[1] >= am[b].sum()


def test_keep_all_is_unpruned_and_visionzip_is_refused(pair):
    """FastV keeping every selectable token of the image with the fewest (newlines are never kept, and mask
    nothing else) generates what the unpruned model does for it."""
    hf, ours = pair
    batch, _, _ = batch_of(ours, hf)
    selectable = np.sum(np.asarray(batch.pixel_values.slot_kind) >= 0, 1)
    b, keep = int(np.argmin(selectable)), int(np.min(selectable))
    assert ours.visual_capacity() <= keep
    dense = generate(ours, batch, max_new_tokens=4, stop_at_eos=False)
    spec = jd.PruneSpec("fastv", keep=keep, layer=2, buckets=(keep,))
    pruned = generate(ours, batch, prune=spec, max_new_tokens=4, stop_at_eos=False)
    assert int(np.asarray(pruned.kept[0][1][b]).sum()) == keep
    np.testing.assert_array_equal(np.asarray(pruned.tokens[b]), np.asarray(dense.tokens[b]))
    with pytest.raises(ValueError, match="no CLS token"):
        generate(ours, batch, prune=jd.PruneSpec("visionzip", keep=20), max_new_tokens=1)
    assert illava.ONEVISION_VIT_R == 92


def _flops(model, visual, spec, T):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdebias.models import generate as gen
    from jaxdebias.models import sequence

    n = model.num_visual(visual)
    shape, limits = (None, ()) if spec is None else spec.plan(n, model.cfg.text.num_layers)
    ids = np.full((1, T), 5)
    ids[:, 10:10 + n] = model.cfg.image_token_id
    g, st = nnx.split(model)
    lowered = gen.prefill_step.lower(g, st, jnp.asarray(ids), jax.tree.map(jnp.asarray, visual),
                                     jnp.ones((1, T), bool), jnp.ones((1, 2), jnp.int32), None,
                                     sequence.limits_array(limits), jax.random.key(0), plan=shape, extra=64,
                                     temperature=0.0)
    return lowered.compile().cost_analysis()["flops"], shape


def test_prefill_flops_fall_as_the_analytic_count_says():
    """FastV on a OneVision span (168/14 views: 12 x 12 patches; one tile: 144 + 12 x 13 = 300 slots): layers 2..5
    run on T - N + K tokens."""
    import jax
    import jax.numpy as jnp

    from jaxdebias.models.llama import LlamaConfig
    from jaxdebias.models.llava_onevision import LlavaOnevision, LlavaOnevisionConfig
    from jaxdebias.models.siglip import SiglipVisionConfig

    D, F = 256, 688
    cfg = LlavaOnevisionConfig(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                                  image_size=168),
                               LlamaConfig(vocab_size=1000, hidden_size=D, intermediate_size=F, num_layers=6,
                                           num_heads=4, num_kv_heads=4, qkv_bias=True), grid_pinpoints=((168, 168),))
    model = abstract(LlavaOnevision, cfg)
    model = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), model)
    visual = model.images([np.zeros((2, 3, 168, 168), np.float32)], [(300, 300)])
    n = model.num_visual(visual)
    assert n == 300
    T = n + 64

    def key_columns(Ts):  # rows.causal_attention: <= 4 row blocks of >= 128 rows, block [a, b) sees keys [0, b)
        size = max(128, -(-Ts // 4))
        return sum(min(size, Ts - a) * min(Ts, a + size) for a in range(0, Ts, size))

    def layer_flops(Ts):  # projections (q, k, v, o), the SwiGLU MLP, QK^T + PV over the computed key columns
        return 2 * Ts * (4 * D * D + 3 * D * F) + 2 * 2 * key_columns(Ts) * D

    dense, _ = _flops(model, visual, None, T)
    for keep in (64,):
        pruned, shape = _flops(model, visual, jd.PruneSpec("fastv", keep=keep, layer=2), T)
        Ts = T - n + shape.stages[0].slots
        ratio = (dense - pruned) / (4 * (layer_flops(T) - layer_flops(Ts)))
        assert 0.97 < ratio < 1.06, ratio
