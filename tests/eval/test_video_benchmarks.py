"""The video benchmarks in Video-LLaVA's layout: readers, frames, exact match, the official prediction lines and
the optional GPT judge (with a fake client: no key, no network)."""

import json

import numpy as np
import pytest
from PIL import Image

from jaxdebias import UserError
from jaxdebias.eval import benchmarks, video


def write_video_bench(root, bench="msvd", videos=(("clip_a", "frames", 10), ("clip_b", "npy", 5)),
                      answers=("dog", "running")):
    """A tiny benchmark folder: GPT_Zero_Shot_QA/<bench folder>/test_q.json, test_a.json and its video folder
    with each video as a frames folder (PNG) or an .npy array. Returns the GPT_Zero_Shot_QA root."""
    folder, sub = video.LAYOUT[bench]
    base = root / "GPT_Zero_Shot_QA" / folder
    vdir = base / sub
    vdir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, kind, n in videos:
        frames = rng.integers(0, 255, (n, 30, 40, 3), dtype=np.uint8)
        frames[:, :, :, 0] = np.arange(n)[:, None, None] * 20  # frame i is recognisable by its red channel
        if kind == "npy":
            np.save(vdir / f"{name}.npy", frames)
        else:
            (vdir / name).mkdir()
            for i, f in enumerate(frames):
                Image.fromarray(f).save(vdir / name / f"{i:05d}.png")
    questions = [{"video_name": name, "question": f"what is in {name}?", "question_id": f"q{i}"}
                 for i, (name, _, _) in enumerate(videos)]
    (base / "test_q.json").write_text(json.dumps(questions))
    (base / "test_a.json").write_text(json.dumps([{"answer": a, "question_id": f"q{i}"}
                                                  for i, a in enumerate(answers)]))
    return root / "GPT_Zero_Shot_QA"


@pytest.mark.parametrize("bench", sorted(video.LAYOUT))
def test_each_layout_reads_from_the_root_or_its_own_folder(tmp_path, bench):
    root = write_video_bench(tmp_path, bench)
    rows, vdir = benchmarks.get(bench).read(str(root))
    assert [r["video"] for r in rows] == ["clip_a", "clip_b"] and rows[1]["answer"] == "running"
    assert rows[0]["text"] == "what is in clip_a?" and rows[0]["question_id"] == "q0"
    again, vdir2 = benchmarks.get(bench).read(str(root / video.LAYOUT[bench][0]))
    assert again == rows and vdir == vdir2 and vdir.endswith(video.LAYOUT[bench][1])


def test_frames_are_sampled_uniformly_from_folders_and_npy(tmp_path):
    root = write_video_bench(tmp_path)
    rows, vdir = benchmarks.get("msvd").read(str(root))
    frames = video.read_frames(video.video_source(vdir, "clip_a"))
    assert len(frames) == 8 and frames[0].size == (40, 30)
    picked = [int(np.asarray(f)[0, 0, 0]) // 20 for f in frames]
    assert picked == np.linspace(0, 9, 8).astype(int).tolist()  # frames 0, 1, 2, 3, 5, 6, 7, 9
    short = video.read_frames(video.video_source(vdir, "clip_b"))  # 5 frames: some repeat
    assert [int(np.asarray(f)[0, 0, 0]) // 20 for f in short] == [0, 0, 1, 1, 2, 2, 3, 4]


def test_video_errors_say_what_to_do(tmp_path):
    root = write_video_bench(tmp_path, "activitynet", videos=(("v_abc", "frames", 3), ("xyz", "npy", 3)))
    _, vdir = benchmarks.get("activitynet").read(str(root))
    assert video.video_source(vdir, "abc").endswith("v_abc")  # the v_ prefix of ActivityNet's files
    assert video.video_source(vdir, "v_xyz").endswith("xyz.npy")
    (tmp_path / "mp4only").mkdir()
    (tmp_path / "mp4only" / "c.mp4").write_bytes(b"\x00")
    with pytest.raises(UserError, match="ffmpeg -i"):
        video.video_source(str(tmp_path / "mp4only"), "c")
    with pytest.raises(UserError, match="missing"):
        video.video_source(vdir, "nope")
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((4, 8, 8), np.float32))
    with pytest.raises(UserError, match="uint8"):
        video.read_frames(str(bad))
    folder = root / video.LAYOUT["activitynet"][0]
    (folder / "test_a.json").write_text(json.dumps([{"answer": "x"}]))
    with pytest.raises(UserError, match="1 answers for 2 questions"):
        video.read_video_qa("activitynet", str(root))
    with pytest.raises(UserError, match="test_q.json"):
        video.read_video_qa("msvd", str(tmp_path))


def test_exact_match_and_the_official_prediction_lines(tmp_path):
    rows = [{"question_id": 7, "text": "what?", "answer": "Dog"}, {"question_id": 8, "text": "who?", "answer": "man"},
            {"question_id": 9, "text": "how?", "answer": "run"}]
    answers = ["dog.", " Man ", "a man runs"]
    assert video.exact_match(rows, answers) == {"exact_match": 2 / 3, "n": 3}
    [path] = video.export_predictions(rows, answers, str(tmp_path))
    lines = [json.loads(x) for x in open(path)]
    assert path.endswith("merge.jsonl")
    assert lines[0] == {"id": 7, "question": "what?", "answer": "Dog", "pred": "dog."}


def test_gpt_judge_with_a_fake_client():
    lines = [{"id": 1, "question": "what?", "answer": "dog", "pred": "a dog"},
             {"id": 2, "question": "who?", "answer": "man", "pred": "a woman"},
             {"id": 3, "question": "how?", "answer": "run", "pred": "walk"}]
    seen = []

    def fake(messages, model):
        seen.append((messages, model))
        user = messages[1]["content"]
        if "Predicted Answer: a dog\n" in user:
            return "{'pred': 'yes', 'score': 4.8}"
        if "a woman" in user:
            return "{'pred': 'no', 'score': 1}"
        return "I think it is wrong"  # does not parse: reported, left out

    logs = []
    out = video.gpt_judge(lines, fake, log=logs.append)
    assert out["gpt_accuracy"] == 0.5 and out["gpt_score"] == (4 + 1) / 2  # int(4.8) = 4, as the script
    assert out["judged"] == 2 and out["unparsed"] == 1 and "did not parse" in logs[0]
    messages, model = seen[0]
    assert model == "gpt-3.5-turbo" and messages[0]["role"] == "system"
    assert messages[0]["content"].startswith("You are an intelligent chatbot designed for evaluating the correctness")
    assert messages[1]["content"].startswith("Please evaluate the following video-based question-answer pair:\n\n"
                                             "Question: what?\nCorrect Answer: dog\nPredicted Answer: a dog\n\n")
    assert messages[1]["content"].endswith("{'pred': 'yes', 'score': 4.8}.")
    with pytest.raises(UserError, match="OPENAI_API_KEY"):
        video.http_client("")
