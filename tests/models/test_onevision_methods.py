"""The first pruning stage of PyramidDrop, SparseVLM, HiMAP and TokenCarve on LLaVA-OneVision keeps the set that a
NumPy re-derivation of ``shared/reference/methods.md`` gives on transformers' attention and hidden states of the same
tiny random model; FastV's debiasing curve applies per view (base view, tile grid). Newlines and the span's empty
slots are never candidates."""

import dataclasses

import numpy as np
import pytest

import jaxdebias as jd
from jaxdebias.models.generate import generate

from .hf_tiny import converted
from .hf_tiny_onevision import IMAGE_TOKEN, make_hf_onevision, onevision_prompts
from .test_onevision_pruning import SIZES, batch_of
from .test_pruning import kept_sets, np_raters, np_select, np_tokencarve

torch = pytest.importorskip("torch")

K = 12  # of 250 and 130 selectable tokens (25 base view + 15 x 15 and 15 x 7 tile grids)
BUCKETS = tuple(range(1, 100))
FAMILY = "llava_onevision"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Ours and transformers' tensors of one prompt batch (right padding); 4 decoder layers, so that SparseVLM's
    layer-2 stage (which prunes layer 2's output) fits."""
    hf, ours = converted(make_hf_onevision(seed=3, layers=4), tmp_path_factory.mktemp("onevision_methods"))
    batch, px, hw = batch_of(ours, hf)
    ids, am, _, _ = onevision_prompts(hf, SIZES, padding="right")
    with torch.no_grad():
        o = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), image_sizes=torch.tensor(hw),
               attention_mask=torch.tensor(am), output_attentions=True, output_hidden_states=True)
    newline = hf.model.image_newline.detach().numpy()
    samples = []
    for b in range(len(SIZES)):
        img = np.nonzero(ids[b] == IMAGE_TOKEN)[0]
        last = int(am[b].sum()) - 1
        h0 = o.hidden_states[0][b].numpy()
        samples.append({"img": img, "last": last, "text": np.arange(img[-1] + 1, last + 1),
                        "newline": np.all(h0[img] == newline, -1)})  # transformers' packed image_newline rows
        assert samples[-1]["newline"].any()
    return {"model": ours, "batch": batch, "samples": samples, "attn": [a.numpy() for a in o.attentions],
            "hidden": [h.numpy() for h in o.hidden_states], "n": ours.num_visual(batch.pixel_values)}


def first_stage(method, n, keep):
    """The first stage of the method's released schedule (its layer, voting rows and score source), keeping ``keep``
    (the schedule for a 32-layer decoder: this one has only 4)."""
    spec = jd.PruneSpec(method, keep=128)
    assert spec.resolved_options(FAMILY) == spec.resolved_options() == {}  # no OneVision-specific defaults
    return dataclasses.replace(spec.schedule(n, 32, FAMILY)[0], keep=keep)


def ref_pdrop(t, b, instr):
    """s = mean_h A^2[instruction, image] (layer 2's own attention on its input: no pruning before it)."""
    return t["attn"][2][b][:, instr][:, t["samples"][b]["img"]].mean(0)


def ref_sparsevlm(t, b, instr):
    """Raters from the layer-0 inputs (V: the image rows, T: every real token after the image); s = mean over
    raters of mean_h A^2[rater, image] (layer 2's own attention)."""
    smp, h0 = t["samples"][b], t["hidden"][0][b]
    text = np.zeros(len(h0), bool)
    text[smp["text"]] = True
    rows = np.nonzero(np_raters(h0[smp["img"]], h0, text))[0]
    assert 0 < len(rows) < len(smp["text"])
    return t["attn"][2][b][:, rows][:, :, smp["img"]].mean(0).mean(0)


def ref_himap(t, b, instr):
    """s_i = sum over the rows after the image of mean_h A^1[row, image_i]."""
    smp = t["samples"][b]
    return t["attn"][1][b][:, smp["text"]][:, :, smp["img"]].mean(0).sum(0)


REFS = {"pdrop": ref_pdrop, "sparsevlm": ref_sparsevlm, "himap": ref_himap}


@pytest.mark.parametrize("method", ["pdrop", "sparsevlm", "himap"])
def test_first_stage_keeps_numpys_top_k(tiny, method):
    """PyramidDrop (the instruction row, given per sample in the batch), SparseVLM (text raters) and HiMAP (all
    rows after the image): the kept set is the top K of the NumPy score over the non-newline image tokens."""
    stage = first_stage(method, tiny["n"], K)
    spec = jd.PruneSpec(method, stages=(stage,), buckets=BUCKETS)
    samples = tiny["samples"]
    instr = np.array([s["last"] - 1 for s in samples])  # a text token before the last, in transformers' prompt
    shift = np.array([tiny["n"] - len(s["img"]) for s in samples])  # ours: the span's empty slots precede the text
    batch = dataclasses.replace(tiny["batch"], instruction_pos=instr + shift)
    r = generate(tiny["model"], batch, prune=spec, max_new_tokens=1)
    for b, smp in enumerate(samples):
        want = np_select(REFS[method](tiny, b, instr[b]), K, ~smp["newline"])
        assert kept_sets(r)[b] == want, (method, b)


def test_tokencarve_keeps_numpys_carved_set(tiny):
    """TokenCarve at W = 2: AV = mean_h A^1[last, image], SV from the SVD of layer 2's input over the image rows
    (newlines are no candidates, so not among the rows), rank fusion (w = 0.5), top int(1.5 K), A/B split and
    int(K/2) merges: the reported kept set (A and the unmerged B) is NumPy's, K tokens."""
    spec = jd.PruneSpec("tokencarve", keep=K, layer=2, buckets=BUCKETS)
    assert spec.resolved_options(FAMILY) == {"info_weight": 0.5}
    r = generate(tiny["model"], tiny["batch"], prune=spec, max_new_tokens=1)
    for b, smp in enumerate(tiny["samples"]):
        img, cand = smp["img"], ~smp["newline"]
        av = tiny["attn"][1][b][:, smp["last"], img].mean(0)
        x = tiny["hidden"][2][b][img]
        kept, _ = np_tokencarve(av[cand], x[cand], K)
        want = np.nonzero(cand)[0][kept].tolist()
        assert kept_sets(r)[b] == want and len(want) == K, b


def test_fastv_curve_applies_per_view(tiny):
    """FastV with one exp curve per view: the kept set (and the debiased scores) are NumPy's top K of
    mean_h A^1[last, image] x exp(-b_v local), local restarting at 0 in the tile grid and skipping its newlines.
    On these scores numbering the tiles by span position, one curve for both views, or no curve keeps another set."""
    bs = (0.1, 0.02)  # base view (5 x 5), tile grid
    spec = jd.PruneSpec("fastv", keep=K, layer=2, buckets=BUCKETS,
                        debias=jd.Debias(curve=[{"form": "exp", "b": v} for v in bs]))
    r = generate(tiny["model"], tiny["batch"], prune=spec, max_new_tokens=1)
    base = tiny["model"].cfg.vision.grid ** 2
    for b, smp in enumerate(tiny["samples"]):
        img, cand = smp["img"], ~smp["newline"]
        s = tiny["attn"][1][b][:, smp["last"], img].mean(0)
        span = np.arange(len(img))
        local = np.where(span < base, span, np.cumsum(cand & (span >= base)) - 1)
        rate = np.where(span < base, bs[0], bs[1])
        want = np_select(s * np.exp(-rate * local), K, cand)
        assert kept_sets(r)[b] == want, b
        np.testing.assert_allclose(r.debiased[b][:len(img)][cand], (s * np.exp(-rate * local))[cand], rtol=1e-4,
                                   atol=1e-7)
        for other in (s * np.exp(-rate * span), s * np.exp(-bs[0] * local), s):
            assert np_select(other, K, cand) != want, b
