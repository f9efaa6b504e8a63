"""Parity of the Flax LLaVA-OneVision port with transformers' LlavaOnevisionForConditionalGeneration (weights through
our converter): SigLIP, anyres-max packing (unpadding, the bilinear downscale past 9 views, image_newline), the
video path (2 x 2 bilinear pooling, one newline), a Qwen2 decoder; fp32."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxdebias.models.generate import Batch, generate  # noqa: E402
from jaxdebias.models.llava_next import image_tokens  # noqa: E402
from jaxdebias.models.llava_onevision import LlavaOnevision, LlavaOnevisionConfig, expand_prompt  # noqa: E402
from jaxdebias.models.onevision_layout import bilinear_taps  # noqa: E402

from .hf_tiny import converted  # noqa: E402
from .hf_tiny_onevision import (IMAGE_TOKEN, VIDEO_TOKEN, hf_token_count, make_hf_onevision,  # noqa: E402
                                onevision_prompts, tiles, video_prompts)

# (width, height): 4 x 4 tiles, downscaled; 3 x 4 tiles, unpadded then downscaled; 3 x 3 tiles, tall, unpadded;
# 2 x 1 tiles, tall
SIZES = [(120, 118), (124, 90), (30, 70), (25, 60)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return converted(make_hf_onevision(), tmp_path_factory.mktemp("onevision"), max_shard_size="20KB")


def ours_inputs(model, ids, am, px, sizes_hw):
    images = model.images(px, sizes_hw[:, ::-1])
    ids2, am2 = expand_prompt(ids, am, images, model.cfg)
    return images, ids2, am2


def hf_positions(am):
    return torch.tensor(np.maximum(am.cumsum(-1) - 1, 0) * am)


def test_bilinear_taps_are_torchs():
    for n_in, n_out in [(27, 14), (5, 3), (20, 15), (15, 12), (162, 81), (7, 7)]:
        x = torch.randn(1, 1, n_in, 3)
        ref = torch.nn.functional.interpolate(x, size=[n_out, 3], mode="bilinear")[0, 0].numpy()
        index, weight = bilinear_taps(n_in, n_out)
        got = np.einsum("ok,okc->oc", weight, x[0, 0].numpy()[index])
        np.testing.assert_allclose(got, ref, atol=1e-5)  # float32 rounding of the products


def test_layout_counts_match_transformers(pair):
    hf, ours = pair
    assert isinstance(ours, LlavaOnevision)
    assert ours.cfg.max_tiles == 9 and ours.cfg.vision.grid == 5
    assert [tiles(hf, w, h) for w, h in SIZES] == [16, 12, 9, 2]
    for w, h in SIZES + [(128, 40), (33, 128), (97, 99), (260, 31), (90, 28), (30, 30)]:
        images = ours.images([np.zeros((1 + tiles(hf, w, h), 3, 32, 32))], [(w, h)])
        assert image_tokens(images)[0] == hf_token_count(hf, w, h), (w, h)
        assert images.num_slots == ours.cfg.slots(min(b for b in ours.cfg.tile_buckets if b >= tiles(hf, w, h)))


def test_every_bucket_holds_its_images(pair):
    """slots(bucket) is the longest span over every image size whose pinpoint falls in the bucket."""
    model = pair[1]
    cfg, longest = model.cfg, 0
    rng = np.random.default_rng(0)
    for w, h in rng.integers(8, 400, size=(300, 2)):
        images = model.images([np.zeros((17, 3, 32, 32))], [(int(w), int(h))], tiles=16)
        longest = max(longest, int(image_tokens(images)[0]))
    assert longest <= cfg.slots(16)
    assert cfg.slots(16) - longest < 40  # the bound is tight, not a blanket maximum


@pytest.mark.parametrize("padding", ["left", "right"])
def test_image_logits_match(pair, padding):
    hf, ours = pair
    ids, am, px, hw = onevision_prompts(hf, SIZES, padding=padding)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), image_sizes=torch.tensor(hw),
                 attention_mask=torch.tensor(am), position_ids=hf_positions(am)).logits.numpy()
    images, ids2, am2 = ours_inputs(ours, ids, am, px, hw)
    got = np.asarray(ours(ids2, images, am2).logits)
    for b in range(len(ids)):  # the real tokens, in order, on both sides
        mine, theirs = got[b][am2[b] == 1], ref[b][am[b] == 1]
        assert mine.shape == theirs.shape
        assert np.abs(mine - theirs).max() <= 1e-4, np.abs(mine - theirs).max()


def test_image_features_match(pair):
    hf, ours = pair
    _, _, px, hw = onevision_prompts(hf, SIZES)
    with torch.no_grad():
        ref = hf.model.get_image_features(pixel_values=torch.tensor(px), image_sizes=torch.tensor(hw)).pooler_output
    images = ours.images(px, hw[:, ::-1])
    got = np.asarray(ours.image_features(images))
    for b, r in enumerate(ref):
        n = int(image_tokens(images)[b])
        np.testing.assert_allclose(got[b, :n], r.numpy(), atol=1e-5)
        assert not got[b, n:].any()


@pytest.mark.parametrize("padding", ["left", "right"])
def test_video_logits_match(pair, padding):
    hf, ours = pair
    ids, am, px = video_prompts(2, 3, padding=padding)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values_videos=torch.tensor(px), attention_mask=torch.tensor(am),
                 position_ids=hf_positions(am)).logits.numpy()
    video = ours.videos(px)
    assert video.num_slots == 3 * 9 + 1
    got = np.asarray(ours(ids, video, am).logits)
    np.testing.assert_array_less(np.abs(got - ref)[am == 1].max(), 1e-4)


def test_greedy_generation_matches(pair):
    hf, ours = pair
    ids, am, px, hw = onevision_prompts(hf, SIZES[:2], padding="left")
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), image_sizes=torch.tensor(hw),
                          attention_mask=torch.tensor(am), max_new_tokens=8, do_sample=False)
    images, ids2, am2 = ours_inputs(ours, ids, am, px, hw)
    got = generate(ours, Batch(ids2, images, am2), max_new_tokens=8, stop_at_eos=False).tokens
    np.testing.assert_array_equal(got, ref[:, ids.shape[1]:].numpy())
    vids, vam, vpx = video_prompts(2, 2)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(vids), pixel_values_videos=torch.tensor(vpx),
                          attention_mask=torch.tensor(vam), max_new_tokens=8, do_sample=False)
    got = generate(ours, Batch(vids, ours.videos(vpx), vam), max_new_tokens=8, stop_at_eos=False).tokens
    np.testing.assert_array_equal(got, ref[:, vids.shape[1]:].numpy())


def test_wrong_inputs_say_what_to_do(pair):
    hf, ours = pair
    ids, am, px, hw = onevision_prompts(hf, SIZES[:2])
    images = ours.images(px, hw[:, ::-1])
    with pytest.raises(ValueError, match="expand_prompt"):
        ours(ids, images, am)  # placeholders not padded to the bucket
    with pytest.raises(TypeError, match="OnevisionVisual"):
        ours(ids, jnp.asarray(px[:, 0]), am)
    vids, vam, vpx = video_prompts(1, 2)
    with pytest.raises(ValueError, match="one kind per batch"):
        ours(np.concatenate([vids, [[IMAGE_TOKEN]]], 1), ours.videos(vpx), np.concatenate([vam, [[1]]], 1))
    with pytest.raises(ValueError, match="pixel_values_videos"):
        ours.videos(vpx[0])
    assert VIDEO_TOKEN == ours.cfg.video_token_id


def test_config_reads_what_checkpoints_leave_out():
    """A published config.json omits values equal to transformers' defaults (Qwen2's and OneVision's)."""
    from transformers import LlavaOnevisionConfig as HF, Qwen2Config

    cfg = LlavaOnevisionConfig.from_hf_config({"model_type": "llava_onevision", "text_config": {
        "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
        "num_hidden_layers": 28, "num_key_value_heads": 4, "rope_theta": 1e6, "vocab_size": 152128},
        "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "image_size": 384, "patch_size": 14,
                          "num_attention_heads": 16, "num_hidden_layers": 26, "model_type": "siglip_vision_model"}})
    assert cfg == LlavaOnevisionConfig.onevision_qwen2_7b(dtype=jnp.float32)
    q = Qwen2Config()
    assert (q.vocab_size, q.hidden_size, q.intermediate_size, q.rms_norm_eps) == (151936, 4096, 22016, 1e-6)
    hf = HF()
    assert [tuple(p) for p in hf.image_grid_pinpoints] == list(cfg.grid_pinpoints)
    assert (hf.image_token_index, hf.video_token_index, hf.vision_aspect_ratio) == (151646, 151647, "anyres_max_9")
    with pytest.raises(ValueError, match="anyres_max"):
        LlavaOnevisionConfig.from_hf_config({"model_type": "llava_onevision", "vision_aspect_ratio": "pad"})
