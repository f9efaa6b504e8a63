"""Which ``LoadedModel`` a checkpoint gets: the family's input processing, picked by the model's ``model_type``
(``FAMILIES``), so that the commands ask the loaded model (``loaded.request``, ``loaded.check``, ``loaded.media``)
instead of checking its class.

    loaded = load_model("out/llava-7b")   # None: the embedded toy default
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os

from jaxdebias import UserError
from jaxdebias.cli.anyres import NextLoadedModel
from jaxdebias.cli.images import CLIP_MEAN, CLIP_STD
from jaxdebias.cli.inputs import HFTokenizer, LoadedModel
from jaxdebias.cli.onevision import OnevisionLoadedModel
from jaxdebias.cli.video import VideoLoadedModel
from jaxdebias.convert.load import load
from jaxdebias.convert.source import ConversionError
from jaxdebias.toy import model as toy

FAMILIES: dict[str, type[LoadedModel]] = {"llava": LoadedModel, "llava_next": NextLoadedModel,
                                          "video_llava": VideoLoadedModel, "llava_onevision": OnevisionLoadedModel}


def default_model() -> LoadedModel:
    """The embedded default: the toy LLaVA-1.5 shipped inside the package (``jaxdebias.toy``; CLIP 336/14 -> 576
    visual tokens, a 24-layer decoder so every method's published layer indices apply), trained on generated
    scenes of shapes. It has learned the language of their questions but not yet to read the image (README, "The
    toy world")."""
    return dataclasses.replace(load_model(toy.default_path()), embedded=True, identity=checkpoint_identity(None))


def load_model(checkpoint: str | None) -> LoadedModel:
    """A converted checkpoint (``jaxdebias-convert``) with its tokenizer and image normalisation, as its family's
    ``LoadedModel``, or the embedded default when ``checkpoint`` is None."""
    if checkpoint is None:
        return default_model()
    try:
        model = load(checkpoint)
    except ConversionError as e:
        raise UserError(str(e)) from None
    family = FAMILIES.get(model.model_type)
    if family is None:
        raise UserError(f"{checkpoint} holds a {model.model_type!r} model, which the command line does not process "
                        f"yet (it processes {', '.join(FAMILIES)}).")
    mean, std = CLIP_MEAN, CLIP_STD
    processor = os.path.join(checkpoint, "preprocessor_config.json")
    if os.path.isfile(processor):
        with open(processor) as f:
            config = json.load(f)
        mean, std = tuple(config.get("image_mean", mean)), tuple(config.get("image_std", std))
    return family(model, HFTokenizer(checkpoint, getattr(model.cfg, family.placeholder)), mean, std,
                  identity=checkpoint_identity(checkpoint))


def checkpoint_identity(checkpoint: str | None) -> dict:
    """What names a checkpoint in a run's setting record: its absolute path and a digest of its small files (the
    config and the converter's marker, which holds the weights' digests), computed without loading it. None: the
    embedded default."""
    path = os.path.abspath(toy.default_path() if checkpoint is None else checkpoint)
    h = hashlib.sha256()
    for name in sorted(glob.glob(os.path.join(path, "*.json"))):
        if os.path.getsize(name) < 1 << 22:
            with open(name, "rb") as f:
                h.update(os.path.basename(name).encode() + b"\0" + f.read())
    return {"checkpoint": "embedded" if checkpoint is None else path, "checkpoint_digest": h.hexdigest()[:16]}


def model_identity(model: LoadedModel | str | None) -> dict:
    """``checkpoint_identity`` of a model given as a path (None: embedded) or as a ``LoadedModel`` (its own
    record, or, built in memory, its class and configuration)."""
    if isinstance(model, LoadedModel):
        return model.identity or {"checkpoint": f"in memory: {type(model.model).__name__}",
                                  "checkpoint_digest": hashlib.sha256(repr(model.model.cfg).encode()).hexdigest()[:16]}
    return checkpoint_identity(model)


def resolve_model(model: LoadedModel | str | None) -> LoadedModel:
    """A ``LoadedModel`` as given, or loaded from a checkpoint path (None: the embedded default)."""
    return model if isinstance(model, LoadedModel) else load_model(model)


def with_frame_trend(model: LoadedModel | str | None, trend: str) -> LoadedModel:
    """A Video-LLaVA model (loaded, or a checkpoint's path) with its positional trend fitted per ``trend``
    ("frame" or "video")."""
    loaded = resolve_model(model)
    if loaded.media != "video":
        raise UserError("--frame-trend applies to Video-LLaVA checkpoints (model_type 'video_llava'); this model is "
                        f"{type(loaded.model).__name__}.")
    try:
        loaded.model.with_frame_trend(trend)
    except ValueError as e:
        raise UserError(str(e)) from None
    return loaded
