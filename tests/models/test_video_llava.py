"""Video-LLaVA: parity with transformers' VideoLlavaForConditionalGeneration (8 frames, both towers, weights via
our converter and Orbax checkpoint), both Hub key layouts, and the input checks."""

import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxdebias.convert import ConversionError, convert, from_hf, load  # noqa: E402
from jaxdebias.convert.files import Source, list_weight_files  # noqa: E402
from jaxdebias.convert.source import detect_layout  # noqa: E402
from jaxdebias.models.generate import Batch, generate  # noqa: E402
from jaxdebias.models.layers import Taps  # noqa: E402
from jaxdebias.models.video_llava import VideoLlava, VideoLlavaConfig  # noqa: E402

from .hf_tiny_video import FRAMES, FRAME_TOKENS, PATCHES, VIDEO_TOKEN, make_hf_video_llava, video_prompts  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    hf = make_hf_video_llava()
    path = tmp_path_factory.mktemp("video_llava")
    hf.save_pretrained(path, max_shard_size="30KB")  # several shards with an index
    return hf, path


@pytest.fixture(scope="module")
def pair(hf_dir, tmp_path_factory):
    hf, path = hf_dir
    out = tmp_path_factory.mktemp("converted") / "ckpt"
    convert(path, out, dtype="float32", progress=False)
    return hf, load(out)


def hf_positions(am):
    return np.where(am == 1, am.cumsum(-1) - 1, 0)


def test_config_and_layout(hf_dir, pair):
    _, path = hf_dir
    _, ours = pair
    cfg = ours.cfg
    assert isinstance(ours, VideoLlava)
    assert (cfg.frames, cfg.frame_tokens, cfg.video_tokens) == (FRAMES, FRAME_TOKENS, FRAMES * FRAME_TOKENS)
    assert cfg.vision.num_features == PATCHES and cfg.video.select_strategy == "full"
    keys = Source(list_weight_files(path)).refs
    assert detect_layout(keys) == "video_llava"
    assert any(k.startswith("video_tower.encoder.") for k in keys)  # transformers 5: no `vision_model.` level
    assert VideoLlavaConfig.video_llava_7b().video_tokens == 2056


@pytest.mark.parametrize("padding", ["left", "right"])
def test_logits_and_attention_rows(pair, padding):
    hf, ours = pair
    ids, am, videos, images = video_prompts(padding=padding, image=True)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values_videos=torch.tensor(videos),
                 pixel_values=torch.tensor(images), attention_mask=torch.tensor(am),
                 position_ids=torch.tensor(hf_positions(am)), output_attentions=True)
    last = np.array([np.nonzero(am[b])[0].max() for b in range(2)])
    after = np.array([np.nonzero(ids[b] == VIDEO_TOKEN)[0].max() + 1 for b in range(2)])
    rows = np.stack([last, after], 1)
    out = ours(ids, images, am, pixel_values_videos=videos, taps=Taps(attn_layers=(1,), rows=jnp.asarray(rows)))
    diff = np.abs(np.asarray(out.logits) - ref.logits.numpy())[am.astype(bool)]
    assert diff.max() <= 1e-4, diff.max()
    expect = ref.attentions[1].numpy()
    for b in range(2):
        np.testing.assert_allclose(np.asarray(out.attentions[1])[b], expect[b][:, rows[b]], atol=1e-5)
    assert out.image_features.shape == (2, FRAMES * FRAME_TOKENS, ours.cfg.text.hidden_size)


def test_video_features_keep_each_frames_cls(pair):
    hf, ours = pair
    _, _, videos, images = video_prompts(image=True)
    with torch.no_grad():
        ref_v = hf.model.get_video_features(pixel_values_videos=torch.tensor(videos)).pooler_output.numpy()
        ref_i = hf.model.get_image_features(pixel_values=torch.tensor(images)).pooler_output.numpy()
    got_v = np.asarray(ours.video_features(videos))
    assert ref_v.shape == (2 * FRAMES, FRAME_TOKENS, ours.cfg.text.hidden_size)
    np.testing.assert_allclose(got_v, ref_v.reshape(2, FRAMES * FRAME_TOKENS, -1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours.image_features(images)), ref_i, atol=1e-5)  # CLS dropped: 4 each


def test_greedy_generation_matches(pair):
    hf, ours = pair
    ids, am, videos, _ = video_prompts(padding="left")
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), pixel_values_videos=torch.tensor(videos),
                          attention_mask=torch.tensor(am), max_new_tokens=12, do_sample=False)
    got = generate(ours, Batch(ids, videos, am), max_new_tokens=12, stop_at_eos=False).tokens
    np.testing.assert_array_equal(got, ref[:, ids.shape[1]:].numpy())


def test_transformers4_hub_layout_with_vision_model_level(hf_dir, tmp_path):
    """LanguageBind/Video-LLaVA-7B-hf was written by transformers 4 (towers as CLIPVisionModel: an inner
    `vision_model.`); both spellings load to the same weights."""
    hf, path = hf_dir
    src = Source(list_weight_files(path))
    from safetensors.numpy import save_file
    os.makedirs(tmp_path / "hub")
    save_file({re.sub(r"^(image|video)_tower\.", r"\1_tower.vision_model.", k): np.asarray(src.load(k))
               for k in src.refs}, str(tmp_path / "hub" / "model.safetensors"))
    with open(tmp_path / "hub" / "config.json", "w") as f:
        json.dump(json.load(open(os.path.join(path, "config.json"))), f)
    hub = from_hf(tmp_path / "hub")
    ids, am, videos, _ = video_prompts()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values_videos=torch.tensor(videos),
                 attention_mask=torch.tensor(am), position_ids=torch.tensor(hf_positions(am))).logits.numpy()
    np.testing.assert_allclose(np.asarray(hub(ids, videos, am).logits)[am == 1], ref[am == 1], atol=1e-4)


def test_inputs_that_do_not_fit(pair, hf_dir, tmp_path):
    _, ours = pair
    ids, am, videos, _ = video_prompts()
    with pytest.raises(ValueError, match="8 frames per video"):
        ours(ids, videos[:, :4], am)
    short = ids.copy()
    short[0, np.nonzero(ids[0] == VIDEO_TOKEN)[0][0]] = 5
    with pytest.raises(ValueError, match="79 video tokens"):
        ours(short, videos, am)
    with pytest.raises(ValueError, match="rank|float\\[V, F"):
        ours(ids, videos[0, 0, 0], am)
    _, path = hf_dir
    config = json.load(open(os.path.join(path, "config.json")))
    config["video_seq_length"] = 41
    with pytest.raises(ValueError, match="whole number of frames"):
        VideoLlavaConfig.from_hf_config(config)
    shutil_dir = tmp_path / "missing"
    os.makedirs(shutil_dir)
    src = Source(list_weight_files(path))
    from safetensors.numpy import save_file
    save_file({k: np.asarray(src.load(k)) for k in src.refs if not k.startswith("video_tower.encoder.layers.1.")},
              str(shutil_dir / "model.safetensors"))
    with open(shutil_dir / "config.json", "w") as f:
        json.dump(json.load(open(os.path.join(path, "config.json"))), f)
    with pytest.raises(ConversionError, match="video_tower.layers.1"):
        from_hf(shutil_dir)
