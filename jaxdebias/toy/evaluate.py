"""Answers and accuracy of a toy model on generated questions (in memory; ``write_bench`` + ``jaxdebias eval``
runs the same questions from disk through the CLI).

An answer is the model's greedy next word after the prompt (every toy answer is one word followed by ``</s>``).
"""

from __future__ import annotations

import numpy as np

from jaxdebias.toy import bench, data, model as toy_model, scenes


def prompts(model, tok, items):
    """Right-padded single-turn prompts for (PIL image, question text) items: (ids int32[B, T], pixels
    float32[B, 3, S, S], mask bool[B, T], instruction positions int32[B], sizes int32[B, 2] (width, height))."""
    n, side, image_id = model.cfg.vision.num_features, model.cfg.vision.image_size, model.cfg.image_token_id
    encoded = [data.prompt_ids(tok, text, n, image_id) for _, text in items]
    T = max(len(ids) for ids, _ in encoded)
    ids = np.full((len(items), T), tok.pad_token_id, np.int32)
    for b, (row, _) in enumerate(encoded):
        ids[b, :len(row)] = row
    px = np.stack([data.pixel_values(image, side) for image, _ in items])
    sizes = np.asarray([image.size for image, _ in items], np.int32)
    return ids, px, ids != tok.pad_token_id, np.asarray([p for _, p in encoded], np.int32), sizes


def answer(model, tok, items, batch_size: int = 8) -> list[str]:
    """The model's one-word answers to (PIL image, question text) items, in batches of ``batch_size`` (the last
    batch padded by repetition, so every batch has one shape)."""
    out = []
    for lo in range(0, len(items), batch_size):
        chunk = list(items[lo:lo + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)
        ids, px, am, _, _ = prompts(model, tok, chunk)
        best = toy_model.answer_logits(model, ids, px, am).argmax(-1)[:real]
        out += [tok.decode([int(t)], skip_special_tokens=True) for t in best]
    return out


def yes_no_set(n: int, seed: int = 0, split: str = "test"):
    """``n`` POPE-style questions (exactly half "yes"): [(PIL image, text, label)]."""
    rows, scenes_by_name = bench.pope_rows(n, seed, split)
    images = {name: scenes.render(s) for name, s in scenes_by_name.items()}
    return [(images[r["image"]], r["text"], r["label"]) for r in rows]


def short_answer_set(n: int, seed: int = 0, split: str = "heldout"):
    """``n`` colour / count / position questions: [(PIL image, text, answer, kind)]."""
    rows, answers, scenes_by_name = bench.gqa_rows(n, seed, split)
    images = {name: scenes.render(s) for name, s in scenes_by_name.items()}
    return [(images[r["image"]], r["text"], answers[r["question_id"]]["answer"], r["category"]) for r in rows]


def heldout(model, tok, n: int = 200, seed: int = 0, batch_size: int = 8) -> dict:
    """Accuracy on ``n`` held-out questions (half yes/no existence, half short answers), by kind and overall."""
    yn = yes_no_set(n // 2, seed, "heldout")
    sa = short_answer_set(n - n // 2, seed, "heldout")
    items = [(im, t) for im, t, _ in yn] + [(im, t) for im, t, _, _ in sa]
    truth = [(a, "exist") for _, _, a in yn] + [(a, k) for _, _, a, k in sa]
    got = answer(model, tok, items, batch_size)
    report: dict = {}
    for (a, kind), g in zip(truth, got):
        for key in (kind, "all"):
            r = report.setdefault(key, {"correct": 0, "n": 0})
            r["correct"] += int(g == a)
            r["n"] += 1
    for r in report.values():
        r["accuracy"] = r["correct"] / r["n"]
    return report
