"""``jaxdebias eval``: pruned inference over a benchmark in the LLaVA layout, its official files and metric.

Everything the run needs is checked before the first answer is written: the question file (every field, no
question twice), every image still to answer (decoded), the model and the pruning spec. The folder records the
setting that produced it (``<bench>_setting.json``: checkpoint, method, budget, debias, decoding, VAR, answer
length, benchmark and a digest of its questions); resuming with another setting is refused. One process writes
an answer file at a time (a lock file beside it). Answers are appended one flushed line at a time, so an
interrupted run resumes where it stopped and never counts an answer twice; a question whose text changed since
its answer was written is answered again.
"""

from __future__ import annotations

import json
import os
import time

import jax
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

import jaxdebias as jd
from jaxdebias.cli.inputs import LoadedModel, check_prompt_length, check_var
from jaxdebias.cli.runner import Runner
from jaxdebias.cli.families import model_identity, resolve_model
from jaxdebias.cli.video import check_rows
from jaxdebias.eval import benchmarks
from jaxdebias.eval.files import atomic_open, check_setting, digest, exclusive, read_answers, write_json
from jaxdebias.models.interventions import VarSpec

UserError = jd.UserError


def _key(row) -> tuple:
    return row["question_id"], row["text"]


def _answer_line(row, text: str, model_id: str) -> dict:
    """One line of LLaVA's answer-file format."""
    return {"question_id": row["question_id"], "prompt": row["text"], "text": text,
            "answer_id": f"{row['question_id']}", "model_id": model_id, "metadata": {}}


def setting(bench: str, spec: jd.PruneSpec | None, var: VarSpec | None, max_new_tokens: int, model, rows) -> dict:
    """What produced an answer file: compared when a run resumes (all but ``data``, the questions' digest)."""
    pruning = {"method": "unpruned"}
    if spec is not None:
        d = spec.debias
        pruning = {"method": spec.method, "keep": spec.keep, "layer": spec.layer, "positions": spec.positions,
                   "stages": None if spec.stages is None else repr(spec.stages), "options": spec.resolved_options(),
                   "debias": {"curve": repr(d.curve), "pad_tau": d.tau_for(spec.method),
                              "task": d.task if d.curve == "released" else None,
                              "geometry": d.geometry_for(spec.method), "every_stage": d.every_stage},
                   "decode": spec.decode, "mode": spec.mode, "reselect": spec.reselect}
    return {"bench": bench, **model_identity(model), **pruning, "var": None if var is None else repr(var),
            "max_new_tokens": max_new_tokens, "data": digest([_key(r) for r in rows])}


def _answer(rows, image_dir, path, done, *, loaded, spec, var, batch_size, max_new_tokens, devices, progress, desc):
    """Answers ``rows`` into the answer file at ``path`` (appending; created with the first answer, so a run that
    fails before it leaves no empty file), recording each in ``done``."""
    runner = Runner(loaded, spec, batch_size, var=var, devices=devices)
    model_id = "jaxdebias-unpruned" if spec is None else f"jaxdebias-{spec.method}-{spec.keep}"
    bar = tqdm(total=len(rows), desc=desc, disable=not progress)
    start, tokens = time.perf_counter(), 0
    f = None
    try:
        for row, _, result, i in runner(rows, image_dir, max_new_tokens):
            line = _answer_line(row, loaded.decode(result.tokens[i]), model_id)
            f = f or open(path, "ab", buffering=0)
            _append_whole(f, (json.dumps(line) + "\n").encode())  # a kill or a full disk leaves whole lines
            done[_key(row)] = line
            tokens += len(result.tokens[i])
            bar.update(1)
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.1f}")
    finally:
        if f is not None:
            f.close()
        bar.close()  # before any error message, so that it starts on a line of its own


def _append_whole(f, data: bytes) -> None:
    """Appends ``data`` to the unbuffered file ``f`` in full, or not at all: a short or failed write (a full disk,
    a file-size limit, an interrupt) is cut back to where it started."""
    start = f.seek(0, os.SEEK_END)
    try:
        view = memoryview(data)
        while view:
            view = view[f.write(view):]
    except BaseException:
        f.truncate(start)
        raise


def _check_unique(rows, bench) -> None:
    seen = set()
    for r in rows:
        if _key(r) in seen:
            raise UserError(f"The {bench} question file has question {r['question_id']!r} twice with the same "
                            "text; each would be scored with one answer. Remove the duplicate.")
        seen.add(_key(r))


def _drop_stale(path, done, rows) -> None:
    """Removes the answers to questions whose text changed since they were written (same id, other text) from
    ``done`` and from the answer file (rewritten atomically), so that they are answered again."""
    keys, ids = {_key(r) for r in rows}, {r["question_id"] for r in rows}
    stale = [k for k in done if k not in keys and k[0] in ids]
    if not stale:
        return
    for k in stale:
        del done[k]
    with atomic_open(path) as f:
        f.writelines(json.dumps(line) + "\n" for line in done.values())


def _checked_model(model, spec, var, todo, image_dir, max_new_tokens) -> LoadedModel:
    """The model, loaded once every question still to answer has been checked against it: its image decodes, the
    spec and VAR fit the model, and its prompt plus the answer fits the decoder's positions."""
    check_rows(todo, image_dir)
    loaded = resolve_model(model)
    if spec is not None:
        loaded.check(spec)
        loaded.check_media(spec, videos=any("video" in r for r in todo))
    check_var(var, loaded)
    for r in todo:
        check_prompt_length(loaded, r["text"], max_new_tokens, f"question {r['question_id']!r}")
    return loaded


def _check_out(out_dir) -> None:
    """--out must be (or become) a writable folder: checked before anything is loaded or written."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out {out_dir} is a file; pass a folder.")
    parent = out_dir if os.path.isdir(out_dir) else os.path.dirname(os.path.abspath(out_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out_dir} is not writable ({parent} is not a writable folder); pass another --out.")


def evaluate(bench: str, data_dir: str, out_dir: str, *, spec: jd.PruneSpec | None,
             model: LoadedModel | str | None = None, limit: int | None = None, batch_size: int = 4,
             max_new_tokens: int = 8, var: VarSpec | None = None, log=print, progress: bool = True,
             devices=None, overwrite: bool = False) -> dict:
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
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}.")
    benchmark = benchmarks.get(bench)
    rows, image_dir = benchmarks.read_any(data_dir, bench)
    rows = rows[:limit]
    _check_unique(rows, bench)
    _check_out(out_dir)
    answers_path = os.path.join(out_dir, f"{bench}_answers.jsonl")
    setting_path = os.path.join(out_dir, f"{bench}_setting.json")
    run_setting = setting(bench, spec, var, max_new_tokens, model, rows)
    if not overwrite:
        check_setting(setting_path, run_setting, record=False)  # refused before anything is loaded
    process, processes = jax.process_index(), jax.process_count()
    mine = rows[process::processes]  # under jax.distributed every process answers its own share

    def part(i):
        return answers_path if processes == 1 else os.path.join(out_dir, f"{bench}_answers.part{i}of{processes}.jsonl")

    done = {} if overwrite else read_answers(part(process))
    loaded, todo = None, [r for r in mine if _key(r) not in done]  # a question edited since: a new key
    if todo:  # every check that can fail runs before the folder is made or a line written
        loaded = _checked_model(model, spec, var, todo, image_dir, max_new_tokens)
    os.makedirs(out_dir, exist_ok=True)
    with exclusive(part(process) + ".lock"):
        if overwrite:
            for name in os.listdir(out_dir):
                if name.startswith(f"{bench}_answers") and not name.endswith(".lock") or name in (
                        f"{bench}_setting.json", f"{bench}_metrics.json"):
                    os.remove(os.path.join(out_dir, name))
        check_setting(setting_path, run_setting)
        done = read_answers(part(process))
        _drop_stale(part(process), done, mine)
        todo = [r for r in mine if _key(r) not in done]
        if todo:
            if loaded is None:  # another process answered meanwhile, then a question changed: check again
                loaded = _checked_model(model, spec, var, todo, image_dir, max_new_tokens)
            _answer(todo, image_dir, part(process), done, loaded=loaded, spec=spec, var=var, batch_size=batch_size,
                    max_new_tokens=max_new_tokens, devices=devices, progress=progress,
                    desc=f"{bench} {'unpruned' if spec is None else f'{spec.method} keep {spec.keep}'}")
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
    write_json(os.path.join(out_dir, f"{bench}_metrics.json"), metrics | {"setting": run_setting})
    flat = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    log(f"{bench}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in flat.items())
        + (f"; wrote {', '.join(files)}" if files else "")
        + ("" if truth else " (no local ground truth: submit the files above)"))
    return metrics
