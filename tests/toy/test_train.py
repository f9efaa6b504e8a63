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
    # the LLaVA stage only, on its answer loss (the patch-naming term is checked in the next test)
    cfg = train.TrainConfig(steps=16, vision_steps=0, text_steps=0, lr=1e-2, patch_loss=0.0, **TINY)
    out = train.train(tmp_path, cfg, progress=False, export=False, log=lambda *a: None)
    losses = [out["losses"][s] for s in sorted(out["losses"])]
    assert np.mean(losses[-4:]) < 0.75 * np.mean(losses[:2]), losses
    log = [json.loads(line) for line in open(tmp_path / "train_log.jsonl")]
    assert [r["step"] for r in log] == list(range(1, 17))


def test_patch_naming_loss_is_the_cross_entropy_of_the_words_at_object_patches():
    from flax import nnx

    from jaxdebias.toy import model as toy_model

    tok = tokenizer.build()
    model = toy_model.init("tiny", tok, 0)
    cfg = data.DataConfig(side=28, n_image=4, max_len=64, turns=2)
    b = data.batch(tok, cfg, tokenizer.image_token_id(tok), 0, 0, 8)
    assert (b["patch_words"] >= 0).any() and (b["patch_words"] < 0).any()  # object and background patches
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = {"model": params, "head": train.init_head(16, 0)}
    with jax.default_matmul_precision("float32"):
        both = train.loss_fn(state, graphdef, rest, b, "llava", 0.5)
        answers = train.loss_fn(state, graphdef, rest, b, "llava", 0.0)
        h, _ = model.embed(b["input_ids"], b["pixel_values"])
        h = model.language_model.run_layers(h, b["positions"], data.branch_mask(b["turns"]),
                                            real=b["attention_mask"]).h
        logits = np.asarray(model.language_model.logits(h), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    at = np.take_along_axis(logp, b["image_positions"][..., None], axis=1)  # [B, N, V]
    named = []
    for j in (0, 1):  # colour word, shape word: mean over the object patches
        w = b["patch_words"][:, j]
        named.append(-np.take_along_axis(at, np.maximum(w, 0)[..., None], -1)[..., 0][w >= 0].mean())
    np.testing.assert_allclose(float(both) - float(answers), 0.5 * np.mean(named), rtol=1e-4)


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


@pytest.mark.parametrize("mode", ["identity", "split"])
def test_stacking_copies_each_layer_into_its_group(mode):
    from jaxdebias.toy import model as toy_model

    tok = tokenizer.build()
    shallow = toy_model.init("tiny", tok, 0)
    deep = toy_model.stack(shallow, "tiny-deep", tok, seed=1, mode=mode)
    assert deep.cfg.text.num_layers == 4
    for i in range(4):  # layers 0, 1 from shallow layer 0; 2, 3 from layer 1
        src, dst = shallow.language_model.layers[i // 2], deep.language_model.layers[i]
        np.testing.assert_array_equal(dst.self_attn.q_proj.kernel[...], src.self_attn.q_proj.kernel[...])
        scale = 0.5 if mode == "split" else float(i % 2 == 0)
        for got, want in ((dst.self_attn.o_proj, src.self_attn.o_proj), (dst.mlp.down_proj, src.mlp.down_proj)):
            np.testing.assert_allclose(np.asarray(got.kernel[...]), scale * np.asarray(want.kernel[...]), rtol=1e-6)
    np.testing.assert_array_equal(deep.language_model.lm_head.kernel[...], shallow.language_model.lm_head.kernel[...])
    cfg = data.DataConfig(side=28, n_image=4, max_len=64, turns=2)
    b = data.batch(tok, cfg, tokenizer.image_token_id(tok), 0, 0, 2)
    with jax.default_matmul_precision("float32"):
        want = shallow(b["input_ids"], b["pixel_values"], b["attention_mask"]).logits
        got = deep(b["input_ids"], b["pixel_values"], b["attention_mask"]).logits
    if mode == "identity":  # exactly the shallow model's function
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="only in the decoder depth"):
        toy_model.stack(deep, "shipped", tok)
    with pytest.raises(ValueError, match="stacking mode"):
        toy_model.stack(shallow, "tiny-deep", tok, mode="copy")


def test_init_scales_with_width():
    from flax import nnx

    from jaxdebias.toy import model as toy_model

    m = toy_model.init("shallow", tokenizer.build(), 0)
    flat = {tuple(str(k) for k in p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    q = flat[("language_model", "layers", "0", "self_attn", "q_proj", "kernel")]
    o = flat[("language_model", "layers", "0", "self_attn", "o_proj", "kernel")]
    np.testing.assert_allclose(q.std(), 1 / np.sqrt(64), rtol=0.1)  # lecun normal at width 64, not 0.02
    np.testing.assert_allclose(o.std(), 1 / np.sqrt(64) / np.sqrt(2 * 6), rtol=0.1)  # GPT-2's residual scaling
    np.testing.assert_allclose(flat[("language_model", "embed_tokens", "embedding")].std(), 1.0, rtol=0.1)
    np.testing.assert_array_equal(flat[("vision_tower", "position_embedding")],
                                  toy_model.sincos_2d(24, 64))


def test_text_stage_describes_the_scene_where_the_image_goes():
    from jaxdebias.toy import scenes

    tok = tokenizer.build()
    image_id = tokenizer.image_token_id(tok)
    cfg = data.DataConfig(side=28, n_image=4, max_len=64, turns=2)
    b = data.text_batch(tok, cfg, image_id, 0, 0, 2)
    s = scenes.scene(scenes.stream(0, "text", 0))
    context = data.described(tok, s)
    row = b["input_ids"][0]
    assert image_id not in row
    start = 1 + len(tok("USER:", add_special_tokens=False).input_ids)
    np.testing.assert_array_equal(row[start:start + len(context)], context)
    assert (b["turns"][0, :start + len(context)] == 0).all()  # the description is the shared prefix
    words = tok.decode(context).split()
    assert set(words) >= {o.color for o in s.objects} | {o.shape for o in s.objects}
    answers = tok.decode(b["targets"][0][b["weights"][0] > 0]).split()
    assert "</s>" in answers and len(answers) >= 4


def test_patch_words_name_the_object_under_each_patch():
    from jaxdebias.toy import scenes

    tok = tokenizer.build()
    cfg = data.DataConfig(side=336, n_image=576, max_len=768, turns=2)
    s = scenes.scene(scenes.stream(0, "train", 3))
    words = data.patch_words(tok, s, cfg)
    colors, shapes = data.patch_labels(s, 336, 24)
    assert words.shape == (2, 576) and ((words[0] >= 0) == (colors > 0)).all()
    named = {tok.decode([int(c)]) + " " + tok.decode([int(h)]) for c, h in words.T if c >= 0}
    assert named == {f"{o.color} {o.shape}" for o in s.objects}
