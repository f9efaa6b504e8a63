"""eval / calibrate with tiny benchmark samples written by the test, on a tiny checkpoint (the ``tiny_checkpoint``
fixture; the embedded default where its own limits are the subject)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import pytest

import jaxdebias as jd
from jaxdebias.cli import families, specs
from jaxdebias.cli.calibrate import calibrate
from jaxdebias.cli.evaluate import evaluate
from jaxdebias.cli.runner import Runner
from jaxdebias.eval import benchmarks, metrics
from jaxdebias.models.generate import generate
from tests.cli.samples import cli_exit, write_pope

SPEC = jd.PruneSpec("fastv", keep=4, debias=jd.Debias(pad_tau=0.5))  # 4 of the tiny checkpoint's 16 visual tokens

# `jaxdebias eval` as `python -m jaxdebias` runs it, a second per batch slower: a SIGKILL lands between answers
SLOW_EVAL = """import sys, time
from jaxdebias.cli import runner
generate = runner.generate
def slow(*args, **kwargs):
    time.sleep(1.0)
    return generate(*args, **kwargs)
runner.generate = slow
from jaxdebias.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_pope_metrics_by_hand():
    answers = ["Yes, there is.", "No.", "There is not a dog", "yes"]
    labels = ["yes", "no", "yes", "no"]
    m = metrics.pope_metrics([metrics.pope_yes_no(a) for a in answers], labels)  # tp: 1, tn: 2, fn: 3, fp: 4
    assert m == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5, "n": 4}


def test_eval_interrupted_resumes_to_the_same_metric(tmp_path, tiny_checkpoint):
    data = write_pope(tmp_path / "pope")
    one = jax.devices()[:1]  # as the killed subprocess below runs (the test session has 4 fake devices)
    tiny = families.load_model(tiny_checkpoint)  # the same checkpoint identity as the subprocess's --checkpoint
    full = evaluate("pope", str(data), str(tmp_path / "full"), spec=SPEC, model=tiny, batch_size=1, progress=False,
                    devices=one)
    lines = [json.loads(x) for x in open(tmp_path / "full" / "pope_answers.jsonl")]
    assert [x["question_id"] for x in lines] == list(range(5))
    assert set(lines[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    rows, _ = benchmarks.read_any(str(data), "pope")
    assert full == benchmarks.get("pope").score(rows, [x["text"] for x in lines])

    out = tmp_path / "resumed"
    answers = out / "pope_answers.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EVAL, "eval", "--bench", "pope", "--data", str(data),
                             "--out", str(out), "--batch", "1", "--keep", "4", "--debias", "pad",
                             "--decode", "fast", "--checkpoint", tiny_checkpoint],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if answers.exists() and len(answers.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(answers.read_text().splitlines())
    assert 2 <= written < 5, written  # really interrupted mid-way
    with open(answers, "a") as f:
        f.write('{"question_id": 4, "pro')  # and a torn line, as a kill during a write would leave
    resumed = evaluate("pope", str(data), str(out), spec=SPEC, model=tiny, batch_size=1, progress=False, devices=one)
    assert resumed == full
    ids = [json.loads(x)["question_id"] for x in answers.read_text().splitlines()]
    assert sorted(ids) == list(range(5))  # nothing double-counted

    # an interruption simulated with a limit: 2 answers, then the full run answers the other 3 and scores all 5
    staged = tmp_path / "staged"
    evaluate("pope", str(data), str(staged), spec=SPEC, model=tiny, batch_size=1, limit=2, progress=False,
             devices=one)
    assert len((staged / "pope_answers.jsonl").read_text().splitlines()) == 2
    assert evaluate("pope", str(data), str(staged), spec=SPEC, model=tiny, batch_size=1, progress=False,
                    devices=one) == full
    assert (staged / "pope_answers.jsonl").read_text() == (tmp_path / "full" / "pope_answers.jsonl").read_text()


def test_eval_and_calibrate_bad_inputs(tmp_path, capsys):
    """Exit 2 with the reason on stderr and nothing written (the command run in this process: the refusals come
    before anything runs; `python -m jaxdebias` itself: tests/cli/test_hostile.py)."""
    def run(*args):
        code, _, err = cli_exit(capsys, *args)
        return code, err

    bad = write_pope(tmp_path / "nolabel", drop_field="label")
    code, err = run("eval", "--bench", "pope", "--data", str(bad), "--out", str(tmp_path / "o1"))
    assert code == 2 and "line 1: missing field(s) label" in err
    missing = write_pope(tmp_path / "noimage")
    os.remove(missing / "images" / "c.png")
    code, err = run("eval", "--bench", "pope", "--data", str(missing), "--out", str(tmp_path / "o2"))
    assert code == 2 and "Image c.png of question 2 is missing" in err
    good = write_pope(tmp_path / "good")
    code, err = run("eval", "--bench", "pope", "--data", str(good), "--keep", "700", "--out", str(tmp_path / "o3"))
    assert code == 2 and "--keep must be in 1..576 (the visual tokens of one image)" in err  # the embedded default's
    code, err = run("calibrate", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "c.json"))
    assert code == 2 and "is not a directory" in err
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3", "c.json"))


def test_eval_truncated_image_stops_before_the_first_answer(tmp_path, capsys):
    """The 7th of 7 images is a truncated PNG: exit 2 naming it, on a line of its own, and no answer file (the
    run used to write 6 answers first). The command runs in this process (the images are checked before a model
    is loaded)."""
    questions = [(f"{name}.png", (320 + 10 * i, 240), f"Is there a {name} in the image?", "yes" if i % 2 else "no")
                 for i, name in enumerate(["ant", "bee", "cat", "dog", "eel", "fox", "gnu"])]
    data = write_pope(tmp_path / "pope", questions)
    png = (data / "images" / "gnu.png").read_bytes()
    (data / "images" / "gnu.png").write_bytes(png[:len(png) // 2])
    out = tmp_path / "out"
    code, _, err = cli_exit(capsys, "eval", "--bench", "pope", "--data", str(data), "--out", str(out), "--batch", "1",
                         "--keep", "64", "--debias", "pad")
    assert code == 2, err[-2000:]
    assert f"jaxdebias eval: error: Image {data / 'images' / 'gnu.png'} cannot be read" in err
    assert any(line.startswith("jaxdebias eval: error:") for line in err.splitlines())  # its own line
    assert not out.exists()  # no answer file, no metrics


def test_calibrate_writes_a_curve_run_accepts(tmp_path, tiny_checkpoint):
    data = write_pope(tmp_path / "cal")
    os.rename(data / "llava_pope_test.jsonl", data / "questions.jsonl")
    rec = calibrate(str(data), str(tmp_path / "curve.json"), method="fastv", form="exp", model=tiny_checkpoint,
                    batch_size=2, progress=False, log=lambda *_: None, devices=jax.devices()[:1])
    assert rec["samples"] == 5 and rec["curve"]["form"] == "exp"
    assert os.path.getsize(tmp_path / "curve.png") > 5000
    debias = specs.parse_debias("pad+curve", 0.5, str(tmp_path / "curve.json"), "gqa")
    assert dict(debias.curve)["b"] == pytest.approx(rec["curve"]["b"])


def test_bias_report(tmp_path, monkeypatch, capsys, tiny_checkpoint):
    data = write_pope(tmp_path / "b")
    os.rename(data / "llava_pope_test.jsonl", data / "questions.jsonl")
    monkeypatch.setattr(jax, "local_devices", lambda *a, **k: jax.devices()[:1])  # one CPU, as the command runs
    code, _, err = cli_exit(capsys, "bias", "--data", str(data), "--out", str(tmp_path / "o"), "--batch", "2",
                         "--checkpoint", tiny_checkpoint)
    assert code == 0, err
    rep = json.load(open(tmp_path / "o" / "bias.json"))
    assert rep["samples"] == 5 and len(rep["before"]["row_means"]) == 4  # a mean per row of the 4 x 4 patch grid
    assert rep["after"]["pad_ratio"] == 0.0  # padding suppressed after debiasing
    assert rep["before"]["pad_ratio"] > 0
    assert os.path.getsize(tmp_path / "o" / "bias.png") > 5000


def test_eval_splits_batches_over_devices(tmp_path, tiny_checkpoint):
    """On 4 (fake) devices the batch is sharded over "data"; the prefill logits equal a single device's."""
    import numpy as np

    assert len(jax.devices()) >= 4
    data = write_pope(tmp_path / "multi")
    runner = Runner(families.load_model(tiny_checkpoint), SPEC, 2, devices=jax.devices()[:4])
    assert runner.batch_size == 4 and runner.mesh.shape["data"] == 4
    rows = benchmarks.read_any(str(data), "pope")[0][:4]
    batch = runner.loaded.batch(runner.requests(rows, str(data / "images")))
    sharded = generate(runner.loaded.model, batch, prune=SPEC, max_new_tokens=1, mesh=runner.mesh)
    ref = generate(families.load_model(tiny_checkpoint).model, batch, prune=SPEC, max_new_tokens=1)
    np.testing.assert_allclose(sharded.logits, ref.logits, atol=1e-4)
    m = evaluate("pope", str(data), str(tmp_path / "o"), spec=SPEC, model=tiny_checkpoint, batch_size=2,
                 progress=False, devices=jax.devices()[:4])
    assert m["n"] == 5


def test_eval_under_jax_distributed_equals_one_process(tmp_path, tiny_checkpoint):
    """Two processes joined by jax.distributed (as two hosts would be) split the questions, write their parts,
    and process 0 merges them: the same answer file and metric as one process."""
    import socket

    data = write_pope(tmp_path / "mh")
    one = evaluate("pope", str(data), str(tmp_path / "one"), spec=SPEC, model=tiny_checkpoint, batch_size=1,
                   progress=False, devices=jax.devices()[:1])
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two"
    procs = [subprocess.Popen([sys.executable, "-m", "jaxdebias", "eval", "--bench", "pope", "--data", str(data),
                               "--out", str(out), "--batch", "1", "--keep", "4", "--debias", "pad", "--decode", "fast",
                               "--checkpoint", tiny_checkpoint, "--distributed",
                               "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-2000:]
    metrics = json.load(open(out / "pope_metrics.json"))
    assert metrics.pop("setting") == json.load(open(tmp_path / "one" / "pope_metrics.json"))["setting"]
    assert metrics == one
    merged = (out / "pope_answers.jsonl").read_text().splitlines()
    assert [json.loads(x)["text"] for x in merged] == [
        json.loads(x)["text"] for x in (tmp_path / "one" / "pope_answers.jsonl").read_text().splitlines()]
    parts = [[json.loads(x)["question_id"] for x in (out / f"pope_answers.part{i}of2.jsonl").read_text().splitlines()]
             for i in range(2)]
    assert parts == [[0, 2, 4], [1, 3]]
