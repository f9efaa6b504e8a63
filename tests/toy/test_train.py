"""Training the toy model: the loss falls, and a killed run resumes with the same data order and parameters."""

import json
import os

import jax
import numpy as np
import pytest

from jaxdebias.toy import data, tokenizer, train

TINY = dict(preset="tiny", batch_size=8, pre_batch_size=8, turns=2, max_len=64, warmup=2)


def test_batch_is_a_function_of_seed_and_step():
    tok = tokenizer.build()
    cfg = data.DataConfig(side=28, n_image=4, max_len=64, turns=2)
    a, b = (data.batch(tok, cfg, tokenizer.image_token_id(tok), 0, 3, 4) for _ in range(2))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = data.batch(tok, cfg, tokenizer.image_token_id(tok), 0, 4, 4)
    assert not np.array_equal(a["pixel_values"], c["pixel_values"])


def test_loss_falls(tmp_path):
    assert len(jax.local_devices()) == 4  # the batch is split over the conftest's 4 fake devices
    cfg = train.TrainConfig(steps=16, vision_steps=0, text_steps=0, lr=1e-2, **TINY)  # the LLaVA stage only
    out = train.train(tmp_path, cfg, progress=False, export=False, log=lambda *a: None)
    losses = [out["losses"][s] for s in sorted(out["losses"])]
    assert np.mean(losses[-4:]) < 0.75 * np.mean(losses[:2]), losses
    log = [json.loads(line) for line in open(tmp_path / "train_log.jsonl")]
    assert [r["step"] for r in log] == list(range(1, 17))


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    # steps 0-1 vision pretraining, 2-3 text pretraining, 4-6 LLaVA; checkpoints after steps 3 and 6
    cfg = train.TrainConfig(steps=7, vision_steps=2, text_steps=2, lr=5e-3, **TINY)
    assert [s for s, _, _ in cfg.stages()] == ["vision", "text", "llava"]
    quiet = dict(progress=False, log=lambda *a: None)
    with pytest.raises(train.Interrupted):  # killed after step 5, mid-stage; its last checkpoint is step 3
        train.train(tmp_path / "killed", cfg, ckpt_every=3, interrupt_at=5, export=False, **quiet)
    assert train.latest_checkpoint(tmp_path / "killed")[0] == 3
    resumed = train.train(tmp_path / "killed", cfg, ckpt_every=3, **quiet)
    whole = train.train(tmp_path / "whole", cfg, ckpt_every=100, export=False, **quiet)
    assert resumed["resumed_from"] == 3 and sorted(resumed["losses"]) == [4, 5, 6, 7]
    np.testing.assert_allclose([resumed["losses"][s] for s in (4, 5, 6, 7)],
                               [whole["losses"][s] for s in (4, 5, 6, 7)], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(resumed["state"]), jax.tree.leaves(whole["state"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert os.path.isfile(os.path.join(resumed["model_dir"], "jaxdebias.json"))
    with pytest.raises(ValueError, match="other settings"):  # a different run never resumes silently
        train.train(tmp_path / "killed", train.TrainConfig(steps=7, vision_steps=2, text_steps=2, lr=1e-3, **TINY),
                    **quiet)


def test_stages_and_what_they_train():
    from flax import nnx

    from jaxdebias.toy import model as toy_model

    cfg = train.TrainConfig(steps=5, vision_steps=1, text_steps=2, **TINY)
    assert [cfg.stage_at(i)[0] for i in range(5)] == ["vision", "text", "text", "llava", "llava"]
    params = nnx.state(toy_model.init("tiny", tokenizer.build(), 0), nnx.Param)
    state = {"model": params, "head": train.init_head(16, 0)}
    for stage, trained in (("vision", {"vision_tower"}), ("text", {"language_model"}),
                           ("llava", {"vision_tower", "multi_modal_projector", "language_model"})):
        mask = train.trainable_mask(state, stage)
        assert {k for k in ("vision_tower", "multi_modal_projector", "language_model")
                if all(jax.tree.leaves(mask["model"][k]))} == trained
        assert all(any(jax.tree.leaves(mask["model"][k])) == (k in trained) for k in mask["model"])
        assert all(jax.tree.leaves(mask["head"])) == (stage == "vision")


def test_stacking_copies_the_shallow_layers_in_order():
    from jaxdebias.toy import model as toy_model

    tok = tokenizer.build()
    shallow = toy_model.init("tiny", tok, 0)
    deep = toy_model.stack(shallow, "tiny-deep", tok, seed=1)
    assert deep.cfg.text.num_layers == 4
    for i in range(4):
        for name in ("q_proj", "o_proj"):
            np.testing.assert_array_equal(getattr(deep.language_model.layers[i].self_attn, name).kernel[...],
                                          getattr(shallow.language_model.layers[i % 2].self_attn, name).kernel[...])
    np.testing.assert_array_equal(deep.language_model.lm_head.kernel[...], shallow.language_model.lm_head.kernel[...])
    np.testing.assert_array_equal(deep.multi_modal_projector.linear_1.kernel[...],
                                  shallow.multi_modal_projector.linear_1.kernel[...])
    with pytest.raises(ValueError, match="only in the decoder depth"):
        toy_model.stack(deep, "shipped", tok)
