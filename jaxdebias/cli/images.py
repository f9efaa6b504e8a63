"""Images on the command line, read without trusting them: opened lazily (a directory, a missing file or a
decompression bomb refused with a message), converted to RGB from any PIL mode (16-bit grey scaled, not
clipped), decoded whole before a run starts (``check_rows``), and LLaVA-1.5's letterbox preprocessing.

Axes: S the tower's side (336 for LLaVA-1.5).
"""

from __future__ import annotations

import io
import os
from importlib import resources

import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxdebias import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def default_image_path() -> str:
    """An image shipped with the package: a toy-world scene (``jaxdebias.toy.scenes``, seed 0, split "test", index
    6) of 405 x 304, letterboxed, so padding suppression has work to do, and chosen by a stated rule
    (``python -m jaxdebias.toy.default_scene``) as one where the toy model shows the recency trend its curve
    corrects."""
    return str(resources.files("jaxdebias") / "assets" / "default.png")


MAX_PIXELS = 16384 * 16384  # 2.7e8: a larger image is refused as a decompression bomb (JAXDEBIAS_MAX_IMAGE_PIXELS)
_UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def max_pixels() -> int:
    """The most pixels an image may have: ``JAXDEBIAS_MAX_IMAGE_PIXELS``, else ``MAX_PIXELS``."""
    text = os.environ.get("JAXDEBIAS_MAX_IMAGE_PIXELS", str(MAX_PIXELS))
    if not text.strip().isdigit() or int(text) < 1:
        raise UserError(f"JAXDEBIAS_MAX_IMAGE_PIXELS must be a whole number of pixels, got {text!r}.")
    return int(text)


def _open(path, data: bytes | None):
    """The image, opened lazily (its header read), or UserError: no such file, a directory, too many pixels."""
    if data is None and os.path.isdir(path):
        raise UserError(f"Image {path} is a directory, not an image file.")
    if data is None and not os.path.isfile(path):
        raise UserError(f"Image {path} does not exist.")
    limit = max_pixels()
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # PIL's own guard off: the limit below decides
    try:
        image = Image.open(path if data is None else io.BytesIO(data))
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    if image.width * image.height > limit:
        image.close()
        raise UserError(f"Image {path} is {image.width} x {image.height} = {image.width * image.height:,} pixels, over "
                        f"the limit of {limit:,} (a guard against decompression bombs). Shrink it, or raise the "
                        f"limit: JAXDEBIAS_MAX_IMAGE_PIXELS={image.width * image.height}.")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB. Colour modes convert as LLaVA's own preprocessing does (``convert("RGB")``: alpha
    dropped, palettes looked up, CMYK mapped); high-bit-depth grey, which ``convert`` clips at 255 (16-bit grey
    turns white), is scaled to 8 bits: I;16* from 65535; I and F from their range (F in [0, 1] from 1, values up
    to 255 as they are, up to 65535 from 65535, beyond from the maximum)."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.nan_to_num(np.asarray(image, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        top = max(float(values.max(initial=0.0)), 1e-30)
        if image.mode.startswith("I;16") or 255 < top <= 65535:
            top = 65535.0
        elif image.mode == "F" and top <= 1.0:
            top = 1.0
        elif top <= 255:
            top = 255.0
        grey = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the same colours; PIL warns when a palette's transparency is dropped
    return image.convert("RGB")


def load_image(path, data: bytes | None = None) -> Image.Image:
    """An RGB PIL image from a file (or from encoded ``data``, ``path`` naming it), or UserError saying what is
    wrong with it."""
    try:
        with _open(path, data) as image:
            return to_rgb(image)
    except _UNREADABLE as e:
        raise UserError(f"Image {path} cannot be read ({e.__class__.__name__}: {e}).") from None


def check_image(path, data: bytes | None = None) -> None:
    """Decodes the whole image (a truncated file fails here, not mid-run; JPEGs cheaply, at 1/8 scale) and
    converts a corner of it (a mode without a conversion to RGB fails here too)."""
    try:
        with _open(path, data) as image:
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
            to_rgb(image.crop((0, 0, 1, 1)))
    except _UNREADABLE as e:
        raise UserError(f"Image {path} cannot be read ({e.__class__.__name__}: {e}).") from None


def row_image(row: dict, image_dir: str) -> tuple[str, bytes | None]:
    """(a name for the image of a benchmark row, its encoded bytes or None when it is a file)."""
    if "image_b64" in row:
        return f"of question {row['question_id']}", row["image_b64"]
    name = row.get("image")
    if not isinstance(name, str) or not name:
        raise UserError(f"Question {row.get('question_id')!r}: the image must be a file name, got {name!r}.")
    return os.path.join(image_dir, name), None


def check_rows(rows, image_dir) -> None:
    """Every row's image exists and decodes: run before the first answer, so a bad file stops the run before
    anything is written (each distinct file is decoded once)."""
    seen = set()
    for row in rows:
        name, data = row_image(row, image_dir)
        if data is None:
            if name in seen:
                continue
            seen.add(name)
            if os.path.isdir(name):
                raise UserError(f"Image {row['image']!r} of question {row['question_id']!r} is a directory ({name}), "
                                "not an image file.")
            if not os.path.isfile(name):
                raise UserError(f"Image {row['image']} of question {row['question_id']} is missing from {image_dir}.")
        check_image(name, data)


def preprocess(image, mean=CLIP_MEAN, std=CLIP_STD, side: int = 336):
    """LLaVA-1.5 preprocessing: expand2square with the mean colour, resize to ``side``, normalise.

    Returns (pixel_values float32[3, side, side], the letterboxed PIL image, (width, height))."""
    width, height = image.size
    square_side = max(width, height)
    canvas = Image.new("RGB", (square_side, square_side), tuple(int(255 * m) for m in mean))
    canvas.paste(image, ((square_side - width) // 2, (square_side - height) // 2))  # as expand2square
    square = canvas.resize((side, side), Image.BICUBIC)
    pixels = (np.asarray(square, np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return pixels.transpose(2, 0, 1), square, (width, height)
