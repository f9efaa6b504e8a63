"""Parity of the Flax LLaVA port with transformers' LlavaForConditionalGeneration (weights via our converter)."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxdebias.convert import from_hf  # noqa: E402
from jaxdebias.models.generate import Batch, generate  # noqa: E402
from jaxdebias.models.layers import Taps  # noqa: E402

from .hf_tiny import IMAGE_TOKEN, make_hf_llava, prompts  # noqa: E402


@pytest.fixture(scope="module", params=["mha", "gqa"])
def pair(request, tmp_path_factory):
    hf = make_hf_llava(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, max_shard_size="20KB")  # several shards with an index
    return hf, from_hf(path)


def hf_positions(am):
    pos = am.cumsum(-1) - 1
    return np.where(am == 1, pos, 0)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_logits_and_attention_rows(pair, padding):
    hf, ours = pair
    ids, am, px = prompts(padding=padding)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), attention_mask=torch.tensor(am),
                 position_ids=torch.tensor(hf_positions(am)), output_attentions=True)
    T = ids.shape[1]
    last = np.array([np.nonzero(am[b])[0].max() for b in range(2)])
    after_img = np.array([np.nonzero(ids[b] == IMAGE_TOKEN)[0].max() + 1 for b in range(2)])
    rows = np.stack([last, after_img, np.minimum(after_img + 1, last)], 1)  # [B, Q=3]
    layers = (0, 2)
    out = ours(ids, px, am, taps=Taps(attn_layers=layers, rows=jnp.asarray(rows)))
    real = am.astype(bool)
    diff = np.abs(np.asarray(out.logits) - ref.logits.numpy())[real]
    assert diff.max() <= 1e-4, diff.max()
    for layer in layers:
        expect = ref.attentions[layer].numpy()  # [B, H, T, T]
        got = np.asarray(out.attentions[layer])
        assert got.shape == (2, expect.shape[1], 3, T)
        for b in range(2):
            np.testing.assert_allclose(got[b], expect[b][:, rows[b]], atol=1e-5)


def test_vision_features(pair):
    hf, ours = pair
    _, _, px = prompts()
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=torch.tensor(px), vision_feature_layer=-2,
                                    vision_feature_select_strategy="default")
    ref = ref.pooler_output if hasattr(ref, "pooler_output") else ref
    ref = np.stack([r.numpy() for r in ref])
    got = np.asarray(ours.image_features(jnp.asarray(px)))
    assert got.shape == ref.shape == (2, 9, ours.cfg.text.hidden_size)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_greedy_generation_matches(pair):
    hf, ours = pair
    ids, am, px = prompts(padding="left")
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px),
                          attention_mask=torch.tensor(am), max_new_tokens=16, do_sample=False)
    ref = ref[:, ids.shape[1]:].numpy()
    got = generate(ours, Batch(ids, px, am), max_new_tokens=16, stop_at_eos=False).tokens
    np.testing.assert_array_equal(got, ref)
    # right-padded input gives the same continuation (positions come from the mask)
    ids_r, am_r, _ = prompts(padding="right")
    np.testing.assert_array_equal(generate(ours, Batch(ids_r, px, am_r), max_new_tokens=16, stop_at_eos=False).tokens, ref)
