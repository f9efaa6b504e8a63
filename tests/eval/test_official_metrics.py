"""Our metrics equal the official scoring scripts' rules, answer by answer.

For each benchmark a table of crafted answers exercises every rule of its script (several sentences, leading and
trailing punctuation, "not", numbers in words, options written out as text, ...). The reference beside each is a
plain re-statement of the script's rule, written here from the script's text (sources in each docstring), not a
call into jaxdebias; the benchmark's ``score`` (and, for MME, the file we export) must agree with it.
"""

import re

import pytest

from jaxdebias.eval import benchmarks, metrics

# --- POPE: haotian-liu/LLaVA llava/eval/eval_pope.py ------------------------------------------------------------


def pope_reference(text):
    """eval_pope: keep the text before the first '.', delete ',', split on ' '; 'No'/'not'/'no' -> no."""
    if text.find(".") != -1:
        text = text[:text.find(".")]
    for word in text.replace(",", "").split(" "):
        if word == "No" or word == "not" or word == "no":
            return "no"
    return "yes"


def pope_scores_reference(predictions, labels):
    pairs = list(zip(predictions, labels))
    tp, fp = pairs.count(("yes", "yes")), pairs.count(("yes", "no"))
    tn, fn = pairs.count(("no", "no")), pairs.count(("no", "yes"))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return {"accuracy": (tp + tn) / len(labels), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall), "yes_ratio": predictions.count("yes") / len(labels)}


POPE = [  # (answer, label, category, what the official parse says)
    ("Yes. There is no dog in it.", "yes", "random", "yes"),  # only the first sentence counts
    ("No, there is not.", "no", "random", "no"),
    ("There is not a dog", "yes", "random", "no"),
    ("Yes, there is a dog in the image.", "yes", "random", "yes"),
    ("no", "no", "popular", "no"),
    ("NO", "no", "popular", "yes"),  # only "No", "no", "not" match
    ("No.", "no", "popular", "no"),
    ("Not really", "no", "popular", "yes"),  # "Not" is not "not"
    ("Yes,no", "yes", "popular", "yes"),  # the comma goes, leaving one word "Yesno"
    ("no,", "yes", "adversarial", "no"),
    ("I see no dog", "yes", "adversarial", "no"),
    ("Yes\nNo", "yes", "adversarial", "yes"),  # split on single spaces: "Yes\nNo" is one word
    ("", "no", "adversarial", "yes"),
    (".No", "no", "adversarial", "yes"),  # an empty first sentence
    ("The answer is: no", "no", "random", "no"),
    ("no  dog", "no", "random", "no"),  # double space: an empty word, and "no"
    ("There are 2.5 dogs, not one", "yes", "random", "yes"),  # cut at "2"
]


def test_pope_parse_and_metrics_equal_eval_pope():
    for answer, _, _, expected in POPE:
        assert pope_reference(answer) == expected, answer
        assert metrics.pope_yes_no(answer) == expected, answer
    rows = [{"question_id": i, "label": label, "category": cat} for i, (_, label, cat, _) in enumerate(POPE)]
    got = benchmarks.get("pope").score(rows, [a for a, _, _, _ in POPE])
    predictions = [pope_reference(a) for a, _, _, _ in POPE]
    for key, value in pope_scores_reference(predictions, [r["label"] for r in rows]).items():
        assert got[key] == pytest.approx(value), key
    for cat in ("adversarial", "popular", "random"):  # eval_pope.py scores each category file on its own
        idx = [i for i, r in enumerate(rows) if r["category"] == cat]
        want = pope_scores_reference([predictions[i] for i in idx], [rows[i]["label"] for i in idx])
        assert got["categories"][cat] == pytest.approx(want | {"n": len(idx)})
    assert got["f1_mean_over_categories"] == pytest.approx(
        sum(got["categories"][c]["f1"] for c in ("adversarial", "popular", "random")) / 3)


# --- MME: the MME eval_tool calculation.py, fed by LLaVA's convert_answer_to_mme.py --------------------------------


def mme_calculation_reference(folder, categories):
    """calculation.py on a folder of "<category>.txt": per line img, question, gt, answer (split on tabs, the
    answer keeping the line's newline), lower-cased; an answer is "yes"/"no" exactly, else whichever of yes/no its
    first 4 characters hold (yes first), else other; lines taken two by two (an image's pair); score = 100 * acc
    + 100 * acc+ (both of a pair right)."""
    scores = {}
    for category in categories:
        with open(folder / f"{category}.txt") as f:
            lines = f.readlines()
        right, pairs_right = [], 0
        for start in range(0, len(lines), 2):
            pair_ok = True
            for line in lines[start:start + 2]:
                _, _, gt, answer = line.split("\t")
                answer = answer.lower()
                if answer in ["yes", "no"]:
                    parsed = answer
                elif "yes" in answer[:4]:
                    parsed = "yes"
                elif "no" in answer[:4]:
                    parsed = "no"
                else:
                    parsed = "other"
                right.append(parsed == gt.lower())
                pair_ok = pair_ok and right[-1]
            pairs_right += pair_ok
        scores[category] = 100 * sum(right) / len(right) + 100 * pairs_right / (len(lines) // 2)
    return scores


MME = [  # (category, image, truth, answer)
    ("existence", "1.jpg", "Yes", "Yes"), ("existence", "1.jpg", "No", "No"),
    ("existence", "2.jpg", "Yes", "yes, it is"), ("existence", "2.jpg", "No", "no."),
    ("existence", "3.jpg", "Yes", "  yes"), ("existence", "3.jpg", "No", "Not sure"),  # "  ye": other; "not ": no
    ("count", "4.jpg", "Yes", "Yes\nNo"), ("count", "4.jpg", "No", "It is no"),  # newline -> space; "it i": other
    ("count", "5.jpg", "Yes", "\tyes"), ("count", "5.jpg", "No", "nope"),  # tab -> space: " yes"; "nope": no
    ("count", "6.jpg", "Yes", "YES!"), ("count", "6.jpg", "No", ""),
    ("code_reasoning", "7.png", "No", "none"), ("code_reasoning", "7.png", "Yes", "yesno"),
    ("code_reasoning", "8.png", "No", "n/a"), ("code_reasoning", "8.png", "Yes", "Yes."),
]


def test_mme_scores_equal_calculation_on_the_exported_files(tmp_path):
    rows = [{"question_id": f"{cat}/{img}", "category": cat, "text": f"Question {i}? Please answer yes or no.",
             "answer": truth} for i, (cat, img, truth, _) in enumerate(MME)]
    answers = [a for *_, a in MME]
    got = benchmarks.get("mme").score(rows, answers)
    benchmarks.get("mme").export(rows, answers, str(tmp_path))
    want = mme_calculation_reference(tmp_path / "mme_eval_tool", ["existence", "count", "code_reasoning"])
    for category, score in want.items():
        assert got["categories"][category]["score"] == pytest.approx(score), category
    assert got["perception"] == pytest.approx(want["existence"] + want["count"])
    assert got["cognition"] == pytest.approx(want["code_reasoning"])
    assert [metrics.mme_yes_no(a.replace("\n", " ").replace("\t", " ")) for a in answers[:6]] == [
        "yes", "no", "yes", "no", "other", "no"]


# --- GQA: LLaVA scripts/convert_gqa_for_eval.py + GQA eval.py (exact match) ----------------------------------------

GQA = [("Yes.", "yes", True), ("yes", "yes", True), ("Left..", "left", True), ("left side", "left", False),
       ("LEFT", "left", True), (" left", "left", False), ("red.", "red", True), ("The red one.", "red", False),
       ("no", "yes", False), ("2", "two", False), ("t-shirt.", "t-shirt", True)]


def test_gqa_equals_the_conversion_and_exact_match():
    for answer, gold, expected in GQA:
        prediction = answer
        while prediction.endswith("."):
            prediction = prediction[:-1]
        assert (prediction.lower() == gold) == expected, answer
    rows = [{"question_id": i, "answer": gold} for i, (_, gold, _) in enumerate(GQA)]
    got = benchmarks.get("gqa").score(rows, [a for a, _, _ in GQA])
    assert got["accuracy"] == pytest.approx(sum(e for *_, e in GQA) / len(GQA))


# --- TextVQA / VQAv2 / VizWiz: LLaVA llava/eval/m4c_evaluator.py (EvalAI processor, TextVQA accuracy) and
# GT-Vision-Lab/VQA vqaEval.py (what the VQAv2 / VizWiz servers run on the submitted answers) ------------------------

# The contractions the crafted answers use, from the processors' table (keys as written there; note that the
# capitalised keys such as "Im" can never match, since words are lower-cased first).
SOME_CONTRACTIONS = {"dont": "don't", "isnt": "isn't", "whats": "what's", "Im": "I'm", "youre": "you're"}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
MARKS = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def punctuation_reference(text, comma_pattern):
    """processPunctuation: a mark next to a space (anywhere in the text), or any mark when the text has a comma
    between digits, is deleted; otherwise it becomes a space. Periods not followed by a digit go (at most 32:
    re.UNICODE lands in sub's count argument)."""
    digit_comma = re.search(comma_pattern, text) is not None
    out = text
    for mark in MARKS:
        out = out.replace(mark, "" if (mark + " " in text or " " + mark in text or digit_comma) else " ")
    return re.sub(r"(?!<=\d)(\.)(?!\d)", "", out, count=32)


def digits_articles_reference(text):
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ("a", "an", "the"):
            words.append(SOME_CONTRACTIONS.get(word, word))
    return " ".join(words)


def evalai_reference(answer):
    """EvalAIAnswerProcessor: word_tokenize (lower, drop ',' '?', "'s" -> " 's", strip), newlines/tabs to
    spaces, punctuation (comma rule: digit, one or more commas, digit), digits/articles/contractions."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return digits_articles_reference(punctuation_reference(text, r"(?<=\d)(\,)+(?=\d)"))


def leave_one_out(prediction, gts):
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        accs.append(min(1, others.count(prediction) / 3))
    return sum(accs) / len(accs)


def textvqa_reference(answer, gts):
    return leave_one_out(evalai_reference(answer), [evalai_reference(g) for g in gts])


def vqa_server_reference(answer, gts):
    """LLaVA's converter submits evalai(answer); vqaEval strips newlines/tabs, and only when the annotators'
    answers differ puts both through processPunctuation (comma rule: digit, comma, digit) and
    processDigitArticle."""
    submitted = evalai_reference(answer).replace("\n", " ").replace("\t", " ").strip()
    gts = [g.replace("\n", " ").replace("\t", " ").strip() for g in gts]
    if len(set(gts)) > 1:
        gts = [digits_articles_reference(punctuation_reference(g, r"(\d)(\,)(\d)")) for g in gts]
        submitted = digits_articles_reference(punctuation_reference(submitted, r"(\d)(\,)(\d)"))
    return leave_one_out(submitted, gts)


VQA = [  # (answer, ten annotator answers)
    ("Two", ["2"] * 6 + ["two"] * 2 + ["3"] * 2),  # number words
    ("the stop sign.", ["stop sign"] * 4 + ["sign"] * 6),  # articles, a trailing period
    ("dont know", ["don't know"] * 2 + ["no"] * 8),  # contractions
    ("1,000", ["1000"] * 5 + ["1,000"] * 5),  # thousands separators
    ("black/white", ["black white"] * 3 + ["black and white"] * 7),  # "/" becomes a space
    ("black / white", ["black white"] * 3 + ["black and white"] * 7),  # "/" next to a space is deleted
    ("Coca-Cola", ["coca cola"] * 9 + ["coke"]),
    ("3.5", ["3.5"] * 10),  # a period before a digit stays
    ("Yes.", ["yes"] * 10),  # all annotators agree: the VQA evaluator leaves both sides unprocessed
    ("2 dogs", ["2 dogs."] * 10),  # ... so an unprocessed "2 dogs." never matches there
    ("Im here", ["I'm here"] * 3 + ["here"] * 7),  # "Im" is lower-cased before the (capitalised) table key
    ("What's that?", ["what 's that"] * 4 + ["sign"] * 6),
    ("  yes\n", ["yes"] * 7 + ["no"] * 3),
    ("one (1)", ["1 1"] * 3 + ["1"] * 7),
    ("a", ["a"] * 10),  # only an article: empty after processing
]


def test_textvqa_equals_the_m4c_evaluator():
    rows = [{"answers": gts} for _, gts in VQA]
    for (answer, gts), row in zip(VQA, rows):
        assert metrics.textvqa_accuracy(answer, gts) == pytest.approx(textvqa_reference(answer, gts)), answer
    got = benchmarks.get("textvqa").score(rows, [a for a, _ in VQA])
    assert got["accuracy"] == pytest.approx(sum(textvqa_reference(a, g) for a, g in VQA) / len(VQA))
    assert textvqa_reference("Two", VQA[0][1]) == 1.0 and textvqa_reference("the stop sign.", VQA[1][1]) == 1.0


@pytest.mark.parametrize("bench", ["vqav2", "vizwiz"])
def test_vqav2_and_vizwiz_equal_the_vqa_evaluator_on_the_submission(bench):
    rows = [{"answers": gts, "image": f"{i}.jpg", "question_id": i} for i, (_, gts) in enumerate(VQA)]
    for answer, gts in VQA:
        assert metrics.vqa_accuracy(metrics.normalize_vqa(answer), gts) == pytest.approx(
            vqa_server_reference(answer, gts)), answer
    got = benchmarks.get(bench).score(rows, [a for a, _ in VQA])
    assert got["accuracy"] == pytest.approx(sum(vqa_server_reference(a, g) for a, g in VQA) / len(VQA))
    assert vqa_server_reference("Yes.", ["yes"] * 10) == 1.0 and vqa_server_reference("2 dogs", ["2 dogs."] * 10) == 0


# --- ScienceQA: LLaVA llava/eval/eval_science_qa.py --------------------------------------------------------------


def scienceqa_reference(text, n_choices):
    """The letter if the text is one of A-E, or starts "X. " (3+ characters), or holds exactly one match of
    'The answer is ([A-Z]).'; the index if among the problem's choices, else -1 (the random fallback is dead code)."""
    options = ["A", "B", "C", "D", "E"]
    if text in options:
        letter = text
    elif len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        letter = text[0]
    else:
        found = re.findall(r"The answer is ([A-Z]).", text)
        letter = found[0] if len(found) == 1 else "FAILED"
    return options.index(letter) if letter in options[:n_choices] else -1


SCIENCEQA = [("A", 3), ("B. cow", 3), ("B.", 3), ("(B)", 3), ("The answer is B.", 3), ("The answer is B", 3),
             ("The answer is B. The answer is C.", 3), ("E", 3), ("E", 5), (" A", 3), ("a", 3), ("AB", 3),
             ("C. x", 2), ("I think The answer is C!", 3), ("The answer is cow.", 3), ("D. ", 4), ("cow", 3), ("", 3)]


def test_scienceqa_equals_eval_science_qa():
    answers = [0, 1, 1, 1, 1, 2, 0, 4, 4, 0, 0, 0, 1, 2, 1, 3, 2, 0]
    rows = [{"question_id": i, "n_choices": n, "answer": a} for i, ((_, n), a) in enumerate(zip(SCIENCEQA, answers))]
    for text, n in SCIENCEQA:
        assert metrics.scienceqa_choice(text, n) == scienceqa_reference(text, n), text
    got = benchmarks.get("scienceqa").score(rows, [t for t, _ in SCIENCEQA])
    want = [scienceqa_reference(t, n) == a for (t, n), a in zip(SCIENCEQA, answers)]
    assert got["accuracy"] == pytest.approx(sum(want) / len(want)) and got["correct"] == sum(want)
    assert [scienceqa_reference(t, 3) for t in ("B.", "(B)", "The answer is B")] == [-1, -1, -1]


# --- MMBench: open-compass/VLMEvalKit vlmeval/utils/matching_util.py can_infer (exact_matching policy) ------------


def mmbench_reference(answer, choices):
    """can_infer_option, then can_infer_text, else Z (exact_matching gives up where a GPT judge would be asked)."""
    def option():
        if "Failed to obtain answer via API" in answer:
            return False
        for refusal in ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                        "I'm sorry, but without the image provided", "Cannot determine the answer"):
            if refusal in answer:
                return "Z"
        cleaned = answer
        for ch in ".()[],:;!*#{}":
            cleaned = cleaned.replace(ch, " ")
        splits = [x.strip() for x in cleaned.split()]
        count = sum(1 for c in choices if c in splits)
        if count == 1:
            for c in choices:
                if c in splits and splits.index(c) > len(splits) - 5:
                    return c
        elif count == 0 and sum(1 for c in ("Z", "") if c in splits) == 1:
            return "Z"
        m = re.search(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**", answer)
        if m and m.group(1).upper() in choices:
            return m.group(1).upper()
        return False

    def text():
        low = answer.lower()
        if len(low) > 2 * sum(len(str(v)) for v in choices.values()):
            return False
        found = [k for k, v in choices.items() if str(v).lower() in low]
        return found[0] if len(found) == 1 else False

    return option() or text() or "Z"


CHOICES = {"A": "cat", "B": "dog", "C": "a red fox", "D": "none of these"}
MMBENCH = ["A", "A.", "(B) dog", "The answer is C", "I think the answer is **b** because", "Dog", "cat and dog",
           "Z", "Cannot determine the answer", "B C", "The correct answer is D.", "A cat is shown here today",
           "It is obviously a red fox, as anyone can see from the picture here at once", "C, a red fox",
           "Option B: dog. Not A.", "None of these", "b", "answer: D"]


def test_mmbench_equals_vlmevalkit_exact_matching():
    for answer in MMBENCH:
        assert metrics.mmbench_choice(answer, dict(CHOICES)) == mmbench_reference(answer, dict(CHOICES)), answer
    truth = ["A", "A", "B", "C", "B", "B", "A", "A", "C", "B", "D", "A", "C", "C", "B", "D", "B", "D"]
    rows = [{"question_id": i, "choices": list(CHOICES.items()), "answer": t, "circular_group": i % 6}
            for i, t in enumerate(truth)]  # three circular copies of six questions
    got = benchmarks.get("mmbench").score(rows, MMBENCH)
    hits = [mmbench_reference(a, dict(CHOICES)) == t for a, t in zip(MMBENCH, truth)]
    assert got["accuracy_per_row"] == pytest.approx(sum(hits) / len(hits))
    assert got["accuracy"] == pytest.approx(sum(all(hits[g::6]) for g in range(6)) / 6)  # all copies right
    assert mmbench_reference("I think the answer is **b** because", dict(CHOICES)) == "B"
