"""A tiny POPE folder in the LLaVA layout, written by the tests."""

import json

from PIL import Image

QUESTIONS = [("a.png", (640, 400), "Is there a dog in the image?", "yes"),
             ("b.png", (300, 500), "Is there a cat in the image?", "no"),
             ("c.png", (400, 400), "Is there a car in the image?", "no"),
             ("a.png", (640, 400), "Is there a tree in the image?", "yes"),
             ("b.png", (300, 500), "Is there a person in the image?", "no")]


def write_pope(root, questions=QUESTIONS, drop_field=None):
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i, (name, size, _, _) in enumerate(questions):
        Image.new("RGB", size, (40 * i, 120, 200)).save(root / "images" / name)
    with open(root / "llava_pope_test.jsonl", "w") as f:
        for i, (name, _, text, label) in enumerate(questions):
            row = {"question_id": i, "image": name, "text": text, "label": label, "category": "random"}
            row.pop(drop_field, None)
            f.write(json.dumps(row) + "\n")
    return root
