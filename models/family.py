"""What the prefill and generation need of a LLaVA-style model: the interface ``Llava``, ``LlavaNext`` and
``VideoLlava`` implement (``VisualModel``), so that the pruning loop asks the model instead of checking its class,
and the code they share (``LlavaFamily``: the forward, one decode step, the intervention checks).

Axes: B batch, T prompt slots, N visual tokens of the pruned span, D width.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from jaxdebias.methods import EncoderInputs

from jaxdebias.models import layers
from jaxdebias.models.interventions import TriangleMix, VarContext, VarSpec, var_context
from jaxdebias.models.layers import Output, Taps
from jaxdebias.models.llama import KVCache
from jaxdebias.models.rows import slot_mask


class ImageViews(NamedTuple):
    """How the visual span splits into views (``jd.debias_views``). views: (view int[B, N], local int[B, N]) or
    None for one view (the raster grid); sizes: static raster length of each view; selectable: bool[B, N] the
    tokens a pruning stage may keep (None: all; LLaVA-NeXT's newlines are not)."""

    views: Any = None
    sizes: tuple = ()
    selectable: Any = None


class VisualModel(Protocol):
    """A LLaVA-style model as the prefill (``pruning.prefill``) and ``generate`` use it.

    Attributes: ``model_type`` (the transformers ``model_type`` it ports: what the command line picks its input
    processing by), ``cfg`` (``.text`` the decoder config, ``.vision`` the tower config, ``pad_token_id``,
    ``eos_token_id``), ``language_model`` (``run_layers``, ``layers``, ``logits``, ``decode``), ``vision_tower``
    and ``multi_modal_projector`` (encoder stages run the tower and project its block)."""

    model_type: str
    cfg: Any
    language_model: Any
    vision_tower: Any
    multi_modal_projector: Any

    def embed(self, input_ids, pixel_values=None):
        """(h float[B, T, D] with the visual features at their placeholders, features or None)."""

    def check_inputs(self, input_ids, pixel_values, attention_mask=None) -> None:
        """Raises a ValueError naming what is wrong with a batch."""

    def check_interventions(self, pixel_values, var, triangle) -> None:
        """Raises a ValueError for a VAR / TriangleMix request this model or prompt cannot run."""

    def num_visual(self, pixel_values) -> int:
        """N, the static length of the visual span that pruning works on."""

    def visual_capacity(self) -> int:
        """The most visual tokens a stage can keep from one input."""

    def visual_token_id(self, pixel_values=None) -> int:
        """The placeholder id of the span that pruning works on."""

    def image_views(self, pixel_values) -> ImageViews:
        """The span's views (one, the raster grid, for LLaVA-1.5)."""

    def padding_content(self, pixel_values, image_sizes, tau: float, geometry: str):
        """bool[B, N], True = content (not letterbox padding) at threshold ``tau``."""

    def at_tau(self, pixel_values, tau: float):
        """The inputs with their padding mask at ``tau`` (those that carry one: LLaVA-NeXT's)."""

    def decode(self, tokens, cache, var=None, reselect=None):
        """One token per sample at each layer's next slot: (logits float32[B, V], cache)."""


def sample_keys(pixel_values):
    """uint32[B]: a hash of each image's pixel values (float32 bits, position-weighted): seeds a per-image random
    stream that depends neither on the batch the image is in nor on the text around it (nor on the tokens
    generated so far)."""
    bits = jax.lax.bitcast_convert_type(jnp.asarray(pixel_values, jnp.float32), jnp.uint32)
    bits = bits.reshape(bits.shape[0], -1)
    weights = jnp.arange(bits.shape[1], dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.sum(bits * weights, axis=1, dtype=jnp.uint32)


class LlavaFamily:
    """What ``Llava``, ``LlavaNext`` and ``VideoLlava`` share, written once: the full forward, one decode step and
    the intervention checks. A subclass provides ``cfg``, ``language_model``, ``embed``, ``check_inputs``,
    ``visual_token_id`` and ``num_visual`` (the span VAR edits)."""

    @staticmethod
    def check_prompt_shapes(input_ids, attention_mask=None) -> bool:
        """Raises on input_ids that are not int[B, T] or a mask of another shape; returns whether the ids are
        concrete (the value checks that follow are skipped for traced ids)."""
        if jnp.ndim(input_ids) != 2:
            raise ValueError(f"input_ids must be int[B, T], got shape {jnp.shape(input_ids)}.")
        if attention_mask is not None and jnp.shape(attention_mask) != jnp.shape(input_ids):
            raise ValueError(f"attention_mask {jnp.shape(attention_mask)} must match input_ids "
                             f"{jnp.shape(input_ids)}.")
        return not isinstance(input_ids, jax.core.Tracer)

    def check_interventions(self, pixel_values, var: VarSpec | None, triangle: TriangleMix | None):
        """Raises on a VAR spec for a prompt without visual input, or a TriangleMix beyond the decoder's layers."""
        if var is not None and pixel_values is None:
            raise ValueError("VAR redistributes attention to visual tokens; this prompt has no image or video. "
                             "Drop var=... for text-only prompts.")
        if triangle is not None:
            triangle.check(self.cfg.text.num_layers)

    def var_context(self, input_ids, real, var: VarSpec | None, pixel_values=None) -> VarContext | None:
        """VAR's inputs for a prompt batch: the visual span and the query rows after it (a sample without visual
        tokens has no rows: VAR leaves it untouched)."""
        if var is None:
            return None
        is_visual = (input_ids == self.visual_token_id(pixel_values)) & real
        return var_context(var, is_visual, real, self.var_span(pixel_values))

    def var_span(self, pixel_values) -> int:
        """The fewest real visual tokens a prompt's span holds: VAR reads the T - span rows after them."""
        return self.num_visual(pixel_values)

    def option_family(self, pixel_values=None) -> str:
        """Whose published method defaults apply (``Method.family_options``): the model's ``model_type``."""
        return self.model_type

    def for_encoder(self, pixel_values, encoder, method: str = ""):
        """The inputs ready for a plan's encoder stage (host side; LLaVA-OneVision lays out its merged views)."""
        return pixel_values

    def encoder_stage(self, encoder, pixel_values, debias, limit, method: str):
        """Runs a plan's encoder stage on one single-view image per sample. debias: the prefill's debias step
        (``debias(0, raw, raster, valid)``, ``debias.candidates``); limit: int32[] the run-time budget.
        Returns (block, its projected features float[B, M, D], the visual input its raster indexes)."""
        if self.image_views(pixel_values).views is not None:
            raise ValueError(f"{method}'s encoder stage runs on one CLIP view (LLaVA-1.5); on a multi-view "
                             "LLaVA-NeXT image or a Video-LLaVA video use a decoder-side method.")
        n = self.num_visual(pixel_values)
        B = jnp.shape(pixel_values)[0]
        raster, ones = jnp.broadcast_to(jnp.arange(n), (B, n)), jnp.ones((B, n), bool)
        inputs = EncoderInputs(self.vision_tower, pixel_values, n, self.cfg.vision.grid,
                               lambda raw: debias(0, raw, raster, ones), debias.candidates(0, raster, ones), limit,
                               sample_keys(pixel_values))
        block = encoder.encode(inputs)
        dtype = self.cfg.text.dtype
        return block, self.multi_modal_projector(block.h.astype(dtype)).astype(dtype), pixel_values

    def forward(self, input_ids, pixel_values, attention_mask=None, position_ids=None, *, taps: Taps = Taps(),
                var: VarSpec | None = None, triangle: TriangleMix | None = None) -> Output:
        """Full forward. input_ids int[B, T]; pixel_values: the model's visual input; attention_mask [B, T] (1 =
        real token; left or right padding); var: VAR on the rows after the visual span; triangle: TriangleMix
        prefill. Returns Output with logits float32[B, T, V], the visual features and the requested taps."""
        self.check_inputs(input_ids, pixel_values, attention_mask)
        self.check_interventions(pixel_values, var, triangle)
        ids = jnp.asarray(input_ids)
        real = jnp.ones(ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        positions = layers.default_positions(real) if position_ids is None else jnp.asarray(position_ids)
        h, feats = self.embed(ids, pixel_values)
        mask = slot_mask(jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape), real)
        run = self.language_model.run_layers(h, positions, mask, taps=taps, real=real,
                                             var=self.var_context(ids, real, var, pixel_values), triangle=triangle)
        return Output(logits=self.language_model.logits(run.h), image_features=feats, **run.tapped.fields())

    def decode(self, tokens, cache: KVCache, var: VarSpec | None = None, reselect=None):
        """One token per sample (int[B]) at each layer's next slot (``reselect``: mask mode's per-token
        re-selection, see ``LlamaModel.decode``). Returns (logits float32[B, V], cache)."""
        lm = self.language_model
        h, cache = lm.decode(lm.embed_tokens(tokens[:, None]), cache, var=var, reselect=reselect)
        return lm.logits(h)[:, 0], cache
