import json
import os
import subprocess
import sys

import pytest

import jaxdebias as jd
from jaxdebias.cli import demo, families, inputs, specs
from jaxdebias.cli.run import run
from jaxdebias.toy.curves import own_curve


def test_demo_debiasing_recovers_the_planted_object():
    r = demo.run(k=64, show=False)
    assert r["no debias"]["padding_kept"] > 0
    for name in ("padding only", "padding + released FastV curve", "padding + online per-sample fit"):
        assert r[name]["padding_kept"] == 0
    assert r["padding + online per-sample fit"]["object_recall"] > r["padding only"]["object_recall"]
    assert abs(r["padding + online per-sample fit"]["slope"]) < abs(r["padding only"]["slope"]) / 3


def test_cli_demo_and_bad_keep():
    ok = subprocess.run([sys.executable, "-m", "jaxdebias", "demo", "--keep", "32"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "object recall" in ok.stdout and "online per-sample fit" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "jaxdebias", "demo", "--keep", "600"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--keep must be in 1..576" in bad.stderr


def test_run_on_the_embedded_default(tmp_path):
    from jaxdebias.cli.main import _debias, build_parser

    lines = []
    # `jaxdebias run --decode fast`: the defaults (FastV keep 128, padding + the toy's own curve), decoding on the
    # shortened cache (the first-stage scores and slopes do not depend on --decode; the released one masks instead)
    args = build_parser().parse_args(["run", "--decode", "fast"])
    spec = specs.prune_spec(args.method, args.keep, _debias(args), args.decode)
    assert "calibrated curve" in specs.describe(spec)
    s = run(spec, out_dir=str(tmp_path), max_new_tokens=3, log=lines.append)
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
    loaded = families.default_model()
    tok = loaded.tokenizer.tokenizer
    ids, instr = inputs.build_prompt(loaded.tokenizer, "Is there a star?", 576)
    assert (ids == loaded.model.cfg.image_token_id).sum() == 576 and tok.decode([int(ids[instr])]) == "?"
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids.tolist()


def test_run_bad_inputs_exit_2(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "jaxdebias", "run", "--out", str(tmp_path / "o"), *args],
                              capture_output=True, text=True)

    r = run("--image", str(tmp_path / "missing.png"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    (tmp_path / "bad.png").write_bytes(b"not an image")
    r = run("--image", str(tmp_path / "bad.png"))
    assert r.returncode == 2 and "cannot be read" in r.stderr
    r = run("--keep", "600")
    assert r.returncode == 2 and "--keep must be in 1..576" in r.stderr
    r = run("--checkpoint", str(tmp_path))
    assert r.returncode == 2 and "is not a jaxdebias checkpoint" in r.stderr
    r = run("--debias", "strong")
    assert r.returncode == 2 and "--debias must be" in r.stderr
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


def test_curves_belong_to_their_model():
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
    loaded = families.default_model()
    with pytest.warns(UserWarning, match="fitted on LLaVA-1.5-7B.*jaxdebias calibrate"):
        loaded.check(jd.PruneSpec("fastv", keep=64, debias=jd.Debias(curve="released", pad_tau=0.5)))
    # the toy model's trend is its own: a calibrated slope near zero, not the 7B release's recency
    assert abs(own["b"]) < jd.RELEASED_EXP_B["himap"]["gqa"] / 2
