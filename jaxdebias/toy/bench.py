"""Generated benchmark folders of the toy world in the layouts ``jaxdebias eval`` reads (POPE, GQA):
``jaxdebias toy-bench --out DIR --n N``. Everything is a function of (seed, split, index), as in ``scenes``."""

from __future__ import annotations

import dataclasses
import json
import os

from jaxdebias.toy.scenes import exist_question, other_questions, render, scene, stream

def _save(image, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, format="PNG", optimize=False)


def pope_rows(n: int, seed: int, split: str = "pope"):
    """(rows, scenes by image name) for ``n`` POPE questions: per image one "yes" and one "no" question
    (exactly balanced), alternately the plain shape form (category "random") and the colour form
    ("adversarial")."""
    rows, scenes = [], {}
    for i in range((n + 1) // 2):
        rng = stream(seed, split, i)
        s = scene(rng)
        name = f"toy_{split}_{i:06d}.png"
        scenes[name] = s
        adversarial = bool(i % 2)
        for answer in ("yes", "no"):
            if len(rows) == n:
                break
            qa = exist_question(s, rng, answer, adversarial)
            rows.append({"question_id": len(rows), "image": name, "text": qa.text, "label": qa.answer,
                         "category": "adversarial" if adversarial else "random"})
    return rows, scenes


def gqa_rows(n: int, seed: int, split: str = "gqa"):
    """(rows, answers by question id, scenes by image name) for ``n`` GQA-style short-answer questions (colour,
    count, position), two per image where the scene has two."""
    rows, answers, scenes = [], {}, {}
    i = 0
    while len(rows) < n:
        rng = stream(seed, split, i)
        s = scene(rng)
        name = f"toy_{split}_{i:06d}.png"
        scenes[name] = s
        pool = other_questions(s)
        for j in rng.permutation(len(pool))[:2]:
            if len(rows) == n:
                break
            qa = pool[j]
            qid = f"{i:06d}{j:02d}"
            rows.append({"question_id": qid, "image": name, "text": qa.text, "category": qa.kind})
            answers[qid] = {"question": qa.question, "answer": qa.answer, "imageId": name[:-4], "types": {
                "detailed": qa.kind}}
        i += 1
    return rows, answers, scenes


def write_bench(out_dir, kind: str, n: int, seed: int = 0) -> str:
    """Writes a benchmark folder in the layout ``jaxdebias eval --bench <kind>`` reads and returns its path.

    pope: ``llava_pope_test.jsonl`` (question_id, image, text, label, category) + ``val2014/*.png``;
    gqa: ``llava_gqa_testdev_balanced.jsonl`` (question_id, image, text, category) +
    ``testdev_balanced_questions.json`` ({question_id: {"answer", ...}}) + ``images/*.png``.
    """
    if n <= 0:
        raise ValueError(f"n must be a positive number of questions, got {n}.")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if kind == "pope":
        rows, scenes = pope_rows(n, seed)
        qfile, image_dir = "llava_pope_test.jsonl", "val2014"
    elif kind == "gqa":
        rows, answers, scenes = gqa_rows(n, seed)
        qfile, image_dir = "llava_gqa_testdev_balanced.jsonl", "images"
        with open(os.path.join(out_dir, "testdev_balanced_questions.json"), "w") as f:
            json.dump(answers, f, indent=1)
    else:
        raise ValueError(f"Unknown toy benchmark {kind!r}; expected 'pope' or 'gqa'.")
    for name, s in scenes.items():
        _save(render(s), os.path.join(out_dir, image_dir, name))
    with open(os.path.join(out_dir, qfile), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(out_dir, "scenes.json"), "w") as f:  # ground truth of every image, for analysis
        json.dump({k: dataclasses.asdict(v) for k, v in scenes.items()}, f)
    return out_dir
