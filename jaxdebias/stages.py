"""Each pruning method's released schedule: the stages, their counts per budget, and the per-method released
settings (positions, padding threshold and geometry). Sources: ``shared/reference/methods.md`` (repo@commit:path
for every rule); a constant the release does not publish for a setting is marked "ours".

Axes: N visual tokens of an image (576 for LLaVA-1.5).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Stage:
    """One pruning stage.

    layer: "tap"/"probe": the first decoder layer that sees only the kept tokens; "self": the layer whose own
      attention scores the tokens and whose *output* is pruned (SparseVLM: layer ``layer`` runs on the full set).
    keep: visual tokens kept (before bucketing); query: which rows vote ("last" | "instruction" | "text" |
      "image" | "raters"); source: "tap" (the attention of layer ``layer - 1``), "probe" (the attention layer
      ``layer`` would compute on its input, recomputed for the voting rows) or "self" (see ``layer``).
    recycle / clusters: the ``recycle`` best-scored pruned tokens (raw scores) are merged into ``clusters``
      DPC-kNN tokens after the kept ones (SparseVLM).
    merge / info_weight: TokenCarve: attention and singular-value ranks fused with weight ``info_weight``, the top
      1.5 x keep split in halves and ``merge`` (= keep // 2) of the second half merged into the first.
    policy: "topk" (keep the best; with the fields above, SparseVLM's and TokenCarve's variants) or "illava" (the
      tokens beyond ``keep`` and the last kept one are merged into it, iLLaVA's LLM stage).
    """

    layer: int
    keep: int
    query: str
    source: str
    recycle: int = 0
    clusters: int = 0
    merge: int = 0
    info_weight: float = 0.0
    policy: str = "topk"

    @property
    def boundary(self) -> int:
        """The first decoder layer that runs on the pruned sequence."""
        return self.layer + (self.source == "self")


def _pdrop_ratio(budget: int, n: int = 576, layers=(2, 10, 20), total=32) -> float:
    """PyramidDrop's first-stage ratio r (then r/2, r/4) whose layer-average token count equals ``budget``."""
    spans = [layers[1] - layers[0], layers[2] - layers[1], total - layers[2]]
    return (total * budget - layers[0] * n) / (n * (spans[0] + spans[1] / 2 + spans[2] / 4))


def fastv_stages(keep: int, layer: int = 2) -> tuple[Stage, ...]:
    """FastV (Chen et al., ECCV 2024; pkunlp-icler/FastV@d165972): at layer K = 2, keep the ``keep`` image tokens
    the last token attended to most in layer K - 1 (heads averaged); original positions."""
    return (Stage(layer, keep, "last", "tap"),)


PDROP_RATIO_128 = 0.32  # the debias paper's PyramidDrop setting for the 128-token budget: layers 2/10/20


def pdrop_stages(keep: int, layers=(2, 10, 20), n: int = 576, num_layers: int = 32) -> tuple[Stage, ...]:
    """PyramidDrop (Xing et al., CVPR 2025; Cooperx521/PyramidDrop@6444f30) in the debias paper's LLaVA-1.5
    setting: before layers 2/10/20 the last instruction token's attention in that layer (recomputed) keeps
    int(576 r), int(576 r/2), int(576 r/4) tokens, r = 0.32 for budget 128 (184/92/46); other budgets: the r whose
    layer average equals the budget (ours). Positions are re-indexed after each drop (the release)."""
    r = PDROP_RATIO_128 if keep == 128 and tuple(layers) == (2, 10, 20) else _pdrop_ratio(keep, n, layers, num_layers)
    if not 0 < r <= 1:
        raise ValueError(f"No PyramidDrop schedule at layers {layers} averages {keep} tokens (ratio {r:.3f}).")
    return tuple(Stage(layer, max(1, int(n * r / 2**i + 1e-9)), "instruction", "probe")
                 for i, layer in enumerate(layers))


HIMAP_PAPER_128 = ((2, 115), (8, 90))  # the debias paper's scripts (layer average 125 for "128")
HIMAP_UPSTREAM = ((2, 288), (8, 72))  # ustc-hyin/HiMAP@6c279e7 defaults


def himap_stages(keep: int, layers=None, keeps=None) -> tuple[Stage, ...]:
    """HiMAP (ustc-hyin/HiMAP@6c279e7): before layer T1 the text rows' attention to the image (rows after the
    image, summed; heads averaged) keeps R1; before T2 the kept image tokens' attention among themselves keeps R2;
    original positions. Budget 128 = the debias paper's (2: 115, 8: 90); other budgets keep the ratio R2/R1 and
    solve for the layer average (ours). ``layers``/``keeps`` override (upstream: (2, 8) / (288, 72))."""
    if keeps is None:
        if keep == 128:
            keeps = tuple(k for _, k in HIMAP_PAPER_128)
        else:
            r1, r2 = (k for _, k in HIMAP_PAPER_128)
            first = (32 * keep - 2 * 576) / ((8 - 2) + (32 - 8) * r2 / r1)
            keeps = (max(2, round(first)), max(1, round(first * r2 / r1)))
    layers = tuple(layers or (layer for layer, _ in HIMAP_PAPER_128))
    return (Stage(layers[0], keeps[0], "text", "tap"), Stage(layers[1], keeps[1], "image", "tap"))


def tokencarve_stages(keep: int, layer: int = 2, info_weight: float = 0.5) -> tuple[Stage, ...]:
    """TokenCarve (Tan et al. 2025; ShawnTan86/TokenCarve@a57bd59, mode 0) at work layer W = 2: the last token's
    attention in layer W - 1 and the singular-value score of layer W's input over the image rows, fused by rank
    with weight ``info_weight`` 0.5; the top int(1.5 n) split in halves A, B, and the int(n / 2) B tokens most
    similar to A merged into their best A token: exactly n kept, original positions, the caches of layers < W
    keep only the kept tokens. The debias paper runs n = 64."""
    return (Stage(layer, keep, "last", "tap", merge=keep // 2, info_weight=info_weight),)


ILLAVA_LLM_LAYER = 8  # OneVision's released llm k; the same for LLaVA-1.5 (ours)


def illava_stages(keep: int, layer: int = ILLAVA_LLM_LAYER) -> tuple[Stage, ...]:
    """iLLaVA's LLM stage (hulianyuyy/iLLaVA@4068149 ``forward_illava``) at layer k = 8: the last token's attention
    in layer k - 1 orders the visual tokens; the r + 1 least attended merge into the (N - r)-th (weights 1..r+1)
    and ``keep`` = N - r remain, at their original positions. OneVision's release keeps 70% (llm_r 0.70); here
    ``keep`` sets it (ours)."""
    return (Stage(layer, keep, "last", "tap", policy="illava"),)


SPARSEVLM_KEEPS = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}


def sparsevlm_stages(keep: int, layers=(2, 6, 15), n: int = 576, recycle: float = 0.3,
                     per_cluster: int = 10) -> tuple[Stage, ...]:
    """SparseVLM v1.5 (Gumpest/SparseVLMs@734d900) on LLaVA-1.5: text raters (``policies.text_raters``) vote with
    the attention of layers 2, 6 and 15 themselves; each of those layers runs on the current set and its output
    keeps min(list[stage], n_v - 1) tokens: 300/200/110 (budget 192), 303/110/36 (128), 66/30/17 (64); other
    budgets scale the 128 list (ours). Of the p pruned tokens the int(0.3 p) + 1 best by raw score are grouped by
    DPC-kNN into int(m / 10) + 1 merged tokens that follow the kept ones; positions re-indexed."""
    ks = SPARSEVLM_KEEPS.get(keep) or tuple(max(1, round(k * keep / 128)) for k in SPARSEVLM_KEEPS[128])
    stages, prev = [], n
    for layer, k in zip(layers, ks):
        k = min(k, prev - 1)
        pruned = prev - k
        m = int(pruned * recycle) + 1
        c = int(m / per_cluster) + 1
        stages.append(Stage(layer, k, "raters", "self", recycle=m, clusters=c))
        prev = k + c
    return tuple(stages)


# Per method, as released (methods.md): positions ("keep" = original ids), the padding threshold and geometry
# (SparseVLM thresholds a bilinearly resized 0/1 mask), and whether padding stays a top-k candidate (only FastV
# caps its budget at the content tokens). VisionZip has no debiased release: its padding choices are ours.
METHOD_DEFAULTS = {
    "fastv": dict(positions="keep", pad_tau=0.5, pad_geometry="continuous", pad_candidates=False),
    "pdrop": dict(positions="reindex", pad_tau=0.01, pad_geometry="continuous", pad_candidates=True),
    "himap": dict(positions="keep", pad_tau=0.5, pad_geometry="continuous", pad_candidates=True),
    "visionzip": dict(positions="reindex", pad_tau=0.5, pad_geometry="continuous", pad_candidates=False),
    "sparsevlm": dict(positions="reindex", pad_tau=0.5, pad_geometry="bilinear", pad_candidates=True),
    "tokencarve": dict(positions="keep", pad_tau=0.5, pad_geometry="continuous", pad_candidates=True),
    "illava": dict(positions="keep", pad_tau=0.5, pad_geometry="continuous", pad_candidates=True),
}
