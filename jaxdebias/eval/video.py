"""Video question answering in the Video-LLaVA evaluation layout: MSVD-QA, MSRVTT-QA, TGIF-QA, ActivityNet-QA.

The layout (Video-LLaVA's ``eval/GPT_Zero_Shot_QA/``; ``--data`` may be that folder or one benchmark's folder):

  bench        folder                      videos in       question / answer files
  msvd         MSVD_Zero_Shot_QA           videos/         test_q.json / test_a.json
  msrvtt       MSRVTT_Zero_Shot_QA         videos/all/     test_q.json / test_a.json
  tgif         TGIF_Zero_Shot_QA           mp4/            test_q.json / test_a.json
  activitynet  Activitynet_Zero_Shot_QA    all_test/       test_q.json / test_a.json

``test_q.json`` is a list of {"video_name", "question", "question_id"}, ``test_a.json`` the list of {"answer",
...} in the same order (Video-LLaVA's ``run_inference_video_qa.py`` pairs them by index). A video is looked up as
``<video dir>/<video_name>`` (ActivityNet names may carry or lack the ``v_`` prefix of the files).

Frames: decord / PyAV are not dependencies, so a video is read as a folder of frame images (``<video_name>/``,
sorted by file name; extract them with ``ffmpeg -i clip.mp4 <video_name>/%05d.png``) or an ``<video_name>.npy``
uint8 array [frames, height, width, 3]. Eight frames are taken uniformly (``np.linspace(0, n - 1, 8)``, as the
release's video processor does). An .mp4/.avi file alone is reported with that ffmpeg line.

Outputs, as the official scripts read them: ``merge.jsonl``, one {"id": question_id, "question", "answer",
"pred"} per line (what Video-LLaVA's inference writes and its ``eval_gpt_*`` / Video-ChatGPT's
``evaluate_activitynet_qa.py`` read); locally the exact-match accuracy (answer and prediction lower-cased,
stripped, a trailing period removed: stricter than the GPT judge, which accepts paraphrases). The GPT-judge score
(``gpt_judge``) is optional: it needs the user's own key and an OpenAI-compatible endpoint and runs only when asked.
"""

from __future__ import annotations

import ast
import json
import os
import urllib.request
from collections.abc import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxdebias import UserError
from jaxdebias.eval.files import atomic_open
from jaxdebias.eval.reading import NotFound, check_fields, read_text

FRAMES = 8
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")
# bench -> (folder in GPT_Zero_Shot_QA, video folder inside it)
LAYOUT = {"msvd": ("MSVD_Zero_Shot_QA", "videos"), "msrvtt": ("MSRVTT_Zero_Shot_QA", os.path.join("videos", "all")),
          "tgif": ("TGIF_Zero_Shot_QA", "mp4"), "activitynet": ("Activitynet_Zero_Shot_QA", "all_test")}


QUESTION_TYPES = {"video_name": (str, int), "question": (str,), "question_id": (int, str)}


def _load_json_list(path, what):
    text = read_text(path, f"The {what} file")
    try:
        data = json.loads(text)
    except RecursionError:
        raise UserError(f"{path} is nested too deeply to be a JSON list of {what}.") from None
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of {what}, got {type(data).__name__}.")
    return data


def bench_folder(data_dir: str, bench: str) -> str:
    """The benchmark's own folder: ``data_dir`` itself when it holds test_q.json, else its LAYOUT subfolder."""
    if os.path.isfile(os.path.join(data_dir, "test_q.json")):
        return data_dir
    inner = os.path.join(data_dir, LAYOUT[bench][0])
    if os.path.isfile(os.path.join(inner, "test_q.json")):
        return inner
    raise NotFound(f"No {bench} question file in {data_dir}: expected test_q.json there or in "
                   f"{LAYOUT[bench][0]}/ (Video-LLaVA's eval/GPT_Zero_Shot_QA layout).")


def read_video_qa(bench: str, data_dir: str):
    """(rows, video folder). A row: question_id, text (the question), video (name in the video folder),
    answer."""
    folder = bench_folder(data_dir, bench)
    questions = _load_json_list(os.path.join(folder, "test_q.json"), "questions")
    answers_path = os.path.join(folder, "test_a.json")
    answers = _load_json_list(answers_path, "answers") if os.path.isfile(answers_path) else None
    if answers is not None and len(answers) != len(questions):
        raise UserError(f"{answers_path} has {len(answers)} answers for {len(questions)} questions in test_q.json; "
                        "they are paired by position and must have the same length.")
    rows = []
    for i, q in enumerate(questions):
        check_fields(q, f"{folder}/test_q.json, item {i}", QUESTION_TYPES, tuple(QUESTION_TYPES))
        row = {"question_id": q["question_id"], "text": q["question"], "video": str(q["video_name"])}
        if answers is not None:
            check_fields(answers[i], f"{answers_path}, item {i}", {"answer": (str, int)}, ("answer",))
            row["answer"] = str(answers[i]["answer"])
        rows.append(row)
    return rows, os.path.join(folder, LAYOUT[bench][1])


def video_source(video_dir: str, name: str) -> str:
    """The frames folder or .npy file of a video, or UserError saying what was found instead."""
    names = [name] + ([name[2:]] if name.startswith("v_") else ["v_" + name])
    for n in names:
        base = os.path.join(video_dir, n)
        if os.path.isdir(base):
            return base
        if os.path.isfile(base + ".npy"):
            return base + ".npy"
    for n in names:
        for suffix in VIDEO_SUFFIXES:
            if os.path.isfile(os.path.join(video_dir, n + suffix)):
                raise UserError(f"Video {n + suffix} in {video_dir} needs a video decoder, which jaxdebias does not "
                                f"depend on. Extract its frames: mkdir {os.path.join(video_dir, n)} && ffmpeg -i "
                                f"{os.path.join(video_dir, n + suffix)} {os.path.join(video_dir, n, '%05d.png')}")
    raise UserError(f"Video {name} is missing from {video_dir} (expected a folder of frames {name}/ or {name}.npy).")


def frame_indices(total: int, frames: int = FRAMES) -> np.ndarray:
    """``frames`` indices spread uniformly over ``total`` (the release's ``np.linspace(0, total - 1, frames)``)."""
    if total < 1:
        raise UserError("A video without frames cannot be answered.")
    return np.linspace(0, total - 1, frames).astype(int)


def read_frames(source: str, frames: int = FRAMES) -> list[Image.Image]:
    """``frames`` RGB frames sampled uniformly from a frames folder or an .npy array [F, H, W, 3] (uint8)."""
    if source.endswith(".npy"):
        try:
            arr = np.load(source, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise UserError(f"Video {source} cannot be read ({e}).") from None
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise UserError(f"Video {source} must be uint8 [frames, height, width, 3], got {arr.dtype} "
                            f"{list(arr.shape)}.")
        return [Image.fromarray(np.asarray(arr[i])) for i in frame_indices(len(arr), frames)]
    files = sorted(f for f in os.listdir(source) if f.lower().endswith(FRAME_SUFFIXES))
    if not files:
        raise UserError(f"Video folder {source} holds no frame images ({', '.join(FRAME_SUFFIXES)}).")
    out = []
    for i in frame_indices(len(files), frames):
        path = os.path.join(source, files[i])
        try:
            with Image.open(path) as image:
                out.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise UserError(f"Frame {path} cannot be read ({e.__class__.__name__}: {e}).") from None
    return out


# --- scores and the official files -------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    text = str(text).strip().lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def exact_match(rows, answers) -> dict:
    hits = [normalize_answer(a) == normalize_answer(r["answer"]) for r, a in zip(rows, answers)]
    return {"exact_match": sum(hits) / len(hits), "n": len(hits)}


def prediction_lines(rows, answers) -> list[dict]:
    """Video-LLaVA's inference output, one dict per question: id, question, answer, pred."""
    return [{"id": r["question_id"], "question": r["text"], "answer": r.get("answer", ""), "pred": a}
            for r, a in zip(rows, answers)]


def export_predictions(rows, answers, out_dir) -> list[str]:
    path = os.path.join(out_dir, "merge.jsonl")
    with atomic_open(path) as f:
        f.writelines(json.dumps(line) + "\n" for line in prediction_lines(rows, answers))
    return [path]


# --- the optional GPT judge (Video-ChatGPT's evaluate_activitynet_qa.py, which Video-LLaVA's eval_gpt_* run) -----

JUDGE_SYSTEM = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for question-answer "
    "pairs. Your task is to compare the predicted answer with the correct answer and determine if they match "
    "meaningfully. Here's how you can accomplish the task:------##INSTRUCTIONS: - Focus on the meaningful match "
    "between the predicted answer and the correct answer.\n- Consider synonyms or paraphrases as valid matches.\n- "
    "Evaluate the correctness of the prediction compared to the answer.")
JUDGE_USER = (
    "Please evaluate the following video-based question-answer pair:\n\nQuestion: {question}\nCorrect Answer: "
    "{answer}\nPredicted Answer: {pred}\n\nProvide your evaluation only as a yes/no and score where the score is an "
    "integer value between 0 and 5, with 5 indicating the highest meaningful match. Please generate the response in "
    "the form of a Python dictionary string with keys 'pred' and 'score', where value of 'pred' is  a string of "
    "'yes' or 'no' and value of 'score' is in INTEGER, not STRING.DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR "
    "EXPLANATION. Only provide the Python dictionary string. For example, your response should look like this: "
    "{{'pred': 'yes', 'score': 4.8}}.")
JUDGE_MODEL = "gpt-3.5-turbo"


def judge_messages(question: str, answer: str, pred: str) -> list[dict]:
    """The official judge prompt for one question-answer pair (chat messages)."""
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_USER.format(question=question, answer=answer, pred=pred)}]


def http_client(api_key: str, base_url: str = "https://api.openai.com/v1", timeout: float = 60.0) -> Callable:
    """complete(messages, model) -> reply text, over an OpenAI-compatible ``/chat/completions`` endpoint."""
    if not api_key:
        raise UserError("The GPT judge needs an API key: set OPENAI_API_KEY (or pass --judge-key).")

    def complete(messages, model):
        body = json.dumps({"model": model, "messages": messages}).encode()
        request = urllib.request.Request(base_url.rstrip("/") + "/chat/completions", data=body, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {api_key}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)["choices"][0]["message"]["content"]

    return complete


def gpt_judge(lines: list[dict], complete: Callable, model: str = JUDGE_MODEL, log=print) -> dict:
    """Judges prediction lines ({question, answer, pred}) with ``complete(messages, model)``, as the official
    script: the reply is a Python dict literal {'pred': 'yes'|'no', 'score': n}; a verdict containing "yes" counts
    yes, else one containing "no" counts no; accuracy = yes / (yes + no); score = mean of int(score) over the
    judged pairs. A reply that does not parse is reported and left out (the script retries
    it until it parses)."""
    yes = no = 0
    total, failed, judged = 0.0, [], []
    for line in lines:
        reply = complete(judge_messages(line["question"], line["answer"], line["pred"]), model)
        try:
            verdict = ast.literal_eval(str(reply).strip())
            pred, score = str(verdict["pred"]).lower(), int(verdict["score"])  # the script's int(): 4.8 -> 4
        except (ValueError, SyntaxError, KeyError, TypeError):
            failed.append(line.get("id"))
            continue
        yes, no = yes + ("yes" in pred), no + ("yes" not in pred and "no" in pred)
        total += score
        judged.append({**line, "judge": {"pred": pred, "score": score}})
    if failed:
        log(f"GPT judge: {len(failed)} replies did not parse (ids {failed[:8]}); rerun to judge them")
    n = len(judged)
    return {"gpt_accuracy": yes / (yes + no) if yes + no else None, "gpt_score": total / n if n else None,
            "judged": n, "unparsed": len(failed), "model": model, "lines": judged}
