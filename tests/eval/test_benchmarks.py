"""Benchmark files in the LLaVA evaluation layout (written here, tiny): readers, official output formats, and
metrics against hand-computed values; one end-to-end `eval` per benchmark on a tiny checkpoint (the
``tiny_checkpoint`` fixture, loaded once)."""

import base64
import csv
import io
import json

import jax
import pytest
from PIL import Image

import jaxdebias as jd
from jaxdebias.cli import families
from jaxdebias.cli.evaluate import evaluate
from jaxdebias.eval import benchmarks, metrics
from jaxdebias.eval.readers import SHORT
from tests.cli.samples import cli_exit


def _img(path, size=(320, 240), colour=(90, 140, 200)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_gqa(root):
    qs = [("201307251", "n1.jpg", "Is the sky dark?", "yes"), ("201640614", "n2.jpg", "Is it a cat?", "no"),
          ("202225914", "n1.jpg", "Which side is the tree on?", "left")]
    _jsonl(root / "llava_gqa_testdev_balanced.jsonl",
           [{"question_id": q, "image": i, "text": f"{t}\n{SHORT}"} for q, i, t, _ in qs])
    (root / "testdev_balanced_questions.json").write_text(json.dumps(
        {q: {"answer": a, "question": t, "imageId": i[:-4]} for q, i, t, a in qs}))
    for _, i, _, _ in qs:
        _img(root / "images" / i, (500, 333))
    return root, ["Yes.", "No", "left."], {"accuracy": 1.0}


def write_textvqa(root):
    _jsonl(root / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": "0054c91397f2fe05", "image": "0054c91397f2fe05.jpg",
         "text": f"what colour is the sign?\nReference OCR token: STOP, sign\n{SHORT}"},
        {"question_id": "005635e119b9f32f", "image": "005635e119b9f32f.jpg",
         "text": f"how many people are there?\nReference OCR token: 2\n{SHORT}"}])
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_name": "textvqa", "data": [
        {"image_id": "0054c91397f2fe05", "question": "what colour is the sign?", "question_id": 34602,
         "answers": ["red"] * 2 + ["blue"] * 8},
        {"image_id": "005635e119b9f32f", "question": "How many people are there?", "question_id": 34603,
         "answers": ["two"] * 3 + ["2"] * 3 + ["three"] * 4}]}))
    for n in ("0054c91397f2fe05", "005635e119b9f32f"):
        _img(root / "train_images" / f"{n}.jpg", (1024, 768))
    # "Red": 2 of 10 say red -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6; "two" = "2" for 6 of 10 -> 1.0
    return root, ["Red", "two"], {"accuracy": 0.8}


def write_vqav2(root):
    _jsonl(root / "llava_vqav2_mscoco_val.jsonl", [
        {"question_id": 1, "image": "COCO_val2014_000000000042.jpg", "text": f"Is it sunny?\n{SHORT}"},
        {"question_id": 2, "image": "COCO_val2014_000000000073.jpg", "text": f"What is this?\n{SHORT}"}])
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": [
        {"question_id": 1, "answers": [{"answer": "yes", "answer_id": i} for i in range(10)]},
        {"question_id": 2, "answers": [{"answer": "don't know"}] + [{"answer": "no"}] * 9}]}))
    _img(root / "val2014" / "COCO_val2014_000000000042.jpg", (640, 480))
    _img(root / "val2014" / "COCO_val2014_000000000073.jpg", (427, 640))
    # "Yes" -> 1.0; "dont know" becomes "don't know", 1 of 10 -> 9 * (1/3) / 10 = 0.3
    return root, ["Yes", "dont know"], {"accuracy": 0.65}


def write_vizwiz(root):
    _jsonl(root / "llava_test.jsonl", [
        {"question_id": 0, "image": "VizWiz_val_00000001.jpg",
         "text": f"What is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n{SHORT}"},
        {"question_id": 1, "image": "VizWiz_val_00000002.jpg", "text": f"What animal?\n{SHORT}"}])
    (root / "val.json").write_text(json.dumps([
        {"image": "VizWiz_val_00000001.jpg", "question": "What is this?",
         "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10},
        {"image": "VizWiz_val_00000002.jpg", "question": "What animal?",
         "answers": [{"answer": "cat"}] * 2 + [{"answer": "dog"}] * 8}]))
    _img(root / "val" / "VizWiz_val_00000001.jpg", (480, 640))
    _img(root / "val" / "VizWiz_val_00000002.jpg", (640, 480))
    return root, ["Unanswerable.", "a cat"], {"accuracy": 0.8}  # 1.0 and 0.6


def write_scienceqa(root):
    items = [{"id": "4", "image": "4/image.png", "conversations": [
                 {"from": "human", "value": "<image>\nContext: A map.\nQuestion: Which state is highlighted?\n"
                                            "Options: (A) Ohio (B) Iowa"}, {"from": "gpt", "value": "B"}]},
             {"id": "5", "conversations": [{"from": "human", "value": "Question: 2+2?\nOptions: (A) 4 (B) 5"},
                                           {"from": "gpt", "value": "A"}]},
             {"id": "6", "image": "6/image.png", "conversations": [
                 {"from": "human", "value": "<image>\nQuestion: Which is a fish?\nOptions: (A) cod (B) cat (C) cow"},
                 {"from": "gpt", "value": "A"}]}]
    (root).mkdir(parents=True, exist_ok=True)
    (root / "llava_test_CQM-A.json").write_text(json.dumps(items))
    (root / "problems.json").write_text(json.dumps({"4": {"answer": 1, "choices": ["Ohio", "Iowa"]},
                                                    "5": {"answer": 0, "choices": ["4", "5"]},
                                                    "6": {"answer": 0, "choices": ["cod", "cat", "cow"]}}))
    _img(root / "images" / "test" / "4" / "image.png", (300, 200))
    _img(root / "images" / "test" / "6" / "image.png", (200, 300))
    return root, ["B", "The answer is C."], {"accuracy": 0.5}  # the text-only question is skipped


def _b64_png(size, colour):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _write_tsv(path, recs):
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
            "comment", "split"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(cols)
        w.writerows(recs)


def write_mmbench(root):
    _write_tsv(root / "mmbench_dev_20230712.tsv", [
        [0, "What is the main colour?", "nan", "blue", "red", "green", "nan", "A", "colour",
         _b64_png((400, 300), (20, 60, 220)), "x", "attr", "nan", "dev"],
        [1, "Which shape?", "Look closely.", "circle", "square", "triangle", "star", "C", "shape",
         _b64_png((300, 400), (200, 60, 20)), "y", "attr", "nan", "dev"]])
    return root, ["A.", "The answer is B."], {"accuracy": 0.5}


def write_mmbench_cn(root):
    """MMBench-CN's file: the same columns, Chinese text (LLaVA's mmbench_cn.sh reads mmbench_dev_cn_20231003.tsv)."""
    _write_tsv(root / "mmbench_dev_cn_20231003.tsv", [
        [0, "图中主要是什么颜色？", "nan", "蓝色", "红色", "绿色", "nan", "A", "colour",
         _b64_png((400, 300), (20, 60, 220)), "x", "attr", "nan", "dev"],
        [1, "这是什么形状？", "仔细看。", "圆形", "正方形", "三角形", "星形", "C", "shape",
         _b64_png((300, 400), (200, 60, 20)), "y", "attr", "nan", "dev"],
        [2, "这是什么形状？", "仔细看。", "圆形", "正方形", "三角形", "星形", "C", "shape",
         _b64_png((300, 400), (200, 60, 20)), "y", "attr", "nan", "dev"]])
    # "A" by its letter, "三角形" by the option text it contains, "D" a wrong letter
    return root, ["A", "三角形", "D"], {"accuracy": 2 / 3}


def write_mmvet(root):
    """LLaVA's llava-mm-vet.jsonl (question ids 0, 1, ...), images/, and MM-Vet's mm-vet.json keyed v1_<id>."""
    qs = [(0, "v1_0.png", "What is x in the equation?", "-1<AND>-5", ["ocr", "math"]),
          (1, "v1_1.jpg", "What is the colour of the car?", "red", ["rec"])]
    _jsonl(root / "llava-mm-vet.jsonl", [{"question_id": q, "image": i, "text": t} for q, i, t, _, _ in qs])
    (root / "mm-vet.json").write_text(json.dumps({f"v1_{q}": {"imagename": i, "question": t, "answer": a,
                                                              "capability": c} for q, i, t, a, c in qs}))
    for _, i, _, _, _ in qs:
        _img(root / "images" / i, (300, 200))
    return root, ["x = -1 or x = -5", "It is red."], {"metric": None}  # graded by GPT-4 only


def write_mme(root):
    rel = root / "MME_Benchmark_release_version"
    qs = {("existence", "000000006040.jpg", ""): [("Is there a train in this image?", "Yes"),
                                                   ("Is there a bed in this image?", "No")],
          ("existence", "000000018150.jpg", ""): [("Is there a bus in this image?", "Yes"),
                                                   ("Is there a cow in this image?", "No")],
          ("artwork", "10002.jpg", "images/"): [("Is this artwork created by Donatello?", "Yes"),
                                                ("Is this artwork created by Monet?", "No")],
          ("code_reasoning", "0020.png", ""): [("Is the output of the code 12?", "No"),
                                               ("Is the output of the code 7?", "Yes")]}
    rows = []
    for (cat, img, sub), pairs in qs.items():
        _img(rel / cat / sub / img)
        qa = rel / cat / ("questions_answers_YN" if sub else "") / (img.rsplit(".", 1)[0] + ".txt")
        qa.parent.mkdir(parents=True, exist_ok=True)
        qa.write_text("".join(f"{q} Please answer yes or no.\t{a}\n" for q, a in pairs))
        rows += [{"question_id": f"{cat}/{img}", "image": f"{cat}/{sub}{img}", "text": f"{q} Please answer yes or no.",
                  "category": cat} for q, _ in pairs]
    _jsonl(root / "llava_mme.jsonl", rows)
    texts = ["Yes", "no, there is not", "No", "No", "yes", "maybe", "no", "yes"]
    # existence: 3 of 4 right, 1 of 2 images all right -> 75 + 50; artwork: "maybe" is neither -> 50 + 0;
    # code_reasoning: both right -> 100 + 100. Perception 175, cognition 200.
    return root, texts, {"perception": 175.0, "cognition": 200.0}


def write_pope(root):
    qs = [("a.png", "Is there a dog in the image?", "yes"), ("b.png", "Is there a cat in the image?", "no")]
    _jsonl(root / "llava_pope_test.jsonl", [{"question_id": i, "image": n, "text": t, "label": lab,
                                             "category": "random"} for i, (n, t, lab) in enumerate(qs)])
    for n, _, _ in qs:
        _img(root / "val2014" / n)
    return root, ["Yes", "Yes, there is"], {"accuracy": 0.5, "precision": 0.5, "recall": 1.0}


WRITERS = {"pope": write_pope, "mme": write_mme, "gqa": write_gqa, "textvqa": write_textvqa,
           "scienceqa": write_scienceqa, "mmbench": write_mmbench, "mmbench_cn": write_mmbench_cn,
           "mmvet": write_mmvet, "vqav2": write_vqav2, "vizwiz": write_vizwiz}
SPEC = jd.PruneSpec("fastv", keep=4, debias=jd.Debias(pad_tau=0.5))  # 4 of the tiny checkpoint's 16 visual tokens


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return families.load_model(tiny_checkpoint)


def _answers_file(path, bench, data, texts):
    """An answer file as a previous run leaves it (LLaVA's format, one line per question, in order)."""
    rows, _ = benchmarks.get(bench).read(str(data))
    assert len(rows) == len(texts)
    _jsonl(path, [{"question_id": r["question_id"], "prompt": r["text"], "text": t, "answer_id": str(r["question_id"]),
                   "model_id": "hand", "metadata": {}} for r, t in zip(rows, texts)])


def test_vqa_normalisation_and_accuracy_by_hand():
    assert metrics.normalize_vqa("Two dogs.") == "2 dogs"
    assert metrics.normalize_vqa("The  Cat!") == "cat"
    assert metrics.normalize_vqa("dont") == "don't"
    assert metrics.normalize_vqa("1,000") == "1000"
    assert metrics.normalize_vqa("black/white") == "black white"
    assert metrics.vqa_accuracy("yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx(0.9)  # 3*(2/3) + 7*1 over 10
    assert metrics.textvqa_accuracy("yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx(0.9)  # 3*(2/3) + 7*1 over 10
    assert metrics.vqa_accuracy("no", ["yes"] * 10) == 0.0
    assert metrics.scienceqa_choice("B", 3) == 1 and metrics.scienceqa_choice("C. cow", 3) == 2
    assert metrics.scienceqa_choice("The answer is A.", 2) == 0 and metrics.scienceqa_choice("D", 3) == -1
    assert metrics.scienceqa_choice("Because", 3) == -1
    assert metrics.mmbench_choice("(C) cow", {"A": "cat", "B": "dog", "C": "cow"}) == "C"
    assert [metrics.mme_yes_no(a) for a in ("Yes", "no.", "Not sure", "It is")] == ["yes", "no", "no", "other"]


@pytest.mark.parametrize("bench", list(WRITERS))
def test_metric_equals_the_hand_computed_value(tmp_path, bench):
    """Answers written as a previous run would have left them: evaluate resumes, runs no model, and scores."""
    data, answers, expected = WRITERS[bench](tmp_path / bench)
    _answers_file(tmp_path / "out" / f"{bench}_answers.jsonl", bench, data, answers)
    m = evaluate(bench, str(data), str(tmp_path / "out"), spec=SPEC, progress=False, log=lambda *_: None)
    for k, v in expected.items():
        assert m[k] == pytest.approx(v), (k, m)
    assert m["n"] == len(answers)


def _check_export(bench, out, rows):
    ids = [r["question_id"] for r in rows]
    if bench == "gqa":
        got = json.load(open(out / "testdev_balanced_predictions.json"))
        assert [g["questionId"] for g in got] == ids and all(set(g) == {"questionId", "prediction"} for g in got)
    elif bench in ("textvqa", "vqav2"):
        got = json.load(open(out / f"{bench}_submission.json"))
        assert [g["question_id"] for g in got] == ids and all(isinstance(g["answer"], str) for g in got)
    elif bench == "vizwiz":
        got = json.load(open(out / "vizwiz_submission.json"))
        assert [g["image"] for g in got] == [r["image"] for r in rows]
    elif bench == "scienceqa":
        got = json.load(open(out / "scienceqa_predictions.json"))
        assert sorted(got) == sorted(ids) == ["4", "6"]
    elif bench in ("mmbench", "mmbench_cn"):
        with open(out / f"{bench}_predictions.tsv") as f:
            got = list(csv.DictReader(f, delimiter="\t"))
        assert [int(g["index"]) for g in got] == ids and "image" not in got[0] and "prediction" in got[0]
    elif bench == "mmvet":
        got = json.load(open(out / "mmvet_results.json"))
        assert list(got) == [f"v1_{i}" for i in ids] and all(isinstance(v, str) for v in got.values())
    elif bench == "mme":
        lines = [x.split("\t") for p in sorted((out / "mme_eval_tool").glob("*.txt")) for x in p.read_text().splitlines()]
        assert sorted(p.name for p in (out / "mme_eval_tool").glob("*.txt")) == [
            "artwork.txt", "code_reasoning.txt", "existence.txt"]
        assert len(lines) == len(rows) and all(len(x) == 4 and x[2] in ("Yes", "No") for x in lines)


@pytest.mark.parametrize("bench", list(WRITERS))
def test_eval_end_to_end_writes_the_official_layout(tmp_path, bench, tiny):
    data, _, _ = WRITERS[bench](tmp_path / bench)
    out = tmp_path / "out"
    m = evaluate(bench, str(data), str(out), spec=SPEC, model=tiny, batch_size=4, max_new_tokens=2, progress=False,
                 log=lambda *_: None, devices=jax.devices()[:1])
    rows, _ = benchmarks.get(bench).read(str(data))
    lines = [json.loads(x) for x in (out / f"{bench}_answers.jsonl").read_text().splitlines()]
    assert [x["question_id"] for x in lines] == [r["question_id"] for r in rows]
    assert all(set(x) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} for x in lines)
    saved = json.load(open(out / f"{bench}_metrics.json"))
    assert saved.pop("setting")["bench"] == bench  # the metric says what produced it
    assert m["n"] == len(rows) and saved == m
    _check_export(bench, out, rows)


def test_test_split_without_answers_writes_submission_and_no_metric(tmp_path):
    data, answers, _ = write_vqav2(tmp_path / "vqav2")
    (data / "v2_mscoco_val2014_annotations.json").unlink()
    _answers_file(tmp_path / "out" / "vqav2_answers.jsonl", "vqav2", data, answers)
    m = evaluate("vqav2", str(data), str(tmp_path / "out"), spec=SPEC, progress=False, log=lambda *_: None)
    assert m == {"metric": None, "n": 2}
    assert json.load(open(tmp_path / "out" / "vqav2_submission.json")) == [
        {"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "don't know"}]


def test_bad_benchmark_files_exit_2_with_nothing_written(tmp_path, capsys):
    """`jaxdebias eval` run in this process (the files are refused before a model is loaded; `python -m jaxdebias`
    itself: tests/cli/test_hostile.py)."""
    def run(bench, data, out):
        code, _, err = cli_exit(capsys, "eval", "--bench", bench, "--data", str(data), "--out", str(out))
        return code, err

    data, _, _ = write_gqa(tmp_path / "gqa")
    rows = [json.loads(x) for x in (data / "llava_gqa_testdev_balanced.jsonl").read_text().splitlines()]
    del rows[1]["text"]
    _jsonl(data / "llava_gqa_testdev_balanced.jsonl", rows)
    code, err = run("gqa", data, tmp_path / "o1")
    assert code == 2 and "line 2: missing field(s) text" in err
    mm, _, _ = write_mmbench(tmp_path / "mmb")
    text = (mm / "mmbench_dev_20230712.tsv").read_text().replace("\tA\tcolour\t", "\tA\tcolour\t!!notbase64")
    (mm / "mmbench_dev_20230712.tsv").write_text(text)
    code, err = run("mmbench", mm, tmp_path / "o2")
    assert code == 2 and "line 2: the image column is not base64" in err
    mme, _, _ = write_mme(tmp_path / "mme")
    (mme / "MME_Benchmark_release_version" / "existence" / "000000006040.txt").write_text("no tab here\n")
    code, err = run("mme", mme, tmp_path / "o3")
    assert code == 2 and "expected 'question<TAB>answer'" in err
    code, err = run("nope", mme, tmp_path / "o4")
    assert code == 2 and "Unknown benchmark 'nope'" in err
    sqa, _, _ = write_scienceqa(tmp_path / "sqa")
    (sqa / "problems.json").write_text(json.dumps({"4": {"answer": 1, "choices": ["a", "b"]}}))
    code, err = run("scienceqa", sqa, tmp_path / "o5")
    assert code == 2 and "no answer/choices for problem 6" in err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))
