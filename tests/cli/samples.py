"""A tiny POPE folder in the LLaVA layout, written by the tests, a tiny in-memory model to answer it, and a tiny
checkpoint on disk for the command line (``--checkpoint``)."""

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


def cli_exit(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``jaxdebias argv`` run in this process (argparse's refusals raise
    SystemExit); ``python -m jaxdebias`` itself is run in tests/cli/test_hostile.py."""
    from jaxdebias.cli.main import main

    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def tiny_checkpoint(path, side: int | None = 56) -> str:
    """A tiny toy checkpoint (the "tiny-deep" preset: 4 decoder layers 16 wide, 2048 positions, the toy word
    tokenizer; at ``side`` 56 px a 4 x 4 patch grid, so that letterboxed images have padding rows and columns; None:
    the preset's own 2 x 2) of random weights, drawn with
    NumPy into the model's abstract shapes (an eager initialisation costs seconds of small compilations), written
    as ``jaxdebias-convert`` writes one. It stands in for the embedded default where that model's own behaviour
    is not what a test checks: its 24 decoder layers cost seconds of compilation per program."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxdebias.models.layers import abstract
    from jaxdebias.models.llava import Llava, LlavaConfig
    from jaxdebias.toy import model as toy_model, tokenizer

    tok = tokenizer.build()
    hf = toy_model.hf_config("tiny-deep", tok)
    if side is not None:
        hf["vision_config"]["image_size"] = side
    graph, state = nnx.split(abstract(Llava, LlavaConfig.from_hf_config(hf)))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(x.dtype), state)
    return toy_model.save(nnx.merge(graph, state), tok, hf, path)
