"""The Colab notebooks run end to end (cells tagged `colab` skipped) on a tiny converted checkpoint (the
``tiny_checkpoint`` fixture, through the notebooks' CHECKPOINT parameter, as on Colab), and their jupytext pairs
agree."""

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupytext = pytest.importorskip("jupytext")

COLAB = pathlib.Path(__file__).resolve().parents[2] / "colab"


def run_notebook(name, tmp_path, params: str):
    nb = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
    nb.cells = [c for c in nb.cells if "colab" not in c.get("metadata", {}).get("tags", [])]
    (cell,) = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    cell.source += "\n" + params
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    return nb


@pytest.mark.parametrize("name", ["quickstart", "calibrate_and_eval"])
def test_pairs_are_in_sync(name):
    py = jupytext.read(COLAB / f"{name}.py")
    nb = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
    assert [c.source for c in py.cells] == [c.source for c in nb.cells]


def test_quickstart(tmp_path, tiny_checkpoint):
    run_notebook("quickstart", tmp_path, f'CHECKPOINT = {tiny_checkpoint!r}; OUT = "out"; KEEP = 4')
    for fig in ("kept.png", "curve.png"):
        assert os.path.getsize(tmp_path / "out" / fig) > 5000


def test_calibrate_and_eval(tmp_path, tiny_checkpoint):
    nb = run_notebook("calibrate_and_eval", tmp_path, f'CHECKPOINT = {tiny_checkpoint!r}; OUT = "out"; LIMIT = 4; KEEP = 4')
    assert os.path.getsize(tmp_path / "out" / "comparison.png") > 5000
    assert os.path.getsize(tmp_path / "out" / "curve.png") > 5000
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "padding + calibrated curve" in printed
