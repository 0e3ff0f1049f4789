"""Reading helpers shared by the loaders and the split files: the data errors, JSON / JSONL reading
and typed field access, each naming the file and the line or entry on bad input.

Internal to :mod:`r4t_fast.data`; :class:`DataError` and :class:`MissingDataError` are public through
:mod:`r4t_fast.data.datasets` (and ``r4t_fast.data``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["MISSING_PLACEHOLDER", "DataError", "MissingDataError"]

MISSING_PLACEHOLDER = "<MISSING>"


class DataError(ValueError):
    """A data file is malformed; the message names the file and the line or entry."""


class MissingDataError(DataError, FileNotFoundError):
    """A data file is absent; the message names the expected path and where the file comes from."""


# ----------------------------------------------------------------------------------------------
# Parsing helpers (shared by all loaders and load_split)
# ----------------------------------------------------------------------------------------------


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
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            yield lineno, _expect_object(obj, where)


def _load_json(path: Path) -> Any:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 at byte {exc.start} ({exc.reason})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None


def _require_file(path: Path, source: str) -> Path:
    if not path.is_file():
        raise MissingDataError(f"{path}: file not found. Expected {path.name}, from {source}.")
    return path


def _resolve_file(path_or_dir: str | os.PathLike[str], filename: str, source: str) -> Path:
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / filename
    return _require_file(path, source)
