import subprocess
import sys

from jaxdebias import demo


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
