"""The benchmark file readers (LLaVA-1.5's evaluation layout): each returns (rows, image folder) or raises a
UserError that names the file, the line and what is missing. See ``jaxdebias.eval.benchmarks`` for the table."""

from __future__ import annotations

import base64
import binascii
import csv
import glob
import io
import os
import re

from jaxdebias import UserError
from jaxdebias.eval.reading import (ANSWERS, STRINGS, NotFound, check_fields, find_file, image_folder, jsonl, kind_of,
                                    optional_file, read_json, read_text)

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
LETTER_CN = "请直接回答选项字母。"  # model_vqa_mmbench.py --lang cn
QUESTION_FIELDS = ("question_id", "image", "text")
MME_RELEASE = "MME_Benchmark_release_version"


def read_pope(data_dir):
    path = find_file(data_dir, ["questions.jsonl", "llava_pope_test.jsonl"], "POPE question file")
    rows = jsonl(path, QUESTION_FIELDS + ("label",))
    bad = [r["question_id"] for r in rows if r["label"] not in ("yes", "no")]
    if bad:
        raise UserError(f"POPE labels must be 'yes' or 'no'; question(s) {bad[:5]} have others.")
    return rows, image_folder(data_dir, ["images", "val2014"])


def read_gqa(data_dir):
    path = find_file(data_dir, ["questions.jsonl", "llava_gqa_testdev_balanced.jsonl"], "GQA question file")
    rows = jsonl(path, QUESTION_FIELDS)
    for r in rows:  # an answer in the question file itself (as toy-bench writes them) is the truth it is scored on
        check_fields(r, f"{path}, question {r['question_id']}", {"answer": str})
    truth = optional_file(data_dir, ["testdev_balanced_questions.json", "data/testdev_balanced_questions.json"])
    if truth:
        questions = read_json(truth, "GQA questions", dict)
        for r in rows:
            q = questions.get(str(r["question_id"]))
            if q is None:
                raise UserError(f"{truth}: no answer for question {r['question_id']}.")
            check_fields(q, f"{truth}, question {r['question_id']}", {"answer": str}, ("answer",))
            r["answer"], r["balanced"] = q["answer"], q.get("isBalanced", True)
    return rows, image_folder(data_dir, ["images"])


def textvqa_question(prompt: str) -> str:
    """The question inside a LLaVA TextVQA prompt, as eval_textvqa.py's prompt_processor finds it."""
    lines = prompt.split("\n")
    if "Reference OCR token: " in prompt and len(lines) == 3:
        return (lines[1] if prompt.startswith("Reference OCR token:") else lines[0]).lower()
    return lines[0].lower()


def read_textvqa(data_dir):
    path = find_file(data_dir, ["questions.jsonl", "llava_textvqa_val_v051_ocr.jsonl"], "TextVQA question file")
    rows = jsonl(path, QUESTION_FIELDS)
    truth = optional_file(data_dir, ["TextVQA_0.5.1_val.json"])
    if truth:
        data = read_json(truth, "TextVQA annotations", dict).get("data", [])
        if not isinstance(data, list):
            raise UserError(f"{truth}: data must be a list of annotations, got {kind_of(data)}.")
        for n, a in enumerate(data):
            check_fields(a, f"{truth}, data item {n}", {"image_id": (str, int), "question": str, "answers": STRINGS},
                         ("image_id", "question", "answers"))
        by_key = {(a["image_id"], a["question"].lower()): a for a in data}
        for r in rows:
            stem, question = os.path.splitext(os.path.basename(r["image"]))[0], textvqa_question(r["text"])
            a = by_key.get((str(r["question_id"]), question)) or by_key.get((stem, question))
            if a is None:
                raise UserError(f"{truth}: no annotation for question {r['question_id']} ({question!r}).")
            r["answers"] = a["answers"]
    return rows, image_folder(data_dir, ["train_images", "images"])


def read_vqav2(data_dir):
    path = find_file(data_dir, ["questions.jsonl", "llava_vqav2_mscoco_*.jsonl"], "VQAv2 question file")
    rows = jsonl(path, QUESTION_FIELDS)
    truth = optional_file(data_dir, ["v2_mscoco_val2014_annotations.json"])
    if truth:
        annotations = read_json(truth, "VQAv2 annotations", dict).get("annotations")
        if not isinstance(annotations, list):
            raise UserError(f"{truth}: expected VQAv2's annotations file, an object with an annotations list.")
        for n, a in enumerate(annotations):
            check_fields(a, f"{truth}, annotation {n}", {"question_id": (int, str), "answers": ANSWERS},
                         ("question_id", "answers"))
        by_id = {a["question_id"]: a for a in annotations}
        for r in rows:
            a = by_id.get(r["question_id"])
            if a is None:
                raise UserError(f"{truth}: no annotation for question {r['question_id']}.")
            r["answers"] = [x["answer"] for x in a["answers"]]
    return rows, image_folder(data_dir, ["test2015", "val2014", "images"])


def read_vizwiz(data_dir):
    path = find_file(data_dir, ["questions.jsonl", "llava_test.jsonl"], "VizWiz question file")
    rows = jsonl(path, QUESTION_FIELDS)
    truth = optional_file(data_dir, ["val.json", "Annotations/val.json"])
    if truth:
        annotations = read_json(truth, "VizWiz annotations", list)
        for n, a in enumerate(annotations):
            check_fields(a, f"{truth}, item {n}", {"image": str, "answers": ANSWERS}, ("image", "answers"))
        by_image = {a["image"]: a for a in annotations}
        for r in rows:
            a = by_image.get(os.path.basename(r["image"]))
            if a is None:
                raise UserError(f"{truth}: no annotation for image {r['image']}.")
            r["answers"] = [x["answer"] for x in a["answers"]]
    return rows, image_folder(data_dir, ["test", "val", "images"])


def read_scienceqa(data_dir):
    """LLaVA's ScienceQA test file (a JSON list of conversations). Only the questions with an image are read:
    pruning needs an image, and LLaVA-1.5 reports the image subset (SQA-IMG)."""
    path = find_file(data_dir, ["llava_test_CQM-A.json"], "ScienceQA question file")
    items = read_json(path, "ScienceQA questions", list)
    problems_path = optional_file(data_dir, ["problems.json"])
    problems = read_json(problems_path, "ScienceQA problems", dict) if problems_path else {}
    rows = []
    for n, it in enumerate(items):
        check_fields(it, f"{path}, item {n}", {"id": (int, str), "image": str, "conversations": list},
                     ("id", "conversations"))
        if not it["conversations"]:
            raise UserError(f"{path}, item {n}: conversations is empty.")
        check_fields(it["conversations"][0], f"{path}, item {n}, conversations[0]", {"value": str}, ("value",))
        if "image" not in it:
            continue
        text = it["conversations"][0]["value"].replace("<image>", "").strip()
        row = {"question_id": it["id"], "image": it["image"], "text": f"{text}\n{LETTER}"}
        if problems:
            p = problems.get(str(it["id"]))
            if p is None:
                raise UserError(f"{problems_path}: no answer/choices for problem {it['id']}.")
            check_fields(p, f"{problems_path}, problem {it['id']}", {"answer": int, "choices": list},
                         ("answer", "choices"))
            row["answer"], row["n_choices"] = int(p["answer"]), len(p["choices"])
        rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no question with an image.")
    return rows, image_folder(data_dir, ["images/test", "test", "images"])


# The strings pandas' read_table reads as NaN (the MMBench scripts read the TSV with pandas), and LLaVA's
# is_none adds "none" in any case.
_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
       "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


def _blank(value) -> bool:
    return value is None or value in _NA or value.lower() == "none"


# language -> (the TSV LLaVA's mmbench.sh / mmbench_cn.sh read, the single-letter instruction). Any other *.tsv
# is taken when that one is absent, the Chinese ones (named with a "cn" part: mmbench_test_cn_20231003.tsv,
# VLMEvalKit's MMBench_DEV_CN.tsv) only for cn: LLaVA's docs put both languages' files in one folder.
MMBENCH_FILES = {"en": ("mmbench_dev_20230712.tsv", LETTER), "cn": ("mmbench_dev_cn_20231003.tsv", LETTER_CN)}


def _is_cn(path) -> bool:
    return re.search(r"(^|[_.-])cn([_.-]|$)", os.path.basename(path), re.IGNORECASE) is not None


def mmbench_tsv(data_dir, lang: str = "en") -> str:
    """The MMBench TSV of ``lang`` ("en" or "cn") in ``data_dir``, or NotFound naming what was expected."""
    name, cn = MMBENCH_FILES[lang][0], lang == "cn"
    for pattern in (name, "*.tsv"):
        for path in sorted(glob.glob(os.path.join(data_dir, pattern))):
            if os.path.isfile(path) and _is_cn(path) == cn:
                return path
    other = optional_file(data_dir, ["*.tsv"])
    hint = f" ({os.path.basename(other)} is there: --bench {'mmbench' if cn else 'mmbench_cn'})" if other else ""
    raise NotFound(f"No MMBench{'-CN' if cn else ''} TSV in {data_dir}: expected {name} or another .tsv "
                   f"{'named' if cn else 'not named'} as Chinese (a _cn_ part){hint}.")


def _tsv_rows(reader, path):
    """(line number, record) of each row of a TSV, each with a value in every column and none beyond them."""
    try:
        for n, record in enumerate(reader, 2):
            if None in record or None in record.values():
                raise UserError(f"{path}, line {reader.line_num}: {'more' if None in record else 'fewer'} columns "
                                "than the header.")
            yield n, record
    except csv.Error as e:
        raise UserError(f"{path}, line {reader.line_num}: not a row of a TSV ({e}).") from None


def read_mmbench(data_dir, lang: str = "en"):
    """An MMBench TSV (index, question, hint, A-D, answer, category, image as base64, ...); ``lang`` "cn" reads
    MMBench-CN's (same columns, Chinese text). The prompt is LLaVA's model_vqa_mmbench (``--lang``): hint,
    question, "A. option" lines for A-D up to the first empty one, then the single-letter instruction (English,
    or "请直接回答选项字母。" for cn; haotian-liu/LLaVA@c121f04:llava/eval/model_vqa_mmbench.py). ``choices``
    (every non-empty letter column) is what VLMEvalKit matches against."""
    path, instruction = mmbench_tsv(data_dir, lang), MMBENCH_FILES[lang][1]
    csv.field_size_limit(1 << 30)
    rows = []
    with io.StringIO(read_text(path, "MMBench TSV"), newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        columns = reader.fieldnames or []
        missing = [k for k in ("index", "question", "A", "B", "image") if k not in columns]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)} (MMBench TSVs have index, question, "
                            "hint, A, B, C, D, answer, category, image).")
        letters = [c for c in columns if len(c) == 1 and c.isupper()]
        for n, record in _tsv_rows(reader, path):
            try:
                raw = base64.b64decode(record["image"], validate=True)
            except (binascii.Error, ValueError, TypeError):
                raise UserError(f"{path}, line {n}: the image column is not base64.") from None
            prompt_options = []
            for c in "ABCD":
                if c not in record or _blank(record[c]):
                    break
                prompt_options.append(f"\n{c}. {record[c]}")
            question = record["question"] if _blank(record.get("hint")) else f"{record['hint']}\n{record['question']}"
            index = record["index"]
            numeric = index.strip().isdigit()
            row = {"question_id": int(index) if numeric else index, "image_b64": raw,
                   "text": question + "".join(prompt_options) + f"\n{instruction}",
                   "choices": [(c, record[c]) for c in letters if not _blank(record[c])],
                   "circular_group": int(index) % 1_000_000 if numeric else index,
                   "record": {k: v for k, v in record.items() if k != "image"}}
            if not _blank(record.get("answer")):
                row["answer"] = record["answer"].strip()
            rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no questions.")
    return rows, data_dir


def mme_key(question: str) -> str:
    return " ".join(question.replace(SHORT, "").split())


def read_mme(data_dir):
    """LLaVA's llava_mme.jsonl (question_id "category/image", image, text, category) with the ground truth of the
    MME release folder: per category, ``questions_answers_YN/<image stem>.txt`` (or ``<image stem>.txt`` beside
    the images) holding "question<TAB>answer" lines."""
    path = find_file(data_dir, ["questions.jsonl", "llava_mme.jsonl"], "MME question file")
    rows = jsonl(path, QUESTION_FIELDS + ("category",))
    release = image_folder(data_dir, [MME_RELEASE])
    truth = {}
    for category in {r["category"] for r in rows}:
        if not category or "\x00" in category or "/" in category or category in (".", ".."):
            raise UserError(f"{path}: category {category!r} is not a folder name of {release}.")
        folder = os.path.join(release, category, "questions_answers_YN")
        folder = folder if os.path.isdir(folder) else os.path.join(release, category)
        for txt in glob.glob(os.path.join(folder, "*.txt")):
            for n, line in enumerate(read_text(txt, "MME ground truth").split("\n"), 1):
                if not line.strip():
                    continue
                parts = line.rstrip("\r").split("\t")
                if len(parts) != 2:
                    raise UserError(f"{txt}, line {n}: expected 'question<TAB>answer'.")
                truth[category, os.path.splitext(os.path.basename(txt))[0], mme_key(parts[0])] = parts[1].strip()
    if truth:
        for r in rows:
            stem = os.path.splitext(os.path.basename(str(r["question_id"])))[0]
            answer = truth.get((r["category"], stem, mme_key(r["text"])))
            if answer is None:
                raise UserError(f"No MME ground truth for {r['question_id']} ({r['text']!r}) under {release}.")
            r["answer"] = answer
    return rows, release


MMVET_TRUTH = ("mm-vet.json", "mm-vet/mm-vet.json")  # in mm-vet.zip (github.com/yuweihao/MM-Vet, release v1)


def mmvet_key(question_id) -> str:
    """The mm-vet.json key of a question: LLaVA's convert_mmvet_for_eval.py writes ``f"v1_{question_id}"`` (its
    llava-mm-vet.jsonl numbers the questions 0..217); an id already of that form ("v1_12") is kept."""
    text = str(question_id)
    return text if text.startswith("v1_") else f"v1_{text}"


def read_mmvet_truth(path) -> dict:
    """MM-Vet's ``mm-vet.json``: {"v1_0": {"imagename", "question", "answer", "capability": ["rec", ...]}, ...},
    checked for the fields the grader needs."""
    truth = read_json(path, "MM-Vet ground truth")
    if not isinstance(truth, dict):
        raise UserError(f"{path}: expected MM-Vet's mm-vet.json, a JSON object keyed v1_0, v1_1, ...")
    for key, item in truth.items():
        check_fields(item, f"{path}, {key}", {"question": str, "answer": str, "capability": STRINGS},
                     ("question", "answer", "capability"))
        if not item["capability"]:
            raise UserError(f"{path}, {key}: capability must be a non-empty list (e.g. [\"rec\", \"ocr\"]).")
    return truth


def read_mmvet(data_dir):
    """LLaVA's ``llava-mm-vet.jsonl`` (question_id, image, text: the question as asked, no suffix; mmvet.sh runs
    model_vqa.py on it) with images in ``images/`` (``mm-vet/images/`` as mm-vet.zip unpacks). Where MM-Vet's
    ``mm-vet.json`` is there, each row also gets its ``answer`` and ``capability`` list (for the GPT grader,
    ``jaxdebias grade-mmvet``; there is no local metric)."""
    path = find_file(data_dir, ["questions.jsonl", "llava-mm-vet.jsonl"], "MM-Vet question file")
    rows = jsonl(path, QUESTION_FIELDS)
    truth_path = optional_file(data_dir, MMVET_TRUTH)
    if truth_path:
        truth = read_mmvet_truth(truth_path)
        for r in rows:
            item = truth.get(mmvet_key(r["question_id"]))
            if item is None:
                raise UserError(f"{truth_path}: no entry {mmvet_key(r['question_id'])} for question "
                                f"{r['question_id']} of {path}.")
            r["answer"], r["capability"] = item["answer"], item["capability"]
    return rows, image_folder(data_dir, ["images", "mm-vet/images"])
