"""The converter: three key layouts to Orbax and back, parity with transformers, and corrupt inputs."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

torch = pytest.importorskip("torch")

from jaxdebias.convert import ConversionError, convert, load  # noqa: E402

from ..models.hf_tiny import IMAGE_TOKEN, make_hf_llava, prompts  # noqa: E402


def write_sharded(tensors: dict, path, config: dict, shards: int = 3):
    """Writes tensors as a sharded safetensors checkpoint with an index, plus config.json."""
    os.makedirs(path, exist_ok=True)
    keys = sorted(tensors)
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(keys)), shards)):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({keys[j]: np.ascontiguousarray(tensors[keys[j]]) for j in part}, os.path.join(path, name))
        weight_map.update({keys[j]: name for j in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_llava("gqa", seed=3)


@pytest.fixture(scope="module")
def t5_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("t5")
    hf_model.save_pretrained(path, max_shard_size="20KB")
    return path


def on_disk(path):
    """All tensors of a save_pretrained directory, by on-disk key."""
    from jaxdebias.convert.files import Source, list_weight_files

    src = Source(list_weight_files(path))
    return {k: np.asarray(src.load(k)) for k in src.refs}


def hub_layout(t5_dir, out):
    tensors = {re.sub(r"^vision_tower\.", "vision_tower.vision_model.", k): v for k, v in on_disk(t5_dir).items()}
    config = json.load(open(os.path.join(t5_dir, "config.json")))
    write_sharded(tensors, out, config)
    return out, None


def original_layout(t5_dir, out):
    """liuhaotian-style: flat Llama config with mm_* fields; CLIP in its own directory as a CLIPModel."""
    ren = {r"^language_model\.model\.": "model.", r"^language_model\.lm_head\.": "lm_head.",
           r"^multi_modal_projector\.linear_1\.": "model.mm_projector.0.",
           r"^multi_modal_projector\.linear_2\.": "model.mm_projector.2."}
    llm, clip = {}, {}
    for k, v in on_disk(t5_dir).items():
        if k.startswith("vision_tower."):
            clip["vision_model." + k[len("vision_tower."):]] = v
            continue
        for pat, rep in ren.items():
            k = re.sub(pat, rep, k)
        llm[k] = v
    clip["text_model.embeddings.token_embedding.weight"] = np.zeros((10, 4), np.float32)  # CLIPModel extras
    clip["logit_scale"] = np.zeros((), np.float32)
    hf = json.load(open(os.path.join(t5_dir, "config.json")))
    flat = {**hf["text_config"], "model_type": "llava", "mm_projector_type": "mlp2x_gelu",
            "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 32,
            "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch"}
    write_sharded(llm, out / "llm", flat)
    write_sharded(clip, out / "clip", {"model_type": "clip", "vision_config": hf["vision_config"]}, shards=1)
    return out / "llm", out / "clip"


@pytest.mark.parametrize("layout", ["hub", "transformers5", "original"])
def test_layouts_convert_load_and_match_transformers(hf_model, t5_dir, tmp_path, layout):
    if layout == "hub":
        src, vision = hub_layout(t5_dir, tmp_path / "src")
    elif layout == "original":
        src, vision = original_layout(t5_dir, tmp_path / "src")
    else:
        src, vision = t5_dir, None
    dst = tmp_path / "out"
    summary = convert(src, dst, dtype="float32", vision=vision, progress=False)
    assert summary["layout"] == layout
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # the temporary was renamed into place
    model = load(dst)
    ids, am, px = prompts()
    if layout == "original":  # the original code marks image positions with IMAGE_TOKEN_INDEX = -200
        ids = np.where(ids == IMAGE_TOKEN, -200, ids)
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor(np.where(ids == -200, IMAGE_TOKEN, ids)), pixel_values=torch.tensor(px),
                       attention_mask=torch.tensor(am), position_ids=torch.tensor(np.where(am == 1, am.cumsum(-1) - 1, 0)))
    got = np.asarray(model(ids, px, am).logits)
    assert np.abs(got - ref.logits.numpy())[am.astype(bool)].max() <= 1e-4
    # bf16 storage restores too, and a dtype can be chosen at load
    convert(src, tmp_path / "bf16", dtype="bfloat16", vision=vision, progress=False)
    half = load(tmp_path / "bf16", dtype="float32")
    assert half.language_model.norm.weight[...].dtype == np.float32
    assert np.abs(np.asarray(half(ids, px, am).logits) - got).max() < 0.5


def _convert_fails(src, tmp_path, match, **kw):
    dst = tmp_path / "dst"
    with pytest.raises(ConversionError, match=match):
        convert(src, dst, progress=False, **kw)
    assert not dst.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".dst")]  # no temporary left behind


def _copy(t5_dir, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(t5_dir, src)
    return src


def test_missing_shard(t5_dir, tmp_path):
    src = _copy(t5_dir, tmp_path)
    os.remove(src / "model-00002-of-00009.safetensors") if (src / "model-00002-of-00009.safetensors").exists() else \
        os.remove(sorted(src.glob("model-*.safetensors"))[1])
    _convert_fails(src, tmp_path, "lists shard\\(s\\) that are missing: model-0000")


def test_truncated_file(t5_dir, tmp_path):
    src = _copy(t5_dir, tmp_path)
    shard = sorted(src.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    _convert_fails(src, tmp_path, "is truncated: tensor")
    shard.write_bytes(b"\x05")
    _convert_fails(src, tmp_path, "not a valid safetensors file")


def test_missing_extra_and_misshaped_keys(t5_dir, tmp_path):
    tensors = on_disk(t5_dir)
    config = json.load(open(os.path.join(t5_dir, "config.json")))
    missing = dict(tensors)
    del missing["language_model.model.layers.1.mlp.up_proj.weight"]
    write_sharded(missing, tmp_path / "a", config)
    _convert_fails(tmp_path / "a", tmp_path, "1 parameter\\(s\\) have no tensor .*language_model.layers.1.mlp.up_proj.kernel"
                   " <- tensor 'language_model.model.layers.1.mlp.up_proj.weight' \\(expected beside its siblings in "
                   "model-0000")  # the key and the shard that holds the rest of layer 1's MLP
    extra = dict(tensors, **{"language_model.model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)})
    write_sharded(extra, tmp_path / "b", config)
    _convert_fails(tmp_path / "b", tmp_path, "not known to the 'transformers5' layout: "
                                             "language_model.model.layers.0.mlp.extra.weight")
    bad = dict(tensors, **{"multi_modal_projector.linear_2.weight": np.zeros((60, 61), np.float32)})
    write_sharded(bad, tmp_path / "c", config)
    _convert_fails(tmp_path / "c", tmp_path, "'multi_modal_projector.linear_2.weight' has shape \\(60, 61\\); "
                                             "parameter multi_modal_projector.linear_2.kernel expects \\(60, 60\\)")


def test_configs_that_are_not_llava(t5_dir, tmp_path):
    src = _copy(t5_dir, tmp_path)
    (src / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    _convert_fails(src, tmp_path, "model_type 'bert'")
    flat = {"model_type": "llava", "mm_projector_type": "linear", "hidden_size": 8}
    (src / "config.json").write_text(json.dumps(flat))
    _convert_fails(src, tmp_path, "Unsupported mm_projector_type 'linear'")
    (src / "config.json").write_text(json.dumps({**flat, "mm_projector_type": "mlp2x_gelu"}))
    _convert_fails(src, tmp_path, "pass --vision DIR")
    (src / "config.json").unlink()
    _convert_fails(src, tmp_path, "No config.json")


def test_existing_destination_and_cli(t5_dir, tmp_path, monkeypatch, capsys):
    from jaxdebias.convert.__main__ import main as convert_main

    (tmp_path / "taken").mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        convert(t5_dir, tmp_path / "taken", progress=False)
    # the refusal in this process; the conversion below through `python -m jaxdebias.convert` itself
    assert convert_main([str(tmp_path / "nowhere"), str(tmp_path / "d")]) == 2
    assert "is not a checkpoint directory" in capsys.readouterr().err
    r = subprocess.run([sys.executable, "-m", "jaxdebias.convert", str(t5_dir), str(tmp_path / "ok"), "--quiet",
                        "--dtype", "float32"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "layout transformers5" in r.stdout
    with pytest.raises(ConversionError, match="not a jaxdebias checkpoint"):
        load(t5_dir)
    # a relative path, as the README writes it (`--checkpoint out/llava-7b`): Orbax itself takes absolute ones only
    monkeypatch.chdir(tmp_path)
    assert load("ok").cfg.text.num_layers > 0


def test_file_list_source_sharded_load_and_torch_free_bin(t5_dir, tmp_path, monkeypatch):
    import jax

    files = sorted(str(p) for p in t5_dir.glob("model-*.safetensors"))
    convert(files, tmp_path / "from_files", dtype="float32", progress=False)
    mesh = jax.make_mesh((2, 2), ("data", "model"), devices=jax.devices()[:4],
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharded = load(tmp_path / "from_files", mesh=mesh)
    kernel = sharded.language_model.layers[0].mlp.gate_proj.kernel[...]
    assert len(kernel.sharding.device_set) == 4  # restored straight onto the mesh
    plain = load(tmp_path / "from_files")
    ids, am, px = prompts()
    np.testing.assert_allclose(np.asarray(sharded(ids, px, am).logits), np.asarray(plain(ids, px, am).logits),
                               atol=2e-5)
    # a PyTorch .bin checkpoint without torch: the error says what to do
    src = tmp_path / "bin"
    src.mkdir()
    (src / "pytorch_model.bin").write_bytes(b"not really")
    (src / "config.json").write_text((t5_dir / "config.json").read_text())
    monkeypatch.setitem(sys.modules, "torch", None)
    _convert_fails(src, tmp_path, "needs torch to read. Install torch")
