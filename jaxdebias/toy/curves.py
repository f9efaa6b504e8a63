"""The embedded toy model's own positional-debiasing curves: ``python -m jaxdebias.toy.curves [--n 96]``.

The released curves (``jaxdebias.RELEASED_EXP_B`` ...) were fitted on LLaVA-1.5-7B, and a curve describes the
model it was fitted on: the toy model's first-stage scores trend differently. This fits, for every method whose
first stage scores tokens, the exponential trend of its scores over ``n`` generated calibration questions
(``experiment.calibrate``: padding excluded, as ``jaxdebias calibrate`` does) and writes the curves with the
model's digest to ``jaxdebias/assets/toy_curves.json``, which ``jaxdebias run`` / ``eval`` use on the embedded
model in place of the released ones.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from importlib import resources

import jaxdebias as jd
from jaxdebias.eval.files import digest, write_json
from jaxdebias.toy import experiment, model as toy_model

METHODS = ("fastv", "pdrop", "sparsevlm", "himap", "tokencarve")


def path() -> str:
    return str(resources.files("jaxdebias") / "assets" / "toy_curves.json")


def own_curve(method: str) -> dict | None:
    """The shipped toy model's calibrated curve for ``method`` (a ``curve_to_dict`` dict), or None."""
    if not os.path.isfile(path()):
        return None
    with open(path()) as f:
        return json.load(f)["curves"].get(jd.canonical_method(method))


def calibrate_all(n: int = 96, seed: int = 0, batch_size: int = 8, log=print) -> dict:
    """{"curves": {method: curve dict}, "slopes": {method: slope of the mean scores}, ...} for ``METHODS``."""
    model, tok = toy_model.load_default()
    questions = experiment.items(n, seed, "calib")
    record = {"model": "jaxdebias toy default", "model_marker": _marker_digest(), "questions": n, "seed": seed,
              "form": "exp", "curves": {}, "slopes": {}}
    for method in METHODS:
        start = time.perf_counter()
        cal = experiment.calibrate(model, tok, questions, method, batch_size, keep=192)
        record["curves"][method] = cal["curve"]
        record["slopes"][method] = cal["slope_of_mean"]
        log(f"{method}: b = {cal['curve']['b']:.3e}, slope of the mean {cal['slope_of_mean']:.5f} "
            f"({time.perf_counter() - start:.0f} s)")
    return record


def _marker_digest() -> str:
    """The digest of the toy model's marker: the curves belong to the model it names."""
    with open(os.path.join(toy_model.default_path(), "jaxdebias.json")) as f:
        return digest(f.read())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxdebias.toy.curves", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=96, help="calibration questions (half yes/no, half short answers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=path())
    args = p.parse_args(argv)
    write_json(args.out, calibrate_all(args.n, args.seed))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
