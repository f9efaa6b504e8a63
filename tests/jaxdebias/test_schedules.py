"""Each method's default schedule, positions and padding threshold equal the release (``shared/reference/methods.md``
states them rule by rule with their sources); our own choices are named options."""

import pytest

import jaxdebias as jd
from jaxdebias.methods import Stage
from jaxdebias.methods.sparsevlm import RecycleStage


def layer_average(stages, n=576, total=32):
    bounds = [0] + [s.boundary for s in stages] + [total]
    counts = [n] + [s.keep + s.extra for s in stages]
    return sum((bounds[i + 1] - bounds[i]) * counts[i] for i in range(len(counts))) / total


def test_fastv_released():
    spec = jd.PruneSpec("fastv", keep=128)
    assert spec.schedule(576, 32) == (Stage(2, 128, "last", "tap"),)
    assert spec.positions == "original" and jd.Debias(pad_tau="released").tau_for("fastv") == 0.5


def test_pdrop_released_counts_positions_and_threshold():
    stages = jd.PruneSpec("pdrop", keep=128).schedule(576, 32)
    assert [(s.layer, s.keep, s.query, s.source) for s in stages] == [
        (2, 184, "instruction", "probe"), (10, 92, "instruction", "probe"), (20, 46, "instruction", "probe")]
    assert jd.PruneSpec("pdrop").positions == "reindex"  # the release re-indexes 0..L'-1 after each drop
    assert jd.Debias(pad_tau="released").tau_for("pdrop") == 0.01
    for budget in (64, 192):  # ours: the ratio whose layer average is the budget
        assert abs(layer_average(jd.PruneSpec("pdrop", keep=budget).schedule(576, 32)) - budget) < 1.5
    assert jd.PruneSpec("pyramiddrop", keep=128, positions="original").positions == "original"  # our variant, named


def test_himap_budgets():
    stages = jd.PruneSpec("himap", keep=128).schedule(576, 32)
    assert [(s.layer, s.keep, s.query) for s in stages] == [(2, 115, "text"), (8, 90, "image")]
    for budget in (64, 192):
        stages = jd.PruneSpec("himap", keep=budget).schedule(576, 32)
        assert abs(layer_average(stages) - budget) < 1.5 and stages[1].keep < stages[0].keep
    upstream = jd.methods.himap.schedule(128, keeps=(288, 72))
    assert [(s.layer, s.keep) for s in upstream] == [(2, 288), (8, 72)]


def test_sparsevlm_released_lists_and_recycling_counts():
    for keep, lists in jd.methods.sparsevlm.KEEPS.items():
        stages = jd.PruneSpec("sparsevlm", keep=keep).schedule(576, 32)
        assert [s.layer for s in stages] == [2, 6, 15] and tuple(s.keep for s in stages) == lists
        assert {s.source for s in stages} == {"self"} and [s.boundary for s in stages] == [3, 7, 16]
    # methods.md's worked example for 192: (kept, pruned, recycled, clusters) per stage
    stages = jd.PruneSpec("sparsevlm", keep=192).schedule(576, 32)
    prev, got = 576, []
    for s in stages:
        got.append((s.keep, prev - s.keep, s.recycle, s.clusters))
        prev = s.keep + s.clusters
    assert got == [(300, 276, 83, 9), (200, 109, 33, 4), (110, 94, 29, 3)]
    shape, limits = jd.PruneSpec("sparsevlm", keep=128).plan(576, 32)
    assert [s.slots for s in shape.stages] == [303, 110, 36]  # exact counts, not bucketed
    assert jd.PruneSpec("sparsevlm").positions == "reindex"


def test_tokencarve_released():
    (s,) = jd.PruneSpec("tokencarve", keep=64).schedule(576, 32)
    assert (s.layer, s.keep, s.query, s.source, s.merge, s.info_weight) == (2, 64, "last", "tap", 32, 0.5)
    assert jd.PruneSpec("tokencarve").positions == "original"  # RoPE at original positions
    shape, limits = jd.PruneSpec("tokencarve", keep=64).plan(576, 32)
    assert shape.stages[0].slots == 64 and limits == (64,)


def test_bad_stages_say_what_to_do():
    with pytest.raises(ValueError, match="source must be 'tap', 'probe' or 'self'"):
        jd.PruneSpec("fastv", stages=(Stage(2, 4, "last", "bogus"),)).schedule(9, 4)
    with pytest.raises(ValueError, match=r"stage layer 3 must be in 1..2"):
        jd.PruneSpec("sparsevlm", stages=(RecycleStage(3, 4),)).schedule(9, 4)
    with pytest.raises(ValueError, match="pad_tau must be a fraction, 'released' or None"):
        jd.Debias(pad_tau="pil")
    with pytest.raises(ValueError, match="Unknown pruning method 'fastvv'"):
        jd.PruneSpec("fastvv")
