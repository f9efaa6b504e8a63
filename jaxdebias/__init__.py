"""jaxdebias: debiased visual token pruning for LLaVA-style VLMs, as jitted pure JAX functions.

Everything here works on arrays you already have (attention rows, scores, hidden states); nothing depends on the
model ports in ``jaxdebias.models`` (the layers, bottom up: this core <- ``jaxdebias.models`` <-
``jaxdebias.convert`` <- ``jaxdebias.cli`` / ``jaxdebias.eval``).
"""

from jaxdebias._checks import UserError
from jaxdebias.curves import (
    RELEASED_EXP_B,
    RELEASED_POLY3_INVERSE,
    ExpConstCurve,
    ExpCurve,
    PolyInverseCurve,
    curve_from_dict,
    curve_to_dict,
)
from jaxdebias.fitting import Calibration, bias_strength, fit_curve, fit_exp_curve, fit_online
from jaxdebias import methods
from jaxdebias.methods import METHOD_ALIASES, METHODS, Stage, canonical_method
from jaxdebias.spec import DECODES, PRESETS, Debias, Plan, PruneSpec, released_curve
from jaxdebias.masks import AnyresMask, pad_mask_anyres, pad_mask_expand2square, pad_mask_resized
from jaxdebias.prune import (
    DEFAULT_BUCKETS,
    bucket,
    debias,
    debias_and_select,
    gather_tokens,
    kept_mask,
    debias_scores,
    debias_views,
    view_rasters,
    select_topk,
)
from jaxdebias.scores import query_mask, text_raters, visual_positions, visual_scores, voting_rows
from jaxdebias.sinks import (
    KNOWN_SINK_DIMS,
    discover_sink_dims,
    image_centric_heads,
    known_sink_dims,
    sink_dim_value,
    sink_tokens,
    var_redistribute,
)

__version__ = "0.1.0"

__all__ = [
    "AnyresMask", "bias_strength", "bucket", "Calibration", "canonical_method", "curve_from_dict", "curve_to_dict",
    "Debias", "debias", "debias_and_select", "debias_scores", "debias_views", "DECODES", "DEFAULT_BUCKETS",
    "discover_sink_dims", "ExpConstCurve", "ExpCurve", "fit_curve", "fit_exp_curve", "fit_online", "gather_tokens",
    "image_centric_heads", "kept_mask", "known_sink_dims", "KNOWN_SINK_DIMS", "METHOD_ALIASES", "METHODS", "methods",
    "pad_mask_anyres", "pad_mask_expand2square", "pad_mask_resized", "Plan", "PolyInverseCurve", "PRESETS",
    "PruneSpec", "query_mask", "released_curve", "RELEASED_EXP_B", "RELEASED_POLY3_INVERSE", "select_topk",
    "sink_dim_value", "sink_tokens", "Stage", "text_raters", "UserError", "var_redistribute", "view_rasters",
    "visual_positions", "visual_scores", "voting_rows",
]
