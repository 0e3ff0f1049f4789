"""Reading helpers shared by the loaders and the split files: the data errors, JSON / JSONL reading
and typed field access, each naming the file and the line or entry on bad input; ``json_data``, the
check that user metadata is plain JSON before it is stored.

Internal to :mod:`r4t_fast.data`; :class:`DataError` and :class:`MissingDataError` are public through
:mod:`r4t_fast.data.datasets` (and ``r4t_fast.data``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MISSING_PLACEHOLDER", "DataError", "MissingDataError", "json_data"]

MISSING_PLACEHOLDER = "<MISSING>"
MAX_JSON_DEPTH = 100
"""Deepest nesting :func:`json_data` accepts (user metadata, not a parser limit)."""


class DataError(ValueError):
    """A data file is malformed; the message names the file and the line or entry."""


class MissingDataError(DataError, FileNotFoundError):
    """A data file is absent; the message names the expected path and where the file comes from."""


# ----------------------------------------------------------------------------------------------
# Parsing helpers (shared by all loaders and load_split)
# ----------------------------------------------------------------------------------------------


def json_data(v: Any, where: str, depth: int = 0) -> Any:
    """``v`` as plain JSON data (numpy scalars and arrays become Python numbers and lists, tuples
    lists); anything JSON cannot hold exactly raises ``ValueError`` naming ``where``."""
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{where}: nested deeper than {MAX_JSON_DEPTH} levels")
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, np.generic):
        v = v.item()
        if isinstance(v, (bytes, complex)) or not isinstance(v, (bool, int, float, str)):
            raise ValueError(f"{where}: a numpy {type(v).__name__} is not JSON data")
        return json_data(v, where, depth)
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{where}: {v!r} is not valid JSON (use None for a missing number)")
        return float(v)
    if isinstance(v, np.ndarray):
        return json_data(v.tolist(), where, depth)
    if isinstance(v, (list, tuple)):
        return [json_data(x, f"{where}[{j}]", depth + 1) for j, x in enumerate(v)]
    if isinstance(v, Mapping):
        out = {}
        for key, x in v.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: key {key!r} is a {type(key).__name__}; JSON keys are strings")
            out[key] = json_data(x, f"{where}[{key!r}]", depth + 1)
        return out
    raise ValueError(f"{where}: a {type(v).__name__} ({v!r:.40}) is not JSON data")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _get_id(obj: Mapping[str, Any], key: str, where: str) -> str:
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r}")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: field {key!r} must be a string or integer, got {_type_name(value)}")
    value = str(value)
    if not value.strip():
        raise DataError(f"{where}: field {key!r} must be non-empty")
    return value


def _get_opt_str(obj: Mapping[str, Any], key: str, where: str, *, allow_int: bool = False) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    kinds = "a string, integer or null" if allow_int else "a string or null"
    raise DataError(f"{where}: field {key!r} must be {kinds}, got {_type_name(value)}")


def _get_text(obj: Mapping[str, Any], key: str, where: str) -> str | None:
    """The (required) text field; ``None`` when it is null, blank or the ``<MISSING>`` placeholder."""
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r}")
    value = _get_opt_str(obj, key, where)
    if value is None:
        return None
    stripped = value.strip()
    if not stripped or stripped.startswith(MISSING_PLACEHOLDER):
        return None
    return value


def _get_list(obj: Mapping[str, Any], key: str, where: str) -> list[Any]:
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, list):
        raise DataError(f"{where}: field {key!r} must be a list, got {_type_name(value)}")
    return value


def _expect_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object, got {_type_name(value)}")
    return value


def _parse_json(text: str, where: str, *, multiline: bool = False) -> Any:
    """``json.loads(text)``; every failure (bad syntax, nesting deeper than the parser's recursion
    limit, an integer literal too long to convert) is a ``DataError`` naming ``where`` (and, for a
    multi-line document, the line)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at = f"{where}:{exc.lineno}" if multiline else where
        raise DataError(f"{at}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise DataError(f"{where}: invalid JSON (nested too deeply)") from None
    except ValueError as exc:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise DataError(f"{where}: invalid JSON ({exc})") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; ``DataError`` naming file and line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not valid UTF-8 ({exc.reason})") from None
            if not line.strip():
                continue
            yield lineno, _expect_object(_parse_json(line, where), where)


def _load_json(path: Path) -> Any:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 at byte {exc.start} ({exc.reason})") from None
    return _parse_json(text, str(path), multiline=True)


def _require_file(path: Path, source: str) -> Path:
    if not path.is_file():
        raise MissingDataError(f"{path}: file not found. Expected {path.name}, from {source}.")
    return path


def _resolve_file(path_or_dir: str | os.PathLike[str], filename: str, source: str) -> Path:
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / filename
    return _require_file(path, source)
