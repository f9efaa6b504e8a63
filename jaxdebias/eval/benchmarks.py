"""Benchmark files in the LLaVA-1.5 evaluation layout: readers, the local metric, the official answer formats.

Each benchmark is a ``Bench``: where its question file and images sit inside ``--data`` (the names LLaVA's
``playground/data/eval/<bench>/`` uses), how a row becomes a prompt, which files the official scorers take, and
the metric (``jaxdebias.eval.metrics``) where the ground truth is local. A row is a dict with ``question_id``,
``text`` (the prompt as given to the model, LLaVA's suffixes included), ``image`` (a path under the image
folder) or ``image_b64`` (encoded bytes), and the benchmark's ground-truth fields.

  bench      question file (in --data)              ground truth (in --data)                 metric
  pope       llava_pope_test.jsonl (label field)    in the file                              accuracy, F1, ...
  mme        llava_mme.jsonl                        MME_Benchmark_release_version/*/ txt     MME scores
  gqa        llava_gqa_testdev_balanced.jsonl       testdev_balanced_questions.json          accuracy
  textvqa    llava_textvqa_val_v051_ocr.jsonl       TextVQA_0.5.1_val.json                   VQA accuracy
  scienceqa  llava_test_CQM-A.json                  problems.json                            accuracy (image set)
  mmbench    mmbench_dev_20230712.tsv (base64)      the TSV's answer column                  accuracy
  mmbench_cn mmbench_dev_cn_20231003.tsv (base64)   the TSV's answer column                  accuracy
  mmvet      llava-mm-vet.jsonl, images/            mm-vet.json (for the GPT grader)         none (GPT-4 graded)
  vqav2      llava_vqav2_mscoco_test-dev2015.jsonl  v2_mscoco_val2014_annotations.json (val) VQA accuracy
  vizwiz     llava_test.jsonl                       val.json (val)                           VQA accuracy

The video benchmarks (msvd, msrvtt, tgif, activitynet: Video-LLaVA's layout, exact match, ``merge.jsonl``) are
in ``jaxdebias.eval.video``; their rows carry ``video`` instead of ``image``.

Every reader except ScienceQA's and MMBench's also takes ``questions.jsonl``. Test splits without local answers
produce the submission files and no metric. MM-Vet is graded by GPT-4 only (``jaxdebias.eval.mmvet``, the command
``jaxdebias grade-mmvet``): ``eval`` writes its results file and no metric.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections import defaultdict
from collections.abc import Callable

from jaxdebias import UserError
from jaxdebias.eval import metrics, video
from jaxdebias.eval.files import atomic_open, write_json, write_text
from jaxdebias.eval.reading import NotFound, image_folder, jsonl
from jaxdebias.eval.readers import (
    QUESTION_FIELDS,
    mme_key,
    read_gqa,
    mmvet_key,
    read_mmbench,
    read_mme,
    read_mmvet,
    read_pope,
    read_scienceqa,
    read_textvqa,
    read_vizwiz,
    read_vqav2,
)


@dataclasses.dataclass(frozen=True)
class Bench:
    """One benchmark: ``read(data_dir) -> (rows, image folder)``; ``score(rows, answers) -> metrics`` (answers
    in row order, as the model wrote them); ``truth`` the field a row needs to be scored; ``export(rows,
    answers, out_dir) -> [written paths]`` the files the official scorers take."""

    name: str
    read: Callable
    score: Callable
    truth: str
    export: Callable

    def has_truth(self, rows) -> bool:
        return all(self.truth in r for r in rows)


# --- scores ------------------------------------------------------------------------------------------------------


def _pope(rows, answers):
    """Overall, and per category (adversarial / popular / random, as eval_pope.py reports them) with the means
    over the categories (LLaVA-1.5 reports the F1 averaged over the three)."""
    preds = [metrics.pope_yes_no(a) for a in answers]
    out = metrics.pope_metrics(preds, [r["label"] for r in rows])
    groups = defaultdict(list)
    for i, r in enumerate(rows):
        if "category" in r:
            groups[r["category"]].append(i)
    if groups:
        per = {c: metrics.pope_metrics([preds[i] for i in idx], [rows[i]["label"] for i in idx])
               for c, idx in sorted(groups.items())}
        out["categories"] = per
        for k in ("accuracy", "f1"):
            out[f"{k}_mean_over_categories"] = sum(m[k] for m in per.values()) / len(per)
    return out


def _mme_answer(answer: str) -> str:
    """An answer as it goes into the eval_tool's tab-separated line (a tab or newline inside would break it)."""
    return answer.replace("\n", " ").replace("\t", " ")


def _mme(rows, answers):
    out = metrics.mme_scores((r["category"], metrics.mme_yes_no(_mme_answer(a)), r["answer"])
                             for r, a in zip(rows, answers))
    return out | {"n": len(rows)}


def _gqa(rows, answers):
    scored = [(r, a) for r, a in zip(rows, answers) if r.get("balanced", True)]  # eval.py scores balanced ones
    return metrics.accuracy(metrics.gqa_prediction(a) == r["answer"] for r, a in scored)


def _textvqa(rows, answers):
    accs = [metrics.textvqa_accuracy(a, r["answers"]) for r, a in zip(rows, answers)]
    return {"accuracy": sum(accs) / len(accs), "n": len(accs)}


def _vqa(rows, answers):
    """The servers' VQA evaluator on the answers as submitted (LLaVA's converters normalise them first)."""
    accs = [metrics.vqa_accuracy(metrics.normalize_vqa(a), r["answers"]) for r, a in zip(rows, answers)]
    return {"accuracy": sum(accs) / len(accs), "n": len(accs)}


def _scienceqa(rows, answers):
    return metrics.accuracy(metrics.scienceqa_choice(a, r["n_choices"]) == r["answer"] for r, a in zip(rows, answers))


def _mmbench(rows, answers):
    """Per row, and circular: a question counts only when every circular copy of it (index mod 1e6) is right.
    Without copies in the file both are the same."""
    hits = [metrics.mmbench_choice(a, dict(r["choices"])) == r["answer"] for r, a in zip(rows, answers)]
    groups = defaultdict(list)
    for r, hit in zip(rows, hits):
        groups[r["circular_group"]].append(hit)
    return {"accuracy": sum(all(g) for g in groups.values()) / len(groups), "questions": len(groups),
            "accuracy_per_row": sum(hits) / len(hits), "n": len(rows)}


def _mmvet(rows, answers):
    """MM-Vet has no local metric: GPT-4 grades each answer against the ground truth."""
    return {"metric": None, "n": len(rows), "grade_with": "jaxdebias grade-mmvet (GPT-4, your API key)"}


# --- exports (the files the official scorers / servers take) -----------------------------------------------------


def _export_mme(rows, answers, out_dir):
    """The MME eval_tool layout: one ``<category>.txt`` per category, "image<TAB>question<TAB>gt<TAB>answer"."""
    folder = os.path.join(out_dir, "mme_eval_tool")
    os.makedirs(folder, exist_ok=True)
    lines = defaultdict(list)
    for r, a in zip(rows, answers):
        lines[r["category"]].append("\t".join([os.path.basename(str(r["question_id"])), mme_key(r["text"]),
                                               r.get("answer", ""), _mme_answer(a)]))
    for category, category_lines in lines.items():
        write_text(os.path.join(folder, f"{category}.txt"), "\n".join(category_lines) + "\n")
    return [folder]


def _export_mmbench(name):
    """The TSV's columns (without the image) plus ``prediction``, as LLaVA's convert_mmbench_for_submission."""
    def export(rows, answers, out_dir):
        path = os.path.join(out_dir, name)
        with atomic_open(path, newline="") as f:
            writer = csv.DictWriter(f, list(rows[0]["record"]) + ["prediction"], delimiter="\t")
            writer.writeheader()
            for r, a in zip(rows, answers):
                writer.writerow({**r["record"], "prediction": a})
        return [path]
    return export


MMVET_RESULTS = "mmvet_results.json"


def _export_mmvet(rows, answers, out_dir):
    """{"v1_<n>": answer} in question order, as LLaVA's scripts/convert_mmvet_for_eval.py writes it (indent 2):
    the file MM-Vet's evaluator (mm-vet_evaluator.py, its online grader) and ``jaxdebias grade-mmvet`` take."""
    return [write_json(os.path.join(out_dir, MMVET_RESULTS),
                       {mmvet_key(r["question_id"]): a for r, a in zip(rows, answers)}, indent=2)]


def _export_gqa(rows, answers, out_dir):
    return [write_json(os.path.join(out_dir, "testdev_balanced_predictions.json"), [
        {"questionId": r["question_id"], "prediction": metrics.gqa_prediction(a)} for r, a in zip(rows, answers)],
        indent=None)]


def _export_scienceqa(rows, answers, out_dir):
    """The parsed letter per problem (None where eval_science_qa.py fails to parse one)."""
    def letter(r, a):
        index = metrics.scienceqa_choice(a, r.get("n_choices", len(metrics.SCIENCEQA_OPTIONS)))
        return metrics.SCIENCEQA_OPTIONS[index] if index >= 0 else None
    return [write_json(os.path.join(out_dir, "scienceqa_predictions.json"),
                       {str(r["question_id"]): letter(r, a) for r, a in zip(rows, answers)}, indent=None)]


def _submission(name, key):
    """The VQA-style submission: one {key..., "answer": normalised answer} per question (LLaVA's converters)."""
    def export(rows, answers, out_dir):
        return [write_json(os.path.join(out_dir, name), [
            {k: f(r) for k, f in key.items()} | {"answer": metrics.normalize_vqa(a)} for r, a in zip(rows, answers)],
            indent=None)]
    return export


_QUESTION_ID = {"question_id": lambda r: r["question_id"]}

BENCHES = {b.name: b for b in (
    Bench("pope", read_pope, _pope, "label", lambda rows, answers, out_dir: []),
    Bench("mme", read_mme, _mme, "answer", _export_mme),
    Bench("gqa", read_gqa, _gqa, "answer", _export_gqa),
    Bench("textvqa", read_textvqa, _textvqa, "answers", _submission("textvqa_submission.json", _QUESTION_ID)),
    Bench("scienceqa", read_scienceqa, _scienceqa, "answer", _export_scienceqa),
    Bench("mmbench", read_mmbench, _mmbench, "answer", _export_mmbench("mmbench_predictions.tsv")),
    Bench("mmbench_cn", lambda data_dir: read_mmbench(data_dir, "cn"), _mmbench, "answer",
          _export_mmbench("mmbench_cn_predictions.tsv")),
    Bench("mmvet", read_mmvet, _mmvet, "answer", _export_mmvet),
    Bench("vqav2", read_vqav2, _vqa, "answers", _submission("vqav2_submission.json", _QUESTION_ID)),
    Bench("vizwiz", read_vizwiz, _vqa, "answers",
          _submission("vizwiz_submission.json", {"image": lambda r: os.path.basename(r["image"])})),
)}


def _video_bench(name: str) -> Bench:
    return Bench(name, lambda data_dir: video.read_video_qa(name, data_dir), video.exact_match, "answer",
                 video.export_predictions)


BENCHES.update({name: _video_bench(name) for name in video.LAYOUT})  # Video-LLaVA's layout: jaxdebias.eval.video


def get(name: str) -> Bench:
    if name not in BENCHES:
        raise UserError(f"Unknown benchmark {name!r}; supported: {', '.join(BENCHES)}.")
    return BENCHES[name]


def read_any(data_dir: str, bench: str | None = None):
    """(rows, image folder) of ``bench`` in ``data_dir``, or, without a name, of the first benchmark whose
    question file is there (``questions.jsonl`` with question_id / image / text fields counts as any)."""
    if not os.path.isdir(data_dir):
        raise UserError(f"--data {data_dir} is not a directory.")
    if bench is not None:
        return get(bench).read(data_dir)
    if os.path.isfile(os.path.join(data_dir, "questions.jsonl")):
        return jsonl(os.path.join(data_dir, "questions.jsonl"), QUESTION_FIELDS), image_folder(data_dir, ["images"])
    for b in BENCHES.values():
        try:
            return b.read(data_dir)
        except NotFound:
            pass
    raise UserError(f"No question file in {data_dir}: expected questions.jsonl or a benchmark's LLaVA file "
                    f"({', '.join(BENCHES)}; pass --bench to name it).")
