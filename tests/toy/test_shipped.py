"""The shipped toy model: a LLaVA-1.5-shaped jaxdebias checkpoint with a transformers tokenizer that answers
generated questions with words of their answer vocabulary."""

import json
import os

import numpy as np
import pytest

from jaxdebias.models import generate, llava
from jaxdebias.toy import data, evaluate, load_default, model as toy_model, scenes


@pytest.fixture(scope="module")
def shipped():
    """(model, tokenizer) of the shipped checkpoint, loaded once for the tests that run it."""
    return load_default()


def test_shipped_checkpoint_is_a_llava_1_5_shaped_jaxdebias_checkpoint():
    path = toy_model.default_path()
    with open(os.path.join(path, "jaxdebias.json")) as f:
        assert json.load(f)["format_version"] == 1
    cfg = llava.LlavaConfig.from_hf_config(path)
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.num_features) == (336, 14, 576)
    assert cfg.text.num_layers > 20  # FastV (2), SparseVLM (2, 6, 15) and PyramidDrop (2, 10, 20) layers exist
    assert sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) < 12e6


def test_shipped_model_reads_the_image_on_a_fixed_yes_no_set(shipped):
    # 64 POPE-style questions of the test split, unpruned, half "yes": issue 17 asks for >= 90% (the shipped model:
    # 98%). Each form on its own >= 85%: the colour form ("Is there a red star?", negatives present shapes in another
    # colour; shipped 100%) and the plain form ("Is there a star?", negatives absent shapes; shipped 97%).
    model, tok = shipped
    qs = evaluate.yes_no_set(64, seed=0, split="test")
    got = evaluate.answer(model, tok, [(im, t) for im, t, _ in qs], batch_size=16)
    assert set(got) <= {"yes", "no"}, got
    right = np.asarray([g == a for g, (_, _, a) in zip(got, qs)])
    colour = np.asarray([t.split()[3] not in scenes.SHAPES for _, t, _ in qs])  # "Is there a red star ..."
    assert colour.sum() >= 16 and (~colour).sum() >= 16, colour.sum()
    assert right[colour].mean() >= 0.85 and right[~colour].mean() >= 0.85, (right[colour].mean(),
                                                                             right[~colour].mean())
    assert right.mean() >= 0.9, right.mean()


def test_shipped_model_generates_a_word_then_stops(shipped):
    model, tok = shipped
    im = scenes.render(scenes.scene(scenes.stream(0, "test", 999)))
    ids, _ = data.prompt_ids(tok, "How many shapes are there?\n" + scenes.SHORT, 576, model.cfg.image_token_id)
    out = generate.generate(model, generate.Batch(ids[None], data.pixel_values(im, 336)[None]), max_new_tokens=3)
    assert out.tokens[0, 1] == tok.eos_token_id
    assert tok.decode(out.tokens[0], skip_special_tokens=True) in scenes.NUMBERS
