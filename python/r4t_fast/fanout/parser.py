"""Parse subqueries out of any completion string; never raises on the text."""

from __future__ import annotations

import ast
import itertools
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    pass


from r4t_fast._internal import check_k, check_positive_int

__all__ = ["ParseResult", "parse_subqueries"]

# --------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParseResult:
    """What :func:`parse_subqueries` found in a completion.

    Attributes:
        queries: usable subqueries (stripped, whitespace-collapsed, distinct case-insensitively, at most k).
        ok: at least one usable query was found.
        reason: ``None`` when the format was followed exactly, else why not (e.g. "no list found",
            "no <queries> tags: used a JSON list", "only 3 of 10 queries usable").
        n_valid: ``len(queries)``.
        method: where the queries came from: ``"tagged_json"`` (JSON list inside the tags), ``"json"``
            (a JSON/Python list elsewhere), ``"lines"`` (numbered or bulleted lines), ``"quoted"``
            (quoted strings) or ``"none"``.
        format_ok: the strict format was followed: a closed ``<queries>`` block holding a JSON list of
            exactly k strings, all usable and distinct. Training counts ``not format_ok`` as a format
            failure.
    """

    queries: list[str]
    ok: bool
    reason: str | None
    n_valid: int = 0
    method: str = "none"
    format_ok: bool = False


_MAX_TEXT_CHARS = 20_000  # completions are at most ~1k tokens; longer input is cut before parsing
_MAX_LIST_STARTS = 256  # bound on the '[' positions tried, so parsing garbage stays linear
_TAG_OPEN = re.compile(r"<\s*queries\s*>", re.IGNORECASE)
_TAG_CLOSE = re.compile(r"<\s*/\s*queries\s*>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"<\s*/\s*think\s*>", re.IGNORECASE)
_ANY_TAG = re.compile(r"<\s*/?\s*(?:think|queries)\s*>", re.IGNORECASE)
_LINE_ITEM = re.compile(r"^[ \t]*(?:\(?\d{1,3}[.):]|[-*\u2022+])[ \t]+(\S[^\n]*)$", re.MULTILINE)
_QUOTED = re.compile(r'"((?:[^"\\\n]|\\[^\n]){0,400})"|\u201c([^\u201d\n]{0,400})\u201d')
_SIMPLE_LIST = re.compile(r"\[[^\[\]]{0,4000}\]")
_STRIP_CHARS = " \t\"'`\u201c\u201d\u2018\u2019,;"
_DICT_KEYS = ("query", "q", "text", "search", "subquery")


def _clean(item: Any, max_chars: int) -> str | None:
    """One candidate query, normalised, or None when unusable."""
    if isinstance(item, dict):
        item = next((item[key] for key in _DICT_KEYS if isinstance(item.get(key), str)), None)
    if not isinstance(item, str):
        return None
    text = " ".join(item.split()).strip(_STRIP_CHARS).strip()
    if not text or len(text) > max_chars or _ANY_TAG.search(text):
        return None
    if not any(ch.isalnum() for ch in text):
        return None
    return text


def _dedup(items: Sequence[Any], max_chars: int) -> tuple[list[str], int]:
    """Usable distinct queries in order, and how many items were dropped as unusable or duplicate."""
    seen: set[str] = set()
    out: list[str] = []
    for item in items:
        text = _clean(item, max_chars)
        if text is None:
            continue
        key = text.casefold()
        if key not in seen:
            seen.add(key)
            out.append(text)
    return out, len(items) - len(out)


def _as_items(value: Any) -> list[Any] | None:
    """A decoded JSON/Python value as a flat list of items, or None when it is not a list."""
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        return None
    if len(value) == 1 and isinstance(value[0], (list, tuple)):  # [["a", "b"]]
        value = list(value[0])
    return value


def _lists_in(text: str) -> list[tuple[int, int, list[Any]]]:
    """Every top-level JSON list (else Python literal list) in ``text`` as ``(start, end, items)``."""
    decoder = json.JSONDecoder()
    found: list[tuple[int, int, list[Any]]] = []
    start = text.find("[")
    tries = 0
    while start != -1 and tries < _MAX_LIST_STARTS:
        tries += 1
        try:
            value, end = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            value, end = None, start + 1
        items = _as_items(value)
        if items:
            found.append((start, end, items))
        else:
            end = start + 1
        start = text.find("[", end)
    if not found:  # single-quoted Python lists: ['a', 'b']
        for match in itertools.islice(_SIMPLE_LIST.finditer(text), _MAX_LIST_STARTS):
            try:
                with warnings.catch_warnings():  # invalid escapes in garbage warn (SyntaxWarning)
                    warnings.simplefilter("ignore")
                    value = ast.literal_eval(match.group(0))
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            items = _as_items(value)
            if items:
                found.append((match.start(), match.end(), items))
    return found


def _best_list(text: str, max_chars: int) -> tuple[list[str], int, int] | None:
    """The list with the most usable queries (ties: the later one), with its drop count and size."""
    best: tuple[list[str], int, int] | None = None
    for _, _, items in _lists_in(text):
        queries, dropped = _dedup(items, max_chars)
        if queries and (best is None or len(queries) >= len(best[0])):
            best = (queries, dropped, len(items))
    return best


def _lines(text: str) -> list[str]:
    return [m.group(1) for m in _LINE_ITEM.finditer(text)]


def _unescape(text: str) -> str:
    try:
        value = json.loads(f'"{text}"')
    except ValueError:
        return text
    return value if isinstance(value, str) else text


def _quoted(text: str) -> list[str]:
    return [_unescape(a) if a else b for a, b in _QUOTED.findall(text)]


def parse_subqueries(text: str, k: int, *, max_chars: int = 200) -> ParseResult:
    """Extract up to ``k`` subqueries from a completion; never raises on any string.

    Tried in order, the first that yields a usable query wins:

    1. inside ``<queries>...</queries>`` (the closing tag may be missing): a JSON list, else a Python
       list, else quoted strings, else numbered/bulleted lines;
    2. anywhere after ``</think>`` (else anywhere): the JSON/Python list with the most usable strings;
    3. numbered or bulleted lines (``1. x``, ``2) y``, ``- z``);
    4. quoted strings.

    Items are stripped of whitespace, quotes and trailing commas, deduplicated case-insensitively
    (first kept), dropped when empty, without any letter or digit, longer than ``max_chars`` or
    containing a ``<think>``/``<queries>`` tag, and truncated to ``k``.

    >>> r = parse_subqueries('<think>x</think><queries>["a b", "A  B", "c"]</queries>', k=2)
    >>> r.queries, r.ok, r.format_ok, r.reason
    (['a b', 'c'], True, False, 'JSON list has 3 items (1 unusable or duplicate), expected exactly 2')
    >>> parse_subqueries("1. red dress\\n2. blue jeans", k=2).queries
    ['red dress', 'blue jeans']
    >>> parse_subqueries("no idea", k=3)
    ParseResult(queries=[], ok=False, reason='no list found', n_valid=0, method='none', format_ok=False)
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected str, got {type(text).__name__}")
    k = check_k(k)
    max_chars = check_positive_int(max_chars, "max_chars")
    text = text[:_MAX_TEXT_CHARS]

    def result(items: list[str], method: str, reason: str | None, strict: bool) -> ParseResult:
        queries = items[:k]
        if not queries:
            return ParseResult([], False, reason or "no usable query", 0, "none", False)
        if reason is None and len(queries) < k:
            reason = f"only {len(queries)} of {k} queries usable"
        return ParseResult(queries, True, reason, len(queries), method, strict and reason is None)

    open_match = _TAG_OPEN.search(text)
    if open_match is not None:
        after = text[open_match.end() :]
        close_match = _TAG_CLOSE.search(after)
        close_at = close_match.start() if close_match else len(after)
        # the first list that starts inside the block (a string in it may itself contain "</queries>")
        first = next(((end, items) for start, end, items in _lists_in(after) if start < close_at), None)
        if first is not None:
            end, items = first
            queries, dropped = _dedup(items, max_chars)
            if queries:
                reason = None
                if _TAG_CLOSE.search(after, end) is None:
                    reason = "missing </queries> closing tag"
                elif len(items) != k or dropped:
                    extra = f" ({dropped} unusable or duplicate)" if dropped else ""
                    reason = f"JSON list has {len(items)} items{extra}, expected exactly {k}"
                return result(queries, "tagged_json", reason, strict=True)
        region = after[:close_at]
        for method, finder in (("quoted", _quoted), ("lines", _lines)):
            queries, _ = _dedup(finder(region), max_chars)
            if queries:
                return result(queries, method, "no JSON list inside <queries> tags", strict=False)

    think_ends = [m.end() for m in _THINK_CLOSE.finditer(text)]
    answer = text[think_ends[-1] :] if think_ends else text
    scopes = [answer, text] if answer is not text else [text]
    for scope in scopes:
        best = _best_list(scope, max_chars)
        if best is not None:
            return result(best[0], "json", "no <queries> tags: used a JSON list", strict=False)
    for method, finder in (("lines", _lines), ("quoted", _quoted)):
        for scope in scopes:
            queries, _ = _dedup(finder(scope), max_chars)
            if queries:
                return result(
                    queries, method, f"no JSON list: used {method.replace('lines', 'list lines')}", False
                )
    return ParseResult([], False, "no list found", 0, "none", False)
