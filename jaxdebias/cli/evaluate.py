"""``jaxdebias eval``: pruned inference over a benchmark in the LLaVA layout, its official files and metric.

Everything the run needs is checked before the first answer is written: the question file (every field), every
image still to answer (decoded), the model and the pruning spec. Answers are then appended one flushed line at
a time, so an interrupted run resumes where it stopped and never counts an answer twice.
"""

from __future__ import annotations

import json
import os
import time

import jax
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

import jaxdebias as jd
from jaxdebias.cli.inputs import LoadedModel
from jaxdebias.cli.runner import Runner
from jaxdebias.cli.video import check_rows, check_spec, resolve_model
from jaxdebias.eval import benchmarks
from jaxdebias.eval.files import atomic_open, read_answers, write_json
from jaxdebias.models.interventions import VarSpec

UserError = jd.UserError


def _key(row) -> tuple:
    return row["question_id"], row["text"]


def _answer_line(row, text: str, model_id: str) -> dict:
    """One line of LLaVA's answer-file format."""
    return {"question_id": row["question_id"], "prompt": row["text"], "text": text,
            "answer_id": f"{row['question_id']}", "model_id": model_id, "metadata": {}}


def _answer(rows, image_dir, path, done, *, loaded, spec, var, batch_size, max_new_tokens, devices, progress, desc):
    """Answers ``rows`` into the answer file at ``path`` (appending), recording each in ``done``."""
    runner = Runner(loaded, spec, batch_size, var=var, devices=devices)
    model_id = "jaxdebias-unpruned" if spec is None else f"jaxdebias-{spec.method}-{spec.keep}"
    bar = tqdm(total=len(rows), desc=desc, disable=not progress)
    start, tokens = time.perf_counter(), 0
    try:
        with open(path, "a") as f:
            for row, _, result, i in runner(rows, image_dir, max_new_tokens):
                line = _answer_line(row, loaded.decode(result.tokens[i]), model_id)
                f.write(json.dumps(line) + "\n")
                f.flush()  # one write per answer, flushed: a kill leaves whole lines
                done[_key(row)] = line
                tokens += len(result.tokens[i])
                bar.update(1)
                bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.1f}")
    finally:
        bar.close()  # before any error message, so that it starts on a line of its own


def evaluate(bench: str, data_dir: str, out_dir: str, *, spec: jd.PruneSpec | None,
             model: LoadedModel | str | None = None, limit: int | None = None, batch_size: int = 4,
             max_new_tokens: int = 8, var: VarSpec | None = None, log=print, progress: bool = True,
             devices=None) -> dict:
    """Pruned (``spec``; None: unpruned) inference over ``bench`` in ``data_dir`` (``jaxdebias.eval.benchmarks``).

    Writes to ``out_dir``: the answers in LLaVA's answer-file format (``<bench>_answers.jsonl``, resumable: a
    rerun skips what is there), the files the official scorers take, and the metric where the ground truth is
    local (``<bench>_metrics.json``; without it ``"metric": null``). ``model``: a ``LoadedModel``, a converted
    checkpoint's directory, or None for the embedded default; it is loaded only if something is left to answer.
    Batches are split over ``devices`` (default: this process's). Under ``jax.distributed`` process i answers
    questions i, i + P, ... into its own part file; process 0 merges them in question order and scores, the
    others return ``{"process": i, "answered": n}``."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}.")
    if batch_size < 1:
        raise UserError(f"--batch must be >= 1, got {batch_size}.")
    benchmark = benchmarks.get(bench)
    rows, image_dir = benchmarks.read_any(data_dir, bench)
    rows = rows[:limit]
    answers_path = os.path.join(out_dir, f"{bench}_answers.jsonl")
    process, processes = jax.process_index(), jax.process_count()
    mine = rows[process::processes]  # under jax.distributed every process answers its own share

    def part(i):
        return answers_path if processes == 1 else os.path.join(out_dir, f"{bench}_answers.part{i}of{processes}.jsonl")

    done = read_answers(part(process))
    todo = [r for r in mine if _key(r) not in done]
    if todo:
        check_rows(todo, image_dir)  # every image decodes before the first answer is written
        loaded = resolve_model(model)
        if spec is not None:
            check_spec(spec, loaded)
        os.makedirs(out_dir, exist_ok=True)
        _answer(todo, image_dir, part(process), done, loaded=loaded, spec=spec, var=var, batch_size=batch_size,
                max_new_tokens=max_new_tokens, devices=devices, progress=progress,
                desc=f"{bench} {'unpruned' if spec is None else f'{spec.method} keep {spec.keep}'}")
    os.makedirs(out_dir, exist_ok=True)
    if processes > 1:
        multihost_utils.sync_global_devices(f"jaxdebias eval {bench}")  # every share is written
        if process != 0:
            return {"process": process, "answered": len(mine)}
        for other in range(1, processes):
            done.update(read_answers(part(other)))
        with atomic_open(answers_path) as f:  # the merged file, in question order, as one process writes it
            f.writelines(json.dumps(done[_key(r)]) + "\n" for r in rows)
    answers = [done[_key(r)]["text"] for r in rows]
    files = benchmark.export(rows, answers, out_dir)
    truth = benchmark.has_truth(rows)
    metrics = benchmark.score(rows, answers) if truth else {"metric": None, "n": len(rows)}
    write_json(os.path.join(out_dir, f"{bench}_metrics.json"), metrics)
    flat = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    log(f"{bench}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in flat.items())
        + (f"; wrote {', '.join(files)}" if files else "")
        + ("" if truth else " (no local ground truth: submit the files above)"))
    return metrics
