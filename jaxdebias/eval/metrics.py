"""Metrics as the official scripts compute them, answer by answer. Each function names its source.

- POPE: LLaVA's ``llava/eval/eval_pope.py``.
- MME: the MME ``eval_tool/calculation.py`` (its yes/no parse, acc and acc+), fed by LLaVA's converter.
- GQA: LLaVA's ``scripts/convert_gqa_for_eval.py`` (``rstrip('.').lower()``) + the GQA ``eval.py`` exact match.
- TextVQA: LLaVA's ``llava/eval/m4c_evaluator.py`` (EvalAI answer processor, ``TextVQAAccuracyEvaluator``).
- VQAv2 / VizWiz: LLaVA's submission converters (the EvalAI answer processor) + the VQA evaluator
  (GT-Vision-Lab/VQA ``vqaEval.py``), which the evaluation servers run.
- ScienceQA: LLaVA's ``llava/eval/eval_science_qa.py``.
- MMBench: VLMEvalKit's rule-based choice extraction (``vlmeval/utils/matching_util.py``, ``can_infer``) under
  its ``exact_matching`` policy, with circular evaluation when the file holds the circular copies.

Where we cannot match (GPT-assisted choice matching, partial benchmarks) the README's eval section says what we do.
"""

from __future__ import annotations

import re
from collections import defaultdict

# --- the EvalAI / VQA answer processing (contractions, number words, articles, punctuation) ----------------------

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
# "(?!<=\d)" is a negative lookahead for the text "<=" followed by a digit (a typo for a lookbehind in the
# originals): the pattern removes every period not followed by a digit. Kept as written, like its quirks below.
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
DIGIT_COMMA_EVALAI = re.compile(r"(?<=\d)(\,)+(?=\d)")  # the EvalAI processor's
DIGIT_COMMA_VQA = re.compile(r"(\d)(\,)(\d)")  # the VQA evaluator's


def _punctuation(text: str, digit_comma: re.Pattern) -> str:
    """Each mark is deleted when it touches a space somewhere in the text (or the text has a digit comma),
    else replaced by a space; then periods not followed by a digit go. (The originals pass ``re.UNICODE`` as
    ``sub``'s count, i.e. at most 32 periods are removed.)"""
    out = text
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or digit_comma.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD.sub("", out, re.UNICODE)


def _digits_articles(text: str) -> str:
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_vqa(answer: str) -> str:
    """The EvalAI answer processor (m4c_evaluator.EvalAIAnswerProcessor): lower case, "," and "?" dropped, "'s"
    split off, punctuation removed or spaced, number words as digits, articles dropped, contractions restored."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text, DIGIT_COMMA_EVALAI))


def textvqa_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """TextVQAAccuracyEvaluator: prediction and every annotator answer through ``normalize_vqa``; the mean over
    the leave-one-annotator-out subsets of min(1, matches / 3). (The original asserts 10 answers.)"""
    if not gt_answers:
        raise ValueError("textvqa_accuracy needs at least one ground-truth answer.")
    pred, gts = normalize_vqa(prediction), [normalize_vqa(a) for a in gt_answers]
    return sum(min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))) / len(gts)


def vqa_accuracy(submitted: str, gt_answers: list[str]) -> float:
    """The VQA evaluator (vqaEval.py) on one submitted answer: newlines/tabs as spaces and stripped on both
    sides; only when the annotators disagree (more than one distinct answer) are both sides put through its
    punctuation and digit/article processing; then the mean over the leave-one-annotator-out subsets of
    min(1, matches / 3). ``submitted`` is the answer as uploaded (LLaVA's converters apply ``normalize_vqa``)."""
    if not gt_answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer.")
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in gt_answers]
    pred = submitted.replace("\n", " ").replace("\t", " ").strip()
    if len(set(gts)) > 1:
        gts = [_digits_articles(_punctuation(a, DIGIT_COMMA_VQA)) for a in gts]
        pred = _digits_articles(_punctuation(pred, DIGIT_COMMA_VQA))
    return sum(min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))) / len(gts)


# --- yes / no ---------------------------------------------------------------------------------------------------


def pope_yes_no(answer: str) -> str:
    """eval_pope.py: the text before the first '.', commas removed, split on single spaces; "no" when a word is
    exactly "No", "not" or "no", else "yes"."""
    first = answer.split(".")[0]
    words = first.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def pope_metrics(predictions: list[str], labels: list[str]) -> dict:
    """Accuracy, precision, recall, F1 and the yes ratio of parsed predictions ("yes"/"no") against labels
    (anything but "no" is a positive label, as in eval_pope.py). Where the script divides by zero (no
    predicted or no true positives) the value here is 0.0."""
    tp = fp = tn = fn = 0
    for pred, label in zip(predictions, labels, strict=True):
        positive = label != "no"
        if pred == "yes":
            tp, fp = tp + positive, fp + (not positive)
        else:
            tn, fn = tn + (not positive), fn + positive
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n, "n": n}


def mme_yes_no(answer: str) -> str:
    """calculation.py's parse of an answer as the converter writes it (lower-cased, the line's newline still
    on it): "yes" or "no" exactly, else "yes" if its first 4 characters contain "yes", else "no" if they
    contain "no", else "other"."""
    answer = answer.lower()
    if answer in ("yes", "no"):
        return answer
    return "yes" if "yes" in answer[:4] else "no" if "no" in answer[:4] else "other"


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_scores(items) -> dict:
    """``items``: (category, parsed prediction, ground truth) in the order of the answer file. As calculation.py:
    per category, acc over the questions and acc+ over consecutive pairs of its lines (an image's two questions
    in the MME files; both must be right), in percent; score = acc + acc+. Perception and cognition are the sums
    over their categories present (calculation.py needs all 14; an odd last line, which it refuses, is a pair of
    one here)."""
    by_category = defaultdict(list)
    for category, pred, truth in items:
        by_category[category].append(pred == truth.lower())
    out = {}
    for category, flags in by_category.items():
        pairs = [flags[i:i + 2] for i in range(0, len(flags), 2)]
        acc = 100 * sum(flags) / len(flags)
        acc_plus = 100 * sum(all(p) for p in pairs) / len(pairs)
        out[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    return {"perception": sum(v["score"] for c, v in out.items() if c in MME_PERCEPTION),
            "cognition": sum(v["score"] for c, v in out.items() if c in MME_COGNITION), "categories": out}


# --- options ----------------------------------------------------------------------------------------------------

SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")  # a list there: "AB" or "" is no option
_SCIENCEQA_SENTENCE = re.compile(r"The answer is ([A-Z]).")


def scienceqa_choice(answer: str, n_choices: int) -> int:
    """eval_science_qa.py: the letter when the answer is one of A-E, or starts with "X. ", or holds exactly one
    "The answer is X" + any character; the choice index if that letter is among the problem's choices, else -1
    (the script's random fallback sits after ``return -1`` and never runs)."""
    if answer in SCIENCEQA_OPTIONS:
        letter = answer
    elif len(answer) >= 3 and answer[0] in SCIENCEQA_OPTIONS and answer[1:3] == ". ":
        letter = answer[0]
    else:
        found = _SCIENCEQA_SENTENCE.findall(answer)
        letter = found[0] if len(found) == 1 else "FAILED"
    return SCIENCEQA_OPTIONS.index(letter) if letter in SCIENCEQA_OPTIONS[:n_choices] else -1


_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def _infer_option(answer: str, choices: dict):
    if "Failed to obtain answer via API" in answer:
        return None
    if any(r in answer for r in _REFUSALS):
        return "Z"
    spaced = answer
    for mark in ".()[],:;!*#{}":
        spaced = spaced.replace(mark, " ")
    words = [w.strip() for w in spaced.split()]
    named = [c for c in choices if c in words]
    if len(named) == 1:
        if words.index(named[0]) > len(words) - 5:  # the letter must be among the last four words
            return named[0]
    elif not named and "Z" in words:
        return "Z"
    m = _VERBOSE_ANSWER.search(answer)
    return m.group(1).upper() if m and m.group(1).upper() in choices else None


def _infer_text(answer: str, choices: dict):
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return None
    named = [c for c, text in choices.items() if str(text).lower() in answer]
    return named[0] if len(named) == 1 else None


def mmbench_choice(answer: str, choices: dict) -> str:
    """VLMEvalKit's ``can_infer`` under ``exact_matching``: a single option letter among the answer's words
    (marks .()[],:;!*#{} as spaces; the letter within the last four words), "Z" for a refusal or a lone "Z",
    "answer is X" anywhere; else the one option whose text the answer contains (answers at most twice the
    options' length); else "Z" (where VLMEvalKit would ask a GPT judge). ``choices``: letter -> option text."""
    return _infer_option(answer, choices) or _infer_text(answer, choices) or "Z"


def gqa_prediction(answer: str) -> str:
    """convert_gqa_for_eval.py: trailing periods stripped, lower case (GQA's eval.py then compares exactly)."""
    return answer.rstrip(".").lower()


def accuracy(flags) -> dict:
    flags = list(flags)
    return {"accuracy": sum(flags) / len(flags), "correct": int(sum(flags)), "n": len(flags)}
