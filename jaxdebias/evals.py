"""Benchmark files in the LLaVA-1.5 evaluation layout: readers, the official answer formats, local metrics.

Each benchmark is a ``Bench``: where its question file and images sit inside ``--data`` (the names LLaVA's
``playground/data/eval/<bench>/`` uses), how a row becomes a prompt, which files the official scorers take, and
the metric where the ground truth is local. A row is a dict with ``question_id``, ``text`` (the prompt as given
to the model, LLaVA's suffixes included), ``image`` (a path under the image folder) or ``image_b64``, and the
benchmark's ground-truth fields.

  bench      question file (in --data)              ground truth (in --data)                 metric
  pope       llava_pope_test.jsonl (label field)    in the file                              accuracy, F1, ...
  mme        llava_mme.jsonl                        MME_Benchmark_release_version/*/ txt     MME scores
  gqa        llava_gqa_testdev_balanced.jsonl       testdev_balanced_questions.json          accuracy
  textvqa    llava_textvqa_val_v051_ocr.jsonl       TextVQA_0.5.1_val.json                   VQA accuracy
  scienceqa  llava_test_CQM-A.json                  problems.json                            accuracy (image set)
  mmbench    mmbench_dev_20230712.tsv (base64)      the TSV's answer column                  accuracy
  vqav2      llava_vqav2_mscoco_test-dev2015.jsonl  v2_mscoco_val2014_annotations.json (val) VQA accuracy
  vizwiz     llava_test.jsonl                       val.json (val)                           VQA accuracy

Every reader also takes ``questions.jsonl``. Test splits without local answers produce the submission files
and no metric.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import csv
import dataclasses
import glob
import json
import os
import re
from collections import defaultdict
from collections.abc import Callable

from jaxdebias._checks import UserError

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."

# --- VQA answer normalisation (the EvalAI / VQA evaluation processor: contractions, number words, articles,
# punctuation), used by the VQAv2, VizWiz and TextVQA metrics and submissions.

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA = re.compile(r"(?<=\d)(\,)+(?=\d)")


def normalize_vqa(answer: str) -> str:
    """An answer as the VQA / EvalAI evaluation compares it: lower case, punctuation removed (or spaced), number
    words as digits, articles dropped, contractions restored ("dont" -> "don't")."""
    s = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    s = s.replace("\n", " ").replace("\t", " ").strip()
    out = s
    for p in PUNCTUATION:
        out = out.replace(p, "") if (p + " " in s or " " + p in s) or _COMMA.search(s) else out.replace(p, " ")
    out = _PERIOD.sub("", out, re.UNICODE)  # the reference passes re.UNICODE as the count (= 32); kept as is
    words = [NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """VQA accuracy: the mean over the 10 leave-one-annotator-out subsets of min(1, matches / 3), on normalised
    answers (any number of annotators is accepted; 10 is the standard)."""
    pred = normalize_vqa(prediction)
    gts = [normalize_vqa(a) for a in gt_answers]
    if not gts:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer.")
    accs = [min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
    return sum(accs) / len(accs)


# --- reading -----------------------------------------------------------------------------------------------


class _NotFound(UserError):
    """The benchmark's question file is not in the folder (``read_any`` then tries the next benchmark)."""


def _optional(data_dir, names):
    """The first file matching one of ``names`` (glob patterns) in ``data_dir``, or None."""
    for name in names:
        matches = sorted(p for p in glob.glob(os.path.join(data_dir, name)) if os.path.isfile(p))
        if matches:
            return matches[0]
    return None


def _find(data_dir, names, what):
    path = _optional(data_dir, names)
    if path is None:
        raise _NotFound(f"No {what} in {data_dir}: expected {' or '.join(names)}.")
    return path


@contextlib.contextmanager
def atomic_open(path, mode="w", **kw):
    """A file written beside ``path`` and renamed onto it when the block ends without error (else removed):
    readers never see a half-written file."""
    tmp = path + ".tmp"
    try:
        with open(tmp, mode, **kw) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _image_dir(data_dir, names):
    for name in names:
        if os.path.isdir(os.path.join(data_dir, name)):
            return os.path.join(data_dir, name)
    return data_dir


def _jsonl(path, need):
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {n}: not JSON ({e}).") from None
            missing = [k for k in need if k not in row]
            if missing:
                raise UserError(f"{path}, line {n}: missing field(s) {', '.join(missing)} (each line needs "
                                f"{', '.join(need)}).")
            rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no questions.")
    return rows


def _json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{what} {path} cannot be read ({e}).") from None


QUESTION_FIELDS = ("question_id", "image", "text")


def read_pope(data_dir):
    path = _find(data_dir, ["questions.jsonl", "llava_pope_test.jsonl"], "POPE question file")
    rows = _jsonl(path, QUESTION_FIELDS + ("label",))
    bad = [r["question_id"] for r in rows if r["label"] not in ("yes", "no")]
    if bad:
        raise UserError(f"POPE labels must be 'yes' or 'no'; question(s) {bad[:5]} have others.")
    return rows, _image_dir(data_dir, ["images", "val2014"])


def read_gqa(data_dir):
    path = _find(data_dir, ["questions.jsonl", "llava_gqa_testdev_balanced.jsonl"], "GQA question file")
    rows = _jsonl(path, QUESTION_FIELDS)
    gt = _optional(data_dir, ["testdev_balanced_questions.json", "data/testdev_balanced_questions.json"])
    if gt:
        answers = _json(gt, "GQA questions")
        for r in rows:
            q = answers.get(str(r["question_id"]))
            if q is None or "answer" not in q:
                raise UserError(f"{gt}: no answer for question {r['question_id']}.")
            r["answer"] = q["answer"]
    return rows, _image_dir(data_dir, ["images"])


def _textvqa_question(prompt: str) -> str:
    """The question inside a LLaVA TextVQA prompt ("question\\nReference OCR token: ...\\nAnswer ...")."""
    lines = prompt.split("\n")
    if "Reference OCR token: " in prompt and len(lines) == 3:
        return (lines[1] if prompt.startswith("Reference OCR token:") else lines[0]).lower()
    return lines[0].lower()


def read_textvqa(data_dir):
    path = _find(data_dir, ["questions.jsonl", "llava_textvqa_val_v051_ocr.jsonl"], "TextVQA question file")
    rows = _jsonl(path, QUESTION_FIELDS)
    gt = _optional(data_dir, ["TextVQA_0.5.1_val.json"])
    if gt:
        data = _json(gt, "TextVQA annotations").get("data", [])
        by_key = {(a["image_id"], a["question"].lower()): a for a in data}
        for r in rows:
            key = os.path.splitext(os.path.basename(r["image"]))[0], _textvqa_question(r["text"])
            a = by_key.get((str(r["question_id"]), key[1])) or by_key.get(key)
            if a is None:
                raise UserError(f"{gt}: no annotation for question {r['question_id']} ({key[1]!r}).")
            r["answers"] = a["answers"]
    return rows, _image_dir(data_dir, ["train_images", "images"])


def read_vqav2(data_dir):
    path = _find(data_dir, ["questions.jsonl", "llava_vqav2_mscoco_*.jsonl"], "VQAv2 question file")
    rows = _jsonl(path, QUESTION_FIELDS)
    gt = _optional(data_dir, ["v2_mscoco_val2014_annotations.json"])
    if gt:
        by_id = {a["question_id"]: a for a in _json(gt, "VQAv2 annotations")["annotations"]}
        for r in rows:
            a = by_id.get(r["question_id"])
            if a is None:
                raise UserError(f"{gt}: no annotation for question {r['question_id']}.")
            r["answers"] = [x["answer"] for x in a["answers"]]
    return rows, _image_dir(data_dir, ["test2015", "val2014", "images"])


def read_vizwiz(data_dir):
    path = _find(data_dir, ["questions.jsonl", "llava_test.jsonl"], "VizWiz question file")
    rows = _jsonl(path, QUESTION_FIELDS)
    gt = _optional(data_dir, ["val.json", "Annotations/val.json"])
    if gt:
        by_image = {a["image"]: a for a in _json(gt, "VizWiz annotations")}
        for r in rows:
            a = by_image.get(os.path.basename(r["image"]))
            if a is None:
                raise UserError(f"{gt}: no annotation for image {r['image']}.")
            r["answers"] = [x["answer"] for x in a["answers"]]
    return rows, _image_dir(data_dir, ["test", "val", "images"])


def read_scienceqa(data_dir):
    """LLaVA's ScienceQA test file (a JSON list of conversations). Only the questions with an image are read:
    pruning needs an image, and LLaVA-1.5 reports the image subset (SQA-IMG)."""
    path = _find(data_dir, ["llava_test_CQM-A.json"], "ScienceQA question file")
    items = _json(path, "ScienceQA questions")
    problems_path = _optional(data_dir, ["problems.json"])
    problems = _json(problems_path, "ScienceQA problems") if problems_path else {}
    rows = []
    for n, it in enumerate(items):
        missing = [k for k in ("id", "conversations") if k not in it]
        if missing or not it["conversations"] or "value" not in it["conversations"][0]:
            raise UserError(f"{path}, item {n}: missing field(s) {', '.join(missing) or 'conversations[0].value'}.")
        if "image" not in it:
            continue
        text = it["conversations"][0]["value"].replace("<image>", "").strip()
        row = {"question_id": it["id"], "image": it["image"], "text": f"{text}\n{LETTER}"}
        if problems:
            p = problems.get(str(it["id"]))
            if p is None or "answer" not in p or "choices" not in p:
                raise UserError(f"{problems_path}: no answer/choices for problem {it['id']}.")
            row["answer"], row["n_choices"] = int(p["answer"]), len(p["choices"])
        rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no question with an image.")
    return rows, _image_dir(data_dir, ["images/test", "test", "images"])


def _blank(v) -> bool:
    return v is None or v.strip() == "" or v.strip().lower() == "nan"


def read_mmbench(data_dir):
    """An MMBench TSV (index, question, hint, A-D, answer, category, image as base64, ...). The prompt is LLaVA's:
    hint, question, "A. option" lines, then the single-letter instruction."""
    path = _find(data_dir, ["mmbench_dev_20230712.tsv", "*.tsv"], "MMBench TSV")
    csv.field_size_limit(1 << 30)
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        need = ("index", "question", "A", "B", "image")
        missing = [k for k in need if k not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)} (MMBench TSVs have index, question, "
                            "hint, A, B, C, D, answer, category, image).")
        for n, rec in enumerate(reader, 2):
            try:
                raw = base64.b64decode(rec["image"], validate=True)
            except (binascii.Error, ValueError, TypeError):
                raise UserError(f"{path}, line {n}: the image column is not base64.") from None
            options = {c: rec[c] for c in "ABCDEFGH" if c in rec and not _blank(rec[c])}
            q = rec["question"] if _blank(rec.get("hint")) else f"{rec['hint']}\n{rec['question']}"
            q += "".join(f"\n{c}. {o}" for c, o in options.items())
            idx = rec["index"]
            row = {"question_id": int(idx) if idx.isdigit() else idx, "image_b64": raw, "text": f"{q}\n{LETTER}",
                   "options": "".join(options), "record": {k: v for k, v in rec.items() if k != "image"}}
            if not _blank(rec.get("answer")):
                row["answer"] = rec["answer"].strip()
            rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no questions.")
    return rows, data_dir


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_RELEASE = "MME_Benchmark_release_version"


def _mme_key(question: str) -> str:
    return " ".join(question.replace(SHORT, "").split())


def read_mme(data_dir):
    """LLaVA's llava_mme.jsonl (question_id "category/image", image, text, category) with the ground truth of the
    MME release folder: per category, ``questions_answers_YN/<image stem>.txt`` (or ``<image stem>.txt`` beside
    the images) holding "question<TAB>answer" lines."""
    path = _find(data_dir, ["questions.jsonl", "llava_mme.jsonl"], "MME question file")
    rows = _jsonl(path, QUESTION_FIELDS + ("category",))
    release = _image_dir(data_dir, [MME_RELEASE])
    gt = {}
    for cat in {r["category"] for r in rows}:
        qa = os.path.join(release, cat, "questions_answers_YN")
        qa = qa if os.path.isdir(qa) else os.path.join(release, cat)
        for txt in glob.glob(os.path.join(qa, "*.txt")):
            with open(txt) as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    parts = line.rstrip("\n").split("\t")
                    if len(parts) != 2:
                        raise UserError(f"{txt}, line {n}: expected 'question<TAB>answer'.")
                    gt[cat, os.path.splitext(os.path.basename(txt))[0], _mme_key(parts[0])] = parts[1].strip()
    if gt:
        for r in rows:
            stem = os.path.splitext(os.path.basename(str(r["question_id"])))[0]
            ans = gt.get((r["category"], stem, _mme_key(r["text"])))
            if ans is None:
                raise UserError(f"No MME ground truth for {r['question_id']} ({r['text']!r}) under {release}.")
            r["answer"] = ans
    return rows, release


# --- metrics -----------------------------------------------------------------------------------------------


def pope_metrics(answers: dict, labels: dict) -> dict:
    """POPE's official scoring: an answer is "no" when its words include no / not / No, else "yes"."""
    tp = fp = tn = fn = 0
    for qid, label in labels.items():
        words = answers[qid].replace(".", " ").replace(",", " ").split()
        pred = "no" if any(w in ("No", "not", "no") for w in words) else "yes"
        if pred == "yes":
            tp, fp = tp + (label == "yes"), fp + (label == "no")
        else:
            tn, fn = tn + (label == "no"), fn + (label == "yes")
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n, "n": n}


def mme_yes_no(answer: str) -> str:
    """MME's parse of an answer: "yes"/"no" exactly, else whichever of them its first 4 characters contain."""
    a = answer.strip().lower()
    if a in ("yes", "no"):
        return a
    return "yes" if "yes" in a[:4] else "no" if "no" in a[:4] else "other"


def mme_scores(rows, texts) -> dict:
    """Per category: accuracy over questions + accuracy+ over images (all of an image's questions right), each
    in percent, summed; perception and cognition totals over the categories present."""
    by_cat = defaultdict(lambda: defaultdict(list))
    for r, t in zip(rows, texts):
        image = os.path.basename(str(r["question_id"]))
        by_cat[r["category"]][image].append(mme_yes_no(t) == r["answer"].lower())
    out = {}
    for cat, images in by_cat.items():
        flat = [c for v in images.values() for c in v]
        acc = 100 * sum(flat) / len(flat)
        acc_plus = 100 * sum(all(v) for v in images.values()) / len(images)
        out[cat] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    return {"perception": sum(v["score"] for c, v in out.items() if c in MME_PERCEPTION),
            "cognition": sum(v["score"] for c, v in out.items() if c in MME_COGNITION),
            "categories": out, "n": len(rows)}


def option_letter(answer: str, options: str) -> str | None:
    """The option letter an answer names: "B", "B.", "B. text", "(B)", or "The answer is B."; None otherwise."""
    a = answer.strip()
    m = re.fullmatch(r"\(?([A-Z])\)?(?:[.:)]\s*.*)?", a, re.S) or re.search(r"[Tt]he answer is \(?([A-Z])\)?", a)
    return m.group(1) if m and m.group(1) in options else None


def accuracy(flags) -> dict:
    flags = list(flags)
    return {"accuracy": sum(flags) / len(flags), "correct": int(sum(flags)), "n": len(flags)}


def _gqa_prediction(text: str) -> str:
    return text.rstrip(".").lower()


# --- exports (the files the official scorers / servers take) -----------------------------------------------


def _dump(path, obj, indent=None):
    with atomic_open(path) as f:
        json.dump(obj, f, indent=indent)
    return path


def _export_mme(rows, texts, out_dir):
    """The MME eval_tool layout: one ``<category>.txt`` per category, "image<TAB>question<TAB>gt<TAB>answer"."""
    folder = os.path.join(out_dir, "mme_eval_tool")
    os.makedirs(folder, exist_ok=True)
    by_cat = defaultdict(list)
    for r, t in zip(rows, texts):
        by_cat[r["category"]].append("\t".join([os.path.basename(str(r["question_id"])), _mme_key(r["text"]),
                                               r.get("answer", ""), t.replace("\n", " ").replace("\t", " ")]))
    for cat, lines in by_cat.items():
        with atomic_open(os.path.join(folder, f"{cat}.txt")) as f:
            f.write("\n".join(lines) + "\n")
    return [folder]


def _export_mmbench(rows, texts, out_dir):
    """The TSV's columns (without the image) plus ``prediction``, as LLaVA's convert_mmbench_for_submission."""
    path = os.path.join(out_dir, "mmbench_predictions.tsv")
    fields = list(rows[0]["record"]) + ["prediction"]
    with atomic_open(path, newline="") as f:
        w = csv.DictWriter(f, fields, delimiter="\t")
        w.writeheader()
        for r, t in zip(rows, texts):
            w.writerow({**r["record"], "prediction": t})
    return [path]


@dataclasses.dataclass(frozen=True)
class Bench:
    name: str
    read: Callable  # data_dir -> (rows, image_dir)
    score: Callable  # (rows with ground truth, answer texts in row order) -> metrics
    has_truth: Callable  # rows -> bool
    export: Callable  # (rows, answer texts, out_dir) -> [written paths]


def _with(field):
    return lambda rows: all(field in r for r in rows)


def _vqa(rows, texts):
    accs = [vqa_accuracy(t, r["answers"]) for r, t in zip(rows, texts)]
    return {"accuracy": sum(accs) / len(accs), "n": len(accs)}


def _submission(name, key):
    """The VQA-style submission: one {key..., "answer": normalised answer} per question."""
    def export(rows, texts, out):
        return [_dump(os.path.join(out, name), [{k: f(r) for k, f in key.items()} | {"answer": normalize_vqa(t)}
                                                for r, t in zip(rows, texts)])]
    return export


_QID = {"question_id": lambda r: r["question_id"]}

BENCHES = {
    "pope": Bench("pope", read_pope,
                  lambda rows, t: pope_metrics(dict(enumerate(t)), {i: r["label"] for i, r in enumerate(rows)}),
                  _with("label"), lambda rows, t, out: []),
    "mme": Bench("mme", read_mme, mme_scores, _with("answer"), _export_mme),
    "gqa": Bench("gqa", read_gqa,
                 lambda rows, t: accuracy(_gqa_prediction(a) == r["answer"] for r, a in zip(rows, t)),
                 _with("answer"),
                 lambda rows, t, out: [_dump(os.path.join(out, "testdev_balanced_predictions.json"), [
                     {"questionId": r["question_id"], "prediction": _gqa_prediction(a)} for r, a in zip(rows, t)])]),
    "textvqa": Bench("textvqa", read_textvqa, _vqa, _with("answers"), _submission("textvqa_submission.json", _QID)),
    "scienceqa": Bench("scienceqa", read_scienceqa,
                       lambda rows, t: accuracy(option_letter(a, "ABCDE"[:r["n_choices"]]) == "ABCDE"[r["answer"]]
                                                for r, a in zip(rows, t)),
                       _with("answer"),
                       lambda rows, t, out: [_dump(os.path.join(out, "scienceqa_predictions.json"), {
                           str(r["question_id"]): option_letter(a, "ABCDE") for r, a in zip(rows, t)})]),
    "mmbench": Bench("mmbench", read_mmbench,
                     lambda rows, t: accuracy(option_letter(a, r["options"]) == r["answer"] for r, a in zip(rows, t)),
                     _with("answer"), _export_mmbench),
    "vqav2": Bench("vqav2", read_vqav2, _vqa, _with("answers"), _submission("vqav2_submission.json", _QID)),
    "vizwiz": Bench("vizwiz", read_vizwiz, _vqa, _with("answers"),
                    _submission("vizwiz_submission.json", {"image": lambda r: os.path.basename(r["image"])})),
}


def read_any(data_dir: str, bench: str | None = None):
    """(rows, image folder) of ``bench`` in ``data_dir``, or, without a name, of the first benchmark whose
    question file is there (``questions.jsonl`` with question_id / image / text fields counts as any)."""
    if not os.path.isdir(data_dir):
        raise UserError(f"--data {data_dir} is not a directory.")
    if bench is not None:
        return get(bench).read(data_dir)
    if os.path.isfile(os.path.join(data_dir, "questions.jsonl")):
        return _jsonl(os.path.join(data_dir, "questions.jsonl"), QUESTION_FIELDS), _image_dir(data_dir, ["images"])
    for b in BENCHES.values():
        try:
            return b.read(data_dir)
        except _NotFound:
            pass
    raise UserError(f"No question file in {data_dir}: expected questions.jsonl or a benchmark's LLaVA file "
                    f"({', '.join(BENCHES)}; pass --bench to name it).")


def get(name: str) -> Bench:
    if name not in BENCHES:
        raise UserError(f"Unknown benchmark {name!r}; supported: {', '.join(BENCHES)}.")
    return BENCHES[name]
