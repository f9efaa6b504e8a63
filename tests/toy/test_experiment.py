"""The toy experiment end to end on a tiny model: calibration, every variant, the table and the plots."""

import json

from jaxdebias.toy import experiment, model as toy_model, tokenizer


def test_experiment_writes_a_table_and_plots_for_every_variant(tmp_path):
    tok = tokenizer.build()
    path = toy_model.save(toy_model.init("tiny-deep", tok, 0), tok, toy_model.hf_config("tiny-deep", tok),
                          tmp_path / "model")
    model, tok = toy_model.load(path)
    res = experiment.experiment(model, tok, tmp_path / "exp", n_calib=8, n_eval=8, methods=("fastv",), keeps=(2,),
                                batch_size=4, log=lambda *a: None)
    assert set(res["pruned"]) == {f"fastv/2/{v}" for v in experiment.VARIANTS}
    assert all(0 <= c["mean"] <= 1 for c in [res["unpruned"], *res["pruned"].values()])
    cal = res["calibration"]["fastv"]
    assert len(cal["row_means"]) == model.cfg.vision.grid and cal["samples"] == 8
    assert json.loads((tmp_path / "exp" / "results.json").read_text())["pruned"] == res["pruned"]
    table = (tmp_path / "exp" / "table.md").read_text()
    assert "| fastv | 2 |" in table and all(v in table for v in experiment.VARIANTS)
    assert (tmp_path / "exp" / "accuracy.png").stat().st_size > 0 and (tmp_path / "exp" / "curves.png").stat().st_size > 0
