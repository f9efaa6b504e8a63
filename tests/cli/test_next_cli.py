"""`jaxdebias run` and `jaxdebias eval` on a converted tiny LLaVA-NeXT checkpoint (42-px tiles, 3 x 3 patches per
view, a Mistral decoder, a character tokenizer): anyres preprocessing, spans padded to the tile bucket, --keep
checked against the model's own visual token count."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import jaxdebias as jd
from jaxdebias.cli import anyres
from jaxdebias.cli.families import load_model
from jaxdebias.cli.main import main

torch = pytest.importorskip("torch")

from ..models.hf_tiny_next import make_hf_next  # noqa: E402
from ..models.hf_tiny_video import save_char_tokenizer  # noqa: E402
from .samples import write_pope  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from jaxdebias.convert import convert

    path = tmp_path_factory.mktemp("next_cli")
    make_hf_next(seed=3, layers=4).save_pretrained(path / "hf")
    save_char_tokenizer(path / "hf")
    convert(path / "hf", path / "ckpt", dtype="float32", progress=False)
    return str(path / "ckpt")


def test_preprocessing_matches_the_processor_geometry(checkpoint):
    from transformers import LlavaNextImageProcessor

    loaded = load_model(checkpoint)
    cfg = loaded.model.cfg
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 100, 3), np.uint8))
    proc = LlavaNextImageProcessor(image_grid_pinpoints=[list(p) for p in cfg.grid_pinpoints],
                                   size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42})
    ref = proc(images=[image], return_tensors="np")
    views, _, size, count = anyres.preprocess(image, cfg, proc.image_mean, proc.image_std)
    assert size == (100, 60) and views.shape == ref["pixel_values"].shape[1:]
    # the same views up to the resampler's rounding (bicubic on uint8 in both, different implementations)
    assert np.mean(np.abs(views - ref["pixel_values"][0])) < 0.05
    request = loaded.request(image, "what?")
    assert (request.input_ids == cfg.image_token_id).sum() == count
    tall = loaded.request(image.resize((40, 90)), "and this one?")
    batch = loaded.batch([request, tall])
    assert batch.pixel_values.num_slots == cfg.slots(4)  # (100, 60) needs 4 tiles: the batch's bucket
    assert batch.attention_mask.sum(1).tolist() == [len(request.input_ids), len(tall.input_ids)]  # pads masked
    assert (batch.input_ids == cfg.image_token_id).sum(1).tolist() == [batch.pixel_values.num_slots] * 2
    for b, r in enumerate((request, tall)):  # the instruction token keeps its id after the padded span
        assert batch.input_ids[b, batch.instruction_pos[b]] == r.input_ids[r.instruction_pos]


def test_run_on_a_next_checkpoint(checkpoint, tmp_path, capsys):
    image = tmp_path / "wide.png"
    Image.new("RGB", (100, 60), (30, 160, 90)).save(image)
    out = tmp_path / "out"
    code = main(["run", "--checkpoint", checkpoint, "--image", str(image), "--prompt", "what?", "--method", "fastv",
                 "--keep", "8", "--debias", "pad+curve", "--curve", "online", "--max-new-tokens", "1",
                 "--decode", "fast", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    summary = json.load(open(out / "run.json"))
    assert summary["kept"] == {"pruned": 8, "pruned + debiased": 8}
    assert summary["padding_kept"]["pruned + debiased"] == 0
    unpruned, pruned = summary["stage_lengths"]["unpruned"], summary["stage_lengths"]["pruned"]
    assert pruned[1][2] == unpruned[0][2] - 51 + jd.bucket(8)  # the 4-tile bucket's 51 slots: 8 (a bucket of 16)
    for f in summary["figures"]:
        assert os.path.getsize(f) > 2000


def test_eval_and_keep_checked_against_the_model(checkpoint, tmp_path, capsys):
    root = write_pope(tmp_path / "pope")
    out = tmp_path / "eval"
    args = ["eval", "--checkpoint", checkpoint, "--bench", "pope", "--data", str(root), "--method", "fastv",
            "--debias", "pad+curve", "--curve", "online", "--max-new-tokens", "1", "--batch", "2", "--out", str(out)]
    assert main(args + ["--keep", "28"]) == 2  # 9 base + the 2-tile bucket's 3 x 6 grid = 27 in every span
    assert "--keep must be in 1..27" in capsys.readouterr().err and not out.exists()
    assert main(args + ["--keep", "300"]) == 2
    assert main(args + ["--keep", "10"]) == 0, capsys.readouterr().err
    answers = [json.loads(x) for x in open(out / "pope_answers.jsonl")]
    assert [a["question_id"] for a in answers] == [0, 1, 2, 3, 4]
    assert "f1" in json.dumps(json.load(open(out / "pope_metrics.json")))


def test_calibrate_per_view_and_eval_with_the_curves(checkpoint, tmp_path, capsys):
    root = write_pope(tmp_path / "pope")
    curve = tmp_path / "curve.json"
    assert main(["calibrate", "--checkpoint", checkpoint, "--data", str(root), "--bench", "pope", "--method",
                 "fastv", "--form", "exp", "--out", str(curve)]) == 0, capsys.readouterr().err
    record = json.load(open(curve))
    views = record["curve"]["views"]
    assert record["view_names"] == ["base", "tiles"] and len(views) == 2 and record["samples"] == 5
    assert views[0] != views[1]  # each view has its own fit
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", checkpoint, "--bench", "pope", "--data", str(root), "--method", "fastv",
                 "--keep", "10", "--debias", "pad+curve", "--curve", str(curve), "--max-new-tokens", "1",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    assert len(open(out / "pope_answers.jsonl").readlines()) == 5


def test_bias_report_on_the_base_view(checkpoint, tmp_path, capsys):
    root = write_pope(tmp_path / "pope")
    out = tmp_path / "bias"
    assert main(["bias", "--checkpoint", checkpoint, "--data", str(root), "--bench", "pope", "--method", "fastv",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    report = json.load(open(out / "bias.json"))
    assert report["positions"] == "base view" and report["samples"] == 5
    assert len(report["before"]["row_means"]) == 3  # the 3 x 3 base view of the tiny model
