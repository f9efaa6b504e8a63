"""VAR inside the decoder against a straightforward PyTorch re-implementation of the released rule, applied to
transformers' eager attention; p = 1 is the identity; bad input."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxdebias as jd
from jaxdebias.models.generate import Batch, generate
from jaxdebias.models.interventions import VarSpec
from jaxdebias.models.layers import Taps

torch = pytest.importorskip("torch")

from .hf_tiny import IMAGE_TOKEN, make_hf_llava, prompts  # noqa: E402

TAU = 3.0  # the tiny model's width (60) caps |x_d| / rms(x) at sqrt(60); real models use 20


def torch_var_reference(hf, ids, spec: VarSpec, dims, num_layers):
    """Installs VAR as a transformers attention function; returns a function that removes it."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import repeat_kv

    layers = set(spec.layer_set(num_layers))
    captured, prefill = {}, {}
    visual_ids = torch.tensor(ids == IMAGE_TOKEN)
    hooks = []
    for i, layer in enumerate(hf.model.language_model.layers):
        def pre(mod, args, kwargs, i=i):
            captured[i] = (args[0] if args else kwargs["hidden_states"]).float()
        hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        k = repeat_kv(key, module.num_key_value_groups)
        v = repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, k.transpose(2, 3)) * scaling
        S = k.shape[2]
        if attention_mask is not None:
            m = attention_mask[:, :, :, :S]
            w = w.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else w + m
        p = torch.softmax(w.float(), dim=-1)
        i = module.layer_idx
        B, H, T, _ = p.shape
        if i in layers:
            if T > 1:  # prefill: sinks on this layer's residual input; edit the rows after the image
                x = captured[i]
                phi = x[..., dims].abs().amax(-1) / torch.sqrt((x * x).mean(-1) + 1e-6)
                real = torch.tensor(real_mask[0])
                prefill[i] = (phi > spec.tau) & real
                last_img = torch.where(visual_ids, torch.arange(T), -1).amax(1)
                rows = (torch.arange(T)[None] > last_img[:, None]) & real
            else:
                rows = torch.ones(B, 1, dtype=torch.bool)
            sink = torch.zeros(B, S, dtype=torch.bool)
            sink[:, :prefill[i].shape[1]] = prefill[i]
            vis = torch.zeros(B, S, dtype=torch.bool)
            vis[:, :visual_ids.shape[1]] = visual_ids
            for b in range(B):
                V, Sk = vis[b], sink[b]
                Sv = V & Sk
                if not Sv.any():
                    continue
                for h in range(H):
                    for q in range(T):
                        if not rows[b, q]:
                            continue
                        a = p[b, h, q]
                        if a[V].sum() >= spec.min_visual and a[Sv].sum() / (a[V] + 1e-6).sum() <= spec.rho:
                            recv = V & ~Sk
                            if a[recv].sum() == 0:
                                continue
                            new = a.clone()
                            new[Sk] = spec.p * a[Sk]
                            new[recv] = a[recv] + (1 - spec.p) * a[Sk].sum() * a[recv] / a[recv].sum()
                            p[b, h, q] = new
        out = torch.matmul(p.to(v.dtype), v).transpose(1, 2).contiguous()
        return out, p

    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    real_mask = []
    ALL_ATTENTION_FUNCTIONS.register("var_reference", attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("var_reference", ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    hf.model.language_model.config._attn_implementation = "var_reference"

    def remove():
        for h in hooks:
            h.remove()
        hf.model.language_model.config._attn_implementation = "eager"

    return remove, real_mask


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from jaxdebias.convert import from_hf

    hf = make_hf_llava("mha", seed=7)
    path = tmp_path_factory.mktemp("var")
    hf.save_pretrained(path)
    return hf, from_hf(path)


def test_var_matches_torch_reference(pair):
    hf, ours = pair
    ids, am, px = prompts(padding="left")
    # the tiny model's sink dims, found the way a user would for an unknown LLM
    h2 = ours(ids, px, am, taps=Taps(hidden_layers=(2,))).hidden_states[2]
    dims = tuple(int(d) for d in jd.discover_sink_dims(h2, top=2, valid=jnp.asarray(am, bool))[0])
    spec = VarSpec(sink_dims=dims, tau=TAU)
    sinks = np.asarray(jd.sink_tokens(h2, dims, TAU)) & am.astype(bool)
    assert (sinks & (ids == IMAGE_TOKEN)).any(), "the test needs visual sinks"
    plain = np.asarray(ours(ids, px, am).logits)
    got = np.asarray(ours(ids, px, am, var=spec).logits)
    remove, real_holder = torch_var_reference(hf, ids, spec, list(dims), 3)
    real_holder.append(am.astype(bool))
    try:
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), attention_mask=torch.tensor(am),
                     position_ids=torch.tensor(np.where(am == 1, am.cumsum(-1) - 1, 0))).logits.numpy()
            gen_ref = hf.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px),
                                  attention_mask=torch.tensor(am), max_new_tokens=8, do_sample=False)
    finally:
        remove()
    real = am.astype(bool)
    assert np.abs(got - plain)[real].max() > 1e-3  # VAR really changed something
    assert np.abs(got - ref)[real].max() <= 1e-4
    gen = generate(ours, Batch(ids, px, am), max_new_tokens=8, stop_at_eos=False, var=spec).tokens
    np.testing.assert_array_equal(gen, gen_ref[:, ids.shape[1]:].numpy())


def test_p_one_is_the_plain_model(pair):
    _, ours = pair
    ids, am, px = prompts()
    spec = VarSpec(sink_dims=(0, 5), tau=TAU, p=1.0)
    np.testing.assert_allclose(ours(ids, px, am, var=spec).logits, ours(ids, px, am).logits, atol=1e-6)
    disc = VarSpec(sink_dims="discover", tau=TAU, layers="intended")
    assert disc.layer_set(4) == (2,) and VarSpec(sink_dims=(1,)).layer_set(4) == (2, 3)
    assert np.isfinite(np.asarray(ours(ids, px, am, var=disc).logits)).all()


def test_var_bad_input(pair):
    _, ours = pair
    ids, am, _ = prompts()
    text_only = np.where(ids == IMAGE_TOKEN, 7, ids)
    for run in (ours, lambda ids, pixel_values, mask, **k: generate(ours, Batch(ids, pixel_values, mask), max_new_tokens=2, **k)):  # forward and generation
        with pytest.raises(ValueError, match="has no image or video. Drop var="):
            run(text_only, None, am, var=VarSpec(sink_dims=(1, 2)))
    with pytest.raises(ValueError, match="VAR needs sink dimensions"):
        VarSpec(sink_dims=())
    with pytest.raises(ValueError, match="sink_dims must be a tuple of ints or 'discover'"):
        VarSpec(sink_dims="qwen")
    with pytest.raises(ValueError, match=r"p must lie in \[0, 1\]"):
        VarSpec(sink_dims=(1,), p=1.5)
    with pytest.raises(ValueError, match="outside the model's 0..3"):
        VarSpec(sink_dims=(1,), layers=(2, 9)).layer_set(4)


def test_var_with_pruning(pair):
    """VAR runs on the pruned sequence: with nothing pruned it is the dense VAR model, prefill and decode."""
    import jaxdebias as jd

    _, ours = pair
    ids, am, px = prompts(padding="right")
    spec = VarSpec(sink_dims="discover", tau=TAU)
    keep_all = jd.PruneSpec("fastv", keep=9, buckets=tuple(range(1, 10)))
    r = generate(ours, Batch(ids, px, am), prune=keep_all, max_new_tokens=6,
                                     stop_at_eos=False, var=spec)
    dense = generate(ours, Batch(ids, px, am), max_new_tokens=6, stop_at_eos=False, var=spec).tokens
    np.testing.assert_array_equal(r.tokens, dense)
    out = ours(ids, px, am, var=spec).logits
    last = am.sum(1) - 1
    np.testing.assert_allclose(r.logits, np.asarray(out)[np.arange(2), last], atol=1e-5)
    pruned = generate(ours, Batch(ids, px, am), prune=jd.PruneSpec(
        "fastv", keep=4, buckets=tuple(range(1, 10))), max_new_tokens=6, var=spec)
    assert np.isfinite(pruned.logits).all()
