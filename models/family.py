"""What the prefill and generation need of a LLaVA-style model: the interface ``Llava``, ``LlavaNext`` and
``VideoLlava`` implement, so that the pruning loop and the command line ask the model instead of checking its
class.

Axes: B batch, T prompt slots, N visual tokens of the pruned span, D width.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol


class ImageViews(NamedTuple):
    """How the visual span splits into views (``jd.debias_views``). views: (view int[B, N], local int[B, N]) or
    None for one view (the raster grid); sizes: static raster length of each view; selectable: bool[B, N] the
    tokens a pruning stage may keep (None: all; LLaVA-NeXT's newlines are not)."""

    views: Any = None
    sizes: tuple = ()
    selectable: Any = None


class VisualModel(Protocol):
    """A LLaVA-style model as the prefill (``pruning.prefill``) and ``generate`` use it.

    Attributes: ``cfg`` (``.text`` the decoder config, ``.vision`` the tower config, ``pad_token_id``,
    ``eos_token_id``), ``language_model`` (``run_layers``, ``layers``, ``logits``, ``decode``), ``vision_tower``
    and ``multi_modal_projector`` (encoder stages run the tower and project its block)."""

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
