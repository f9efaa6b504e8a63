"""The scene shipped as ``jaxdebias/assets/default.png``, chosen by a stated rule:
``python -m jaxdebias.toy.default_scene``.

``jaxdebias run`` without ``--image`` answers "Is there a star in the image?" about the shipped scene on the
embedded toy model and prints the FastV first-stage positional slope (``jd.bias_strength``: a log-linear fit over
the content tokens) before and after debiasing with the toy model's own FastV curve ``w_i = exp(-b i)``
(``jaxdebias/assets/toy_curves.json``). Dividing by that curve lowers the slope fitted on the same tokens by
exactly ``b``, so it flattens a scene's slope ``s`` iff ``0 < b < 2 s``. The toy model's trend is weak and its
per-sample slopes straddle zero (over the 64 calibration questions: mean +8e-5, 48% negative), so a mean curve
steepens about half of the scenes. The shipped scene is one that shows the trend the calibration found.

The rule: render the toy-world scenes of seed 0, split "test" (``jaxdebias.toy.scenes``), in index order from 0,
and take the first that (1) is letterboxed (some patches are padding at tau 0.5, so padding suppression has work to
do) and (2) has a FastV first-stage slope, on the embedded model with ``jaxdebias run``'s default prompt, of at
least the toy FastV curve's ``b``. Nothing else (prompt, curve, method, model) is chosen here.
"""

from __future__ import annotations

import argparse
import os
from importlib import resources

import numpy as np

import jaxdebias as jd
from jaxdebias.cli.families import default_model
from jaxdebias.cli.inputs import LoadedModel
from jaxdebias.cli.run import TOY_PROMPT
from jaxdebias.models.generate import generate
from jaxdebias.toy import curves, scenes

SEED, SPLIT, STOP = 0, "test", 64  # the scenes searched: (SEED, SPLIT, index) for index in range(STOP)
SHIPPED = 6  # the index the rule picked for the shipped model and curves (405 x 304: 144 padding patches)
METHOD, TAU = "fastv", 0.5  # the method whose first-stage slope `jaxdebias run` prints, and its padding threshold


def path() -> str:
    return str(resources.files("jaxdebias") / "assets" / "default.png")


def first_stage_slope(loaded: LoadedModel, image, prompt: str = TOY_PROMPT) -> tuple[float, int]:
    """(the FastV first-stage slope of ``image``, as ``jaxdebias run`` prints it before debiasing; the number of
    padding patches at tau 0.5)."""
    request = loaded.request(image, prompt)
    result = generate(loaded.model, loaded.batch([request]), prune=jd.PruneSpec(METHOD, keep=128), max_new_tokens=1)
    content = loaded.content_mask(request.size, TAU)
    return float(jd.bias_strength(result.scores[0], content=content)["slope"]), int((~content).sum())


def choose(slopes, padding, b: float) -> int | None:
    """The rule: the first index whose scene is letterboxed (``padding[i] > 0``) and whose slope is at least ``b``
    (the calibrated curve's), or None. ``slopes``, ``padding``: per scene, in index order."""
    ok = (np.asarray(padding) > 0) & (np.asarray(slopes, dtype=np.float64) >= b)
    return int(np.argmax(ok)) if ok.any() else None


def pick(loaded: LoadedModel | None = None, *, stop: int = STOP, log=print) -> tuple[int, float]:
    """(index, slope) of the scene the rule picks among (SEED, SPLIT, 0..stop-1); scenes are measured in index
    order and the search stops at the first that qualifies."""
    loaded = loaded or default_model()
    b = curves.own_curve(METHOD)["b"]
    slopes, padding = [], []
    for index in range(stop):
        s = scenes.scene(scenes.stream(SEED, SPLIT, index))
        slope, pad = first_stage_slope(loaded, scenes.render(s))
        slopes.append(slope)
        padding.append(pad)
        log(f"{SPLIT} {index}: {s.width} x {s.height}, {len(s.objects)} objects, {pad} padding patches, "
            f"slope {slope:+.5f}")
        if choose(slopes, padding, b) is not None:
            return index, slope
    raise RuntimeError(f"No scene among ({SEED}, {SPLIT!r}, 0..{stop - 1}) is letterboxed with a {METHOD} slope "
                       f">= b = {b:.3e}; search more with --stop.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxdebias.toy.default_scene", description=__doc__.split("\n")[0])
    p.add_argument("--stop", type=int, default=STOP, help="search the scenes of index 0..STOP-1")
    p.add_argument("--out", default=path())
    args = p.parse_args(argv)
    b = curves.own_curve(METHOD)["b"]
    index, slope = pick(stop=args.stop)
    s = scenes.scene(scenes.stream(SEED, SPLIT, index))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    scenes.render(s).save(args.out)
    print(f"picked ({SEED}, {SPLIT!r}, {index}): {s.width} x {s.height}, slope {slope:+.5f} >= b = {b:.3e}; "
          f"after the curve {slope - b:+.5f}; wrote {args.out}")
    if index != SHIPPED:
        print(f"the rule now picks index {index}, not {SHIPPED}: set SHIPPED = {index} in {__file__} and update "
              "default_image_path's docstring and README's figures")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
