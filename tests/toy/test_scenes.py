"""The toy world's generator and tokenizer: seeded, balanced, answerable, in the LLaVA evaluation layouts."""

import filecmp
import json
import os
import re

import numpy as np
import pytest

from jaxdebias.cli.main import main as cli_main
from jaxdebias.toy import bench, data, scenes, tokenizer


def test_scene_is_a_function_of_seed_split_index():
    a, b = scenes.scene(scenes.stream(3, "train", 7)), scenes.scene(scenes.stream(3, "train", 7))
    assert a == b
    assert np.array_equal(np.asarray(scenes.render(a)), np.asarray(scenes.render(b)))
    assert scenes.scene(scenes.stream(3, "train", 8)) != a
    assert scenes.scene(scenes.stream(3, "pope", 7)) != a
    assert scenes.scene(scenes.stream(4, "train", 7)) != a


def test_scenes_cover_aspect_ratios_positions_and_objects():
    many = [scenes.scene(scenes.stream(0, "train", i)) for i in range(300)]
    ratios = {round(s.width / s.height, 2) for s in many}
    assert len(ratios) >= 8 and any(r > 1.5 for r in ratios) and any(r < 0.67 for r in ratios)
    objs = [(o, s) for s in many for o in s.objects]
    assert {o.shape for o, _ in objs} == set(scenes.SHAPES) and {o.color for o, _ in objs} == set(scenes.COLORS)
    assert sum(o.cy - o.size < 0.02 * s.height for o, s in objs) > 10  # objects reaching the top rows, too
    assert {len(s.objects) for s in many} == set(range(1, scenes.MAX_OBJECTS + 1))
    assert {s.background for s in many} == set(scenes.BACKGROUNDS)
    for s in many[:50]:  # no overlaps, all inside the image
        for i, o in enumerate(s.objects):
            assert o.size <= o.cx <= s.width - o.size and o.size <= o.cy <= s.height - o.size
            for p in s.objects[i + 1:]:
                assert np.hypot(o.cx - p.cx, o.cy - p.cy) >= o.size + p.size


def test_pope_is_balanced_and_true():
    rows, by_name = bench.pope_rows(200, seed=1)
    assert len(rows) == 200 and sum(r["label"] == "yes" for r in rows) == 100
    for name in by_name:  # one yes and one no question per image
        assert sorted(r["label"] for r in rows if r["image"] == name) == ["no", "yes"]
    assert {r["category"] for r in rows} == {"random", "adversarial"}
    for r in rows:
        s = by_name[r["image"]]
        words = re.fullmatch(r"Is there an? (.+) in the image\?", r["text"].split("\n")[0]).group(1).split()
        present = any(o.shape == words[-1] and (len(words) == 1 or o.color == words[0]) for o in s.objects)
        assert present == (r["label"] == "yes"), r
        assert r["text"].endswith("\n" + scenes.SHORT)


def test_short_answers_are_true():
    rows, answers, by_name = bench.gqa_rows(120, seed=2)
    assert len(rows) == 120 and len({r["question_id"] for r in rows}) == 120
    kinds = {r["category"] for r in rows}
    assert {"color", "count", "horizontal", "vertical"} <= kinds
    for r in rows:
        s, a, q = by_name[r["image"]], answers[r["question_id"]]["answer"], answers[r["question_id"]]["question"]
        if r["category"] == "color":
            shape = q.removeprefix("What color is the ").removesuffix("?")
            assert [o.color for o in s.objects if o.shape == shape] == [a]
        elif r["category"] == "count":
            plural = q.split()[2]
            assert scenes.NUMBERS.index(a) == sum(scenes.PLURALS[o.shape] == plural for o in s.objects)
        elif r["category"] == "horizontal":
            shape = q.split(" on the ")[0].split()[-1]
            o = [o for o in s.objects if o.shape == shape and (q.split()[2] in (shape, o.color))][0]
            assert a == ("left" if o.cx < s.width / 2 else "right")


def test_write_bench_is_deterministic_and_in_llava_layout(tmp_path):
    a = bench.write_bench(tmp_path / "a", "pope", 6, seed=5)
    b = bench.write_bench(tmp_path / "b", "pope", 6, seed=5)
    assert filecmp.cmp(os.path.join(a, "llava_pope_test.jsonl"), os.path.join(b, "llava_pope_test.jsonl"), False)
    rows = [json.loads(line) for line in open(os.path.join(a, "llava_pope_test.jsonl"))]
    assert all({"question_id", "image", "text", "label"} <= set(r) for r in rows)
    for r in rows:
        assert filecmp.cmp(os.path.join(a, "val2014", r["image"]), os.path.join(b, "val2014", r["image"]), False)
    g = bench.write_bench(tmp_path / "g", "gqa", 5, seed=5)
    rows = [json.loads(line) for line in open(os.path.join(g, "llava_gqa_testdev_balanced.jsonl"))]
    truth = json.load(open(os.path.join(g, "testdev_balanced_questions.json")))
    assert len(rows) == 5 and all(truth[str(r["question_id"])]["answer"] for r in rows)
    assert all(os.path.isfile(os.path.join(g, "images", r["image"])) for r in rows)
    assert cli_main(["toy-bench", "--out", str(tmp_path / "cli"), "--n", "2", "--bench", "gqa"]) == 0
    assert filecmp.cmp(os.path.join(tmp_path / "cli" / "gqa", "testdev_balanced_questions.json"),
                       os.path.join(bench.write_bench(tmp_path / "g2", "gqa", 2, seed=0),
                                    "testdev_balanced_questions.json"), False)
    with pytest.raises(ValueError, match="Unknown toy benchmark"):
        bench.write_bench(tmp_path / "x", "mme", 2)


def test_tokenizer_round_trips_through_transformers(tmp_path):
    from transformers import AutoTokenizer

    tok = tokenizer.build()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert tokenizer.image_token_id(loaded) == len(tok) - 1
    text = scenes.PROMPT.format(scenes.exist_question(scenes.scene(scenes.stream(0, "test", 0)),
                                                      scenes.stream(0, "test", 1), "no", True).text)
    ids = loaded(text.replace("<image>", ""), add_special_tokens=True).input_ids
    assert ids[0] == loaded.bos_token_id and loaded.unk_token_id not in ids
    assert loaded.decode([loaded.convert_tokens_to_ids("yes"), loaded.eos_token_id], skip_special_tokens=True) == "yes"


def test_training_sample_is_each_question_alone_behind_one_image():
    tok = tokenizer.build()
    image_id = tokenizer.image_token_id(tok)
    cfg = data.DataConfig(side=28, n_image=4, max_len=200, turns=4)
    img, ids, targets, weights, positions, turns, words, at_image = data.sample(tok, cfg, image_id, 0, "train", 0)
    assert words.shape == (2, 4) and ids[at_image].tolist() == [image_id] * 4
    assert img.shape == (28, 28, 3) and ids.shape == targets.shape == weights.shape == turns.shape == (200,)
    rng = scenes.stream(0, "train", 0)
    qas = scenes.questions(scenes.scene(rng), rng, 4)  # the sample's questions
    expected = [t for qa in qas for t in tok(qa.answer, add_special_tokens=False).input_ids + [tok.eos_token_id]]
    assert targets[weights > 0].tolist() == expected  # the loss is on the answers only
    mask = np.asarray(data.branch_mask(turns[None]))[0]
    for j, qa in enumerate(qas, start=1):
        alone = data.prompt_ids(tok, qa.text, 4, image_id)[0].tolist()
        alone += tok(qa.answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
        last = np.flatnonzero(turns == j)[-1]
        seen = np.flatnonzero(mask[last])  # what the question's last token attends to
        assert ids[seen].tolist() == alone and positions[seen].tolist() == list(range(len(alone)))
        assert set(turns[seen]) == {0, j}  # no other question, no padding


def test_caption_lists_objects_left_to_right():
    s = scenes.scene(scenes.stream(0, "train", 3))
    qa = scenes.caption(s)
    names = [f"{o.color} {o.shape}" for o in sorted(s.objects, key=lambda o: o.cx)]
    assert qa.answer.split(" , ") == names and qa.kind == "caption"
