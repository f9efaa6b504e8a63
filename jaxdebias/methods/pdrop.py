"""PyramidDrop (Xing et al., CVPR 2025; Cooperx521/PyramidDrop@6444f30:llava/model/modeling_llama_pdrop.py
L1106-1470), in the debias paper's LLaVA-1.5 setting.

Before layers 2 / 10 / 20 the last instruction token's attention in that layer - recomputed on the layer's input
("probe") - keeps int(576 r), int(576 r / 2), int(576 r / 4) tokens: r = 0.32 for the 128 budget (184 / 92 / 46).
Positions are re-indexed after each drop; decoding continues from the pruned caches (the new token's position is
each layer's cache length, as the release's). Padding threshold 0.01; padding stays a candidate.

``keep`` is the layer-average budget: other budgets take the r whose layer average equals it (ours).
"""

from __future__ import annotations

from jaxdebias.methods.base import Method, Stage

LAYERS = (2, 10, 20)
RATIO_128 = 0.32  # the debias paper's setting for the 128 budget


def ratio(budget: int, n: int = 576, layers=LAYERS, total: int = 32) -> float:
    """The first-stage ratio r (then r/2, r/4) whose layer-average token count equals ``budget`` (ours)."""
    spans = [layers[1] - layers[0], layers[2] - layers[1], total - layers[2]]
    return (total * budget - layers[0] * n) / (n * (spans[0] + spans[1] / 2 + spans[2] / 4))


def schedule(keep: int, layers=LAYERS, n: int = 576, num_layers: int = 32) -> tuple[Stage, ...]:
    r = RATIO_128 if keep == 128 and tuple(layers) == LAYERS else ratio(keep, n, layers, num_layers)
    if not 0 < r <= 1:
        raise ValueError(f"No PyramidDrop schedule at layers {layers} averages {keep} tokens (ratio {r:.3f}).")
    return tuple(Stage(layer, max(1, int(n * r / 2**i + 1e-9)), "instruction", "probe")
                 for i, layer in enumerate(layers))


def stages(keep: int, layer: int | None, n: int, num_layers: int, options: dict) -> tuple[Stage, ...]:
    return schedule(keep, n=n, num_layers=num_layers)


METHOD = Method("pdrop", "Cooperx521/PyramidDrop@6444f30", stages, aliases=("pyramiddrop", "pyramid_drop"),
                budget="layer-average visual tokens over the decoder", positions="reindex", pad_tau=0.01)
