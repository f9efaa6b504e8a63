"""Hostile input and faults of the machine (issue #27 items 3-4): whatever a user passes gives a result or one
message - never a traceback, never a wrong result, never a half-written file - and a full disk, a file-size limit,
running out of memory or Ctrl-C stop a command with their own exit code and one line, keeping the whole answer lines
that a rerun resumes from.

Generated files go through the readers in-process (hypothesis); named cases go through ``main`` in-process and one
through the real command in a subprocess; a file-size limit stops a real ``jaxdebias eval`` (subprocess) and SIGINT
one in-process, both on a tiny toy checkpoint; the other faults are raised through the command's error boundary.
"""

import errno
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

import jaxdebias as jd
from jaxdebias.cli import faults, families, images, inputs, main as cli, runner, specs
from jaxdebias.eval.benchmarks import read_any
from tests.cli.samples import cli_exit, tiny_checkpoint, write_pope

HOSTILE = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
LONG = "Look closely at every corner of the picture before you answer. " * 5  # answer lines of ~450 bytes
QUESTIONS = [(f"{c}.png", (60, 40), f"Is there a {w} in the image? {LONG}", label)
             for c, w, label in (("a", "dog", "yes"), ("b", "cat", "no"), ("c", "car", "no"))]
EVAL = ["eval", "--bench", "pope", "--limit", "3", "--max-new-tokens", "1", "--keep", "2", "--debias", "pad",
        "--batch", "1"]


def files_under(root) -> set:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


# --- generated files, in-process ---------------------------------------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                  max_size=3), max_leaves=6)
_fields = st.sampled_from(["question_id", "image", "text", "label", "category", "answer"]) | st.text(max_size=4)


@st.composite
def _question_line(draw) -> bytes:
    """A line of a question file: mostly a valid row with some fields replaced or dropped, else any JSON or bytes."""
    kind = draw(st.sampled_from(["row", "row", "row", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=24))
    if kind == "json":
        return json.dumps(draw(_json)).encode()
    row = {"question_id": draw(st.integers(0, 3) | st.text(max_size=3)), "image": "a.png", "text": "Is it?",
           "label": "yes", "category": "random"}
    row.update(draw(st.dictionaries(_fields, _json, max_size=2)))
    for key in draw(st.lists(st.sampled_from(sorted(row)), max_size=2)):
        row.pop(key, None)
    return json.dumps(row).encode()


TRUTH = {"gqa": "testdev_balanced_questions.json", "textvqa": "TextVQA_0.5.1_val.json",
         "vqav2": "v2_mscoco_val2014_annotations.json", "vizwiz": "val.json", "mmvet": "mm-vet.json"}
_truth = _json | st.dictionaries(st.sampled_from(["0", "1", "v1_0", "data", "annotations"]),
                                 _json | st.fixed_dictionaries({"answer": _json}), max_size=3)


def _check_row(row, bench) -> None:
    """What a row read without a refusal must hold: the fields the commands use, typed."""
    assert isinstance(row["question_id"], (int, str)) and not isinstance(row["question_id"], bool)
    assert isinstance(row["text"], str)
    assert isinstance(row["video"] if "video" in row else row["image"], str)
    if bench == "gqa" and "answer" in row:
        assert isinstance(row["answer"], str)
    if bench in ("textvqa", "vqav2", "vizwiz") and "answers" in row:
        assert all(isinstance(a, str) for a in row["answers"])


@settings(HOSTILE, max_examples=400)
@given(bench=st.sampled_from([None, "pope", "gqa", "mme", "textvqa", "vqav2", "vizwiz", "mmvet"]),
       lines=st.lists(_question_line(), min_size=1, max_size=4), newline=st.booleans(),
       truth=st.none() | _truth | st.binary(max_size=12))
@example(bench="gqa", newline=False, truth=None,  # an answer of null in GQA's question file was read, then scored
         lines=[b'{"question_id": 0, "image": "a.png", "text": "Is it?", "category": "random", "answer": null}'])
def test_question_files_are_read_or_refused(bench, lines, newline, truth):
    with tempfile.TemporaryDirectory() as root:
        with open(os.path.join(root, "questions.jsonl"), "wb") as f:
            f.write(b"\n".join(lines) + (b"\n" if newline else b""))
        if truth is not None and bench in TRUTH:
            with open(os.path.join(root, TRUTH[bench]), "wb") as f:
                f.write(truth if isinstance(truth, bytes) else json.dumps(truth).encode())
        before = files_under(root)
        try:
            rows, _ = read_any(root, bench)
        except jd.UserError:
            rows = []
        for row in rows:
            _check_row(row, bench)
        assert files_under(root) == before


@settings(HOSTILE, max_examples=100)
@given(questions=_json | st.lists(_json | st.fixed_dictionaries(
           {"video_name": _json, "question": _json, "question_id": _json}), max_size=3) | st.binary(max_size=12),
       answers=st.none() | _json | st.lists(st.fixed_dictionaries({"answer": _json}), max_size=3))
def test_video_question_files_are_read_or_refused(questions, answers):
    with tempfile.TemporaryDirectory() as root:
        with open(os.path.join(root, "test_q.json"), "wb") as f:
            f.write(questions if isinstance(questions, bytes) else json.dumps(questions).encode())
        if answers is not None:
            with open(os.path.join(root, "test_a.json"), "w") as f:
                json.dump(answers, f)
        before = files_under(root)
        try:
            rows, _ = read_any(root, "msvd")
        except jd.UserError:
            rows = []
        for row in rows:
            _check_row(row, "msvd")
            assert "answer" not in row or isinstance(row["answer"], str)
        assert files_under(root) == before


_number = st.floats() | st.integers() | _json
_curve = st.fixed_dictionaries({"form": st.sampled_from(["exp", "exp+c", "poly3_inverse", "views", "cubic"]) | _json},
                               optional={"b": _number, "a": _number, "c": _number,
                                         "coeffs": st.lists(_number, max_size=5) | _json,
                                         "views": st.lists(st.fixed_dictionaries({"form": st.just("exp"), "b": _number}),
                                                           max_size=2) | _json})


@settings(HOSTILE, max_examples=250)
@given(content=st.fixed_dictionaries({"curve": _curve | _json}) | _json | st.binary(max_size=24))
def test_curve_files_are_read_or_refused(content):
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "curve.json")
        with open(path, "wb") as f:
            f.write(content if isinstance(content, bytes) else json.dumps(content).encode())
        try:
            curve = specs.read_curve(path)
        except jd.UserError as e:
            assert path in str(e)
        else:
            assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree_util.tree_leaves(curve))
        assert files_under(root) == {"curve.json"}


MODES = {"1": (bool, 1), "L": (np.uint8, 1), "P": (np.uint8, 1), "LA": (np.uint8, 2), "RGB": (np.uint8, 3),
         "RGBA": (np.uint8, 4), "CMYK": (np.uint8, 4), "I;16": (np.uint16, 1), "I": (np.int32, 1), "F": (np.float32, 1)}


def _pixels(mode: str, w: int, h: int, seed: int) -> np.ndarray:
    dtype, channels = MODES[mode]
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 1 else (h, w, channels)
    if dtype is bool:
        return rng.random(shape) < 0.5
    if dtype is np.float32:
        return (rng.random(shape) * rng.choice([1.0, 255.0, 1e6])).astype(np.float32)
    low, high = {np.uint8: (0, 256), np.uint16: (0, 65536), np.int32: (-5, 70000)}[dtype]
    return rng.integers(low, high, shape).astype(dtype)


@st.composite
def _image(draw):
    """(encoded image, mode, pixels, intact) of a small image in one of PIL's common modes, sometimes damaged."""
    mode = draw(st.sampled_from(sorted(MODES)))
    pixels = _pixels(mode, draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.integers(0, 2**16)))
    if mode == "CMYK":
        image = Image.frombytes(mode, pixels.shape[1::-1], pixels.tobytes())
    elif mode == "P":
        image = Image.fromarray(pixels).convert("P")
        if draw(st.booleans()):
            image.info["transparency"] = 0
    else:
        image = Image.fromarray(pixels)
    assert image.mode == mode
    buffer = io.BytesIO()
    image.save(buffer, "TIFF" if mode in ("CMYK", "I", "F") else "PNG")
    data = bytearray(buffer.getvalue())
    for _ in range(draw(st.integers(0, 2))):  # damage: a byte changed, or the tail cut
        if draw(st.booleans()) or len(data) < 2:
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        else:
            del data[draw(st.integers(1, len(data) - 1)):]
    return bytes(data), mode, pixels, data == buffer.getvalue()


@settings(HOSTILE, max_examples=300)
@given(case=_image() | st.binary(max_size=64))
def test_images_are_converted_or_refused(case):
    data, mode, pixels, intact = case if isinstance(case, tuple) else (case, None, None, False)
    try:
        image = images.load_image("hostile.img", data)
    except jd.UserError as e:
        assert not intact, e  # an intact image of any of these modes converts
        return
    assert image.mode == "RGB"
    if intact and mode == "I;16":  # 16-bit grey scaled to 8 bits, not clipped to white
        assert np.abs(np.asarray(image, np.int64)[..., 0] - np.rint(pixels / 257)).max() <= 1


def test_16_bit_grey_directory_and_decompression_bomb(tmp_path, monkeypatch):
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    grey = np.asarray(images.load_image(str(tmp_path / "grey16.png")))
    assert grey.min() == 0 and grey.max() == 255 and 120 < grey.mean() < 135  # was all white (255)
    with pytest.raises(jd.UserError, match="is a directory"):
        images.load_image(str(tmp_path))
    with pytest.raises(jd.UserError, match="is a directory"):
        images.check_rows([{"question_id": 1, "image": ".", "text": "q"}], str(tmp_path))
    with pytest.raises(jd.UserError, match="the image must be a file name, got ''"):
        images.check_rows([{"question_id": 1, "image": "", "text": "q"}], str(tmp_path))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(20000, 20000))
    with pytest.raises(jd.UserError, match=r"20000 x 20000 = 400,000,000 pixels.*JAXDEBIAS_MAX_IMAGE_PIXELS=400000000"):
        images.check_image(str(bomb))
    monkeypatch.setenv("JAXDEBIAS_MAX_IMAGE_PIXELS", "400000000")  # raised: the header passes, the data is missing
    with pytest.raises(jd.UserError, match="cannot be read"):
        images.load_image(str(bomb))
    assert Image.MAX_IMAGE_PIXELS is not None  # PIL's own guard is back after each open


def _png_claiming(width: int, height: int) -> bytes:
    """A 1 x 1 PNG whose header claims width x height (what a decompression bomb shows before its data)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# --- the model's limits: VAR dims and prompt length ----------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny toy checkpoint at its preset's 2 x 2 patches (``samples.tiny_checkpoint``)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("hostile") / "tiny", side=None)


def test_var_dims_and_prompt_length_are_checked_against_the_model(checkpoint):
    loaded = families.load_model(checkpoint)
    width = loaded.model.cfg.text.hidden_size
    inputs.check_var(specs.var_spec(f"0,{width - 1}"), loaded)
    with pytest.raises(jd.UserError, match=f"--var-dims 99999: the model's hidden size is {width}"):
        inputs.check_var(specs.var_spec("3,99999"), loaded)
    with pytest.raises(jd.UserError, match="--var-layers"):
        inputs.check_var(specs.var_spec("3", layers="2,40"), loaded)
    with pytest.raises(jd.UserError, match="indices >= 0"):
        specs.var_spec("3,-1")
    with pytest.raises(jd.UserError, match="--var-tau"):
        specs.var_spec("3", tau=float("nan"))
    inputs.check_prompt_length(loaded, "Is there a dog?", 8)
    with pytest.raises(jd.UserError, match=r"question 7.*past the model's 2048 positions"):
        inputs.check_prompt_length(loaded, "dog " * 3000, 8, "question 7")


# --- named cases through the command ------------------------------------------------------------------------------

def refused(capsys, argv, out=None, match="") -> str:
    """Runs ``jaxdebias argv`` in-process: exit 2, exactly one line on stderr, nothing written under ``out``."""
    code, _, err = cli_exit(capsys, *argv)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"jaxdebias {argv[0]}: error: ") and match in err, err
    assert out is None or not os.path.exists(out)
    return err


def test_bad_inputs_are_refused_in_one_line(tmp_path, capsys, checkpoint):
    out = str(tmp_path / "out")
    pope = write_pope(tmp_path / "pope")
    questions = pope / "llava_pope_test.jsonl"
    good = questions.read_bytes()

    def eval_with(lines: bytes, match: str):
        questions.write_bytes(lines)
        refused(capsys, [*EVAL, "--data", str(pope), "--out", out], out, match)

    row = {"question_id": 0, "image": "a.png", "text": "Is it?", "label": "yes"}
    eval_with(good + b'{"question_id": 9, "text": "caf\xe9"}\n', "llava_pope_test.jsonl, line 6: not UTF-8")
    eval_with(json.dumps({**row, "text": None}).encode() + b"\n", "line 1: text must be a string, got null")
    eval_with(json.dumps({**row, "question_id": [1]}).encode() + b"\n", "question_id must be a whole number")
    eval_with(json.dumps({**row, "image": 5}).encode() + b"\n", "image must be a string, got 5")
    (pope / "images" / "dir.png").mkdir()
    eval_with(json.dumps({**row, "image": "dir.png"}).encode() + b"\n", "is a directory")
    questions.write_bytes(good)
    for name, content in (("list.json", "[1, 2]"), ("deep.json", "[" * 200_000 + "]" * 200_000)):
        (tmp_path / name).write_text(content)
        refused(capsys, [*EVAL, "--data", str(pope), "--out", out, "--debias", "curve", "--curve",
                         str(tmp_path / name)], out, "not a curve file" if name == "list.json" else "nested too deep")
    gqa = tmp_path / "gqa"
    (gqa / "images").mkdir(parents=True)
    (gqa / "questions.jsonl").write_text(json.dumps(row) + "\n")
    (gqa / "testdev_balanced_questions.json").write_text("[1, 2]")
    refused(capsys, ["eval", "--bench", "gqa", "--data", str(gqa), "--out", out], out, "expected a JSON object")
    (tmp_path / "bomb.png").write_bytes(_png_claiming(20000, 20000))
    refused(capsys, ["run", "--image", str(tmp_path / "bomb.png"), "--out", out], out, "decompression bombs")
    refused(capsys, ["run", "--image", str(tmp_path), "--out", out], out, "is a directory")
    refused(capsys, ["run", "--var", "--var-dims", "3,-1", "--out", out], out, "indices >= 0")
    refused(capsys, [*EVAL, "--data", str(pope), "--out", out, "--batch", "0"], out, "--batch: expected a whole")
    refused(capsys, ["calibrate", "--data", str(pope), "--out", str(tmp_path), "--checkpoint", checkpoint],
            match="is a folder")
    refused(capsys, ["bias", "--data", str(pope), "--out", out, "--pad-tau", "nan"], out, "fraction in [0, 1]")
    refused(capsys, ["toy-bench", "--out", str(tmp_path / "bomb.png")], match="is a file")
    questions.write_text(json.dumps({**row, "text": "dog " * 3000}) + "\n")
    refused(capsys, ["calibrate", "--data", str(pope), "--out", str(tmp_path / "c" / "curve.json"), "--checkpoint",
                     checkpoint], str(tmp_path / "c"), "past the model's 2048 positions")


def test_the_real_command_refuses_in_one_line(tmp_path):
    """Through ``python -m jaxdebias``: the same one line, no traceback, nothing written."""
    pope = write_pope(tmp_path / "pope")
    with open(pope / "llava_pope_test.jsonl", "ab") as f:
        f.write(b'{"question_id": 9, "image": "a.png", "text": "\xff\xfe"}\n')
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "jaxdebias", *EVAL, "--data", str(pope), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "llava_pope_test.jsonl, line 6: not UTF-8 text (byte 0xff)" in r.stderr
    assert not out.exists()


# --- faults of the machine ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("error, code, words", [
    (OSError(errno.ENOSPC, "No space left on device", "/out/pope_answers.jsonl"), 74,
     "no space left on the device (/out/pope_answers.jsonl): free some space"),
    (OSError(errno.EROFS, "Read-only file system"), 74, "read-only"),
    (MemoryError(), 75, "out of memory (host memory): try --batch 1 or a smaller --max-new-tokens"),
    (jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.00GiB."), 75,
     "out of memory (RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.00GiB.): try --batch 1"),
    (KeyboardInterrupt(), 130, "interrupted; the answers written so far are kept: rerun the same command to resume."),
])
def test_faults_exit_with_their_own_code_in_one_line(monkeypatch, capsys, error, code, words):
    def fail(args):
        raise error
    monkeypatch.setattr(cli, "_command", fail)
    assert cli.main(["eval", "--bench", "pope", "--data", "d"]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err


@pytest.mark.parametrize("error", [OSError(errno.ENOENT, "No such file"), RuntimeError("a bug"),
                                   jax.errors.JaxRuntimeError("INTERNAL: a bug")])
def test_bugs_keep_their_traceback(monkeypatch, error):
    def fail(args):
        raise error
    monkeypatch.setattr(cli, "_command", fail)
    with pytest.raises(type(error)):
        cli.main(["eval", "--bench", "pope", "--data", "d"])


def _eval_in_process(monkeypatch, capsys, data, out, checkpoint) -> dict:
    """``jaxdebias eval`` in this process on one device (as the subprocesses run); returns the metrics written."""
    monkeypatch.setattr(jax, "local_devices", lambda *a, **k: jax.devices()[:1])
    code = cli.main([*EVAL, "--data", str(data), "--out", str(out), "--checkpoint", checkpoint])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    return json.loads((out / "pope_metrics.json").read_text())


@pytest.fixture(scope="module")
def clean(tmp_path_factory, checkpoint):
    """The toy POPE questions (long, so that an answer line is ~450 bytes) and the answers of a clean run."""
    root = tmp_path_factory.mktemp("clean")
    data = write_pope(root / "pope", QUESTIONS)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(jax, "local_devices", lambda *a, **k: jax.devices()[:1])
        assert cli.main([*EVAL, "--data", str(data), "--out", str(root / "out"), "--checkpoint", checkpoint]) == 0
    return data, (root / "out" / "pope_answers.jsonl").read_text()


def _resumes(monkeypatch, capsys, data, out, checkpoint, answers) -> bool:
    """Checks an interrupted run's answer file (complete lines are answers, no lock is left), reruns it and compares
    with a clean run. Returns whether the interrupted run left a torn last line (which the rerun cuts)."""
    written = (out / "pope_answers.jsonl").read_bytes()
    whole = written[:written.rfind(b"\n") + 1]
    assert 1 <= len([json.loads(line) for line in whole.decode().splitlines()]) < len(QUESTIONS)
    assert not (out / "pope_answers.jsonl.lock").exists()
    _eval_in_process(monkeypatch, capsys, data, out, checkpoint)
    assert (out / "pope_answers.jsonl").read_text() == answers
    return whole != written


# A real `jaxdebias eval` under a file-size limit: the setting record (~500 bytes) fits, the second answer line
# (~450 bytes) does not.
LIMITED = """import resource, runpy
resource.setrlimit(resource.RLIMIT_FSIZE, (700, resource.RLIM_INFINITY))
runpy.run_module("jaxdebias", run_name="__main__")
"""


def test_file_size_limit_exits_74_and_the_rerun_resumes(tmp_path, monkeypatch, capsys, checkpoint, clean):
    data, answers = clean
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", LIMITED, *EVAL, "--data", str(data), "--out", str(out), "--checkpoint",
                        checkpoint], capture_output=True, text=True)
    assert r.returncode == faults.EXIT_IO and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "jaxdebias eval: error: a file grew past the file-size limit: raise the limit (ulimit -f) or pass another "
        "--out; the answers written so far are kept: rerun the same command to resume.")
    assert not _resumes(monkeypatch, capsys, data, out, checkpoint, answers)  # only whole lines were left


def test_ctrl_c_exits_130_and_the_rerun_resumes(tmp_path, monkeypatch, capsys, checkpoint, clean):
    """SIGINT (what Ctrl-C sends) to this process once the first answer line is written, as the second batch starts."""
    data, answers = clean
    out = tmp_path / "out"
    generate = runner.generate

    def interrupted(*args, **kwargs):
        if (out / "pope_answers.jsonl").is_file():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)  # the signal's KeyboardInterrupt cuts this short
        return generate(*args, **kwargs)

    monkeypatch.setattr(runner, "generate", interrupted)
    monkeypatch.setattr(jax, "local_devices", lambda *a, **k: jax.devices()[:1])
    assert cli.main([*EVAL, "--data", str(data), "--out", str(out), "--checkpoint", checkpoint]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "jaxdebias eval: interrupted; the answers written so far are kept: rerun the same command to resume.")
    monkeypatch.setattr(runner, "generate", generate)
    assert not _resumes(monkeypatch, capsys, data, out, checkpoint, answers)


SLOW_EVAL = """import sys, time
from jaxdebias.cli import runner
generate = runner.generate
def slow(*args, **kwargs):  # a second per batch: the lock is held long enough for the second eval to meet it
    time.sleep(1.0)
    return generate(*args, **kwargs)
runner.generate = slow
from jaxdebias.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_two_evals_on_one_folder(tmp_path, monkeypatch, capsys, checkpoint, clean):
    """A second eval into the folder another one is writing is refused (exit 2, the owner's pid named, nothing
    touched); once the first is done, the same command finds nothing left and scores the same answers."""
    data, answers = clean
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-c", SLOW_EVAL, *EVAL, "--data", str(data), "--out", str(out),
                              "--checkpoint", checkpoint], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (out / "pope_answers.jsonl.lock").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    monkeypatch.setattr(jax, "local_devices", lambda *a, **k: jax.devices()[:1])
    code = cli.main([*EVAL, "--data", str(data), "--out", str(out), "--checkpoint", checkpoint])
    err = capsys.readouterr().err
    assert code == 2 and f"Another process (pid {first.pid}) is writing to" in err and len(err.splitlines()) == 1
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert (out / "pope_answers.jsonl").read_text() == answers  # written once, by the first
    _eval_in_process(monkeypatch, capsys, data, out, checkpoint)
    assert (out / "pope_answers.jsonl").read_text() == answers
