"""Parity of the Flax LLaVA-NeXT port with transformers' LlavaNextForConditionalGeneration (weights through our
converter): anyres tiles, unpadding, image_newline, Mistral decoder; fp32, non-square images with 2-4 tiles."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxdebias.models.generate import Batch, generate  # noqa: E402
from jaxdebias.models.llava_next import LlavaNext, expand_prompt, image_tokens  # noqa: E402

from .hf_tiny import converted  # noqa: E402
from .hf_tiny_next import make_hf_next, next_prompts  # noqa: E402

SIZES = [(100, 60), (50, 130)]  # (width, height): 4 tiles (84 x 84) and 3 tiles (126 x 42), both unpadded


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return converted(make_hf_next(), tmp_path_factory.mktemp("next"), max_shard_size="20KB")


def ours_inputs(model, ids, am, px, sizes_hw):
    images = model.images(px, sizes_hw[:, ::-1])
    ids2, am2 = expand_prompt(ids, am, images, model.cfg)
    return images, ids2, am2


def test_layout_counts_match_transformers(pair):
    hf, ours = pair
    assert isinstance(ours, LlavaNext)
    ids, am, px, hw = next_prompts(hf, SIZES + [(90, 40), (40, 40)])
    images = ours.images(px, hw[:, ::-1])
    assert images.pixels.shape[1] == 5 and images.num_slots == ours.cfg.slots(4)
    np.testing.assert_array_equal(image_tokens(images), (ids == 150).sum(1))


@pytest.mark.parametrize("padding", ["left", "right"])
def test_logits_match(pair, padding):
    hf, ours = pair
    ids, am, px, hw = next_prompts(hf, SIZES, padding=padding)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), image_sizes=torch.tensor(hw),
                 attention_mask=torch.tensor(am), position_ids=torch.tensor(np.maximum(am.cumsum(-1) - 1, 0) * am))
    images, ids2, am2 = ours_inputs(ours, ids, am, px, hw)
    got = np.asarray(ours(ids2, images, am2).logits)
    ref = ref.logits.numpy()
    for b in range(len(ids)):  # the real tokens, in order, on both sides
        mine, theirs = got[b][am2[b] == 1], ref[b][am[b] == 1]
        assert mine.shape == theirs.shape
        assert np.abs(mine - theirs).max() <= 1e-4, np.abs(mine - theirs).max()


def test_image_features_match(pair):
    hf, ours = pair
    _, _, px, hw = next_prompts(hf, SIZES)
    with torch.no_grad():
        ref = hf.model.get_image_features(pixel_values=torch.tensor(px), image_sizes=torch.tensor(hw),
                                          vision_feature_layer=-2, vision_feature_select_strategy="default")
    ref = ref.pooler_output if hasattr(ref, "pooler_output") else ref
    images = ours.images(px, hw[:, ::-1])
    got = np.asarray(ours.image_features(images))
    for b, r in enumerate(ref):
        n = int(image_tokens(images)[b])
        np.testing.assert_allclose(got[b, :n], r.numpy(), atol=1e-5)
        assert not got[b, n:].any()


def test_greedy_generation_matches(pair):
    hf, ours = pair
    ids, am, px, hw = next_prompts(hf, SIZES, padding="left")
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), image_sizes=torch.tensor(hw),
                          attention_mask=torch.tensor(am), max_new_tokens=12, do_sample=False)
    ref = ref[:, ids.shape[1]:].numpy()
    images, ids2, am2 = ours_inputs(ours, ids, am, px, hw)
    got = generate(ours, Batch(ids2, images, am2), max_new_tokens=12, stop_at_eos=False).tokens
    np.testing.assert_array_equal(got, ref)


def test_wrong_inputs_say_what_to_do(pair):
    hf, ours = pair
    ids, am, px, hw = next_prompts(hf, SIZES)
    images = ours.images(px, hw[:, ::-1])
    with pytest.raises(ValueError, match="expand_prompt"):
        ours(ids, images, am)  # placeholders not padded to the bucket
    with pytest.raises(TypeError, match="AnyresImages"):
        ours(ids, jnp.asarray(px[:, 0]), am)
    with pytest.raises(ValueError, match="views were given"):
        ours.images(px[:, :2], hw[:, ::-1])
