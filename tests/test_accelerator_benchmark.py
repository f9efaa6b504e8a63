"""benchmarks/accelerator.py stays runnable: its --small table on the CPU has every row and column, with finite
positive numbers (no timing is asserted), and the shallow-decoder schedules it uses are valid."""

import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
COLUMNS = ["device", "model", "measurement", "setting", "ms", "work", "achieved", "% of limit", "time ratio",
           "FLOP ratio", "note"]
METHODS = ("fastv", "pdrop", "sparsevlm", "himap", "tokencarve", "visionzip")


def _number(cell: str) -> float:
    return float(cell.split()[0])


def _positive(cell: str) -> bool:
    x = _number(cell)
    return math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def small_table(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerator") / "table.md"
    # unoptimised XLA:CPU code compiles ~40% faster; the numbers are checked for sanity, never for speed
    flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
    r = subprocess.run([sys.executable, os.path.join(BENCH, "accelerator.py"), "--small", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.read_text() == r.stdout  # --out holds the same single table
    return r.stdout


def test_small_table_rows_and_numbers(small_table):
    lines = small_table.strip().splitlines()
    assert all(line.startswith("|") and line.endswith("|") for line in lines)  # one table, nothing else
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert rows[0] == COLUMNS and set(rows[1]) == {"---"}
    rows = [dict(zip(COLUMNS, r)) for r in rows[2:]]
    assert all(len(r) == len(COLUMNS) and r["device"].startswith("cpu") for r in rows)

    def find(measurement, setting=""):
        hit = [r for r in rows if r["measurement"] == measurement and r["setting"].startswith(setting)]
        assert len(hit) == 1, (measurement, setting, [r["setting"] for r in rows if r["measurement"] == measurement])
        return hit[0]

    measured = [r for r in rows if not r["note"].startswith("skipped")]
    for r in measured:  # every measured row has a time and a rate
        assert _positive(r["ms"]) and _positive(r["achieved"]), r
    for name in ("matmul rate", "copy bandwidth"):
        assert find(name)["model"] == "limits"
    prefill, decode = find("prefill"), find("decode")
    for r in (prefill, decode):
        assert _positive(r["work"]) and _positive(r["% of limit"]), r
    assert decode["work"].endswith("GB/token") and prefill["work"].endswith("GFLOP")

    for method in METHODS:  # each method's 64-token row: measured, or skipped with its reason
        r = find("pruned prefill", f"{method} keep 64")
        if r["note"].startswith("skipped"):
            assert method in ("pdrop", "sparsevlm", "himap") and "too shallow" in r["note"], r
            continue
        for col in ("work", "% of limit", "time ratio", "FLOP ratio"):
            assert _positive(r[col]), (col, r)
        assert _number(r["FLOP ratio"]) < 1, r  # the pruned program counts fewer FLOPs than the unpruned one
    assert len([r for r in rows if r["measurement"] == "pruned prefill" and r["note"].startswith("skipped")]) == 3

    for tokens in (512, 1024):
        dense = find("attention: dense (XLA, the model's path)", f"{tokens} tokens")
        split = find("attention: TriangleMix split", f"{tokens} tokens")
        assert _positive(dense["work"]) and dense["time ratio"] == "-"
        for col in ("work", "time ratio", "FLOP ratio"):
            assert _positive(split[col]), (col, split)
        assert _number(split["FLOP ratio"]) < 1, split


def test_shallow_schedules_scale_to_the_decoder():
    sys.path.insert(0, BENCH)
    try:
        import accelerator
    finally:
        sys.path.remove(BENCH)
    for method in METHODS:
        for keep in (64, 128, 192):
            spec, setting = accelerator.prune_spec(method, keep, 32)  # the released schedule, untouched
            assert spec.stages is None and setting == f"{method} keep {keep}"
            spec, setting = accelerator.prune_spec(method, keep, 8)  # the mid-sized decoder
            spec.plan(576, 8)
            released = spec.schedule(576, 8) if spec.stages is None else None
            if method in ("pdrop", "sparsevlm", "himap"):
                assert released is None and "scaled to 8 layers" in setting
                assert all(s.boundary < 8 for s in spec.stages)
                # same token counts as the released 32-layer schedule, only the layers move
                ref = accelerator.jd.PruneSpec(method, keep=keep).schedule(576, 32)
                assert [s.keep for s in spec.stages] == [s.keep for s in ref]
        with pytest.raises(ValueError):
            accelerator.prune_spec("sparsevlm", 64, 2)
