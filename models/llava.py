"""LLaVA-1.5 in Flax NNX: CLIP tower, 2-layer GELU projector, Llama decoder; taps, KV cache, generation.

Axes: B batch, T prompt slots, I images, P visual tokens per image, D text width, V vocab, H heads, Q rows.

Usage::

    model = Llava(LlavaConfig.llava_1_5_7b(), rngs=nnx.Rngs(0))  # or jaxdebias.convert.load(...) / from_hf(...)
    out = model(input_ids, pixel_values, attention_mask)         # out.logits float32[B, T, V]
    out = model(input_ids, pixel_values, attention_mask,
                taps=Taps(attn_layers=(1,), rows=last_rows))     # + out.attentions[1] float32[B, H, Q, T]

Generation (dense or pruned) is ``jaxdebias.models.generate.generate``.

Image features go to the positions of the image placeholder token (``image_token_id``) in ``input_ids``, in
order; the offset of the image in the sequence is never assumed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxdebias as jd
from jaxdebias.models import layers
from jaxdebias.models.clip import ClipVisionConfig, ClipVisionTower
from jaxdebias.models.family import ImageViews, LlavaFamily
from jaxdebias.models.interventions import TriangleMix, VarSpec
from jaxdebias.models.layers import Output, Taps
from jaxdebias.models.llama import LlamaConfig, LlamaModel
from jaxdebias.models.rows import slot_mask


def hf_config_dict(hf, model_type: str, name: str, note: str = "") -> dict:
    """A transformers config (object, dict, or a path to a config.json / checkpoint directory) as a dict, checked to
    be ``model_type`` with the Linear-GELU-Linear projector every port here runs."""
    if isinstance(hf, (str, os.PathLike)):
        path = os.path.join(hf, "config.json") if os.path.isdir(hf) else hf
        with open(path) as f:
            hf = json.load(f)
    d = dict(hf if isinstance(hf, dict) else hf.to_dict())
    if d.get("model_type") != model_type:
        raise ValueError(f"Not a {name} config: model_type is {d.get('model_type')!r}, expected {model_type!r}{note}.")
    act = d.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"Unsupported projector_hidden_act {act!r}: this port's projector is Linear-GELU-Linear "
                         "(exact erf GELU, 'gelu').")
    return d


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    vision: ClipVisionConfig = ClipVisionConfig()
    text: LlamaConfig = LlamaConfig(vocab_size=32064)
    image_token_id: int = 32000
    projector_bias: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 2

    @classmethod
    def llava_1_5_7b(cls, dtype=jnp.bfloat16) -> LlavaConfig:
        """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 + Vicuna-7B-v1.5 (vocab padded to 32064)."""
        return cls(ClipVisionConfig(dtype=dtype, param_dtype=dtype),
                   LlamaConfig.llama2_7b(vocab_size=32064, dtype=dtype, param_dtype=dtype))

    @classmethod
    def llava_1_5_13b(cls, dtype=jnp.bfloat16) -> LlavaConfig:
        """llava-hf/llava-1.5-13b-hf: CLIP ViT-L/14-336 + Vicuna-13B-v1.5."""
        return cls(ClipVisionConfig(dtype=dtype, param_dtype=dtype),
                   LlamaConfig.llama2_13b(vocab_size=32064, dtype=dtype, param_dtype=dtype))

    @classmethod
    def from_hf_config(cls, hf, dtype=jnp.float32) -> LlavaConfig:
        """From a transformers LlavaConfig, its dict, or a path to a config.json / checkpoint directory."""
        d = hf_config_dict(hf, "llava", "LLaVA", " (LLaVA-NeXT, Video-LLaVA and OneVision are separate ports)")
        vision = ClipVisionConfig.from_hf_config(
            d["vision_config"], feature_layer=d.get("vision_feature_layer", -2),
            select_strategy=d.get("vision_feature_select_strategy", "default"), dtype=dtype, param_dtype=dtype)
        text = LlamaConfig.from_hf_config(d["text_config"], dtype=dtype, param_dtype=dtype)
        token = d.get("image_token_id", d.get("image_token_index", 32000))
        tc = d["text_config"]
        return cls(vision, text, image_token_id=int(token),
                   projector_bias=bool(d.get("multimodal_projector_bias", True)),
                   pad_token_id=int(tc.get("pad_token_id") or d.get("pad_token_id") or 0),
                   eos_token_id=int(tc.get("eos_token_id") or 2) if not isinstance(tc.get("eos_token_id"), list)
                   else int(tc["eos_token_id"][0]))


class Projector(nnx.Module):
    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs):
        kw = dict(bias=cfg.projector_bias, dtype=cfg.text.dtype, param_dtype=cfg.text.param_dtype, rngs=rngs)
        self.linear_1 = layers.linear(cfg.vision.hidden_size, cfg.text.hidden_size, shard="col", **kw)
        self.linear_2 = layers.linear(cfg.text.hidden_size, cfg.text.hidden_size, shard="row", **kw)

    def __call__(self, x):
        return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=False))


class Llava(LlavaFamily, nnx.Module):
    model_type = "llava"  # the transformers config it ports
    tower = ClipVisionTower  # the vision tower's class (LLaVA-OneVision's is SigLIP)

    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision_tower = self.tower(cfg.vision, rngs=rngs)
        self.multi_modal_projector = Projector(cfg, rngs=rngs)
        self.language_model = LlamaModel(cfg.text, rngs=rngs)

    def image_features(self, pixel_values):
        """pixel_values float[I, 3, H, W] -> float[I, P, D] projected visual tokens."""
        return self.multi_modal_projector(self.vision_tower(jnp.asarray(pixel_values)).astype(self.cfg.text.dtype))

    def embed(self, input_ids, pixel_values=None):
        """Token embeddings with image features written at the placeholder positions. Returns (h [B, T, D],
        image features [I, P, D] or None)."""
        ids = jnp.asarray(input_ids)
        is_img = ids == self.visual_token_id(pixel_values)
        lm = self.language_model
        h = lm.embed_tokens(jnp.where(is_img, 0, ids))
        if pixel_values is None:
            return h, None
        feats = self.image_features(pixel_values)
        flat = feats.reshape(-1, feats.shape[-1])
        order = jnp.clip(jnp.cumsum(is_img.reshape(-1)) - 1, 0, flat.shape[0] - 1)
        merged = jnp.take(flat, order, axis=0).reshape(h.shape).astype(h.dtype)
        return jnp.where(is_img[..., None], merged, h), feats

    def check_inputs(self, input_ids, pixel_values, attention_mask=None):
        """Eager checks with clear messages (skipped for traced values)."""
        if not self.check_prompt_shapes(input_ids, attention_mask):
            return
        n_tok = int(np.sum(np.asarray(input_ids) == self.cfg.image_token_id))
        n_img = 0 if pixel_values is None else int(jnp.shape(pixel_values)[0])
        per = self.cfg.vision.num_features
        if n_tok != n_img * per:
            raise ValueError(f"input_ids hold {n_tok} image tokens (id {self.cfg.image_token_id}) but "
                             f"{n_img} image(s) give {n_img * per} features ({per} each). Expand each <image> "
                             "placeholder to one token per feature (the HF processor does this).")

    def num_visual(self, pixel_values) -> int:
        """N, the static visual tokens of one image (``LlavaNext`` derives it from its images' tile bucket)."""
        return self.cfg.vision.num_features

    def visual_capacity(self) -> int:
        """The most visual tokens a pruning stage can keep from one image (576 for LLaVA-1.5)."""
        return self.cfg.vision.num_features

    def padding_content(self, pixel_values, image_sizes, tau: float, geometry: str):
        """bool[B, N], True = content: the expand2square letterbox of ``image_sizes`` int[B, 2] (width, height)."""
        grid = self.cfg.vision.grid
        if self.cfg.vision.num_features != grid * grid:
            raise ValueError("Padding suppression needs one token per patch (vision_feature_select_strategy "
                             "'default').")
        return jd.pad_mask_expand2square(image_sizes[:, 0], image_sizes[:, 1], grid=grid,
                                         canvas=self.cfg.vision.image_size, tau=tau, geometry=geometry)

    def at_tau(self, pixel_values, tau: float):
        """The images with their padding mask at ``tau`` (LLaVA-1.5's is computed in the prefill: unchanged)."""
        return pixel_values

    def image_views(self, pixel_values):
        """((view int[B, N], local int[B, N]), static view sizes) of a multi-view image (``jd.debias_views``), and
        bool[B, N] the tokens a pruning stage may keep; (None, (), None) here: one view, the raster grid."""
        return ImageViews()

    def visual_token_id(self, pixel_values=None) -> int:
        """The placeholder id of the visual span that pruning works on (Video-LLaVA: its video's)."""
        return self.cfg.image_token_id

    def __call__(self, input_ids, pixel_values=None, attention_mask=None, position_ids=None, *,
                 taps: Taps = Taps(), var: VarSpec | None = None, triangle: TriangleMix | None = None) -> Output:
        """Full forward (``LlavaFamily.forward``). input_ids int[B, T]; pixel_values float[I, 3, H, W]."""
        return self.forward(input_ids, pixel_values, attention_mask, position_ids, taps=taps, var=var,
                            triangle=triangle)


@functools.partial(nnx.jit, static_argnames=("layer",))
def layer_input(model: Llava, input_ids, pixel_values, attention_mask, layer: int):
    """The residual-stream input of decoder layer ``layer``, float[B, T, D], running only the vision tower and
    the layers before it (what the sink statistics of a prompt need; ``Taps(hidden_layers=...)`` on a full
    forward gives the same for every layer)."""
    ids = jnp.asarray(input_ids)
    real = jnp.asarray(attention_mask).astype(bool)
    h, _ = model.embed(ids, pixel_values)
    mask = slot_mask(jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape), real)
    return model.language_model.run_layers(h, layers.default_positions(real), mask, stop=layer, real=real).h


def param_count(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
    """Places the parameters on ``mesh`` following their partition specs. An axis that does not divide a
    dimension is left unsplit for that parameter (tiny test models), never padded."""
    state = nnx.state(model)
    specs = nnx.get_partition_spec(state)

    def place(x, spec):
        if not hasattr(x, "shape"):
            return x
        spec = tuple(spec) if isinstance(spec, jax.sharding.PartitionSpec) else ()
        spec = tuple(a if a is None or x.shape[i] % mesh.shape[a] == 0 else None for i, a in enumerate(spec))
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))

    nnx.update(model, jax.tree.map(place, state, specs))
    return model
