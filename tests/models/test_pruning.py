"""Pruning inside the decoder: selections against NumPy re-derivations on transformers' attention, exactness with
nothing pruned, a masked-attention reference, compile counts and FLOPs."""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxdebias as jd
from jaxdebias.methods import Stage
from jaxdebias.methods.illava import MergeStage
from jaxdebias.methods.sparsevlm import RecycleStage
from jaxdebias.methods.tokencarve import CarveStage
from jaxdebias.models import generate as gen
from jaxdebias.models import layers, llava, sequence
from jaxdebias.models.layers import abstract
from jaxdebias.models.llama import rope_inv_freq
from jaxdebias.models.rows import slot_mask

torch = pytest.importorskip("torch")

from .hf_tiny import IMAGE_TOKEN, make_hf_llava, prompts  # noqa: E402

SIZES = np.array([[1000, 300], [300, 1000]])  # letterboxed: top/bottom rows, left/right columns are padding
BUCKETS = tuple(range(1, 10))
CURVE = {"form": "exp", "b": 0.4}  # strong enough to reorder 9 tokens
WEAK = {"form": "exp", "b": 0.02}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from jaxdebias.convert import from_hf

    hf = make_hf_llava("gqa", seed=5)
    path = tmp_path_factory.mktemp("prune")
    hf.save_pretrained(path)
    ids, am, px = prompts(padding="right")
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), attention_mask=torch.tensor(am),
                 position_ids=torch.tensor(np.where(am == 1, am.cumsum(-1) - 1, 0)), output_attentions=True)
        vis = hf.model.vision_tower(torch.tensor(px), output_attentions=True)
    return {"hf": hf, "model": from_hf(path), "ids": ids, "am": am, "px": px,
            "attn": [a.numpy() for a in ref.attentions], "vis_attn": [a.numpy() for a in vis.attentions]}


def batch(t, instruction=None):
    return gen.Batch(t["ids"], t["px"], t["am"], image_sizes=SIZES, instruction_pos=instruction)


def np_select(scores, k, candidates):
    order = [i for i in np.lexsort((np.arange(len(scores)), -scores)) if candidates[i]]
    return sorted(order[:k])


def np_debias(scores, debias):
    content = np.asarray(jd.pad_mask_expand2square(SIZES[:, 0], SIZES[:, 1], grid=3, canvas=42, tau=0.5))
    s, cand = scores.copy(), np.ones_like(content)
    if debias in ("curve", "pad+curve"):
        s = s * np.exp(-CURVE["b"] * np.arange(9))
    if debias in ("pad", "pad+curve"):
        s, cand = np.where(content, s, 0.0), content
    return s, cand


DEBIAS = {"off": jd.Debias(), "pad": jd.Debias(pad_tau=0.5), "pad+curve": jd.Debias(curve=CURVE, pad_tau=0.5)}


def kept_sets(result, stage=0):
    idx, slot = result.kept[stage]
    return [sorted(idx[b][slot[b]].tolist()) for b in range(idx.shape[0])]


@pytest.mark.parametrize("debias", ["off", "pad", "pad+curve"])
def test_fastv_selection_equals_numpy(tiny, debias):
    spec = jd.PruneSpec("fastv", keep=4, layer=2, buckets=BUCKETS, debias=DEBIAS[debias])
    r = gen.generate(tiny["model"], batch(tiny), prune=spec, max_new_tokens=1)
    for b in range(2):
        img = np.nonzero(tiny["ids"][b] == IMAGE_TOKEN)[0]
        last = np.nonzero(tiny["am"][b])[0].max()
        scores = tiny["attn"][1][b][:, last, img].mean(0)  # layer K-1 = 1, last token, heads averaged
        s, cand = np_debias(scores, debias)
        s, cand = s[b] if s.ndim == 2 else s, cand[b]
        assert kept_sets(r)[b] == np_select(s, 4, cand)
    if debias != "off":  # the correction changes the kept set as the formula says (checked above), and differs
        plain = gen.generate(tiny["model"], batch(tiny), prune=dataclasses.replace(
            spec, debias=jd.Debias()), max_new_tokens=1)
        assert kept_sets(plain) != kept_sets(r)


def hf_fastv_mask_mode(hf, x0, img, keep, steps, weights, fixed=False):
    """FastV's mask mode as released, on transformers' layers run one by one over a DynamicCache: at prefill and at
    every generated token, the newest row of layer 1's attention (heads averaged, times ``weights``) keeps the top
    ``keep`` image tokens; layers >= 2 mask the others for that forward's queries (their own rows included).
    x0: float[1, T, D] the prompt's input embeddings; img: its image slots. Returns (greedy tokens, the pruned
    image tokens of every forward, the top-2 logit margin of every step)."""
    from transformers import DynamicCache

    lm = hf.model.language_model
    cache_kw = "cache" if "cache" in inspect.signature(lm.layers[0].forward).parameters else "past_key_values"
    cache, tokens, x, start, selections, margins = DynamicCache(), [], x0, 0, [], []
    neg = torch.finfo(x0.dtype).min
    for _ in range(steps):
        T = x.shape[1]
        pos = torch.arange(start, start + T)[None]
        causal = torch.arange(start + T)[None, :] <= pos[0][:, None]  # [T, S]
        pe = lm.rotary_emb(x, pos)
        h, pruned = x, None
        for i, layer in enumerate(lm.layers):
            allowed = causal.clone()
            if pruned is not None:
                allowed[:, torch.tensor(img[pruned])] = False
            mask = torch.where(allowed, 0.0, neg)[None, None]
            seen = []
            hook = layer.self_attn.register_forward_hook(lambda mod, args, out: seen.append(out[1]))
            h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe, **{cache_kw: cache})
            h = h[0] if isinstance(h, tuple) else h
            hook.remove()
            if i == 1 and fixed and selections:  # the prefill's selection serves every token
                pruned = np.asarray(selections[0], int)
            elif i == 1:  # K - 1: the newest row selects for layers >= K
                scores = seen[0][0, :, -1, torch.tensor(img)].mean(0).numpy() * weights
                pruned = np.setdiff1d(np.arange(len(img)), np_select(scores, keep, np.ones(len(img), bool)))
                selections.append(tuple(pruned))
        logits = hf.lm_head(lm.norm(h[:, -1]))[0]
        top2 = torch.topk(logits, 2).values
        tok = int(logits.argmax(-1))
        tokens.append(tok)
        margins.append(float(top2[0] - top2[1]))
        start += T
        x = hf.model.get_input_embeddings()(torch.tensor([[tok]]))
    return tokens, selections, margins


def test_fastv_mask_mode_reselects_at_every_token_as_released(tiny):
    """mode="mask", reselect="every_token": nothing is removed; every generated token re-selects the kept image
    tokens from its own row,
    debiased: tokens 2+ equal the re-selecting reference on transformers' layers, where the kept set does change
    between forwards (so a fixed selection would not pass)."""
    spec = jd.PruneSpec("fastv", keep=4, layer=2, buckets=BUCKETS, decode="released", debias=jd.Debias(curve=WEAK))
    assert (spec.mode, spec.reselect) == ("mask", "every_token")  # FastV's release decodes so
    r = gen.generate(tiny["model"], batch(tiny), prune=spec, max_new_tokens=8, stop_at_eos=False)
    hf, ids, am = tiny["hf"], tiny["ids"], tiny["am"]
    with torch.no_grad():
        x0 = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(tiny["px"]), attention_mask=torch.tensor(am),
                output_hidden_states=True).hidden_states[0]
        changed = []
        for b in range(2):
            n_valid = am[b].sum()
            img = np.nonzero(ids[b] == IMAGE_TOKEN)[0]
            ref, selections, margins = hf_fastv_mask_mode(hf, x0[b:b + 1, :n_valid], img, 4, 8,
                                                          np.exp(-WEAK["b"] * np.arange(9)))
            for step, (got, want, margin) in enumerate(zip(r.tokens[b].tolist(), ref, margins)):
                if margin < 1e-3:  # a near-tie of the two best logits: fp32 rounding may pick either, and the
                    break  # sequences part there
                assert got == want, (b, step, margin)
            changed.append(len(set(selections)) > 1)
    assert any(changed)
    assert r.stage_lengths == [(0, 2, 64), (2, 4, 64)]  # no token leaves the sequence
    fixed = gen.generate(tiny["model"], batch(tiny), prune=dataclasses.replace(spec, reselect="prefill"),
                         max_new_tokens=8, stop_at_eos=False)
    with torch.no_grad():
        for b in range(2):
            n_valid = am[b].sum()
            img = np.nonzero(ids[b] == IMAGE_TOKEN)[0]
            ref, _, margins = hf_fastv_mask_mode(hf, x0[b:b + 1, :n_valid], img, 4, 8,
                                                 np.exp(-WEAK["b"] * np.arange(9)), fixed=True)
            for step, (got, want, margin) in enumerate(zip(fixed.tokens[b].tolist(), ref, margins)):
                if margin < 1e-3:
                    break
                assert got == want, (b, step, margin)
    with pytest.raises(ValueError, match="mode='mask'"):
        jd.PruneSpec("pdrop", mode="mask", stages=(Stage(2, 4, "instruction", "probe"),)).plan(9, 4)


def test_pdrop_stages_equal_numpy_and_transformers(tiny):
    """Stage 1: the instruction row of layer 2's own attention (debiased by the curve) keeps 5. Stage 2: layer 3's
    attention, which transformers computes here after running layer 2 on the pruned sequence (positions
    re-indexed 0..L'-1, as the release does), keeps 2 of them, undebiased."""
    instr = np.array([np.nonzero(tiny["am"][b])[0].max() - 1 for b in range(2)])  # a text token before the last
    spec = jd.PruneSpec("pdrop", stages=(Stage(2, 5, "instruction", "probe"), Stage(3, 2, "instruction", "probe")),
                        buckets=BUCKETS, debias=jd.Debias(curve=CURVE))
    r = gen.generate(tiny["model"], batch(tiny, instr), prune=spec, max_new_tokens=1)
    hf, ids, am = tiny["hf"], tiny["ids"], tiny["am"]
    lm = hf.model.language_model
    with torch.no_grad():
        h2 = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(tiny["px"]), attention_mask=torch.tensor(am),
                position_ids=torch.tensor(np.where(am == 1, am.cumsum(-1) - 1, 0)),
                output_hidden_states=True).hidden_states[2]
    for b in range(2):
        img = np.nonzero(ids[b] == IMAGE_TOKEN)[0]
        scores = tiny["attn"][2][b][:, instr[b], img].mean(0)  # the stage layer's own attention, before pruning
        s, cand = np_debias(scores, "curve")
        kept = np_select(s, 5, cand[b])
        assert kept_sets(r)[b] == kept
        slots = np.concatenate([np.arange(img[0]), img[kept], np.arange(img[-1] + 1, am[b].sum())])
        x = h2[b][slots][None]
        L = x.shape[1]
        mask = torch.full((1, 1, L, L), torch.finfo(x.dtype).min).triu(1)
        pos = torch.arange(L)[None]  # re-indexed
        weights = []
        hook = lm.layers[3].self_attn.register_forward_hook(lambda mod, args, out: weights.append(out[1][0].numpy()))
        with torch.no_grad():
            pe = lm.rotary_emb(x, pos)
            x = lm.layers[2](x, attention_mask=mask, position_ids=pos, position_embeddings=pe)
            lm.layers[3](x[0] if isinstance(x, tuple) else x, attention_mask=mask, position_ids=pos,
                         position_embeddings=pe)
        hook.remove()
        row = int(np.nonzero(slots == instr[b])[0][0])
        second = weights[0][:, row, img[0] + np.arange(5)].mean(0)
        assert kept_sets(r, 1)[b] == [kept[i] for i in np_select(second, 2, np.ones(5, bool))]


def test_himap_stages_equal_numpy_and_transformers(tiny):
    """Stage 1: the text rows' attention in layer 1 keeps 5. Stage 2: the kept image tokens' attention to each
    other in layer 2, which transformers computes here on the pruned sequence (original positions), keeps 3."""
    spec = jd.PruneSpec("himap", stages=(Stage(2, 5, "text", "tap"), Stage(3, 3, "image", "tap")), buckets=BUCKETS)
    r = gen.generate(tiny["model"], batch(tiny), prune=spec, max_new_tokens=1)
    hf, ids, am = tiny["hf"], tiny["ids"], tiny["am"]
    lm = hf.model.language_model
    with torch.no_grad():
        h2 = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(tiny["px"]), attention_mask=torch.tensor(am),
                position_ids=torch.tensor(np.where(am == 1, am.cumsum(-1) - 1, 0)),
                output_hidden_states=True).hidden_states[2]
    for b in range(2):
        img = np.nonzero(ids[b] == IMAGE_TOKEN)[0]
        n_valid = am[b].sum()
        text = [t for t in range(n_valid) if t > img.max()]
        scores = tiny["attn"][1][b][:, text][:, :, img].mean((0, 1))
        kept = np_select(scores, 5, np.ones(9, bool))
        assert kept_sets(r)[b] == kept
        slots = np.concatenate([np.arange(img[0]), img[kept], np.arange(img[-1] + 1, n_valid)])  # = positions
        x = h2[b][slots][None]
        L = x.shape[1]
        weights = []
        hook = lm.layers[2].self_attn.register_forward_hook(lambda mod, args, out: weights.append(out[1][0].numpy()))
        with torch.no_grad():
            pos = torch.tensor(slots)[None]
            lm.layers[2](x, attention_mask=torch.full((1, 1, L, L), torch.finfo(x.dtype).min).triu(1),
                         position_ids=pos, position_embeddings=lm.rotary_emb(x, pos))
        hook.remove()
        rows = img[0] + np.arange(5)  # the kept image tokens, as queries and as keys
        second = weights[0][:, rows][:, :, rows].mean((0, 1))
        assert kept_sets(r, 1)[b] == [kept[i] for i in np_select(second, 3, np.ones(5, bool))]


def hf_himap_logits(hf, x, n_image_start, keep1, keep2):
    """HiMAP's released forward on transformers' layers for one sequence x [1, T, D] (no cache): layers 0-1 full;
    before layer 2 the rows after the image (heads averaged, summed) keep ``keep1`` image tokens (original
    positions); before layer 3 the kept image tokens' attention among themselves keeps ``keep2``. Returns the
    last token's logits."""
    lm = hf.model.language_model
    T = x.shape[1]
    img = n_image_start + np.arange(9)
    slots = np.arange(T)
    h = x
    for i, layer in enumerate(lm.layers):
        L = len(slots)
        mask = torch.full((1, 1, L, L), torch.finfo(x.dtype).min).triu(1)
        pos = torch.tensor(slots)[None]
        seen = []
        hook = layer.self_attn.register_forward_hook(lambda mod, args, out: seen.append(out[1][0].numpy()))
        h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=lm.rotary_emb(h, pos))
        h = h[0] if isinstance(h, tuple) else h
        hook.remove()
        image_rows = np.nonzero(np.isin(slots, img))[0]
        if i == 1:  # stage 1 before layer 2: every row after the image votes
            text = np.nonzero(slots > img[-1])[0]
            scores = seen[0][:, text][:, :, image_rows].mean(0).sum(0)
            chosen = image_rows[np_select(scores, keep1, np.ones(len(image_rows), bool))]
        elif i == 2:  # stage 2 before layer 3: the kept image tokens among themselves
            scores = seen[0][:, image_rows][:, :, image_rows].mean(0).sum(0)
            chosen = image_rows[np_select(scores, keep2, np.ones(len(image_rows), bool))]
        else:
            continue
        keep = np.sort(np.concatenate([np.nonzero(~np.isin(slots, img))[0], chosen]))
        slots, h = slots[keep], h[:, torch.tensor(keep)]
    return hf.lm_head(lm.norm(h[:, -1]))[0].numpy()


def test_himap_recomputes_both_stages_at_every_token_as_released(tiny):
    """reselect="every_token" with mode="remove": no KV cache, the whole pruned prefill reruns for each new token,
    which joins the voting rows - tokens equal a step-by-step reference on transformers' layers."""
    spec = jd.PruneSpec("himap", stages=(Stage(2, 5, "text", "tap"), Stage(3, 3, "image", "tap")), buckets=BUCKETS,
                        decode="released")
    assert (spec.mode, spec.reselect) == ("remove", "every_token")  # HiMAP's release decodes so
    r = gen.generate(tiny["model"], batch(tiny), prune=spec, max_new_tokens=8, stop_at_eos=False)
    hf, ids, am = tiny["hf"], tiny["ids"], tiny["am"]
    with torch.no_grad():
        for b in range(2):
            seq = ids[b][:am[b].sum()].tolist()
            img0 = int(np.nonzero(ids[b] == IMAGE_TOKEN)[0][0])
            for step in range(8):
                out = hf(input_ids=torch.tensor([seq]), pixel_values=torch.tensor(tiny["px"][b:b + 1]),
                         output_hidden_states=True)
                logits = hf_himap_logits(hf, out.hidden_states[0], img0, 5, 3)
                if step == 0:
                    np.testing.assert_allclose(r.logits[b], logits, atol=1e-4)
                assert r.tokens[b, step] == int(logits.argmax())
                seq.append(int(logits.argmax()))
    left_ids, left_am, left_px = prompts(padding="left")  # each new token goes after the prompt's last real slot
    left = gen.generate(tiny["model"], gen.Batch(left_ids, left_px, left_am), prune=spec, max_new_tokens=8,
                        stop_at_eos=False)
    np.testing.assert_array_equal(left.tokens, r.tokens)


def np_visionzip(attn, hidden, keys, dominant, contextual):
    """The released VisionZip algorithm (dvlab-research/VisionZip, clip_encoder.py), re-derived in NumPy for one
    image: CLS + the dominant-1 patches CLS attends to most (heads summed), in index order; of the rest, targets
    every (n_rest // contextual)-th, the others joined to the target of most similar normalised key; a contextual
    token is its target plus the mean of its joiners. attn [H, P+1, P+1], hidden [P+1, D], keys [P+1, Hd]."""
    cls = attn[:, 0, 1:].sum(0)
    top = np.sort(np.argsort(-cls, kind="stable")[:dominant - 1] + 1)
    keep = np.concatenate([[0], top])
    rest = np.setdiff1d(np.arange(len(hidden)), keep)
    k = keys[rest] / np.linalg.norm(keys[rest], axis=-1, keepdims=True)
    step = max(1, len(rest) // contextual)
    targets = np.arange(0, len(rest), step)[:contextual]
    others = np.setdiff1d(np.arange(len(rest)), targets)
    joined = np.argmax(k[others] @ k[targets].T, axis=1)
    ctx = [hidden[rest[t]] + (hidden[rest[others[joined == c]]].mean(0) if (joined == c).any() else 0)
           for c, t in enumerate(targets)]
    return np.concatenate([hidden[keep], np.stack(ctx)]), top - 1


def test_visionzip_equals_the_released_algorithm_on_transformers(tiny):
    """keep 6 = CLS + 3 dominant patches + 2 contextual tokens. The reference runs the released rule on
    transformers' CLIP outputs, projects the block with transformers' projector and runs transformers' decoder
    with the image span replaced by it (positions re-indexed, as the block is simply shorter)."""
    spec = jd.PruneSpec("visionzip", keep=6, options={"contextual": 2}, buckets=BUCKETS)
    r = gen.generate(tiny["model"], batch(tiny), prune=spec, max_new_tokens=1)
    hf, ids, am = tiny["hf"], tiny["ids"], tiny["am"]
    tower = hf.model.vision_tower
    with torch.no_grad():
        out = tower(torch.tensor(tiny["px"]), output_hidden_states=True, output_attentions=True)
        layer = tower.encoder.layers[-2]
        x = layer.layer_norm1(out.hidden_states[-3])
        keys = layer.self_attn.k_proj(x).reshape(*x.shape[:2], layer.self_attn.num_heads, -1).mean(2).numpy()
        embeds, masks, kept = [], [], []
        for b in range(2):
            block, top = np_visionzip(out.attentions[-2][b].numpy(), out.hidden_states[-2][b].numpy(), keys[b], 4, 2)
            kept.append(sorted(top.tolist()))
            img = np.nonzero(ids[b] == IMAGE_TOKEN)[0]
            proj = hf.model.multi_modal_projector(torch.tensor(block))
            tok = hf.model.get_input_embeddings()(torch.tensor(ids[b]))
            embeds.append(torch.cat([tok[:img[0]], proj, tok[img[-1] + 1:]]))
            masks.append(np.concatenate([am[b][:img[0]], np.ones(len(block), int), am[b][img[-1] + 1:]]))
        am2 = np.stack(masks)
        logits = hf(inputs_embeds=torch.stack(embeds), attention_mask=torch.tensor(am2),
                    position_ids=torch.tensor(np.where(am2 == 1, am2.cumsum(-1) - 1, 0))).logits.numpy()
    assert kept_sets(r) == kept
    last = [np.nonzero(am2[b])[0].max() for b in range(2)]
    np.testing.assert_allclose(r.logits, logits[[0, 1], last], atol=1e-4)
    assert r.stage_lengths[0][2] == 64 - 9 + 6  # the prompt's 64-slot bucket with the image span shortened


def np_raters(h_visual, h_all, text):
    """SparseVLM v1.5's raters (methods.md): softmax over the text tokens of raw dot products V.T^T, the mean over
    the image rows, raters = the text tokens strictly above the mean of those means."""
    logits = h_visual @ h_all[text].T
    m = np.exp(logits - logits.max(1, keepdims=True))
    m = (m / m.sum(1, keepdims=True)).mean(0)
    rows = np.zeros(len(h_all), bool)
    rows[np.nonzero(text)[0][m > m.mean()]] = True
    return rows


def run_layers_from(lm, hf, x, pos, start):
    """transformers' decoder layers [start, L) on x [1, L', D] at positions pos, causal; the last token's logits."""
    L = x.shape[1]
    mask = torch.full((1, 1, L, L), torch.finfo(x.dtype).min).triu(1)
    pos = torch.tensor(np.asarray(pos))[None]
    with torch.no_grad():
        pe = lm.rotary_emb(x, pos)
        for layer in lm.layers[start:]:
            x = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=pe)
            x = x[0] if isinstance(x, tuple) else x
        return hf.lm_head(lm.norm(x))[0, -1].numpy()


def test_sparsevlm_stage_equals_numpy_and_transformers(tiny):
    """Raters from the decoder inputs; layer 2 runs on the full set and its own attention (rater rows, heads then
    raters averaged) keeps 4; of the 5 pruned the best 3 by raw score become one merged token after the kept ones;
    the pruned sequence is layer 2's *output*, positions re-indexed: kept set = NumPy on transformers' tensors,
    logits = transformers' layer 3 on that sequence."""
    spec = jd.PruneSpec("sparsevlm", stages=(RecycleStage(2, 4, "raters", "self", recycle=3, clusters=1),),
                        buckets=BUCKETS, debias=jd.Debias(curve=CURVE))
    r = gen.generate(tiny["model"], batch(tiny), prune=spec, max_new_tokens=1)
    hf, ids, am = tiny["hf"], tiny["ids"], tiny["am"]
    lm = hf.model.language_model
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(tiny["px"]), attention_mask=torch.tensor(am),
                 position_ids=torch.tensor(np.where(am == 1, am.cumsum(-1) - 1, 0)), output_attentions=True,
                 output_hidden_states=True)
    for b in range(2):
        img = np.nonzero(ids[b] == IMAGE_TOKEN)[0]
        n_valid = am[b].sum()
        h0 = out.hidden_states[0][b].numpy()
        text = np.zeros(len(h0), bool)
        text[img[-1] + 1:n_valid] = True
        rows = np.nonzero(np_raters(h0[img], h0, text))[0]
        raw = out.attentions[2][b][:, rows][:, :, img].mean(0).mean(0).numpy()
        s, cand = np_debias(raw, "curve")  # debiasing touches the top-k only
        kept = np_select(s, 4, cand[b])
        assert kept_sets(r)[b] == kept
        pruned = [i for i in range(9) if i not in kept]
        recycled = sorted(pruned, key=lambda i: (-raw[i], i))[:3]  # raw scores, over every pruned token
        h3 = out.hidden_states[3][b]  # layer 2's output
        x = torch.cat([h3[:img[0]], h3[img[kept]], h3[img[recycled]].mean(0, keepdim=True),
                       h3[img[-1] + 1:n_valid]])[None]
        np.testing.assert_allclose(r.logits[b], run_layers_from(lm, hf, x, np.arange(x.shape[1]), 3), atol=1e-4)
    assert r.stage_lengths == [(0, 3, 64), (3, 4, 64 - 9 + 4 + 1)]


def np_tokencarve(av, x, n, w=0.5):
    """TokenCarve's released selection (methods.md): rank fusion of AV and SV (SVD of X), the top int(1.5 n) in
    score order split in halves A and B, the min(|A|, int(n/2)) B tokens most cosine-similar to A merged into
    their best A token. Returns (kept indices ascending, their features)."""
    N = len(av)
    u, sv, _ = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    sv_score = (np.abs(u) * sv).sum(1)
    rank = lambda s: np.argsort(np.lexsort((np.arange(N), -s)))  # noqa: E731  0-based descending rank
    score = w * (N - rank(av)) + (1 - w) * (N - rank(sv_score))
    top = np.lexsort((np.arange(N), -score))[:int(1.5 * n)]
    A, B = top[:len(top) // 2], top[len(top) // 2:]
    unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
    feats = {a: [x[a]] for a in A}
    merged = set()
    if len(A):
        cos = unit[B] @ unit[A].T
        best, target = cos.max(1), A[cos.argmax(1)]
        for j in np.lexsort((np.arange(len(B)), -best))[:min(len(A), n // 2)]:
            feats[target[j]].append(x[B[j]])
            merged.add(B[j])
    kept = sorted([*A, *[b for b in B if b not in merged]])
    return kept, np.stack([np.mean(feats[k], 0) if k in feats else x[k] for k in kept])


def test_tokencarve_stage_equals_numpy_and_transformers(tiny):
    """Layer 1's last-token attention (debiased: curve and padding on this score only) and the SV score of layer 2's
    input over all image rows, fused by rank; the release's A/B split and merge; original positions: kept set =
    NumPy on transformers' tensors, logits = transformers' layers 2-3 on that sequence; the debiased kept set
    differs; generated tokens see only the kept tokens in layers 0-1 too."""
    hf, ids, am = tiny["hf"], tiny["ids"], tiny["am"]
    lm = hf.model.language_model
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(tiny["px"]), attention_mask=torch.tensor(am),
                 position_ids=torch.tensor(np.where(am == 1, am.cumsum(-1) - 1, 0)), output_attentions=True,
                 output_hidden_states=True)
    kept_by = {}
    for debias, K in (("off", 4), ("curve", 4), ("pad+curve", 2), ("off", 1)):
        spec = jd.PruneSpec("tokencarve", stages=(CarveStage(2, K, "last", "tap", info_weight=0.5),),
                            buckets=BUCKETS, debias=DEBIAS.get(debias, jd.Debias(curve=CURVE)))
        r = gen.generate(tiny["model"], batch(tiny), prune=spec, max_new_tokens=1)
        kept_by[debias, K] = kept_sets(r)
        for b in range(2):
            img = np.nonzero(ids[b] == IMAGE_TOKEN)[0]
            n_valid = am[b].sum()
            av, _ = np_debias(out.attentions[1][b][:, n_valid - 1, img].mean(0).numpy(), debias)
            av = av[b] if av.ndim == 2 else av
            h2 = out.hidden_states[2][b].numpy()  # layer 2's input = layer 1's decoder output
            kept, feats = np_tokencarve(av, h2[img], K)
            assert kept_by[debias, K][b] == kept
            x = torch.tensor(np.concatenate([h2[:img[0]], feats, h2[img[-1] + 1:n_valid]]))[None]
            pos = np.concatenate([np.arange(img[0]), img[kept], np.arange(img[-1] + 1, n_valid)])  # original
            np.testing.assert_allclose(r.logits[b], run_layers_from(lm, hf, x, pos, 2), atol=1e-4)
        assert r.stage_lengths == [(0, 2, 64), (2, 4, 64 - 9 + K)]
    assert kept_by["curve", 4] != kept_by["off", 4]


def test_tokencarve_lower_caches_hold_the_kept_tokens(tiny):
    """After the stage the caches of the layers below the work layer hold only the kept image tokens (the release
    gathers them), so generated tokens attend to the pruned set in every layer."""
    spec = jd.PruneSpec("tokencarve", stages=(CarveStage(2, 4, "last", "tap", info_weight=0.5),),
                        buckets=BUCKETS)
    model = tiny["model"]
    prep = gen.prepare(model, batch(tiny), spec)
    graphdef, state = nnx.split(model)
    _, out = gen.prefill_step(graphdef, state, *prep.arrays, prep.limits, jax.random.key(0), plan=prep.plan,
                              extra=64, temperature=0.0, var=None, triangle=None)  # generate's call: its program
    cache = out.cache
    for b in range(2):
        img = np.nonzero(tiny["ids"][b] == IMAGE_TOKEN)[0]
        kept = np.asarray(out.kept[0][0][b])[np.asarray(out.kept[0][1][b])]
        pruned = np.setdiff1d(np.arange(9), kept)
        for layer in (0, 1):
            valid = np.asarray(cache.valid[layer][b])
            assert not valid[img[pruned]].any() and valid[img[kept]].all()
        assert np.asarray(cache.valid[2][b]).sum() == tiny["am"][b].sum() - 9 + 4


def test_illava_stages_equal_the_release_on_transformers(tiny):
    """iLLaVA: CLIP layer 1 merges 2 tokens away (CLS protected), the decoder sees 7 image tokens at contiguous
    positions; before layer 2 the last token's layer-1 attention (debiased by the curve at each token's raster
    index) merges the 3 + 1 least attended into the 4th kept (weights 1..4), original positions: kept tokens and
    logits = the NumPy rules on transformers' CLIP and decoder layers run one by one."""
    from tests.jaxdebias.test_illava_rules import ref_llm_merge
    from tests.models.test_illava import reference as clip_with_merges

    spec = jd.PruneSpec("illava", keep=4, layer=2, options={"vit_layers": (1,), "vit_r": 2},
                        debias=jd.Debias(curve=CURVE))
    r = gen.generate(tiny["model"], batch(tiny), prune=spec, max_new_tokens=1)
    hf, ids, am = tiny["hf"], tiny["ids"], tiny["am"]
    lm = hf.model.language_model
    feats, source = clip_with_merges(hf.model.vision_tower, tiny["px"], (1,), 2, runs=2)
    for b in range(2):
        assert kept_sets(r, 0)[b] == sorted(source[b].tolist())
        img = np.nonzero(ids[b] == IMAGE_TOKEN)[0]
        n_valid = am[b].sum()
        with torch.no_grad():
            block = hf.model.multi_modal_projector(torch.tensor(feats[b]))
            tok = hf.model.get_input_embeddings()(torch.tensor(ids[b][:n_valid]))
            x = torch.cat([tok[:img[0]], block, tok[img[-1] + 1:]])[None]
            L = x.shape[1]
            mask = torch.full((1, 1, L, L), torch.finfo(x.dtype).min).triu(1)
            pos = torch.arange(L)[None]
            pe = lm.rotary_emb(x, pos)
            seen = []
            hook = lm.layers[1].self_attn.register_forward_hook(lambda m, a, out: seen.append(out[1][0].numpy()))
            for layer in lm.layers[:2]:
                x = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=pe)
                x = x[0] if isinstance(x, tuple) else x
            hook.remove()
        rows = img[0] + np.arange(7)
        scores = seen[0][:, L - 1, rows].mean(0) * np.exp(-CURVE["b"] * source[b])
        kept, merged = ref_llm_merge(x[0, rows].numpy(), scores, 3)
        assert kept_sets(r, 1)[b] == sorted(source[b][kept].tolist())
        x = torch.cat([x[0, :img[0]], torch.tensor(merged, dtype=x.dtype), x[0, img[0] + 7:]])[None]
        positions = np.concatenate([np.arange(img[0]), img[0] + kept, np.arange(img[0] + 7, L)])  # original
        np.testing.assert_allclose(r.logits[b], run_layers_from(lm, hf, x, positions, 2), atol=1e-4)
    assert r.stage_lengths == [(0, 2, 64 - 9 + 7), (2, 4, 64 - 9 + 4)]


@pytest.mark.parametrize("method", ["fastv", "pdrop", "himap", "visionzip", "sparsevlm", "illava"])
def test_keep_all_equals_unpruned(tiny, method):
    """(TokenCarve's released rule merges a quarter of its top 1.5 n even when n is every token: no keep-all.)"""
    stages = {"fastv": None, "pdrop": (Stage(1, 9, "instruction", "probe"), Stage(3, 9, "instruction", "probe")),
              "sparsevlm": (RecycleStage(2, 9),), "illava": (MergeStage(2, 9),),
              "himap": (Stage(1, 9, "text", "tap"), Stage(2, 9, "image", "tap")), "visionzip": None}[method]
    options = {"visionzip": {"contextual": 0, "cls": False}, "illava": {"vit_layers": (), "vit_r": 0}}
    spec = jd.PruneSpec(method, keep=9, stages=stages, buckets=BUCKETS, options=options.get(method, {}))
    r = gen.generate(tiny["model"], batch(tiny), prune=spec, max_new_tokens=8, stop_at_eos=False)
    out = tiny["model"](tiny["ids"], tiny["px"], tiny["am"])
    ref = np.asarray(layers.last_real(out.logits, jnp.asarray(tiny["am"], bool)))
    np.testing.assert_allclose(r.logits, ref, atol=1e-5)
    dense = gen.generate(tiny["model"], gen.Batch(tiny["ids"], tiny["px"], tiny["am"]), max_new_tokens=8, stop_at_eos=False).tokens
    np.testing.assert_array_equal(r.tokens, dense)


def masked_reference(model, ids, px, am, layer, kept_raster):
    """FastV by masking instead of removing: layers >= `layer` may not attend to pruned image tokens."""
    lm = model.language_model
    h, _ = model.embed(ids, px)
    B, T = ids.shape
    amb = jnp.asarray(am, bool)
    pos = layers.default_positions(amb)
    is_img = ids == IMAGE_TOKEN
    raster = np.where(is_img, np.cumsum(is_img, 1) - 1, -1)
    keep = ~is_img | np.stack([np.isin(raster[b], kept_raster[b]) for b in range(B)])
    q = jnp.broadcast_to(jnp.arange(T), (B, T))
    inv = jnp.asarray(rope_inv_freq(model.cfg.text))
    for i, lay in enumerate(lm.layers):
        mask = slot_mask(q, amb if i < layer else amb & jnp.asarray(keep))
        h = lay(h, pos, inv, mask)[0]
    last = jnp.max(jnp.where(amb & jnp.asarray(keep), jnp.arange(T), 0), 1)
    return np.asarray(lm.logits(jnp.take_along_axis(h, last[:, None, None], 1)[:, 0]))


def test_pruned_logits_equal_masked_attention_reference(tiny):
    spec = jd.PruneSpec("fastv", keep=3, layer=2, buckets=BUCKETS, debias=jd.Debias(pad_tau=0.5))
    r = gen.generate(tiny["model"], batch(tiny), prune=spec, max_new_tokens=1)
    ref = masked_reference(tiny["model"], tiny["ids"], tiny["px"], tiny["am"], 2, kept_sets(r))
    np.testing.assert_allclose(r.logits, ref, atol=1e-5)
    assert r.stage_lengths == [(0, 2, 64), (2, 4, 64 - 9 + 3)]  # the tokens are really gone after layer 2


def test_mixed_requests_compile_once_per_bucket(tiny):
    """32 requests of four methods with mixed prompt lengths, image shapes and budgets: one prefill program per
    (prompt bucket, shape spec) and one decode program per (prompt bucket, per-layer cache sizes). The requests are
    drawn so that eight programs serve them (each compile costs seconds on a CPU): FastV's prompts span both prompt
    buckets and its budgets both budget buckets, the others' prompts fit the first; VisionZip's budgets share one
    bucket, TokenCarve's and SparseVLM's are exact keeps (one and two)."""
    rng = np.random.default_rng(0)
    gen.prefill_step.clear_cache()  # other tests in this process may have compiled the same shapes
    gen.decode_step.clear_cache()
    p0, d0 = gen.prefill_step._cache_size(), gen.decode_step._cache_size()
    seen, caches, budgets = set(), set(), {}
    buckets = (4, 9)
    for i in range(32):
        method = ["fastv", "visionzip", "tokencarve", "sparsevlm"][i % 4]
        extra = int(rng.integers(0, 70 if method == "fastv" else 40))  # prompt lengths 21..90 / 21..60
        ids = np.concatenate([tiny["ids"][:, :1], rng.integers(3, 140, (2, extra)), tiny["ids"][:, 1:]], 1)
        am = np.concatenate([tiny["am"][:, :1], np.ones((2, extra), int), tiny["am"][:, 1:]], 1)
        sizes = rng.integers(50, 2000, (2, 2))
        keep = {"fastv": int(rng.integers(2, 10)),  # 2..9: both budget buckets
                "visionzip": int(rng.integers(3, 5)),  # CLS + 1 contextual + 1..2 dominant: one bucket
                "tokencarve": 4,  # exact keeps (one program per budget): one budget
                "sparsevlm": 4 + 2 * int(rng.integers(0, 2))}[method]  # exact keeps: two budgets
        stages = None
        if method == "sparsevlm":
            stages = (RecycleStage(2, keep, "raters", "self", recycle=2, clusters=1),)
        options = {"contextual": 1} if method == "visionzip" else {}
        spec = jd.PruneSpec(method, keep=keep, stages=stages, buckets=buckets, options=options,
                            debias=jd.Debias(curve="online", pad_tau=0.5))
        r = gen.generate(tiny["model"], gen.Batch(ids, tiny["px"], am, sizes), prune=spec,
                                         max_new_tokens=2, stop_at_eos=False)
        shape, limits = spec.plan(9, 4)
        prompt = jd.bucket(ids.shape[1], gen.PROMPT_BUCKETS)
        seen.add((prompt, shape))
        budgets.setdefault((prompt, shape), set()).add(keep)
        caches.add(tuple(r.stage_lengths))
        assert all((s.sum(1) <= keep).all() for _, s in r.kept)
    assert {m for _, m in {(p, s.method) for p, s in seen}} == {"fastv", "visionzip", "tokencarve", "sparsevlm"}
    assert len(seen) <= 8 and {p for p, s in seen if s.method == "fastv"} == {64, 128}
    assert any(len(k) > 1 for k in budgets.values())  # different budgets in one bucket share a program
    assert gen.prefill_step._cache_size() - p0 == len(seen)
    assert gen.decode_step._cache_size() - d0 == len(caches) < len(seen)  # equal cache layouts share a decode


def _flops(model, spec, T=640):
    n = model.cfg.vision.num_features
    shape, limits = (None, ()) if spec is None else spec.plan(n, model.cfg.text.num_layers)
    B = 1
    ids = np.full((B, T), 5)
    ids[:, 10:10 + n] = model.cfg.image_token_id
    px = jnp.zeros((B, 3, model.cfg.vision.image_size, model.cfg.vision.image_size))
    from flax import nnx

    g, st = nnx.split(model)
    lowered = gen.prefill_step.lower(g, st, jnp.asarray(ids), px, jnp.ones((B, T), bool), jnp.ones((B, 2), jnp.int32),
                                     None, sequence.limits_array(limits), jax.random.key(0), plan=shape,
                                     extra=64, temperature=0.0)
    # XLA's cost analysis of the program as lowered (what compiling would optimise; within 0.3 % of the compiled
    # program's count here) costs no compilation
    return lowered.cost_analysis()["flops"], shape


def test_prefill_flops_match_the_analytic_count():

    from jaxdebias.models.clip import ClipVisionConfig
    from jaxdebias.models.llama import LlamaConfig

    cfg = llava.LlavaConfig(ClipVisionConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2),
                            LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1376, num_layers=6,
                                        num_heads=8, num_kv_heads=8))
    model = abstract(llava.Llava, cfg)
    model = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), model)
    D, F, T = 512, 1376, 640  # the cache's 64 decode slots after the prompt are not attended by it

    def key_columns(Ts):  # rows.causal_attention: <= 4 row blocks of >= 128 rows, block [a, b) sees keys [0, b)
        size = max(128, -(-Ts // 4))
        return sum(min(size, Ts - a) * min(Ts, a + size) for a in range(0, Ts, size))

    def layer_flops(Ts):  # projections, MLP, and QK^T + PV over the key columns the prompt's attention computes
        return 2 * Ts * (4 * D * D + 3 * D * F) + 2 * 2 * key_columns(Ts) * D

    dense, _ = _flops(model, None)
    for keep in (64, 192):
        pruned, shape = _flops(model, jd.PruneSpec("fastv", keep=keep, layer=2))
        Ts = T - 576 + shape.stages[0].slots
        analytic_saving = 4 * (layer_flops(T) - layer_flops(Ts))  # layers 2..5 see Ts tokens instead of T
        ratio = (dense - pruned) / analytic_saving
        assert 0.97 < ratio < 1.06, ratio
    sv = (RecycleStage(2, 300, "raters", "self", recycle=83, clusters=9), RecycleStage(4, 110, "raters", "self", recycle=63,
                                                                                  clusters=7))
    pruned, shape = _flops(model, jd.PruneSpec("sparsevlm", stages=sv))
    T1, T2 = T - 576 + 309, T - 576 + 117  # kept + merged tokens; layers 2 and 4 run on the set before them
    analytic_saving = 2 * (layer_flops(T) - layer_flops(T1)) + (layer_flops(T) - layer_flops(T2))
    Q = T - 576  # the rows after the image that may rate
    overhead = 2 * 576 * T * D + sum(2 * Q * Ts * D for Ts in (T, T1))  # raters, each stage's tapped rows
    ratio = (dense - pruned) / (analytic_saving - overhead)
    assert 0.97 < ratio < 1.06, ratio  # the rest: DPC-KNN distances, softmaxes, gathers
    pruned, shape = _flops(model, jd.PruneSpec("tokencarve", keep=128))  # 192 ranked, 32 of B merged into A
    analytic_saving = 4 * (layer_flops(T) - layer_flops(T - 576 + 128))
    overhead = 2 * 96 * 96 * D  # the A x B cosine similarities (the SVD is not in XLA's count)
    ratio = (dense - pruned) / (analytic_saving - overhead)
    assert 0.97 < ratio < 1.06, ratio
