"""Every method at its released defaults and at budgets 64/128/192, on a tiny LLaVA with the full 24 x 24 grid (576
image tokens), a letterboxed 640 x 427 image and the released curves: the kept sets, merged features and positions
equal the release's rule re-derived in NumPy on transformers' tensors (``shared/reference/methods.md``), and the
logits equal transformers' layers run on that pruned sequence. The methods that prune at layer 2 or in the encoder
(FastV, TokenCarve, VisionZip) run on the same model with 3 decoder layers, the others on 21.

The reference runs transformers' decoder layers one at a time (eager attention, weights captured by hooks) and
applies each rule between layers. Later stages are driven by our earlier kept sets, so that a near-tie (float
noise at the k-th score) cannot cascade; a differing token is accepted only at such a near-tie.
"""

import jax
import numpy as np
import pytest
from flax import nnx

import jaxdebias as jd
from jaxdebias.models import generate as gen
from jaxdebias.models.generate import Batch, generate

torch = pytest.importorskip("torch")

from tests.jaxdebias.test_released_rules import (  # noqa: E402
    pil_sparsevlm_mask, ref_carve, ref_cluster_and_merge, ref_generate_pad_mask_1d, ref_rank_fusion, ref_sv, to_grid)

IMAGE, W, H = 150, 640, 427
PREFIX, SUFFIX = 5, 8
FASTV_POLY = (1.0, 3.0152e-3, -1.45979e-5, 2.56911e-8)  # methods.md: 1/w = 1 + c1 i + c2 i^2 + c3 i^3
LAYERS = 21  # PyramidDrop's last stage is layer 20
SHALLOW = 3  # FastV's and TokenCarve's stage is layer 2


def build(tmp_path_factory, layers):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from jaxdebias.convert import from_hf

    torch.manual_seed(3)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=336, patch_size=14),
        text_config=LlamaConfig(vocab_size=151, hidden_size=32, intermediate_size=40, num_hidden_layers=layers,
                                num_attention_heads=2, num_key_value_heads=2, initializer_range=0.5, pad_token_id=0),
        image_token_id=IMAGE)
    hf = LlavaForConditionalGeneration(cfg).eval()
    hf.config._attn_implementation = "eager"
    with torch.no_grad():  # peaked attention (range 0.5) but a residual stream of moderate size, so that DPC-kNN's
        for layer in hf.model.language_model.layers:  # densities exp(-d^2) do not underflow in fp32
            layer.self_attn.o_proj.weight.mul_(0.05)
            layer.mlp.down_proj.weight.mul_(0.05)
    path = tmp_path_factory.mktemp(f"big{layers}")
    hf.save_pretrained(path)
    rng = np.random.default_rng(4)
    ids = np.concatenate([[1], rng.integers(3, 140, PREFIX - 1), [IMAGE] * 576, rng.integers(3, 140, SUFFIX)])[None]
    px = rng.normal(size=(1, 3, 336, 336)).astype(np.float32)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), output_attentions=True,
                 output_hidden_states=True)
    ours = from_hf(path)
    # 21 layers at initializer range 0.5 (peaked attention, few near-ties among 576 scores) amplify fp32 rounding:
    # the unpruned logits' difference to transformers sets the tolerance of the pruned ones (4x: each pruned
    # path rounds differently; PyramidDrop at 64 debiased reaches 3.3x with the row-blocked prompt attention)
    dense = generate(ours, Batch(ids, px), max_new_tokens=1).logits[0]
    reference = out.logits[0, -1].numpy()
    atol = 4 * float(np.abs(dense - reference).max()) + 1e-5
    assert atol < 1e-3 * np.abs(reference).max(), (atol, np.abs(reference).max())
    return {"hf": hf, "ours": ours, "ids": ids, "px": px, "x0": out.hidden_states[0], "atol": atol, "layers": layers,
            "attn": [a[0].numpy() for a in out.attentions], "hidden": out.hidden_states}


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return build(tmp_path_factory, LAYERS)


@pytest.fixture(scope="module")
def shallow(tmp_path_factory):
    """The same model with the 3 decoder layers that the methods acting at layer 2 (FastV, TokenCarve) and in the
    encoder (VisionZip) reach: a pruned program of 21 layers costs seconds more to compile."""
    return build(tmp_path_factory, SHALLOW)


def run(big, spec):
    return generate(big["ours"], Batch(big["ids"], big["px"], image_sizes=[[W, H]]), prune=spec, max_new_tokens=1)


def recycled_sets(big, spec):
    """The tokens each SparseVLM stage recycled (indices into its visual span), from the jitted prefill's info."""
    prep = gen.prepare(big["ours"], Batch(big["ids"], big["px"], image_sizes=[[W, H]]), spec)
    graphdef, state = nnx.split(big["ours"])
    out = gen.prefill_step(graphdef, state, *prep.arrays, prep.limits, jax.random.key(0), plan=prep.plan,
                           extra=64, temperature=0.0, var=None, triangle=None)[1]  # generate's call: its program
    return [np.sort(np.asarray(idx[0])[np.asarray(slot[0])]) for idx, slot in out.merged]


def kept(result, stage):
    """Stage ``stage``'s kept tokens as indices into that stage's visual span (ascending)."""
    return np.sort(result.kept_span[stage][0][result.kept[stage][1][0]])


def check_selection(ours, scores, k, candidates, rtol=1e-4):
    """ours == the top-k of scores among candidates (ties: lower index first), up to near-ties at the k-th score."""
    order = [i for i in np.lexsort((np.arange(len(scores)), -scores)) if candidates[i]]
    ref = np.sort(order[:k])
    assert len(ours) == len(ref)
    if not np.array_equal(ours, ref):
        kth = scores[order[k - 1]]
        for i in np.setxor1d(ours, ref):
            assert abs(scores[i] - kth) <= rtol * abs(kth), (i, scores[i], kth, len(scores), k, i in ours)


class Reference:
    """transformers' decoder run layer by layer on a sequence (hidden x [1, L, D], positions, image rows)."""

    def __init__(self, big):
        self.hf, self.lm, self.layers = big["hf"], big["hf"].model.language_model, big["layers"]
        self.x = big["x0"]
        self.pos = np.arange(self.x.shape[1])
        self.image = PREFIX + np.arange(576)  # rows of the image tokens in the current sequence
        self.layer = 0

    def run_to(self, stop, capture=None):
        """Runs layers [self.layer, stop); returns the attention weights [H, L, L] of layer ``capture``."""
        weights = None
        for i in range(self.layer, stop):
            L = self.x.shape[1]
            mask = torch.full((1, 1, L, L), torch.finfo(self.x.dtype).min).triu(1)
            pos = torch.tensor(self.pos)[None]
            seen = []
            hook = self.lm.layers[i].self_attn.register_forward_hook(lambda m, a, out: seen.append(out[1][0]))
            with torch.no_grad():
                x = self.lm.layers[i](self.x, attention_mask=mask, position_ids=pos,
                                      position_embeddings=self.lm.rotary_emb(self.x, pos))
            hook.remove()
            self.x = x[0] if isinstance(x, tuple) else x
            self.last_weights = seen[0].numpy()
            if i == capture:
                weights = self.last_weights
        self.layer = stop
        return weights

    def peek(self, layer):
        """The attention weights [H, L, L] layer ``layer`` computes on the current input, without running on."""
        state = (self.x, self.layer)
        self.layer = layer
        weights = self.run_to(layer + 1, capture=layer)
        self.x, self.layer = state
        return weights

    def keep(self, kept_image, features=None, positions="keep", extra=None):
        """Keeps the image rows ``kept_image`` (indices into the current image span), optionally replacing their
        features and appending ``extra`` merged rows after them; positions kept or re-indexed."""
        first, n = self.image[0], len(self.image)
        block = self.x[0, self.image[kept_image]] if features is None else torch.tensor(features, dtype=self.x.dtype)
        parts = [self.x[0, :first], block] + ([torch.tensor(extra, dtype=self.x.dtype)] if extra is not None else [])
        self.x = torch.cat(parts + [self.x[0, first + n:]])[None]
        m = len(kept_image) + (0 if extra is None else len(extra))
        if positions == "keep":
            tail = self.pos[first + n:]
            self.pos = np.concatenate([self.pos[:first], self.pos[self.image[kept_image]], tail])
        else:
            self.pos = np.arange(self.x.shape[1])
        self.image = first + np.arange(m)

    def logits(self):
        self.run_to(self.layers)
        with torch.no_grad():
            return self.hf.lm_head(self.lm.norm(self.x[:, -1]))[0].numpy()


BUDGETS = [(64, True), (128, True), (192, True), (128, False)]  # debiased at every budget, plain at 128


def continuous_content(tau, debiased=True):
    return to_grid(W, H, ref_generate_pad_mask_1d(W, H, tau)) if debiased else np.ones(576, bool)


def exp_weights(method, debiased=True):
    return np.exp(-jd.RELEASED_EXP_B[method]["gqa"] * np.arange(576)) if debiased else np.ones(576)


def released(method, keep, debiased=True):
    debias = jd.Debias(curve="released", pad_tau="released", task="gqa") if debiased else jd.Debias()
    return jd.PruneSpec(method, keep=keep, debias=debias)


@pytest.mark.parametrize("keep,debiased", BUDGETS)
def test_fastv(shallow, keep, debiased):
    r = run(shallow, released("fastv", keep, debiased))
    ref = Reference(shallow)
    last = ref.x.shape[1] - 1
    weights = 1 / np.polyval(FASTV_POLY[::-1], np.arange(576)) if debiased else np.ones(576)
    content = continuous_content(0.5, debiased)
    scores = shallow["attn"][1][:, last, ref.image].mean(0) * weights * content
    check_selection(kept(r, 0), scores, keep, content)  # FastV caps R at the content tokens
    ref.run_to(2)
    ref.keep(kept(r, 0))  # original positions
    np.testing.assert_allclose(r.logits[0], ref.logits(), rtol=0, atol=shallow["atol"])


def test_fastv_before(shallow):
    """The debias code's "before" setting: FastV.patch's ``unpad_mask`` (no threshold), the budget capped at its
    content, no curve."""
    from tests.jaxdebias.test_presets import ref_unpad_mask

    r = run(shallow, jd.PruneSpec("fastv", keep=128, debias=jd.Debias.preset("before", "fastv")))
    ref = Reference(shallow)
    content = ref_unpad_mask(W, H)
    scores = shallow["attn"][1][:, ref.x.shape[1] - 1, ref.image].mean(0) * content
    check_selection(kept(r, 0), scores, 128, content)


@pytest.mark.parametrize("keep,debiased", BUDGETS)
def test_pdrop(big, keep, debiased):
    spec = released("pdrop", keep, debiased)
    stages = spec.schedule(576, LAYERS)
    if keep == 128:
        assert [s.keep for s in stages] == [184, 92, 46]
    r = run(big, spec)
    ref = Reference(big)
    content = continuous_content(0.01, debiased)
    for i, s in enumerate(stages):
        ref.run_to(s.layer)
        attn = ref.peek(s.layer)  # the attention layer s.layer computes on its input, last (instruction) row
        scores = attn[:, -1, ref.image].mean(0)
        if i == 0:  # debiased: released curve, padding (tau 0.01) zeroed but still a candidate
            scores = scores * exp_weights("pdrop", debiased) * content
        check_selection(kept(r, i), scores, s.keep, np.ones(len(ref.image), bool))
        ref.keep(kept(r, i), positions="reindex")  # the release re-indexes 0..L'-1
    np.testing.assert_allclose(r.logits[0], ref.logits(), rtol=0, atol=big["atol"])


def raters(x0):
    """SparseVLM v1.5: softmax over the text after the image of raw V T^T, mean over V, strictly above the mean."""
    v, t = x0[PREFIX:PREFIX + 576], x0[PREFIX + 576:]
    logits = v.astype(np.float64) @ t.astype(np.float64).T
    p = np.exp(logits - logits.max(1, keepdims=True))
    m = (p / p.sum(1, keepdims=True)).mean(0)
    return np.nonzero(m > m.mean())[0]  # indices into the text after the image


@pytest.mark.parametrize("keep,debiased", BUDGETS)
def test_sparsevlm(big, keep, debiased):
    spec = released("sparsevlm", keep, debiased)
    stages = spec.schedule(576, LAYERS)
    r = run(big, spec)
    recycled_by_us = recycled_sets(big, spec)
    ref = Reference(big)
    rating = raters(big["x0"][0].numpy())
    content = pil_sparsevlm_mask(W, H) if debiased else np.ones(576, bool)  # the release's bilinear mask
    for i, s in enumerate(stages):
        attn = ref.run_to(s.layer + 1, capture=s.layer)  # the stage layer runs on the current set
        rows = ref.image[-1] + 1 + rating
        raw = attn[:, rows][:, :, ref.image].mean(0).mean(0)
        n_v = len(ref.image)
        scores = raw * exp_weights("sparsevlm", debiased) * content if i == 0 else raw  # the top-k only is debiased
        ours = kept(r, i)
        check_selection(ours, scores, min(s.keep, n_v - 1), np.ones(n_v, bool))
        pruned = np.setdiff1d(np.arange(n_v), ours)
        recycled = recycled_by_us[i]  # the best pruned by the raw score (tiny probabilities: checked to 1e-3)
        check_selection(recycled, np.where(np.isin(np.arange(n_v), pruned), raw, -1.0), s.recycle,
                        np.isin(np.arange(n_v), pruned), rtol=1e-3)
        out = ref.x[0, ref.image].numpy()  # layer s.layer's output
        ref.keep(ours, extra=ref_cluster_and_merge(out[recycled], s.clusters), positions="reindex")
    np.testing.assert_allclose(r.logits[0], ref.logits(), rtol=0, atol=big["atol"])


@pytest.mark.parametrize("keep,debiased", BUDGETS)
def test_himap(big, keep, debiased):
    spec = released("himap", keep, debiased)
    (s1, s2) = spec.schedule(576, LAYERS)
    if keep == 128:
        assert (s1.layer, s1.keep, s2.layer, s2.keep) == (2, 115, 8, 90)
    r = run(big, spec)
    ref = Reference(big)
    text = np.arange(ref.image[-1] + 1, ref.x.shape[1])
    scores = big["attn"][1][:, text][:, :, ref.image].mean(0).sum(0)  # every row after the image, summed
    scores = scores * exp_weights("himap", debiased) * continuous_content(0.5, debiased)  # padding zeroed, still a candidate
    check_selection(kept(r, 0), scores, s1.keep, np.ones(576, bool))
    ref.run_to(s1.layer)
    ref.keep(kept(r, 0))  # original positions
    ref.run_to(s2.layer)
    attn = ref.last_weights  # layer T2 - 1 on the stage-1 sequence
    scores = attn[:, ref.image][:, :, ref.image].mean(0).sum(0)  # the causal image x image block, column sums
    check_selection(kept(r, 1), scores, s2.keep, np.ones(len(ref.image), bool))
    ref.keep(kept(r, 1))
    np.testing.assert_allclose(r.logits[0], ref.logits(), rtol=0, atol=big["atol"])


@pytest.mark.parametrize("keep,debiased", BUDGETS)
def test_tokencarve(shallow, keep, debiased):
    r = run(shallow, released("tokencarve", keep, debiased))
    ref = Reference(shallow)
    last = ref.x.shape[1] - 1
    av = shallow["attn"][1][:, last, ref.image].mean(0) * exp_weights("tokencarve", debiased) \
        * continuous_content(0.5, debiased)
    ref.run_to(2)
    x = ref.x[0, ref.image].numpy()  # layer 1's decoder output = layer 2's input, all 576 image rows
    score = ref_rank_fusion(av, ref_sv(x))
    idx, feats = ref_carve(score, x, keep)
    np.testing.assert_array_equal(kept(r, 0), idx)
    ref.keep(np.asarray(idx), features=feats)  # original positions, merged features
    np.testing.assert_allclose(r.logits[0], ref.logits(), rtol=0, atol=shallow["atol"])


@pytest.mark.parametrize("keep", [64, 128, 192])
def test_visionzip(shallow, keep):
    """VisionZip has no debiased release: plain, at the split 54+10 / 108+20 / 162+30 (CLS first among the
    dominant tokens); the block replaces the image span at contiguous positions."""
    from tests.models.test_pruning import np_visionzip

    r = run(shallow, jd.PruneSpec("visionzip", keep=keep))
    ctx = {64: 10, 128: 20, 192: 30}[keep]
    tower = shallow["hf"].model.vision_tower
    with torch.no_grad():
        out = tower(torch.tensor(shallow["px"]), output_hidden_states=True, output_attentions=True)
        layer = tower.encoder.layers[-2]
        x = layer.layer_norm1(out.hidden_states[-3])
        keys = layer.self_attn.k_proj(x).reshape(*x.shape[:2], layer.self_attn.num_heads, -1).mean(2).numpy()
        block, top = np_visionzip(out.attentions[-2][0].numpy(), out.hidden_states[-2][0].numpy(), keys[0],
                                  keep - ctx, ctx)
        np.testing.assert_array_equal(np.sort(result_raster(r)), np.sort(top))
        ref = Reference(shallow)
        proj = shallow["hf"].model.multi_modal_projector(torch.tensor(block)).numpy()
        ref.keep(np.arange(len(block)) % 576, features=proj, positions="reindex")
    # the block also carries the CLIP tower's and projector's fp32 rounding: a floor of 3e-4 on logits of ~5
    np.testing.assert_allclose(r.logits[0], ref.logits(), rtol=0, atol=max(shallow["atol"], 3e-4))


def result_raster(result):
    idx, slot = result.kept[0]
    return idx[0][slot[0]]
