import json
import os

import pytest

import jaxdebias as jd
from jaxdebias.cli import demo, families, inputs, specs
from jaxdebias.cli.run import run
from jaxdebias.toy.curves import own_curve
from tests.cli.samples import cli_exit


@pytest.fixture(scope="module")
def embedded():
    """The embedded default, loaded once for the checks below that read it (``run`` loads its own)."""
    return families.default_model()


def test_demo_debiasing_recovers_the_planted_object():
    r = demo.run(k=64, show=False)
    assert r["no debias"]["padding_kept"] > 0
    for name in ("padding only", "padding + released FastV curve", "padding + online per-sample fit"):
        assert r[name]["padding_kept"] == 0
    assert r["padding + online per-sample fit"]["object_recall"] > r["padding only"]["object_recall"]
    assert abs(r["padding + online per-sample fit"]["slope"]) < abs(r["padding only"]["slope"]) / 3


def test_cli_demo_and_bad_keep(capsys):
    code, out, err = cli_exit(capsys, "demo", "--keep", "32")
    assert code == 0, err
    assert "object recall" in out and "online per-sample fit" in out
    code, _, err = cli_exit(capsys, "demo", "--keep", "600")
    assert code == 2 and "--keep must be in 1..576" in err


def test_run_on_the_embedded_default(tmp_path, embedded):
    from jaxdebias.cli.main import _debias, build_parser

    lines = []
    # `jaxdebias run --decode fast`: the defaults (FastV keep 128, padding + the toy's own curve), decoding on the
    # shortened cache (the first-stage scores and slopes do not depend on --decode; the released one masks instead)
    args = build_parser().parse_args(["run", "--decode", "fast"])
    spec = specs.prune_spec(args.method, args.keep, _debias(args), args.decode)
    assert "calibrated curve" in specs.describe(spec)
    s = run(spec, out_dir=str(tmp_path), max_new_tokens=1, log=lines.append)  # a one-word answer: one token
    assert any("toy LLaVA-1.5" in line for line in lines)
    for f in s["figures"]:
        assert os.path.getsize(f) > 5000  # a real PNG with content
    assert s["kept"] == {"pruned": 128, "pruned + debiased": 128}
    assert s["padding_kept"]["pruned"] > 0  # the letterbox rows of the 405x304 scene draw some selections...
    assert s["padding_kept"]["pruned + debiased"] == 0  # ...and with debiasing none
    saved = json.load(open(tmp_path / "run.json"))
    # the shipped scene shows the recency trend the toy's FastV curve corrects (jaxdebias.toy.default_scene):
    # the printed slope is flatter after debiasing
    assert abs(saved["bias_after"]["slope"]) < abs(saved["bias_before"]["slope"])
    assert saved["bias_before"]["slope"] >= own_curve("fastv")["b"] > 0
    assert set(saved["answers"]) == {"unpruned", "pruned", "pruned + debiased"}
    assert all(a in ("yes", "no") for a in saved["answers"].values())  # the toy model answers its question
    assert saved["stage_lengths"]["pruned"][1][2] < saved["stage_lengths"]["unpruned"][0][2]
    loaded = embedded
    tok = loaded.tokenizer.tokenizer
    ids, instr = inputs.build_prompt(loaded.tokenizer, "Is there a star?", 576)
    assert (ids == loaded.model.cfg.image_token_id).sum() == 576 and tok.decode([int(ids[instr])]) == "?"
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids.tolist()


def test_run_bad_inputs_exit_2(tmp_path, capsys):
    def run(*args):
        code, _, err = cli_exit(capsys, "run", "--out", str(tmp_path / "o"), *args)
        return code, err

    code, err = run("--image", str(tmp_path / "missing.png"))
    assert code == 2 and "does not exist" in err
    (tmp_path / "bad.png").write_bytes(b"not an image")
    code, err = run("--image", str(tmp_path / "bad.png"))
    assert code == 2 and "cannot be read" in err
    code, err = run("--keep", "600")
    assert code == 2 and "--keep must be in 1..576" in err
    code, err = run("--checkpoint", str(tmp_path))
    assert code == 2 and "is not a jaxdebias checkpoint" in err
    code, err = run("--debias", "strong")
    assert code == 2 and "--debias must be" in err
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_var_flags_parse():
    from jaxdebias.cli.main import _var, build_parser

    def parsed(*flags, checkpoint=True):
        return build_parser().parse_args(["run", *flags] + (["--checkpoint", "ckpt"] if checkpoint else []))

    assert _var(parsed()) is None
    assert _var(parsed("--var", "--var-dims", "llava-1.5-7b")).sink_dims == (1415, 2533)
    spec = _var(parsed("--var", "--var-dims", "3,9", "--var-p", "0.5", "--var-layers", "2,3"))
    assert spec.sink_dims == (3, 9) and spec.p == 0.5 and spec.layers == (2, 3)
    assert _var(parsed("--var", checkpoint=False)).sink_dims == "discover"  # the embedded model: discovered
    with pytest.raises(jd.UserError, match="--var needs the model's sink dimensions"):
        _var(parsed("--var"))
    with pytest.raises(jd.UserError, match="p must lie"):
        _var(parsed("--var", "--var-dims", "1", "--var-p", "2.0"))


def test_curves_belong_to_their_model(embedded):
    """The embedded toy model debiases with its own calibrated curve (jaxdebias/assets/toy_curves.json), a
    checkpoint with the released one; a released curve on a model it was not fitted on warns."""
    from jaxdebias.cli.main import _debias, build_parser
    from jaxdebias.toy import curves as toy_curves

    def debias(*flags):
        return _debias(build_parser().parse_args(["run", *flags]))

    own = toy_curves.own_curve("fastv")
    assert own["form"] == "exp" and set(toy_curves.METHODS) <= set(json.load(open(toy_curves.path()))["curves"])
    assert debias().curve == tuple(sorted(own.items()))
    assert debias("--method", "pdrop").curve == tuple(sorted(toy_curves.own_curve("pdrop").items()))
    assert debias("--checkpoint", "ckpt").curve == "released"
    assert debias("--curve", "released").curve == "released"  # asked for: then it warns (below)
    assert debias("--method", "visionzip") == jd.Debias(pad_tau="released", task="gqa")  # no curve: padding only
    loaded = embedded
    with pytest.warns(UserWarning, match="fitted on LLaVA-1.5-7B.*jaxdebias calibrate"):
        loaded.check(jd.PruneSpec("fastv", keep=64, debias=jd.Debias(curve="released", pad_tau=0.5)))
    # the toy model's trend is its own: a calibrated slope near zero, not the 7B release's recency
    assert abs(own["b"]) < jd.RELEASED_EXP_B["himap"]["gqa"] / 2
