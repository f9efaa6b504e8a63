"""Command-line values into specs: ``--method``/``--keep``/``--decode`` into a ``jd.PruneSpec``, ``--debias``,
``--pad-tau`` and ``--curve`` into a ``jd.Debias``, the ``--var-*`` flags into a ``VarSpec``; each bad value becomes a
UserError that says what to pass instead. ``describe`` puts a spec's debiasing back into words."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings

import jax
import numpy as np

import jaxdebias as jd
from jaxdebias.models.interventions import VarSpec

UserError = jd.UserError
DEBIAS_MODES = ("off", "pad", "curve", "pad+curve") + jd.PRESETS  # the last three: jd.Debias.preset


def parse_debias(mode: str, pad_tau: float | str = "released", curve: str | None = None,
                 task: str = "gqa", method: str = "fastv") -> jd.Debias:
    """--debias off|pad|curve|pad+curve, with --pad-tau (a fraction or "released": each method's own) and --curve
    FILE (a ``jaxdebias calibrate`` output) or a curve dict, "online" or "released" (the default: the method's
    released curve for ``task``); or one of the debias code's settings for ``method`` (``jd.Debias.preset``):
    paper, before, after (--curve replaces the released curve of "after"; --pad-tau does not apply)."""
    if mode not in DEBIAS_MODES:
        raise UserError(f"--debias must be {', '.join(DEBIAS_MODES[:-1])} or {DEBIAS_MODES[-1]}, got {mode!r}.")
    chosen = None
    if "curve" in mode or (mode == "after" and curve is not None):
        chosen = "released" if curve is None else curve
        if isinstance(chosen, dict):  # a curve record (the embedded model's own)
            chosen = jd.curve_from_dict(chosen)
        elif chosen not in ("released", "online"):
            chosen = read_curve(chosen)
    try:
        if mode in jd.PRESETS:
            preset = jd.Debias.preset(mode, method, task)
            return preset if chosen is None else dataclasses.replace(preset, curve=chosen)
        return jd.Debias(curve=chosen, pad_tau=pad_tau if "pad" in mode else None, task=task)
    except ValueError as e:
        raise UserError(str(e)) from None


def describe(spec: jd.PruneSpec) -> str:
    """What debiasing ``spec`` applies, in words."""
    debias, tau = spec.debias, spec.debias.tau_for(spec.method)
    parts = []
    if tau is not None:
        geometry = debias.geometry_for(spec.method)
        parts.append("unpad mask" if geometry == "unpad" else f"pad {tau:g}" + (" bilinear" if geometry == "bilinear"
                                                                                 else ""))
        if not spec.pad_candidates:
            parts[-1] += ", budget capped at the content"
    if debias.curve == "released":
        parts.append(f"released {debias.task} curve")
    elif debias.curve is not None:
        parts.append("online curve" if debias.curve == "online" else "calibrated curve " + (
            ", ".join(f"{k} {v:.3g}" for k, v in debias.curve if isinstance(v, float)) if debias.curve[0] != "views"
            else "per view"))
    return " + ".join(parts) or "off"


def read_curve(path: str):
    """The curve in a file written by ``jaxdebias calibrate``."""
    if os.path.isdir(path):
        raise UserError(f"Curve file {path} is a directory; pass the curve.json written by jaxdebias calibrate.")
    if not os.path.isfile(path):
        raise UserError(f"Curve file {path} does not exist (write one with jaxdebias calibrate).")
    with open(path, "rb") as f:
        try:
            record = json.loads(f.read().decode("utf-8"))
            if not isinstance(record, dict) or "curve" not in record:
                raise ValueError(f"expected a JSON object with a 'curve' field, got {type(record).__name__}"
                                 + (" without one" if isinstance(record, dict) else ""))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a float32 overflow: refused just below
                curve = jd.curve_from_dict(record["curve"])
            if not all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree_util.tree_leaves(curve)):
                raise ValueError("a parameter overflows float32")
            return curve
        except RecursionError:
            raise UserError(f"{path} is nested too deeply to be a curve file written by jaxdebias calibrate.") from None
        except (KeyError, TypeError, ValueError, ArithmeticError) as e:  # UnicodeDecodeError is a ValueError
            raise UserError(f"{path} is not a curve file written by jaxdebias calibrate ({e}).") from None


# keep buckets past LLaVA-1.5's 576 (a video's 2056, LLaVA-NeXT's 2880 tokens): a large budget is rounded up to the
# next of these, not to the whole span (a bucket only shapes the program; the kept count is the one asked for)
LARGE_BUCKETS = (640, 768, 896, 1024, 1280, 1536, 1792, 2048, 2560, 3072)


def prune_spec(method: str, keep: int, debias: jd.Debias = jd.Debias(), decode: str = "released") -> jd.PruneSpec:
    """A ``jd.PruneSpec`` from command-line values (a bad method name or keep becomes a UserError), with keep
    buckets up to 3072 and, by default, each method's released decoding (``--decode``)."""
    try:
        return jd.PruneSpec(method, keep=keep, debias=debias, buckets=jd.DEFAULT_BUCKETS + LARGE_BUCKETS,
                            decode=decode)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None


def var_spec(dims: str | None, *, p: float = 0.6, tau: float = 20.0, rho: float = 0.5,
             layers: str = "released") -> VarSpec:
    """A VAR spec from command-line values. ``dims``: "1415,2533", a model name with published sink dims
    ("llava-1.5-7b"), or "discover"; ``layers``: "released", "intended" or "2,3,4"."""
    if dims is None:
        raise UserError("--var needs the model's sink dimensions: --var-dims 1415,2533, a model name "
                        f"({', '.join(jd.KNOWN_SINK_DIMS)}) or 'discover'.")
    if not (math.isfinite(tau) and tau > 0):
        raise UserError(f"--var-tau must be a positive number (the sink threshold, released 20), got {tau}.")
    try:
        if dims != "discover":
            dims = tuple(int(d) for d in dims.split(",")) if dims[:1].isdigit() else jd.known_sink_dims(dims)
        chosen = layers if layers in ("released", "intended") else tuple(int(x) for x in layers.split(","))
        spec = VarSpec(sink_dims=dims, p=p, tau=tau, rho=rho, layers=chosen)
    except (ValueError, KeyError) as e:
        raise UserError(str(e).strip("'\"")) from None
    indices = [*(() if spec.sink_dims == "discover" else spec.sink_dims), *(() if isinstance(chosen, str) else chosen)]
    if any(i < 0 for i in indices):
        raise UserError(f"--var-dims and --var-layers are indices >= 0, got {[i for i in indices if i < 0]}.")
    return spec
