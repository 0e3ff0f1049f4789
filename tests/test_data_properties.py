"""Property tests (hypothesis) for the sets.jsonl loader under random corruption: every corrupted file
either loads or raises DataError naming the file and the line, never any other exception."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from r4t_fast.data import DataError, Dataset, load_jsonl  # noqa: E402

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # reproducible in CI: the examples do not depend on the clock
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
_json_value = st.recursive(
    _json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_ids = st.one_of(st.text(min_size=0, max_size=6), st.integers(-5, 10**6))


@st.composite
def _item(draw: Any) -> dict[str, Any]:
    it: dict[str, Any] = {"item_id": draw(_ids), "text": draw(st.one_of(st.text(max_size=20), st.none()))}
    if draw(st.booleans()):
        it["category"] = draw(st.one_of(st.text(max_size=6), st.integers(0, 9), st.none()))
    if draw(st.booleans()):
        it["price"] = draw(_json_value)
    return it


@st.composite
def _set_row(draw: Any, j: int) -> dict[str, Any]:
    row: dict[str, Any] = {"set_id": f"s{j}", "items": draw(st.lists(_item(), min_size=1, max_size=4))}
    if draw(st.booleans()):
        row["query"] = draw(st.one_of(st.text(max_size=20), st.none()))
    if draw(st.booleans()):
        row["context"] = draw(st.text(max_size=10))
    return row


@st.composite
def _valid_file(draw: Any) -> list[dict[str, Any]]:
    n = draw(st.integers(1, 5))
    return [draw(_set_row(j)) for j in range(n)]


def _encode(rows: list[Any]) -> bytes:
    # both spellings of non-ASCII text: \u escapes on even lines, raw UTF-8 on odd ones
    return b"".join(
        json.dumps(r, ensure_ascii=j % 2 == 0).encode("utf-8") + b"\n" for j, r in enumerate(rows)
    )


# corruptions of the bytes of a valid file
@st.composite
def _corrupted(draw: Any) -> bytes:
    data = bytearray(_encode(draw(_valid_file())))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(
            st.sampled_from(["flip", "truncate", "insert", "delete", "dup_line", "nest", "swap", "value"])
        )
        if not data:
            data = bytearray(b"{")
        pos = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif kind == "dup_line":
            lines = bytes(data).split(b"\n")
            j = draw(st.integers(0, len(lines) - 1))
            lines.insert(j, lines[j])
            data = bytearray(b"\n".join(lines))
        elif kind == "nest":  # a deeply nested value (defect 15: RecursionError)
            depth = draw(st.sampled_from([10, 1000, 5000, 50_000]))
            opener = draw(st.sampled_from([b"[", b'{"a":']))
            data[pos:pos] = opener * depth
        elif kind == "swap":  # one line replaced by an arbitrary JSON value
            lines = bytes(data).split(b"\n")
            j = draw(st.integers(0, len(lines) - 1))
            lines[j] = json.dumps(draw(_json_value)).encode()
            data = bytearray(b"\n".join(lines))
        else:  # a field of a set or an item replaced by an arbitrary JSON value
            lines = bytes(data).split(b"\n")
            j = draw(st.integers(0, len(lines) - 1))
            try:
                obj = json.loads(lines[j])
            except ValueError:
                continue
            if isinstance(obj, dict):
                target = obj
                if obj.get("items") and isinstance(obj["items"], list) and draw(st.booleans()):
                    target = obj["items"][0] if isinstance(obj["items"][0], dict) else obj
                key = draw(
                    st.sampled_from(["set_id", "items", "query", "context", "item_id", "text", "category"])
                )
                target[key] = draw(_json_value)
                lines[j] = json.dumps(obj).encode()
                data = bytearray(b"\n".join(lines))
    return bytes(data)


def _check(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "sets.jsonl"
        path.write_bytes(data)
        try:
            ds = load_jsonl(path)
        except DataError as exc:
            msg = str(exc)
            # a line-level error names file:line; the only file-level one is "no usable set"
            assert re.match(rf"^{re.escape(str(path))}:\d+[: ]", msg) or msg.startswith(
                f"{path}: no usable set"
            ), msg
            return
        assert isinstance(ds, Dataset) and ds.sets
        for s in ds.sets:
            assert s.items and all(isinstance(it.item_id, str) and it.item_id.strip() for it in s.items)
            assert len({it.item_id for it in s.items}) == len(s.items)


@SETTINGS
@given(_corrupted())
def test_corrupted_sets_jsonl_loads_or_names_file_line(data: bytes) -> None:
    _check(data)


@SETTINGS
@given(st.binary(max_size=200))
def test_random_bytes_load_or_name_file_line(data: bytes) -> None:
    _check(data)


@SETTINGS
@given(_valid_file())
def test_valid_files_round_trip(rows: list[dict[str, Any]]) -> None:
    _check(_encode(rows))


@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_deeply_nested_line_names_file_and_line(tmp_path: Path, opener: str) -> None:
    """Defect 15: a deeply nested line was a RecursionError traceback without file:line."""
    path = tmp_path / "sets.jsonl"
    good = json.dumps({"set_id": "s1", "items": [{"item_id": "a", "text": "x"}]})
    path.write_text(good + "\n" + '{"set_id": "s2", "items": ' + opener * 100_000 + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: invalid JSON \(nested too deeply\)"):
        load_jsonl(path)


def test_over_long_integer_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "sets.jsonl"
    path.write_text('{"set_id": ' + "9" * 5000 + ', "items": []}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: invalid JSON"):
        load_jsonl(path)
