"""Reading benchmark files without trusting them: finding a benchmark's files in a folder, UTF-8 text with a
message naming the file and line, JSON and JSON lines whose fields are type-checked (``check_fields``)."""

from __future__ import annotations

import glob
import json
import os

from jaxdebias import UserError

STRINGS, ANSWERS = "strings", "answers"  # field types: a list of strings; a list of {"answer": string}
TYPE_NAMES = {int: "a whole number", str: "a string", list: "a JSON list", dict: "a JSON object",
              STRINGS: "a list of strings", ANSWERS: 'a list of {"answer": string}'}
# the types of the question fields the commands use (a question id is a dict key and goes into file names)
FIELD_TYPES = {"question_id": (int, str), "image": (str,), "text": (str,), "label": (str,), "category": (str,)}

class NotFound(UserError):
    """The benchmark's question file is not in the folder (``read_any`` then tries the next benchmark)."""


def optional_file(data_dir, names):
    """The first file matching one of ``names`` (glob patterns) in ``data_dir``, or None."""
    for name in names:
        matches = sorted(p for p in glob.glob(os.path.join(data_dir, name)) if os.path.isfile(p))
        if matches:
            return matches[0]
    return None


def find_file(data_dir, names, what):
    path = optional_file(data_dir, names)
    if path is None:
        raise NotFound(f"No {what} in {data_dir}: expected {' or '.join(names)}.")
    return path


def image_folder(data_dir, names):
    for name in names:
        if os.path.isdir(os.path.join(data_dir, name)):
            return os.path.join(data_dir, name)
    return data_dir


def read_text(path, what: str = "File") -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped), or UserError naming the line that is not."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"{what} {path} cannot be read ({e.__class__.__name__}: {e}).") from None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}, line {line}: not UTF-8 text (byte {data[e.start]:#04x}); save the file as "
                        "UTF-8.") from None


def kind_of(value) -> str:
    """A JSON value for a message: a scalar as written, a container by its kind."""
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "a list"
    return json.dumps(value)[:60]


def typed(value, types) -> bool:
    if types == STRINGS:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if types == ANSWERS:
        return isinstance(value, list) and all(isinstance(v, dict) and isinstance(v.get("answer"), str)
                                               for v in value)
    return not isinstance(value, bool) and isinstance(value, types)


def check_fields(item, where: str, fields: dict, required=()) -> None:
    """``item`` is a JSON object holding ``required`` and whichever of ``fields`` (name -> type or tuple of types)
    it has with their types, or UserError saying what ``where`` holds instead."""
    if not isinstance(item, dict):
        raise UserError(f"{where}: expected a JSON object, got {kind_of(item)}.")
    missing = [k for k in required if k not in item]
    if missing:
        raise UserError(f"{where}: missing field(s) {', '.join(missing)} (needs {', '.join(required)}).")
    for key, types in fields.items():
        if key in item and not typed(item[key], types):
            names = " or ".join(TYPE_NAMES[t] for t in (types if isinstance(types, tuple) else (types,)))
            raise UserError(f"{where}: {key} must be {names}, got {kind_of(item[key])}.")


def loads(text: str, where: str):
    try:
        return json.loads(text)
    except RecursionError:
        raise UserError(f"{where}: nested too deeply to be read as JSON.") from None
    except ValueError as e:  # a JSONDecodeError, or an integer of more than 4300 digits
        raise UserError(f"{where}: not JSON ({e}).") from None


def jsonl(path, need):
    rows = []
    for number, line in enumerate(read_text(path, "Question file").split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        row = loads(line, where)
        check_fields(row, where, FIELD_TYPES, need)
        rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no questions.")
    return rows


def read_json(path, what, expected: type | None = None):
    """The JSON in ``path`` (of type ``expected`` when given), or UserError naming the file."""
    data = loads(read_text(path, what), f"{what} {path}")
    if expected is not None and not typed(data, expected):
        raise UserError(f"{what} {path}: expected {TYPE_NAMES[expected]}, got {kind_of(data)}.")
    return data
