"""The converter on LLaVA-OneVision checkpoints: the llava-hf Hub layout (``vision_tower.vision_model.*`` SigLIP,
``language_model.model.*`` Qwen2, ``image_newline``) and transformers 5's save_pretrained layout give the same
parameters through convert + load to Orbax, which picks the class from config.json; a missing SigLIP tensor is
refused by name; a tied 0.5B-style decoder needs no lm_head."""

import json
import os
import re

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from jaxdebias.convert import ConversionError, convert, from_hf, load  # noqa: E402
from jaxdebias.models.llava_onevision import LlavaOnevision  # noqa: E402

from ..models.hf_tiny_onevision import make_hf_onevision  # noqa: E402
from .test_convert import on_disk, write_sharded  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("onevision_t5")
    make_hf_onevision(seed=4, layers=2).save_pretrained(path, max_shard_size="20KB")
    return path


def params(model):
    return {tuple(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def config(saved):
    with open(os.path.join(saved, "config.json")) as f:
        return json.load(f)


def test_hub_and_transformers5_layouts_agree(saved, tmp_path):
    tensors = on_disk(saved)
    assert "vision_tower.embeddings.patch_embedding.bias" in tensors  # transformers 5: no vision_model level
    hub = {re.sub(r"^vision_tower\.", "vision_tower.vision_model.", k): v for k, v in tensors.items()}
    write_sharded(hub, tmp_path / "hub", config(saved))
    summary = convert(tmp_path / "hub", tmp_path / "ckpt", dtype="float32", progress=False)
    assert summary["layout"] == "hub" and summary["model_type"] == "llava_onevision"
    loaded = load(tmp_path / "ckpt")
    a, b = params(from_hf(saved)), params(loaded)
    assert isinstance(loaded, LlavaOnevision) and a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
    np.testing.assert_array_equal(a[("vision_tower", "patch_bias")], tensors["vision_tower.embeddings.patch_embedding.bias"])
    np.testing.assert_array_equal(a[("vision_tower", "post_layernorm", "scale")],
                                  tensors["vision_tower.post_layernorm.weight"])


def test_missing_siglip_tensor_is_named(saved, tmp_path):
    gone = "vision_tower.embeddings.patch_embedding.bias"
    write_sharded({k: v for k, v in on_disk(saved).items() if k != gone}, tmp_path / "cut", config(saved))
    with pytest.raises(ConversionError, match="patch_bias|patch_embedding"):
        convert(tmp_path / "cut", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_tied_decoder_has_no_lm_head(saved, tmp_path):
    cfg = config(saved)
    cfg["text_config"]["tie_word_embeddings"] = True
    cfg["tie_word_embeddings"] = True
    tensors = {k: v for k, v in on_disk(saved).items() if "lm_head" not in k}
    write_sharded(tensors, tmp_path / "tied", cfg)
    model = from_hf(tmp_path / "tied")
    assert model.cfg.text.tie_word_embeddings and ("language_model", "lm_head", "kernel") not in {
        tuple(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
