"""The converter on LLaVA-NeXT checkpoints: the llava-hf Hub layout (``vision_tower.vision_model.*``,
``language_model.model.*``, a top-level ``image_newline``) and transformers 5's save_pretrained layout give the
same parameters, through convert + load to Orbax; a checkpoint without ``image_newline`` is refused by name."""

import json
import os
import re

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from jaxdebias.convert import ConversionError, convert, from_hf, load  # noqa: E402
from jaxdebias.models.llava_next import LlavaNext  # noqa: E402

from ..models.hf_tiny_next import make_hf_next  # noqa: E402
from .test_convert import on_disk, write_sharded  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("next_t5")
    make_hf_next(seed=4).save_pretrained(path, max_shard_size="20KB")
    return path


def params(model):
    return {tuple(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_hub_and_transformers5_layouts_agree(saved, tmp_path):
    tensors = on_disk(saved)
    assert "image_newline" in tensors
    hub = {re.sub(r"^vision_tower\.", "vision_tower.vision_model.", k): v for k, v in tensors.items()}
    write_sharded(hub, tmp_path / "hub", json.load(open(os.path.join(saved, "config.json"))))
    summary = convert(tmp_path / "hub", tmp_path / "ckpt", dtype="float32", progress=False)
    assert summary["layout"] == "hub" and summary["model_type"] == "llava_next"
    a, b = params(from_hf(saved)), params(load(tmp_path / "ckpt"))
    assert isinstance(load(tmp_path / "ckpt"), LlavaNext) and a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
    np.testing.assert_array_equal(a[("image_newline",)], tensors["image_newline"])


def test_missing_image_newline_is_named(saved, tmp_path):
    tensors = {k: v for k, v in on_disk(saved).items() if k != "image_newline"}
    write_sharded(tensors, tmp_path / "cut", json.load(open(os.path.join(saved, "config.json"))))
    with pytest.raises(ConversionError, match="image_newline"):
        convert(tmp_path / "cut", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
