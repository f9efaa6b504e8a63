"""A tiny POPE folder in the LLaVA layout, written by the tests, and a tiny in-memory model to answer it."""

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


def tiny_model():
    """A tiny LLaVA-1.5 (2 x 2 patches at 28 px, 3 decoder layers) with the byte tokenizer, built in memory."""
    from flax import nnx

    from jaxdebias.cli.inputs import ByteTokenizer, LoadedModel
    from jaxdebias.models.clip import ClipVisionConfig
    from jaxdebias.models.llama import LlamaConfig
    from jaxdebias.models.llava import Llava, LlavaConfig

    cfg = LlavaConfig(ClipVisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, image_size=28),
                      LlamaConfig(vocab_size=260, hidden_size=16, intermediate_size=32, num_layers=3, num_heads=2,
                                  num_kv_heads=2), image_token_id=259)
    return LoadedModel(Llava(cfg, rngs=nnx.Rngs(0)), ByteTokenizer())
