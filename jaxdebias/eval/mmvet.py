"""MM-Vet's GPT-4 grader, as its official evaluator runs it, with the chat endpoint injected.

Source: yuweihao/MM-Vet@acde843:mm-vet_evaluator.py (and the .ipynb it was written from). Per question, one user
message: the few-shot prompt (``PROMPT``), a blank line, then the question's row of the table with its last cell
empty: ``"{question} | {ground truth} | {prediction} | "`` (``<AND>`` / ``<OR>`` in the ground truth spaced out).
GPT-4 (``gpt-4-0613``, ``max_tokens=3``, temperature 0) completes the cell. The reply's first space-separated
word, stripped, must parse as a float in [0, 1]; otherwise the question is asked again with ``"\\nPredict the
correctness of the answer (digit): "`` appended, at temperatures 0, 0.5, 1.0, 1.5, 2.0; after the fifth retry
the score is 0.0 (that last reply is not read). Capability c's score is the sum of the scores of the questions
that need c over their number, in percent; a capability integration (the exact set a question needs) likewise;
the total is the mean over all questions. With several runs (the paper: 5) each is averaged over the runs,
rounded to one decimal (numpy's rounding), with the population std and the per-run totals.

``complete(messages, model, temperature=..., max_tokens=...) -> reply text`` is any chat endpoint;
``http_client`` builds one over an OpenAI-compatible ``/chat/completions`` with the user's key.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable

import numpy as np

from jaxdebias import UserError

GRADER_MODEL = "gpt-4-0613"
MAX_TOKENS = 3
RETRIES = 5  # re-asks after the first reply; the score is 0.0 when none of the first five replies parses
RETRY_SUFFIX = "\nPredict the correctness of the answer (digit): "
DECIMALS = 1

_INSTRUCTION = (
    "Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. "
    "<AND> in the ground truth means it is totally right only when all elements in the ground truth are present "
    "in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in "
    "the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, "
    "or 1.0 (totally right). Just complete the last space of the correctness score.")
_MEME = ("This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. "
         "Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered "
         "in ice and snow. The meme is saying that the person has trust issues because the names of these countries "
         "do not accurately represent their landscapes.")
# The few-shot rows (question, ground truth, prediction, correctness), as the official prompt lists them.
_EXAMPLES = (
    ("What is x in the equation?", "-1 <AND> -5", "x = 3", "0.0"),
    ("What is x in the equation?", "-1 <AND> -5", "x = -1", "0.5"),
    ("What is x in the equation?", "-1 <AND> -5", "x = -5", "0.5"),
    ("What is x in the equation?", "-1 <AND> -5", "x = -5 or 5", "0.5"),
    ("What is x in the equation?", "-1 <AND> -5", "x = -1 or x = -5", "1.0"),
    ("Can you explain this meme?", _MEME, "The meme talks about Iceland and Greenland. It's pointing out that "
     "despite their names, Iceland is not very icy and Greenland isn't very green.", "0.4"),
    ("Can you explain this meme?", _MEME, "The meme is using humor to point out the misleading nature of Iceland's "
     "and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered "
     "in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these "
     "contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected "
     "contrast between the names of the countries and their actual physical characteristics.", "1.0"),
)
PROMPT = (_INSTRUCTION + "\n\nQuestion | Ground truth | Prediction | Correctness\n--- | --- | --- | ---\n"
          + "".join(" | ".join(row) + "\n" for row in _EXAMPLES))


def grader_messages(question: str, answer: str, prediction: str, retry: bool = False) -> list[dict]:
    """The one user message that asks for a correctness score (``retry``: the re-ask's, with the digit hint)."""
    truth = answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    content = PROMPT + "\n" + " | ".join([question, truth, prediction, ""]) + (RETRY_SUFFIX if retry else "")
    return [{"role": "user", "content": content}]


def parse_score(reply) -> float | None:
    """The score in a grader reply, or None where the official evaluator asks again: the first space-separated
    word, stripped, as a float in [0, 1] ("0.5", "1.0\\n", "0.7 because" parse; "Score: 0.5", " 0.5", "1.5"
    do not). Like the official ``float()`` it accepts "nan", which would make the averages nan."""
    try:
        score = float(reply.split(" ")[0].strip())
    except (AttributeError, ValueError):
        return None
    return None if score > 1.0 or score < 0.0 else score


def grade(question: str, answer: str, prediction: str, complete: Callable, model: str = GRADER_MODEL):
    """One question graded as the official evaluator does: (score in [0, 1], the reply it kept: the parsed word,
    or the last raw reply when it gave up at 0.0)."""
    reply = complete(grader_messages(question, answer, prediction), model, temperature=0.0, max_tokens=MAX_TOKENS)
    temperature, tries = 0.0, 1
    while True:
        score = parse_score(reply)
        if score is not None:
            return score, reply.split(" ")[0].strip()
        reply = complete(grader_messages(question, answer, prediction, retry=True), model, temperature=temperature,
                         max_tokens=MAX_TOKENS)
        tries, temperature = tries + 1, temperature + 0.5
        if tries > RETRIES:
            return 0.0, reply


def aggregate(scores: dict, capabilities: dict, decimals: int = DECIMALS) -> dict:
    """The official per-capability and per-integration scores.

    Args:
      scores: question key -> [score of each run] (floats in [0, 1], every list the same length R).
      capabilities: question key -> its capability list (mm-vet.json's "capability"), for exactly the graded
        questions, in mm-vet.json's order.

    Returns:
      {"total": %, "std": population std of the per-run totals, "runs": [total of each run],
       "capabilities": {capability: %} (most frequent first), "integrations": {"rec_ocr": %, ...} (most frequent
       first; named by joining the capabilities in their mm-vet.json order: the official joins a Python set, whose
       order varies between runs), "questions": graded questions}; every % rounded to ``decimals``.
    """
    if set(scores) != set(capabilities) or not scores:
        raise ValueError("aggregate needs a score list for every question in capabilities, and at least one.")
    runs = len(next(iter(scores.values())))
    counter, integrations = Counter(), {}  # integrations: frozenset -> [capabilities in first-seen order, count]
    for caps in capabilities.values():
        caps = tuple(dict.fromkeys(caps))
        counter.update(caps)
        integrations.setdefault(frozenset(caps), [caps, 0])[1] += 1
    by_capability = {c: np.zeros(runs) for c, _ in counter.most_common()}
    by_integration = {s: np.zeros(runs) for s in integrations}
    total = np.zeros(runs)
    for key, caps in capabilities.items():
        run_scores = np.asarray(scores[key], np.float64)
        for c in set(caps):
            by_capability[c] += run_scores
        by_integration[frozenset(caps)] += run_scores
        total += run_scores

    def percent(summed, count):  # the mean over the runs of each run's percentage, rounded as numpy rounds
        return float(np.round((summed / count * 100).mean(), decimals))

    total_pct = total / len(capabilities) * 100
    order = np.argsort(-np.array([count for _, count in integrations.values()]), kind="stable")
    sets = list(integrations)
    return {"total": percent(total, len(capabilities)), "std": float(np.round(total_pct.std(), decimals)),
            "runs": [float(x) for x in np.round(total_pct, decimals)],
            "capabilities": {c: percent(v, counter[c]) for c, v in by_capability.items()},
            "integrations": {"_".join(integrations[sets[i]][0]): percent(by_integration[sets[i]],
                                                                         integrations[sets[i]][1]) for i in order},
            "questions": len(capabilities)}


def http_client(api_key: str, base_url: str = "https://api.openai.com/v1", timeout: float = 60.0,
                rate_limit_wait: float = 30.0, rate_limit_tries: int = 20, sleep=time.sleep) -> Callable:
    """complete(messages, model, temperature, max_tokens) -> reply text over an OpenAI-compatible
    ``/chat/completions``. A rate-limited request (HTTP 429) waits ``rate_limit_wait`` s and is sent again, as the
    official evaluator does (it waits forever; here ``rate_limit_tries`` times); other failures are UserErrors.
    (``jaxdebias.eval.video.http_client`` sends neither temperature nor max_tokens, which this grading fixes.)"""
    if not api_key:
        raise UserError("MM-Vet grading needs an OpenAI API key: set OPENAI_API_KEY or pass --api-key.")

    def complete(messages, model, temperature: float = 0.0, max_tokens: int = MAX_TOKENS):
        body = json.dumps({"model": model, "messages": messages, "temperature": temperature,
                           "max_tokens": max_tokens}).encode()
        url = base_url.rstrip("/") + "/chat/completions"
        for _ in range(rate_limit_tries):
            request = urllib.request.Request(url, data=body, headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {api_key}"})
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    return json.load(response)["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as e:
                if e.code != 429:
                    raise UserError(f"{url} answered HTTP {e.code} ({e.read()[:300].decode(errors='replace')}); "
                                    "check the key, the model name and --url.") from None
                sleep(rate_limit_wait)
            except (urllib.error.URLError, TimeoutError, KeyError, IndexError, ValueError) as e:
                raise UserError(f"{url} could not be used ({e.__class__.__name__}: {e}); check the network and "
                                "--url. Grades so far are saved: rerun to continue.") from None
        raise UserError(f"{url} kept rate-limiting after {rate_limit_tries} tries {rate_limit_wait:.0f} s apart; "
                        "rerun later to continue (grades so far are saved).")

    return complete
