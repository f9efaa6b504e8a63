"""eval-grid: methods x {plain, debiased} + unpruned on a toy POPE folder, one summary table and plot."""

import csv
import os

import jax
import pytest

import jaxdebias as jd
from jaxdebias.cli import families, grid
from jaxdebias.cli import main as cli
from jaxdebias.toy import bench as toy_bench
from tests.cli.samples import write_pope


def eval_grid(monkeypatch, capsys, *argv) -> None:
    """``jaxdebias eval-grid argv`` run in this process on one device, as the command runs on one CPU (the test
    session has 4 fake devices, over which the batch would be sharded)."""
    monkeypatch.setattr(jax, "local_devices", lambda *a, **k: jax.devices()[:1])
    code = cli.main(["eval-grid", *argv])
    assert code == 0, capsys.readouterr().err[-3000:]


def test_eval_grid_writes_one_summary(tmp_path, monkeypatch, capsys, tiny_checkpoint):
    data = write_pope(tmp_path / "pope")
    out = tmp_path / "grid"
    eval_grid(monkeypatch, capsys, "--bench", "pope", "--data", str(data), "--out", str(out), "--methods",
              "fastv,VisionZip,pool", "--keep", "4", "--limit", "3", "--batch", "3", "--max-new-tokens", "1",
              "--checkpoint", tiny_checkpoint)
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(x["method"], x["variant"]) for x in rows] == [
        ("unpruned", "unpruned"), ("fastv", "paper"), ("fastv", "before"), ("fastv", "after"),
        ("visionzip", "paper"), ("visionzip", "before"), ("visionzip", "after"),
        ("pool", "paper")]  # pool scores nothing: the paper setting only
    assert {x["n"] for x in rows} == {"3"} and all(0 <= float(x["f1"]) <= 1 for x in rows)
    assert {x["decode"] for x in rows} == {"dense", "released"}  # the releases' decoding by default
    debias = {(x["method"], x["variant"]): x["debias"] for x in rows}
    assert debias["fastv", "paper"] == "off"
    assert debias["fastv", "before"] == "unpad mask, budget capped at the content"  # FastV.patch's unpad_mask
    # a checkpoint's "after": the released curve of the benchmark (the embedded model's own curve: below)
    assert debias["fastv", "after"] == "pad 0.5, budget capped at the content + released pope curve"
    assert debias["visionzip", "after"] == debias["visionzip", "before"] == "pad 0.5, budget capped at the content"
    markdown = (out / "summary.md").read_text()
    assert "| fastv |" in markdown and "| visionzip |" in markdown and "| unpruned |" in markdown
    assert "| pool |" in markdown and "| n/a | n/a | | | not applicable |" in markdown
    assert "before: letterbox padding suppressed" in markdown  # the summary says which setting is which
    assert os.path.getsize(out / "summary.png") > 5000
    for folder in ("unpruned", "fastv-paper", "fastv-before", "fastv-after", "visionzip-paper", "visionzip-before"):
        assert len((out / folder / "pope_answers.jsonl").read_text().splitlines()) == 3  # resumable cells
    assert not (out / "visionzip-after").exists()  # the same setting as its "before": not run twice

    # on the embedded default (no --checkpoint), "after" is the embedded toy model's own calibrated curve, not
    # LLaVA-1.5-7B's released one: one cell of the same command
    own = tmp_path / "own"
    eval_grid(monkeypatch, capsys, "--bench", "pope", "--data", str(data), "--out", str(own), "--methods", "fastv",
              "--presets", "after", "--no-unpruned", "--keep", "64", "--limit", "1", "--batch", "1",
              "--max-new-tokens", "1")
    with open(own / "summary.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["method"], row["variant"], row["n"], row["decode"]) == ("fastv", "after", "1", "released")
    assert row["debias"].startswith("pad 0.5, budget capped at the content + calibrated curve b ")


def test_grid_table_plot_and_methods(tmp_path):
    cells = [{"method": "unpruned", "variant": "unpruned", "keep": 576, "debias": "off",
              "metrics": {"f1": 0.8, "accuracy": 0.8, "n": 4}}]
    for i, method in enumerate(("fastv", "pdrop", "sparsevlm")):
        for variant, bonus in (("paper", 0.0), ("before", 0.02), ("after", 0.05)):
            cells.append({"method": method, "variant": variant, "keep": 64, "debias": "pad 0.5",
                          "decode": "released", "metrics": {"f1": 0.6 + 0.05 * i + bonus, "accuracy": 0.7, "n": 4}})
    cells.append({"method": "visionzip", "variant": "paper", "keep": 64, "debias": "off",
                  "metrics": {"f1": 0.4, "n": 4}})
    cells.append({"method": "visionzip", "variant": "before", "keep": 64, "debias": "pad 0.5",
                  "metrics": {"f1": 0.45, "n": 4}})
    cells.append({"method": "visionzip", "variant": "after", "keep": 64, "debias": "pad 0.5", "same_as": "before",
                  "metrics": {"f1": 0.45, "n": 4}})
    cells.append({"method": "random", "variant": "paper", "keep": 64, "debias": "off",
                  "metrics": {"f1": 0.5, "accuracy": 0.5, "n": 4}})  # a baseline: the paper setting only
    table, markdown = grid.summary_tables("pope", cells)
    assert "| random | 0.5000 | n/a | n/a | | | not applicable |" in markdown
    assert table.splitlines()[0] == "method,variant,keep,decode,debias,f1,accuracy,n"
    assert "| pdrop | 0.6500 | 0.6700 | 0.7000 | +0.0500 | +0.0300 | pad 0.5 |" in markdown
    assert "| visionzip | 0.4000 | 0.4500 | 0.4500 | +0.0500 | +0.0000 | pad 0.5 |" in markdown
    assert os.path.getsize(grid.summary_plot("pope", cells, str(tmp_path / "radar.png"))) > 5000
    assert grid.parse_methods("all") == jd.METHODS
    assert grid.parse_methods("PyramidDrop, fastv") == ("pdrop", "fastv")
    with pytest.raises(jd.UserError, match="Unknown pruning method"):
        grid.parse_methods("fastv,nope")


def test_eval_grid_over_several_benchmarks(tmp_path, tiny_checkpoint):
    """--bench pope,gqa: --data holds a folder per benchmark (as toy-bench writes them), a grid per benchmark in
    its own folder, and the radar over the benchmarks. (The tiny checkpoint at the batch and budget of the test
    above: the same compiled programs serve both.)"""
    for kind in ("pope", "gqa"):
        toy_bench.write_bench(str(tmp_path / "data" / kind), kind, 3, 0)
    model = families.load_model(tiny_checkpoint)
    cells = grid.evaluate_grids(["pope", "gqa"], str(tmp_path / "data"), str(tmp_path / "out"), methods=("fastv",),
                                keep=4, presets=("paper", "after"), model=model, limit=2, batch_size=3,
                                max_new_tokens=1, progress=False, log=lambda *_: None, devices=jax.devices()[:1])
    assert list(cells) == ["pope", "gqa"]
    for bench in ("pope", "gqa"):
        assert [(c["method"], c["variant"]) for c in cells[bench]] == [
            ("unpruned", "unpruned"), ("fastv", "paper"), ("fastv", "after")]
        assert (tmp_path / "out" / bench / "summary.md").is_file()
    assert os.path.getsize(tmp_path / "out" / "radar.png") > 5000
    with pytest.raises(jd.UserError, match="one folder per benchmark; .* has no mme folder"):
        grid.evaluate_grids(["pope", "mme"], str(tmp_path / "data"), str(tmp_path / "out2"), methods=("fastv",),
                            keep=4, model=model, progress=False)
