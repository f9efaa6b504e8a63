"""MMBench-CN and MM-Vet: readers on tiny files, the official answer files, and MM-Vet's GPT-4 grader with a fake
chat endpoint (the prompt, the score parsing and its retries, the aggregation against a hand computation, the
command end to end)."""

import hashlib
import http.server
import json
import threading

import pytest

from jaxdebias import UserError
from jaxdebias.cli.evaluate import evaluate
from jaxdebias.cli.grade import grade_mmvet
from jaxdebias.cli.main import main
from jaxdebias.eval import benchmarks, mmvet
from jaxdebias.eval.reading import NotFound
from jaxdebias.eval.readers import LETTER, LETTER_CN
from tests.eval.test_benchmarks import SPEC, _answers_file, _img, _jsonl, write_mmbench, write_mmbench_cn, write_mmvet

QUIET = {"log": lambda *_: None, "progress": False}


# --- MMBench-CN ---------------------------------------------------------------------------------------------------


def test_mmbench_cn_prompt_ends_with_the_chinese_instruction(tmp_path):
    write_mmbench(tmp_path)
    write_mmbench_cn(tmp_path)  # LLaVA's docs put both languages' TSVs in one folder
    cn, _ = benchmarks.get("mmbench_cn").read(str(tmp_path))
    en, _ = benchmarks.get("mmbench").read(str(tmp_path))
    assert LETTER_CN == "请直接回答选项字母。"
    assert cn[1]["text"] == "仔细看。\n这是什么形状？\nA. 圆形\nB. 正方形\nC. 三角形\nD. 星形\n请直接回答选项字母。"
    assert en[0]["text"] == f"What is the main colour?\nA. blue\nB. red\nC. green\n{LETTER}"
    assert dict(cn[0]["choices"]) == {"A": "蓝色", "B": "红色", "C": "绿色"}


def test_mmbench_finds_only_its_own_language(tmp_path):
    write_mmbench_cn(tmp_path / "cn")
    with pytest.raises(NotFound, match=r"mmbench_dev_cn_20231003.tsv is there: --bench mmbench_cn"):
        benchmarks.get("mmbench").read(str(tmp_path / "cn"))
    rows, _ = benchmarks.read_any(str(tmp_path / "cn"))  # no --bench: the CN reader takes it
    assert rows[0]["text"].endswith(LETTER_CN)
    write_mmbench(tmp_path / "en")
    with pytest.raises(NotFound, match="No MMBench-CN TSV"):
        benchmarks.get("mmbench_cn").read(str(tmp_path / "en"))


def test_cli_eval_takes_the_new_benches(tmp_path, capsys):
    """`jaxdebias eval --bench mmbench_cn / mmvet` with every answer already written: scores, no model run."""
    for bench, writer in (("mmbench_cn", write_mmbench_cn), ("mmvet", write_mmvet)):
        data, answers, _ = writer(tmp_path / bench)
        out = tmp_path / f"out_{bench}"
        _answers_file(out / f"{bench}_answers.jsonl", bench, data, answers)
        assert main(["eval", "--bench", bench, "--data", str(data), "--out", str(out)]) == 0
    assert json.load(open(tmp_path / "out_mmbench_cn" / "mmbench_cn_metrics.json"))["accuracy"] == pytest.approx(2 / 3)
    assert json.load(open(tmp_path / "out_mmvet" / "mmvet_metrics.json"))["metric"] is None
    assert "mmvet_results.json" in capsys.readouterr().out


# --- MM-Vet files -------------------------------------------------------------------------------------------------


def test_mmvet_reader(tmp_path):
    data, _, _ = write_mmvet(tmp_path / "a")
    rows, images = benchmarks.get("mmvet").read(str(data))
    assert images == str(data / "images")
    assert [(r["question_id"], r["image"], r["answer"], r["capability"]) for r in rows] == [
        (0, "v1_0.png", "-1<AND>-5", ["ocr", "math"]), (1, "v1_1.jpg", "red", ["rec"])]
    assert rows[0]["text"] == "What is x in the equation?"  # asked as is: model_vqa.py adds no suffix

    # ids already "v1_<n>", mm-vet.zip unpacked as mm-vet/ (images and truth inside), no ground truth
    root = tmp_path / "b"
    _jsonl(root / "llava-mm-vet.jsonl", [{"question_id": "v1_7", "image": "v1_7.png", "text": "Why?"}])
    _img(root / "mm-vet" / "images" / "v1_7.png")
    rows, images = benchmarks.get("mmvet").read(str(root))
    assert images == str(root / "mm-vet" / "images") and "answer" not in rows[0]
    (root / "mm-vet" / "mm-vet.json").write_text(json.dumps({"v1_7": {"question": "Why?", "answer": "because",
                                                                      "capability": ["know"]}}))
    assert benchmarks.get("mmvet").read(str(root))[0][0]["capability"] == ["know"]
    (root / "mm-vet" / "mm-vet.json").write_text(json.dumps({"v1_8": {"question": "Why?", "answer": "because",
                                                                      "capability": ["know"]}}))
    with pytest.raises(UserError, match="no entry v1_7 for question v1_7"):
        benchmarks.get("mmvet").read(str(root))


def test_mmvet_results_file_has_the_official_layout(tmp_path):
    data, answers, _ = write_mmvet(tmp_path / "mmvet")
    out = tmp_path / "out"
    _answers_file(out / "mmvet_answers.jsonl", "mmvet", data, answers)
    m = evaluate("mmvet", str(data), str(out), spec=SPEC, **QUIET)
    assert m["metric"] is None and m["n"] == 2
    text = (out / "mmvet_results.json").read_text()
    assert json.loads(text) == {"v1_0": "x = -1 or x = -5", "v1_1": "It is red."}  # convert_mmvet_for_eval.py
    assert text.startswith('{\n  "v1_0": ')  # its indent=2


# --- the grader ---------------------------------------------------------------------------------------------------

# sha256 of the prompt string in yuweihao/MM-Vet@acde843:mm-vet_evaluator.py (and the .ipynb), checked byte for byte
# against that file when this was written: a change to mmvet.PROMPT changes every score.
OFFICIAL_PROMPT_SHA256 = "d1b3e0a5b4e72c888b77164489d705bba4dd149934fff564dfba6443d81afe3f"


def test_prompt_is_the_official_one():
    assert mmvet.PROMPT.startswith("Compare the ground truth and prediction from AI models")
    assert mmvet.PROMPT.endswith(" physical characteristics. | 1.0\n")
    assert hashlib.sha256(mmvet.PROMPT.encode()).hexdigest() == OFFICIAL_PROMPT_SHA256
    [message] = mmvet.grader_messages("What is x?", "-1<AND>-5<OR>6", "x = -1")
    assert message["role"] == "user"
    assert message["content"] == mmvet.PROMPT + "\nWhat is x? | -1 <AND> -5 <OR> 6 | x = -1 | "
    [retry] = mmvet.grader_messages("What is x?", "-1", "x = -1", retry=True)
    assert retry["content"].endswith("| x = -1 | \nPredict the correctness of the answer (digit): ")


@pytest.mark.parametrize("reply, score", [
    ("0.5", 0.5), ("1.0", 1.0), ("0", 0.0), ("0.7 because", 0.7), ("0.3\n", 0.3), ("1.", 1.0),
    ("1.5", None), ("-0.1", None), ("Score: 0.5", None), (" 0.5", None), ("0.5,", None), ("", None), (None, None)])
def test_parse_score(reply, score):
    assert mmvet.parse_score(reply) == score


class Fake:
    """A chat endpoint that replies from a script and records each request's (retry?, temperature, max_tokens)."""

    def __init__(self, replies):
        self.replies, self.calls = list(replies), []

    def __call__(self, messages, model, temperature=0.0, max_tokens=3):
        self.calls.append((messages[0]["content"].endswith("(digit): "), temperature, max_tokens))
        return self.replies.pop(0)


def test_grade_retries_as_the_official_evaluator():
    fake = Fake(["0.8 correct"])
    assert mmvet.grade("q", "a", "p", fake) == (0.8, "0.8")
    assert fake.calls == [(False, 0.0, 3)]

    fake = Fake(["Correct", "0.6"])  # a reply that is not a number: asked again with the digit hint
    assert mmvet.grade("q", "a", "p", fake) == (0.6, "0.6")
    assert fake.calls == [(False, 0.0, 3), (True, 0.0, 3)]

    fake = Fake(["no", "no", "no", "no", "no", "0.9"])  # five replies fail: 0.0, and the sixth is never read
    assert mmvet.grade("q", "a", "p", fake) == (0.0, "0.9")
    assert fake.calls == [(False, 0.0, 3), (True, 0.0, 3), (True, 0.5, 3), (True, 1.0, 3), (True, 1.5, 3),
                          (True, 2.0, 3)]


def test_aggregate_by_hand():
    caps = {"v1_0": ["rec"], "v1_1": ["rec", "ocr"], "v1_2": ["ocr", "math"], "v1_3": ["rec"], "v1_4": ["ocr", "rec"]}
    scores = {"v1_0": [1.0, 1.0], "v1_1": [0.5, 0.4], "v1_2": [0.0, 0.1], "v1_3": [0.4, 0.4], "v1_4": [0.2, 0.2]}
    got = mmvet.aggregate(scores, caps)
    # run 1: total 2.1 / 5 = 42 %, run 2: 2.1 / 5 = 42 %; rec: (1 + .5 + .4 + .2) / 4 = 52.5 and (1 + .4 + .4 + .2) / 4
    # = 50 -> 51.25 -> 51.2 (numpy rounds half to even); ocr: (.5 + 0 + .2) / 3 = 23.33, (.4 + .1 + .2) / 3 -> 23.3;
    # math: 0 and 10 -> 5.0. Integrations: {rec} 2 questions (1.4 / 2 = 70), {rec, ocr} 2 (0.7/2 = 35, 0.6/2 = 30
    # -> 32.5), {ocr, math} 1 (0 and 10 -> 5.0).
    assert got == {"total": 42.0, "std": 0.0, "runs": [42.0, 42.0],
                   "capabilities": {"rec": 51.2, "ocr": 23.3, "math": 5.0},
                   "integrations": {"rec": 70.0, "rec_ocr": 32.5, "ocr_math": 5.0}, "questions": 5}
    assert list(got["capabilities"]) == ["rec", "ocr", "math"]  # most frequent first
    one = mmvet.aggregate({"a": [1.0], "b": [0.25]}, {"a": ["rec"], "b": ["ocr"]})
    assert (one["total"], one["capabilities"], one["std"]) == (62.5, {"rec": 100.0, "ocr": 25.0}, 0.0)
    two = mmvet.aggregate({"a": [1.0, 0.0]}, {"a": ["rec"]})
    assert (two["total"], two["std"], two["runs"]) == (50.0, 50.0, [100.0, 0.0])  # population std


# --- the command --------------------------------------------------------------------------------------------------


def _graded_folder(tmp_path):
    data, answers, _ = write_mmvet(tmp_path / "mmvet")
    out = tmp_path / "out"
    _answers_file(out / "mmvet_answers.jsonl", "mmvet", data, answers)
    evaluate("mmvet", str(data), str(out), spec=SPEC, **QUIET)
    return data, out


def by_prediction(messages, model, temperature=0.0, max_tokens=3):
    """Grades the x question 1.0 and the car question "It's 0.5" then, asked again, 0.5."""
    row = messages[0]["content"][len(mmvet.PROMPT):]  # the question's row, after the few-shot table
    if "| x = -1 or x = -5 | " in row:
        return "1.0"
    return "0.5" if row.endswith("(digit): ") else "It's 0.5"


def test_grade_mmvet_end_to_end(tmp_path):
    data, out = _graded_folder(tmp_path)
    scores = grade_mmvet(str(out), str(data), complete=by_prediction, **QUIET)
    assert scores == {"total": 75.0, "std": 0.0, "runs": [75.0], "capabilities": {"ocr": 100.0, "math": 100.0,
                      "rec": 50.0}, "integrations": {"ocr_math": 100.0, "rec": 50.0}, "questions": 2}
    saved = json.load(open(out / "mmvet_gpt_grade.json"))
    assert saved["scores"] == scores and saved["grader"] == "gpt-4-0613"
    assert saved["grades"]["v1_1"] == {"model": ["gpt-4-0613"], "content": ["0.5"], "score": [0.5],
                                       "prediction": "It is red."}

    def unreachable(*_, **__):
        raise AssertionError("every question is graded already")
    assert grade_mmvet(str(out), str(data), complete=unreachable, **QUIET) == scores  # resumes: nothing to ask

    results = json.load(open(out / "mmvet_results.json"))
    (out / "mmvet_results.json").write_text(json.dumps(results | {"v1_1": "x = -1 or x = -5"}))
    asked = []
    again = grade_mmvet(str(out), str(data), complete=lambda m, *a, **k: asked.append(1) or "1.0", **QUIET)
    assert len(asked) == 1 and again["total"] == 100.0  # only the changed answer is graded again


def test_grade_mmvet_says_what_is_missing(tmp_path, capsys):
    data, out = _graded_folder(tmp_path)
    (data / "mm-vet.json").unlink()
    assert main(["grade-mmvet", "--out", str(out), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "mm-vet.json is not in" in err and "mm-vet.zip" in err and "Traceback" not in err
    assert main(["grade-mmvet", "--out", str(tmp_path / "nothing"), "--data", str(data)]) == 2
    assert "run `jaxdebias eval --bench mmvet" in capsys.readouterr().err
    assert not (out / "mmvet_gpt_grade.json").exists()


def test_grade_mmvet_partial_answers_are_said(tmp_path):
    data, out = _graded_folder(tmp_path)
    (out / "mmvet_results.json").write_text(json.dumps({"v1_1": "red"}))
    said = []
    scores = grade_mmvet(str(out), str(data), complete=lambda *a, **k: "1.0", log=said.append, progress=False)
    assert scores["questions"] == 1 and scores["capabilities"] == {"rec": 100.0}
    assert "1 of MM-Vet's 2 questions" in said[0]
    (out / "mmvet_results.json").write_text(json.dumps({"v1_9": "red"}))
    with pytest.raises(UserError, match=r"question\(s\) \['v1_9'\]"):
        grade_mmvet(str(out), str(data), complete=lambda *a, **k: "1.0", **QUIET)


def test_http_client_sends_the_grading_settings_and_waits_out_rate_limits(monkeypatch):
    """The real endpoint's client against a local stand-in: temperature and max_tokens in the body, the key in the
    header, a 429 waited out, another error as a message."""
    for proxy in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)  # the stand-in is local
    seen, statuses = [], [429, 200, 401]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append((self.path, self.headers["Authorization"],
                         json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            status = statuses.pop(0)
            body = json.dumps({"choices": [{"message": {"content": "0.7"}}]} if status == 200 else {"error": "no"})
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        waits = []
        complete = mmvet.http_client("sk-test", f"http://127.0.0.1:{server.server_port}/v1", sleep=waits.append)
        assert complete([{"role": "user", "content": "hi"}], "gpt-4-0613", temperature=0.5, max_tokens=3) == "0.7"
        assert waits == [30.0] and len(seen) == 2
        path, auth, body = seen[1]
        assert (path, auth) == ("/v1/chat/completions", "Bearer sk-test")
        assert body == {"model": "gpt-4-0613", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5,
                        "max_tokens": 3}
        with pytest.raises(UserError, match="HTTP 401"):
            complete([{"role": "user", "content": "hi"}], "gpt-4-0613")
    finally:
        server.shutdown()
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(UserError, match="OPENAI_API_KEY"):
        mmvet.http_client("")
