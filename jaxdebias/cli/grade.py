"""``jaxdebias grade-mmvet``: MM-Vet's official GPT-4 grading (``jaxdebias.eval.mmvet``) of the answers
``jaxdebias eval --bench mmvet`` wrote.

Reads ``OUT/mmvet_results.json`` ({"v1_<n>": answer}, LLaVA's convert_mmvet_for_eval.py format) and MM-Vet's
``mm-vet.json`` from ``--data``; writes ``OUT/mmvet_gpt_grade.json``: the grader model, the runs, every question's
grades ({"model", "content", "score"} lists, one entry per run, as the official grade file, plus the prediction
graded) and, once every question is graded, the scores. The file is rewritten after each question, so an
interrupted grading resumes; a grade is reused only for the same prediction and grader model.
"""

from __future__ import annotations

import json
import os

from tqdm.auto import tqdm

from jaxdebias import UserError
from jaxdebias.eval import mmvet
from jaxdebias.eval.benchmarks import MMVET_RESULTS
from jaxdebias.eval.files import write_json
from jaxdebias.eval.reading import optional_file
from jaxdebias.eval.readers import MMVET_TRUTH, read_mmvet_truth

GRADE_FILE = "mmvet_gpt_grade.json"
MMVET_ZIP = "https://github.com/yuweihao/MM-Vet/releases/download/v1/mm-vet.zip"


def _results(out_dir) -> dict:
    path = os.path.join(out_dir, MMVET_RESULTS)
    if not os.path.isfile(path):
        raise UserError(f"No {path}: run `jaxdebias eval --bench mmvet --data DATA --out {out_dir}` first (it "
                        "writes the answers in MM-Vet's results format).")
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} cannot be read ({e}); rerun jaxdebias eval --bench mmvet to write it.") from None
    if not isinstance(results, dict) or not all(isinstance(v, str) for v in results.values()):
        raise UserError(f"{path}: expected {{\"v1_0\": answer text, ...}} as jaxdebias eval --bench mmvet writes it.")
    return results


def _truth(data_dir) -> tuple[str, dict]:
    if not os.path.isdir(data_dir):
        raise UserError(f"--data {data_dir} is not a directory.")
    path = optional_file(data_dir, MMVET_TRUTH)
    if path is None:
        raise UserError(f"MM-Vet's ground truth mm-vet.json is not in {data_dir} (looked for "
                        f"{' and '.join(MMVET_TRUTH)}). It is in {MMVET_ZIP}: unzip it into {data_dir}. Without it, "
                        "submit the results file to MM-Vet's online evaluator instead.")
    return path, read_mmvet_truth(path)


def grade_mmvet(out_dir: str, data_dir: str, *, model: str = mmvet.GRADER_MODEL, runs: int = 1, complete=None,
                api_key: str | None = None, base_url: str = "https://api.openai.com/v1", log=print,
                progress: bool = True) -> dict:
    """Grades ``out_dir``'s MM-Vet answers with ``model`` ``runs`` times (the official default 1; the paper 5).
    ``complete``: the chat endpoint (see ``jaxdebias.eval.mmvet``); by default an OpenAI-compatible one at
    ``base_url`` with ``api_key`` (else OPENAI_API_KEY). Returns the scores (``mmvet.aggregate``). Answers for
    only some of the questions (``eval --limit``) are graded and scored over those, as the official evaluator
    scores a subset, and said so."""
    if runs < 1:
        raise UserError(f"--runs must be >= 1, got {runs}.")
    results = _results(out_dir)
    truth_path, truth = _truth(data_dir)
    unknown = [k for k in results if k not in truth]
    if unknown:
        raise UserError(f"{os.path.join(out_dir, MMVET_RESULTS)} answers question(s) {unknown[:5]} that "
                        f"{truth_path} does not have: is --data the MM-Vet these answers came from?")
    keys = [k for k in truth if k in results]
    if len(keys) < len(truth):
        log(f"grade-mmvet: {len(keys)} of MM-Vet's {len(truth)} questions are answered in {out_dir}; the scores are "
            "over those only (run jaxdebias eval --bench mmvet without --limit for the benchmark's numbers).")

    path = os.path.join(out_dir, GRADE_FILE)
    grades = {}
    if os.path.isfile(path):
        try:
            with open(path) as f:
                previous = json.load(f)
            grades = {k: g for k, g in previous.get("grades", {}).items()
                      if k in results and g.get("prediction") == results[k] and set(g.get("model", [])) <= {model}}
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise UserError(f"{path} cannot be read ({e}); remove it to grade again from the start.") from None

    def save(scores=None):
        write_json(path, {"grader": model, "runs": runs, "data": truth_path, "scores": scores, "grades": grades})

    todo = sum(max(0, runs - len(grades.get(k, {}).get("score", []))) for k in keys)
    if todo:
        if complete is None:
            complete = mmvet.http_client(api_key or os.environ.get("OPENAI_API_KEY", ""), base_url)
        bar = tqdm(total=todo, desc=f"MM-Vet grading ({model})", disable=not progress)
        try:
            for run in range(runs):  # the official order: every question once, then the next run
                for k in keys:
                    entry = grades.setdefault(k, {"model": [], "content": [], "score": [], "prediction": results[k]})
                    if len(entry["score"]) > run:
                        continue
                    score, content = mmvet.grade(truth[k]["question"], truth[k]["answer"], results[k], complete, model)
                    entry["model"].append(model)
                    entry["content"].append(content)
                    entry["score"].append(score)
                    save()
                    bar.update(1)
        finally:
            bar.close()
    scores = mmvet.aggregate({k: grades[k]["score"][:runs] for k in keys},
                             {k: truth[k]["capability"] for k in keys})
    save(scores)
    caps = ", ".join(f"{c} {v}" for c, v in scores["capabilities"].items())
    log(f"mmvet GPT grade ({model}, {runs} run{'s' if runs > 1 else ''}, {scores['questions']} questions): total "
        f"{scores['total']}" + (f" (std {scores['std']})" if runs > 1 else "") + f"; {caps}; wrote {path}")
    return scores
