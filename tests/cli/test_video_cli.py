"""`jaxdebias run --video` and `jaxdebias eval` on a converted tiny Video-LLaVA checkpoint (8 frames x (4 patches +
CLS) = 40 visual tokens, a character tokenizer), and the GPT-judge step with a fake client."""

import json
import os

import numpy as np
import pytest

import jaxdebias as jd
from jaxdebias import UserError
from jaxdebias.cli import families
from jaxdebias.cli import run as cli_run
from jaxdebias.cli import video as cli_video
from jaxdebias.cli.main import main

torch = pytest.importorskip("torch")

from ..eval.test_video_benchmarks import write_video_bench  # noqa: E402
from ..models.hf_tiny_video import make_hf_video_llava, save_char_tokenizer  # noqa: E402


def image_model():
    """A tiny LLaVA-1.5 (an image model) with the byte tokenizer, built in memory."""
    from flax import nnx

    from jaxdebias.cli.inputs import ByteTokenizer, LoadedModel
    from jaxdebias.models.clip import ClipVisionConfig
    from jaxdebias.models.llama import LlamaConfig
    from jaxdebias.models.llava import Llava, LlavaConfig

    cfg = LlavaConfig(ClipVisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, image_size=28),
                      LlamaConfig(vocab_size=260, hidden_size=16, intermediate_size=32, num_layers=3, num_heads=2,
                                  num_kv_heads=2), image_token_id=259)
    return LoadedModel(Llava(cfg, rngs=nnx.Rngs(0)), ByteTokenizer())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from jaxdebias.convert import convert

    path = tmp_path_factory.mktemp("video_cli")
    make_hf_video_llava(seed=2, text_layers=3).save_pretrained(path / "hf")
    save_char_tokenizer(path / "hf")
    convert(path / "hf", path / "ckpt", dtype="float32", progress=False)
    return str(path / "ckpt")


def test_run_on_a_video(checkpoint, tmp_path, capsys):
    root = write_video_bench(tmp_path / "data")
    frames = str(root / "MSVD_Zero_Shot_QA" / "videos" / "clip_a")
    out = tmp_path / "out"
    code = main(["run", "--checkpoint", checkpoint, "--video", frames, "--prompt", "what?", "--method", "fastv",
                 "--keep", "16", "--debias", "curve", "--curve", "online", "--max-new-tokens", "1",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    summary = json.load(open(out / "run.json"))
    assert summary["visual_tokens"] == 40 and summary["kept"] == {"pruned": 16, "pruned + debiased": 16}
    assert sum(summary["kept_per_frame"]["pruned + debiased"]) == 16 and summary["frame_trend"] == "frame"
    # FastV decoded as released (the default): mask mode, nothing leaves the sequence, each token re-selects
    assert summary["decode"] == "released"
    assert summary["stage_lengths"]["pruned"][1][2] == summary["stage_lengths"]["unpruned"][0][2]
    for f in summary["figures"]:
        assert os.path.getsize(f) > 3000
    assert "no letterbox padding" not in capsys.readouterr().out  # --debias curve has no padding part


def test_eval_on_a_video_benchmark_and_judge(checkpoint, tmp_path, capsys):
    root = write_video_bench(tmp_path / "data")
    out = tmp_path / "eval"
    args = ["eval", "--checkpoint", checkpoint, "--bench", "msvd", "--data", str(root), "--method", "fastv",
            "--keep", "12", "--debias", "curve", "--curve", "online", "--max-new-tokens", "1", "--batch", "2",
            "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    lines = [json.loads(x) for x in open(out / "merge.jsonl")]
    assert [(x["id"], x["question"], x["answer"]) for x in lines] == [("q0", "what is in clip_a?", "dog"),
                                                                      ("q1", "what is in clip_b?", "running")]
    answers = [json.loads(x)["text"] for x in open(out / "msvd_answers.jsonl")]
    assert [x["pred"] for x in lines] == answers
    metrics = json.load(open(out / "msvd_metrics.json"))
    assert metrics.pop("setting")["method"] == "fastv"
    assert metrics == {"exact_match": sum(a.strip().lower().rstrip(".") == g for a, g in
                                          zip(answers, ["dog", "running"])) / 2, "n": 2}
    scores = cli_video.judge("msvd", str(out), complete=lambda messages, model: "{'pred': 'no', 'score': 2}",
                             log=lambda *_: None)
    assert scores["gpt_accuracy"] == 0.0 and scores["gpt_score"] == 2.0 and scores["judged"] == 2
    assert json.load(open(out / "msvd_gpt_judge.json"))["lines"][0]["judge"] == {"pred": "no", "score": 2}


def test_video_inputs_that_do_not_fit_exit_2(checkpoint, tmp_path, capsys):
    root = write_video_bench(tmp_path / "data")
    base = ["eval", "--checkpoint", checkpoint, "--bench", "msvd", "--data", str(root), "--out", str(tmp_path / "o")]
    assert main(base + ["--keep", "41", "--debias", "off"]) == 2
    assert "--keep must be in 1..40 (the visual tokens of one video" in capsys.readouterr().err
    assert main(base + ["--keep", "8"]) == 2  # the default pad+curve: no letterbox on video frames
    assert "no letterbox padding" in capsys.readouterr().err
    os.remove(root / "MSVD_Zero_Shot_QA" / "videos" / "clip_b.npy")
    (root / "MSVD_Zero_Shot_QA" / "videos" / "clip_b.avi").write_bytes(b"\x00")
    assert main(base + ["--keep", "8", "--debias", "off"]) == 2
    assert "ffmpeg -i" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing half-written
    assert main(["run", "--video", str(tmp_path / "none"), "--checkpoint", checkpoint]) == 2
    assert "does not exist" in capsys.readouterr().err
    np.save(tmp_path / "v.npy", np.zeros((8, 28, 28, 3), np.uint8))
    with pytest.raises(UserError, match="--video needs a Video-LLaVA or LLaVA-OneVision checkpoint"):
        cli_run.run_video(jd.PruneSpec("fastv", keep=4), model=image_model(), video=str(tmp_path / "v.npy"))


def test_calibrate_per_frame_and_across_frames_then_eval_with_the_curve(checkpoint, tmp_path, capsys):
    root = write_video_bench(tmp_path / "data")
    for trend, positions in (("frame", 5), ("video", 40)):
        curve = tmp_path / f"{trend}.json"
        assert main(["calibrate", "--checkpoint", checkpoint, "--bench", "msvd", "--data", str(root),
                     "--frame-trend", trend, "--out", str(curve)]) == 0, capsys.readouterr().err
        record = json.load(open(curve))
        assert record["frame_trend"] == trend and record["positions"] == positions
        assert record["samples"] == (2 * 8 if trend == "frame" else 2)  # each frame is a sample of its trend
        assert os.path.getsize(tmp_path / f"{trend}.png") > 3000
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", checkpoint, "--bench", "msvd", "--data", str(root), "--keep", "8",
                 "--debias", "curve", "--curve", str(tmp_path / "frame.json"), "--frame-trend", "frame",
                 "--max-new-tokens", "1", "--out", str(out)]) == 0, capsys.readouterr().err
    assert len(open(out / "merge.jsonl").readlines()) == 2
    with pytest.raises(UserError, match="--frame-trend applies to Video-LLaVA checkpoints"):
        families.with_frame_trend(image_model(), "video")


def test_bias_report_refuses_video_rows(tmp_path, capsys):
    root = write_video_bench(tmp_path / "data")
    assert main(["bias", "--bench", "msvd", "--data", str(root), "--out", str(tmp_path / "b")]) == 2
    assert "calibrate --frame-trend" in capsys.readouterr().err and not (tmp_path / "b").exists()


@pytest.mark.parametrize("size", [(500, 300), (301, 457), (224, 224), (97, 61)])
def test_frames_are_processed_as_transformers_processes_them(size):
    """Shortest edge to 224 (bicubic), centre crop, CLIP normalisation: transformers' VideoLlavaImageProcessor
    applies the same transforms to every frame (its video processor needs torchvision, which is not installed)."""
    from PIL import Image
    from transformers import VideoLlavaImageProcessor

    rng = np.random.default_rng(sum(size))
    frames = [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(3)]
    ref = VideoLlavaImageProcessor()(images=frames, return_tensors="np")
    ref = np.asarray(ref[list(ref.keys())[0]]).reshape(3, 3, 224, 224)
    ours, crops = cli_video.preprocess_frames(frames)
    assert ours.shape == (3, 3, 224, 224) and crops[0].size == (224, 224)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_eval_grid_on_a_video_benchmark(checkpoint, tmp_path, capsys):
    root = write_video_bench(tmp_path / "data")
    out = tmp_path / "grid"
    assert main(["eval-grid", "--checkpoint", checkpoint, "--bench", "msvd", "--data", str(root), "--methods",
                 "fastv", "--keep", "8", "--curve", "online", "--max-new-tokens", "1", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    assert (out / "summary.csv").exists() and (out / "fastv-after" / "merge.jsonl").exists()
    # frames are centre-cropped: "before" (padding only) is the paper setting, not run twice
    assert not (out / "fastv-before").exists() and "| fastv |" in (out / "summary.md").read_text()
    assert main(["eval", "--checkpoint", checkpoint, "--bench", "msvd", "--data", str(root), "--method",
                 "visionzip", "--keep", "8", "--debias", "off", "--out", str(tmp_path / "vz")]) == 2
    assert "decoder-side method" in capsys.readouterr().err and not (tmp_path / "vz").exists()


def test_large_budgets_get_their_own_buckets():
    """A video keeps up to 2056 tokens: a CLI budget past 576 is rounded to the next large bucket, not the span."""
    from jaxdebias.cli.specs import prune_spec

    shape, limits = prune_spec("fastv", 1000).plan(2056, 32)
    assert shape.stages[0].slots == 1024 and limits[0] == 1000
    shape, _ = prune_spec("fastv", 2000).plan(2056, 32)
    assert shape.stages[0].slots == 2048
    shape, _ = prune_spec("fastv", 500).plan(576, 32)
    assert shape.stages[0].slots == 576  # LLaVA-1.5 unchanged


def test_run_without_video_on_a_video_checkpoint_says_to_pass_one(checkpoint, capsys):
    assert main(["run", "--checkpoint", checkpoint]) == 2
    assert "--video FRAMES_DIR" in capsys.readouterr().err
