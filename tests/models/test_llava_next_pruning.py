"""Pruning and debiasing on LLaVA-NeXT: the visual span, its views and padding come from the model (base view +
unpadded tile rows with newlines), selections against NumPy re-derivations on transformers' attention, pruned
logits against transformers with the pruned keys masked, compile counts bounded by tile-count buckets."""

import dataclasses

import jax
import numpy as np
import pytest

import jaxdebias as jd
from jaxdebias.methods import Stage
from jaxdebias.models import generate as gen
from jaxdebias.models.llava_next import expand_prompt

from ..jaxdebias.test_anyres_mask import reference
from .hf_tiny_next import IMAGE_TOKEN, PINPOINTS, make_hf_next, next_prompts

torch = pytest.importorskip("torch")

SIZES = [(100, 60), (50, 130)]  # (width, height): 4 and 3 tiles, padding rows / columns inside the tiles
BUCKETS = tuple(range(1, 60))
CURVE = {"form": "exp", "b": 0.15}
DEBIAS = {"off": jd.Debias(), "pad": jd.Debias(pad_tau=0.5), "pad+curve": jd.Debias(curve=CURVE, pad_tau=0.5),
          "online": jd.Debias(curve="online", pad_tau=0.5),
          "per-view": jd.Debias(curve=[CURVE, {"form": "exp", "b": -0.1}], pad_tau=0.5)}  # base view, tile grid


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from jaxdebias.convert import from_hf

    hf = make_hf_next(seed=5, layers=4)
    path = tmp_path_factory.mktemp("next_prune")
    hf.save_pretrained(path)
    ids, am, px, hw = next_prompts(hf, SIZES, padding="right")
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), image_sizes=torch.tensor(hw),
                 attention_mask=torch.tensor(am), position_ids=torch.tensor(np.where(am == 1, am.cumsum(-1) - 1, 0)),
                 output_attentions=True, output_hidden_states=True)
    model = from_hf(path)
    images = model.images(px, hw[:, ::-1])
    ids2, am2 = expand_prompt(ids, am, images, model.cfg)
    return {"hf": hf, "model": model, "ids": ids, "am": am, "attn": [a.numpy() for a in ref.attentions],
            "h0": ref.hidden_states[0], "batch": gen.Batch(ids2, images, am2, image_sizes=hw[:, ::-1])}


def layout(b):
    """(content, newline, local, view) over sample b's real image tokens, from the NumPy geometry."""
    w, h = SIZES[b]
    content, newline, _, _ = reference(w, h, PINPOINTS, 42, 3, 0.5)
    view = np.where(newline, -1, 1)
    view[:9] = 0
    local = np.zeros(len(view), int)
    local[:9] = np.arange(9)
    local[view == 1] = np.arange((view == 1).sum())
    return content, newline, local, view


def np_select(scores, k, candidates):
    order = [i for i in np.lexsort((np.arange(len(scores)), -scores)) if candidates[i]]
    return sorted(order[:k])


def np_line_slope(x, y):
    """Least-squares slope of y on x (the closed-form fit of ``fit_exp_curve``)."""
    if len(x) < 2 or np.ptp(x) == 0:
        return 0.0
    return float(np.polyfit(x, y, 1)[0])


def np_online(s, ok, local, view):
    """Per view: the base view on its 3 x 3 grid's row medians at the row centres, the tile grid log-linear."""
    b = np.zeros(len(s))
    base = [(r * 3 + 1.0, np.median(s[:9][r * 3:r * 3 + 3][ok[:9][r * 3:r * 3 + 3]]))
            for r in range(3) if ok[:9][r * 3:r * 3 + 3].any()]
    base = [(x, m) for x, m in base if m > 0]
    b[view == 0] = np_line_slope(np.array([x for x, _ in base]), np.log([m for _, m in base]))
    t = (view == 1) & ok & (s > 0)
    b[view == 1] = np_line_slope(local[t].astype(float), np.log(s[t]))
    return np.exp(-b * local)


def np_debias(scores, b, debias):
    content, newline, local, view = layout(b)
    cand = ~newline
    s = scores.copy()
    if debias == "pad+curve":
        s = s * np.exp(-CURVE["b"] * local)
    if debias == "per-view":
        s = s * np.exp(-np.where(view == 0, CURVE["b"], -0.1) * local)
    if debias == "online":
        s = s * np_online(s, cand & content, local, view)
    if debias != "off":
        s, cand = np.where(content, s, 0.0), cand & content
    return np.where(newline, 0.0, s), cand


def kept_sets(result, stage=0):
    idx, slot = result.kept[stage]
    return [sorted(idx[b][slot[b]].tolist()) for b in range(idx.shape[0])]


@pytest.mark.parametrize("debias", ["off", "pad", "pad+curve", "online", "per-view"])
def test_fastv_selection_equals_numpy(tiny, debias):
    spec = jd.PruneSpec("fastv", keep=6, layer=2, buckets=BUCKETS, debias=DEBIAS[debias])
    r = gen.generate(tiny["model"], tiny["batch"], prune=spec, max_new_tokens=1)
    for b in range(2):
        img = np.nonzero(tiny["ids"][b] == IMAGE_TOKEN)[0]
        last = np.nonzero(tiny["am"][b])[0].max()
        scores = tiny["attn"][1][b][:, last, img].mean(0)  # layer K-1 = 1, the last token, heads averaged
        s, cand = np_debias(scores, b, debias)
        assert kept_sets(r)[b] == np_select(s, 6, cand), debias
        np.testing.assert_allclose(r.debiased[b][:len(img)][cand], s[cand], rtol=1e-4, atol=1e-7)
    if "curve" in debias or debias in ("online", "per-view"):  # the curve changes what is kept (as checked)
        plain = gen.generate(tiny["model"], tiny["batch"], prune=jd.PruneSpec(
            "fastv", keep=6, layer=2, buckets=BUCKETS), max_new_tokens=1)
        assert kept_sets(plain) != kept_sets(r)


@pytest.mark.parametrize("debias", ["pad", "pad+curve"])
def test_pdrop_stage_equals_numpy(tiny, debias):
    """PyramidDrop's first stage on NeXT: the instruction row of layer 2's own attention, debiased; as released its
    padding is only zeroed and stays a candidate (newlines never are)."""
    instr_hf = np.array([np.nonzero(tiny["am"][b])[0].max() - 1 for b in range(2)])  # a text token before the last
    n_img = (tiny["ids"] == IMAGE_TOKEN).sum(1)
    shift = tiny["batch"].pixel_values.num_slots - n_img  # our prompt holds the span's empty slots before it
    spec = jd.PruneSpec("pdrop", stages=(Stage(2, 6, "instruction", "probe"),), buckets=BUCKETS,
                        debias=DEBIAS[debias])
    assert spec.pad_candidates
    r = gen.generate(tiny["model"], dataclasses.replace(tiny["batch"], instruction_pos=instr_hf + shift), prune=spec,
                     max_new_tokens=1)
    for b in range(2):
        img = np.nonzero(tiny["ids"][b] == IMAGE_TOKEN)[0]
        scores = tiny["attn"][2][b][:, instr_hf[b], img].mean(0)  # the stage layer's own attention
        s, _ = np_debias(scores, b, debias)
        _, newline, _, _ = layout(b)
        assert kept_sets(r)[b] == np_select(s, 6, ~newline), debias


def hf_masked_logits(tiny, b, pruned, layer=2):
    """transformers' decoder on sample b's real tokens, layers >= ``layer`` unable to see the pruned image tokens
    (FastV by masking: the same last-token logits as removing them with their positions kept)."""
    lm = tiny["hf"].model.language_model
    real = np.nonzero(tiny["am"][b])[0]
    x = tiny["h0"][b:b + 1, real]
    T = x.shape[1]
    pos = torch.arange(T)[None]
    img = np.nonzero(tiny["ids"][b][real] == IMAGE_TOKEN)[0]
    with torch.no_grad():
        pe = lm.rotary_emb(x, pos)
        for i, lay in enumerate(lm.layers):
            allowed = torch.ones(T, T, dtype=torch.bool).tril()
            if i >= layer:
                allowed[:, torch.tensor(img[pruned])] = False
            mask = torch.where(allowed, 0.0, torch.finfo(x.dtype).min)[None, None]
            x = lay(x, attention_mask=mask, position_ids=pos, position_embeddings=pe)
            x = x[0] if isinstance(x, tuple) else x
        return tiny["hf"].lm_head(lm.norm(x))[0, -1].numpy()


def test_pruned_logits_equal_transformers_with_pruned_keys_masked(tiny):
    spec = jd.PruneSpec("fastv", keep=7, layer=2, buckets=BUCKETS, debias=DEBIAS["pad+curve"])
    r = gen.generate(tiny["model"], tiny["batch"], prune=spec, max_new_tokens=1)
    for b in range(2):
        n = int((tiny["ids"][b] == IMAGE_TOKEN).sum())
        pruned = np.setdiff1d(np.arange(n), kept_sets(r)[b])  # newlines and padding included
        np.testing.assert_allclose(r.logits[b], hf_masked_logits(tiny, b, pruned), atol=1e-4)
    assert r.stage_lengths[1][2] == 64 - tiny["batch"].pixel_values.num_slots + 7  # the span is really shorter


@pytest.mark.parametrize("method", ["pdrop", "sparsevlm", "himap", "tokencarve"])
def test_every_decoder_method_keeps_content_tokens_only(tiny, method):
    """Each method runs on the anyres span with online per-view debiasing: nothing it keeps is a newline or an
    empty slot (their first-stage kept indices all fall on the image's real tokens, none on a newline)."""
    spec = jd.PruneSpec(method, keep=8, buckets=BUCKETS, debias=DEBIAS["online"])
    if method != "tokencarve":  # the released schedules' stages that fit this 4-layer decoder
        n, L = tiny["batch"].pixel_values.num_slots, tiny["model"].cfg.text.num_layers
        stages = tuple(s for s in spec.schedule(n, 32) if s.layer < L)
        spec = jd.PruneSpec(method, keep=8, buckets=BUCKETS, debias=DEBIAS["online"], stages=stages)
    r = gen.generate(tiny["model"], tiny["batch"], prune=spec, max_new_tokens=3, stop_at_eos=False)
    for b in range(2):
        _, newline, _, _ = layout(b)
        first = kept_sets(r)[b]
        assert first and all(0 <= i < len(newline) and not newline[i] for i in first if i >= 0)
    assert r.tokens.shape == (2, 3)


def test_encoder_methods_say_they_need_one_view(tiny):
    with pytest.raises(ValueError, match="decoder-side method"):
        gen.generate(tiny["model"], tiny["batch"], prune=jd.PruneSpec("visionzip", keep=8, buckets=BUCKETS),
                     max_new_tokens=1)


def test_compiles_once_per_tile_bucket(tiny):
    """Images of many sizes: one prefill program per (prompt bucket, tile-count bucket)."""
    hf, model = tiny["hf"], tiny["model"]
    gen.prefill_step.clear_cache()
    p0 = gen.prefill_step._cache_size()
    spec = jd.PruneSpec("fastv", keep=6, layer=2, buckets=BUCKETS, debias=DEBIAS["online"])
    sizes = [(100, 60), (120, 90), (95, 70), (50, 130), (40, 120), (90, 40), (200, 90), (60, 60)]
    buckets = set()
    for i in range(0, len(sizes), 2):
        pair = sizes[i:i + 2]
        ids, am, px, hw = next_prompts(hf, pair, seed=i, padding="right")
        images = model.images(px, hw[:, ::-1])
        ids2, am2 = expand_prompt(ids, am, images, model.cfg)
        buckets.add((jd.bucket(ids2.shape[1], gen.PROMPT_BUCKETS), images.pixels.shape[1]))
        gen.generate(model, gen.Batch(ids2, images, am2, image_sizes=hw[:, ::-1]), prune=spec, max_new_tokens=1)
    assert len(buckets) < len(sizes) // 2 + 1
    assert gen.prefill_step._cache_size() - p0 == len(buckets)
    assert jax.tree.leaves(images)  # the images are a pytree the jitted prefill takes


def test_var_works_on_the_anyres_span(tiny):
    """VAR on NeXT: sinks only among the real tokens (never the masked empty slots), p = 1 leaves the logits as
    they are, p = 0.6 moves them; with pruning it runs on the kept tokens."""
    from flax import nnx

    from jaxdebias.models.interventions import VarSpec

    # the forward jitted (one program per VAR setting) rather than dispatched op by op
    forward = nnx.jit(lambda m, ids, px, am, var=None: m(ids, px, am, var=var), static_argnames="var")
    model, b = tiny["model"], tiny["batch"]
    real = np.asarray(b.attention_mask, bool)
    base = np.asarray(forward(model, b.input_ids, b.pixel_values, b.attention_mask).logits)[real]
    keep = VarSpec(sink_dims="discover", p=1.0, tau=1.5, min_visual=0.0, rho=1.0)
    out = forward(model, b.input_ids, b.pixel_values, b.attention_mask, var=keep)
    np.testing.assert_allclose(np.asarray(out.logits)[real], base, atol=1e-5)
    assert out.sinks and all(not (np.asarray(s) & ~real).any() for s in out.sinks.values())
    assert any(np.asarray(s).any() for s in out.sinks.values())
    moved = VarSpec(sink_dims="discover", p=0.6, tau=1.5, min_visual=0.0, rho=1.0)
    assert np.abs(np.asarray(forward(model, b.input_ids, b.pixel_values, b.attention_mask, var=moved).logits)[real]
                  - base).max() > 1e-4
    r = gen.generate(model, b, prune=jd.PruneSpec("fastv", keep=6, layer=2, buckets=BUCKETS), var=moved,
                     max_new_tokens=2, stop_at_eos=False)
    assert r.tokens.shape == (2, 2)


@pytest.mark.parametrize("debias", ["pad", "per-view", "online"])
def test_fastv_released_decode_reselects_per_view(tiny, debias):
    """FastV's released decode on LLaVA-NeXT: each new token's row re-selects through the prefill's own debias
    step (padding, newlines, one curve per view), equal to the NumPy re-derivation on a given row; then 8 tokens
    decode with it."""
    from flax import nnx

    spec = jd.PruneSpec("fastv", keep=6, layer=2, buckets=BUCKETS, debias=DEBIAS[debias], decode="released")
    prep = gen.prepare(tiny["model"], tiny["batch"], spec)
    graphdef, state = nnx.split(tiny["model"])
    _, out = gen.prefill_step(graphdef, state, *prep.arrays, prep.limits, jax.random.key(0), plan=prep.plan,
                              extra=64, temperature=0.0, var=None, triangle=None)  # generate's call below: one program
    reselect = out.reselect
    S = out.cache.k[2].shape[1]
    rng = np.random.default_rng(1)
    probs = np.zeros((2, 2, 1, S), np.float32)
    rows = []
    for b in range(2):
        n_img = int((tiny["ids"][b] == IMAGE_TOKEN).sum())
        slots = np.asarray(reselect.image_slots[b, :n_img])
        rows.append(rng.random(n_img).astype(np.float32) + 0.01)
        probs[b, :, 0][:, slots] = rows[-1]
    allowed = np.asarray(reselect(jax.numpy.asarray(probs)))
    for b in range(2):
        n_img = len(rows[b])
        slots = np.asarray(reselect.image_slots[b, :n_img])
        s, cand = np_debias(rows[b], b, debias)
        assert sorted(np.nonzero(allowed[b, slots])[0].tolist()) == np_select(s, 6, cand), (b, debias)
    r = gen.generate(tiny["model"], tiny["batch"], prune=spec, max_new_tokens=8, stop_at_eos=False)
    assert r.tokens.shape == (2, 8)
