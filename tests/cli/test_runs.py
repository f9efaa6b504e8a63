"""A run knows what it is (issue: reliability): an answer folder records the setting that produced it and refuses
another; one process per answer file; duplicate question ids refused; an edited question answered again; run-time
checks before the first answer (nothing written on a refusal); result files that honour the umask."""

import json
import os
import subprocess
import sys

import jax
import pytest

import jaxdebias as jd
from jaxdebias.cli.evaluate import evaluate
from jaxdebias.cli.specs import parse_debias
from tests.cli.samples import QUESTIONS, tiny_model, write_pope

SPEC = jd.PruneSpec("fastv", keep=2, debias=jd.Debias(pad_tau=0.5))


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def ev(tiny, data, out, spec=SPEC, **kw):
    return evaluate("pope", str(data), str(out), spec=spec, model=tiny, batch_size=5, max_new_tokens=2,
                    progress=False, devices=jax.devices()[:1], log=lambda *_: None, **kw)


def test_a_folder_refuses_another_setting(tiny, tmp_path):
    data, out = write_pope(tmp_path / "pope"), tmp_path / "out"
    first = ev(tiny, data, out)
    answers = (out / "pope_answers.jsonl").read_text()
    record = json.loads((out / "pope_setting.json").read_text())
    assert (record["method"], record["keep"], record["decode"], record["max_new_tokens"]) == ("fastv", 2, "fast", 2)
    assert json.loads((out / "pope_metrics.json").read_text())["setting"] == record  # the metric says its setting
    for other, named in [(jd.PruneSpec("fastv", keep=1, debias=SPEC.debias), "keep: 2 there, 1 now"),
                         (jd.PruneSpec("fastv", keep=2), "debias"),
                         (jd.PruneSpec("himap", keep=2), "method: 'fastv' there"),
                         (jd.PruneSpec("fastv", keep=2, debias=SPEC.debias, decode="released"), "decode")]:
        with pytest.raises(jd.UserError, match=named) as e:
            ev(tiny, data, out, spec=other)
        assert "--overwrite" in str(e.value) and "new --out" in str(e.value)
    with pytest.raises(jd.UserError, match="max_new_tokens"):
        evaluate("pope", str(data), str(out), spec=SPEC, model=tiny, batch_size=5, max_new_tokens=3, progress=False,
                 devices=jax.devices()[:1], log=lambda *_: None)
    assert (out / "pope_answers.jsonl").read_text() == answers  # refused: nothing touched
    assert ev(tiny, data, out) == first  # the same setting resumes (nothing left to answer)
    again = ev(tiny, data, out, spec=jd.PruneSpec("fastv", keep=1, debias=SPEC.debias), overwrite=True)
    assert json.loads((out / "pope_setting.json").read_text())["keep"] == 1
    assert again["n"] == len(QUESTIONS)


def test_duplicates_refused_and_edited_questions_answered_again(tiny, tmp_path):
    data, out = write_pope(tmp_path / "pope"), tmp_path / "out"
    ev(tiny, data, out)
    lines = (data / "llava_pope_test.jsonl").read_text().splitlines()
    edited = json.loads(lines[1]) | {"text": "Is there a horse in the image?"}
    (data / "llava_pope_test.jsonl").write_text("\n".join([lines[0], json.dumps(edited)] + lines[2:]) + "\n")
    ev(tiny, data, out)
    answered = [json.loads(x) for x in (out / "pope_answers.jsonl").read_text().splitlines()]
    assert sorted(x["question_id"] for x in answered) == list(range(len(QUESTIONS)))  # the old line is gone
    assert next(x for x in answered if x["question_id"] == 1)["prompt"] == edited["text"]
    (data / "llava_pope_test.jsonl").write_text("\n".join(lines + [lines[3]]) + "\n")
    fresh = tmp_path / "fresh"
    with pytest.raises(jd.UserError, match="question 3 twice"):
        ev(tiny, data, fresh)
    assert not fresh.exists()


def test_one_process_per_answer_file(tiny, tmp_path):
    data, out = write_pope(tmp_path / "pope"), tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "pope_answers.jsonl.lock").write_text(str(holder.pid))
        with pytest.raises(jd.UserError, match=f"Another process \\(pid {holder.pid}\\) is writing"):
            ev(tiny, data, out)
        assert not (out / "pope_answers.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    ev(tiny, data, out)  # the owner is gone: its lock is stale and taken over
    assert len((out / "pope_answers.jsonl").read_text().splitlines()) == len(QUESTIONS)
    assert not (out / "pope_answers.jsonl.lock").exists()


def test_run_time_checks_come_first_and_files_honour_the_umask(tiny, tmp_path):
    data = write_pope(tmp_path / "pope")
    with pytest.raises(jd.UserError, match="--max-new-tokens must be >= 1"):
        evaluate("pope", str(data), str(tmp_path / "o1"), spec=SPEC, model=tiny, max_new_tokens=0, progress=False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(jd.UserError, match="is a file"):
        ev(tiny, data, tmp_path / "afile")
    with pytest.raises(jd.UserError, match="--keep must be in 1..4"):
        ev(tiny, data, tmp_path / "o2", spec=jd.PruneSpec("fastv", keep=5))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    nan = tmp_path / "nan.json"
    nan.write_text('{"curve": {"form": "exp", "b": NaN}}')
    with pytest.raises(jd.UserError, match="finite number"):
        parse_debias("curve", curve=str(nan))
    for bad, named in [('{"curve": {"form": "poly3_inverse", "coeffs": [1, 2, 3]}}', "4 coefficients"),
                       ('{"curve": {"form": "exp", "b": [0.001]}}', "finite number"),
                       ('{"curve": {"form": "exp", "b": 1e39}}', "finite number")]:
        nan.write_text(bad)
        with pytest.raises(jd.UserError, match=named):
            parse_debias("curve", curve=str(nan))
    views = jd.Debias(curve=[{"form": "exp", "b": 0.001}, {"form": "exp", "b": 0.002}])  # LLaVA-NeXT's form
    with pytest.raises(jd.UserError, match="one part per view"):
        ev(tiny, data, tmp_path / "o4", spec=jd.PruneSpec("fastv", keep=2, debias=views))
    assert not (tmp_path / "o4").exists()
    old = os.umask(0o022)
    try:
        ev(tiny, data, tmp_path / "o3")
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "o3" / "pope_metrics.json").st_mode & 0o777) == 0o644
