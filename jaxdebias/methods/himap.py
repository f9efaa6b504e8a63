"""HiMAP (ustc-hyin/HiMAP@6c279e7:src/LLaVA/llava/model/language_model/himap.py L143-203).

Before layer T1 (2) the text rows after the image (their attention in layer T1 - 1 summed, heads averaged) keep
R1 tokens; before T2 (8) the kept image tokens' attention among themselves keeps R2; original positions. The
release decodes without a KV cache: both stages rerun for every generated token, which joins the text rows that
vote (``decode``); the fast decode keeps the prefill's selection in the pruned caches.

``keep`` is the layer-average budget: 128 is the debias paper's (2: 115, 8: 90; average 125); other budgets keep
the ratio R2 / R1 and solve for the layer average (ours). Upstream defaults: (2, 288), (8, 72).
"""

from __future__ import annotations

from jaxdebias.methods.base import Method, Stage

PAPER_128 = ((2, 115), (8, 90))  # the debias paper's scripts (layer average 125 for "128")
UPSTREAM = ((2, 288), (8, 72))  # ustc-hyin/HiMAP@6c279e7 defaults


def schedule(keep: int, layers=None, keeps=None) -> tuple[Stage, ...]:
    if keeps is None:
        if keep == 128:
            keeps = tuple(k for _, k in PAPER_128)
        else:
            r1, r2 = (k for _, k in PAPER_128)
            first = (32 * keep - 2 * 576) / ((8 - 2) + (32 - 8) * r2 / r1)
            keeps = (max(2, round(first)), max(1, round(first * r2 / r1)))
    layers = tuple(layers or (layer for layer, _ in PAPER_128))
    return (Stage(layers[0], keeps[0], "text", "tap"), Stage(layers[1], keeps[1], "image", "tap"))


def stages(keep: int, layer: int | None, n: int, num_layers: int, options: dict) -> tuple[Stage, ...]:
    return schedule(keep)


METHOD = Method("himap", "ustc-hyin/HiMAP@6c279e7", stages, budget="layer-average visual tokens (128: 115 then 90)",
                positions="original", pad_tau=0.5, decode=("remove", "every_token"))
