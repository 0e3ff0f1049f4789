"""Constrained decoding for the fan-out LM: every answer is exactly ``k`` distinct, non-empty, short
subqueries in the format the parser reads, within the generation cap.

What is guaranteed (for any weights, greedy or sampled, any ``max_new_tokens >= min_new_tokens``)::

    [<think>...</think>\\n]<queries>["q1", "q2", ..., "qk"]</queries><|im_end|>

- exactly ``k`` strings, each of at most ``max_words`` words and ``max_chars`` characters, starting with
  a letter or digit, made of letters, digits, single spaces and ``-&'./+``, so no JSON escape, quote,
  tag or newline can appear;
- distinct under the parser's own normalisation (whitespace collapsed, edge punctuation stripped,
  case-folded: :func:`r4t_fast.fanout.parser.parse_subqueries` keeps all ``k``), so
  ``parse_subqueries(text, k).format_ok`` is always true;
- the end-of-turn token is emitted before ``max_new_tokens``: each string gets a fair share of the
  remaining budget, the separators and the closing tags are reserved in advance.

Why our own ``LogitsProcessor`` and not a grammar library
--------------------------------------------------------
Checked on this 2-core CPU with SmolLM2-135M, transformers 5.24, on 48 Polyvore val titles
(``benchmarks/results/fanout_format.md``, 2026-12-01): xgrammar 0.2.8 installs from PyPI (it needs
``apache-tvm-ffi`` and declares ``triton``), works offline with transformers 5 and this tokenizer and
compiles a grammar of "exactly 10 strings of <= 60 safe characters in the tags" in ~1 s; its overhead
was small (1.4 % of generate time, ours 1.6 %). But a grammar cannot express the two rules that
matter here: **distinctness** (no library enforces JSON-schema ``uniqueItems``; the dominant failure of
SmolLM2 is one string repeated) and **closing within the cap** (a grammar does not know
``max_new_tokens``). Greedy with the grammar gave 3.46 usable subqueries of 10 with 83 % strict-format
failures (duplicates) and 6 % of answers cut open; this processor gives 10.00 / 0 % / 0 %, greedy and at
T = 0.9. outlines, lm-format-enforcer and llguidance were not tried: both rules lie outside what a
grammar or schema engine enforces (uniqueness over unbounded strings, a token budget), so any of them
would need this processor's logic on top. We keep one small processor, with no dependency.

How it works
------------
One state per row, advanced from the last generated token at every call: forced text (the opening
``<queries>["``, separators, ``"]</queries>``, then the end token) is emitted token by token from its
canonical tokenisation; inside a string only "string-safe" tokens are allowed, the length rules being
checked on the decoded text (masks are cached per ``(chars, words, last_is_space)``). A string may be
closed (``"`` / ``",`` / ``"]`` ...) only when its normalised text is non-empty and new; a token that
would reach the character bound with a duplicate is forbidden, so a row can never get stuck. When a
string reaches its share of the token budget it must close; if it is a duplicate at that point, one
more "repair" token that makes it new is allowed (and reserved).

Use it through :meth:`r4t_fast.fanout.generation.FanOutLM.generate` (``constrained=True``), as a
``logits_processor`` of ``model.generate``, or, for TRL's ``GRPOTrainer`` (whose ``generation_kwargs``
go into a ``GenerationConfig``, which refuses a ``logits_processor``), with :func:`install_constraint`
on the trainer's model. Beam search is not supported (the state follows each row's own tokens).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from r4t_fast._internal import check_k, check_non_negative_int, check_positive_int
from r4t_fast.fanout.parser import _STRIP_CHARS, _clean, parse_subqueries
from r4t_fast.fanout.prompt import query_from_prompt
from r4t_fast.fanout.tokens import (
    _OPEN_THINK,
    _PARSER_MAX_CHARS,
    STRING_PUNCTUATION,
    _table,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "STRING_PUNCTUATION",
    "FanOutConstraint",
    "FanOutLogitsProcessor",
    "constrained_generate",
    "install_constraint",
]

# --------------------------------------------------------------------------------------------------
# The constraint (a frozen config)
# --------------------------------------------------------------------------------------------------

MIN_TITLE_CHARS = 3
"""``forbid_title`` leaves titles shorter than this alone (forbidding "a" would forbid most words)."""


def _title_key(title: str | None) -> str | None:
    """The case-folded, whitespace-collapsed title a subquery may not contain (None: not enforced)."""
    if title is None:
        return None
    key = " ".join(title.casefold().split())
    return key if len(key) >= MIN_TITLE_CHARS else None


@dataclass(frozen=True)
class FanOutConstraint:
    """What every constrained answer satisfies; build processors with :meth:`logits_processor`.

    Attributes:
        k: subqueries per answer, exactly (1..64).
        max_words: most whitespace-separated words in one subquery.
        max_chars: most characters in one subquery (at most 200, the parser's bound).
        think: open with a ``<think>...</think>`` block (off by default: a 135M policy gains nothing
            from it and it costs tokens); the prompt should then be built with the same ``think``.
        max_think_tokens: most tokens inside the think block (also at most a third of the spare budget).
        max_query_tokens: most tokens of one subquery (each one also gets at most its fair share of the
            tokens left, so that the list always closes within ``max_new_tokens``).
        exclude: subqueries never to emit (compared as the parser compares them), e.g. the worked
            example's, so that a small policy cannot copy the example verbatim; at most 64.
        forbid_title: no subquery may contain its row's title (the query, case-folded, whitespace
            collapsed; titles under :data:`MIN_TITLE_CHARS` characters are not enforced) as a substring.
            The processor reads each row's title from ``titles`` or, when not given, from the row's
            prompt (:func:`r4t_fast.fanout.prompt.query_from_prompt`), so it works inside TRL's rollouts.

    >>> c = FanOutConstraint(k=3, max_words=2)
    >>> c.check('<queries>["red dress", "blue jeans", "hat"]</queries>') is None
    True
    >>> c.check('<queries>["red dress", "Red dress", "hat"]</queries>')
    'only 2 distinct usable subqueries of 3'
    """

    k: int = 10
    max_words: int = 8
    max_chars: int = 60
    think: bool = False
    max_think_tokens: int = 32
    max_query_tokens: int = 16
    exclude: tuple[str, ...] = ()
    forbid_title: bool = False

    def __post_init__(self) -> None:
        check_k(self.k, "k")
        check_positive_int(self.max_words, "max_words")
        check_positive_int(self.max_chars, "max_chars", upper=_PARSER_MAX_CHARS)
        check_non_negative_int(self.max_think_tokens, "max_think_tokens")
        check_positive_int(self.max_query_tokens, "max_query_tokens")
        if not isinstance(self.think, bool):
            raise ValueError(f"think: expected a bool, got {self.think!r}")
        if not isinstance(self.forbid_title, bool):
            raise ValueError(f"forbid_title: expected a bool, got {self.forbid_title!r}")
        if isinstance(self.exclude, str) or not all(isinstance(x, str) for x in self.exclude):
            raise ValueError(f"exclude: expected a tuple of strings, got {self.exclude!r}")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if len(self.exclude) > 64:
            raise ValueError(f"exclude: expected at most 64 strings, got {len(self.exclude)}")

    @property
    def excluded_keys(self) -> frozenset[str]:
        """The parser's identity (cleaned, case-folded) of each excluded subquery."""
        keys = (_clean(x, _PARSER_MAX_CHARS) for x in self.exclude)
        return frozenset(key.casefold() for key in keys if key is not None)

    def check(self, text: str, title: str | None = None) -> str | None:
        """``None`` when ``text`` satisfies the constraint, else the first rule it breaks (for tests);
        with ``forbid_title``, ``title`` is the row's title."""
        parse = parse_subqueries(text, self.k)
        if parse.n_valid != self.k:
            return f"only {parse.n_valid} distinct usable subqueries of {self.k}"
        if not parse.format_ok:
            return f"not the strict format: {parse.reason}"
        if self.think != text.startswith(_OPEN_THINK):
            return f"think block {'missing' if self.think else 'not allowed'}"
        excluded = self.excluded_keys
        for q in parse.queries:
            if q.casefold() in excluded:
                return f"subquery {q!r} is excluded"
            if len(q) > self.max_chars or len(q.split()) > self.max_words:
                return f"subquery {q!r} exceeds {self.max_words} words / {self.max_chars} characters"
            key = _title_key(title) if self.forbid_title and title is not None else None
            if key is not None and key in q.casefold():
                return f"subquery {q!r} contains the title {title!r}"
        return None

    def min_new_tokens(self, tokenizer: Any) -> int:
        """The fewest ``max_new_tokens`` with which this constraint can always finish (tokenizer-specific)."""
        return _table(tokenizer).min_new_tokens(self.k, self.think)

    def logits_processor(
        self,
        tokenizer: Any,
        max_new_tokens: int,
        *,
        eos_token_id: int | None = None,
        titles: Sequence[str] | None = None,
    ) -> FanOutLogitsProcessor:
        """A fresh processor for one ``generate`` call with this ``max_new_tokens`` (see the class)."""
        return FanOutLogitsProcessor(
            self, tokenizer, max_new_tokens, eos_token_id=eos_token_id, titles=titles
        )


# --------------------------------------------------------------------------------------------------
# The logits processor
# --------------------------------------------------------------------------------------------------

_FORCED, _THINK, _STRING, _DONE = range(4)


class _Row:
    """Decoding state of one sequence."""

    __slots__ = (
        "phase",
        "forced",
        "then",
        "think_n",
        "j",
        "text",
        "n_tok",
        "limit",
        "seen",
        "words",
        "title",
    )

    def __init__(self) -> None:
        self.phase = _FORCED
        self.forced: list[int] = []
        self.then = _STRING
        self.think_n = 0
        self.j = 0  # index of the current string
        self.text = ""
        self.n_tok = 0
        self.limit = 1
        self.words = 0
        self.seen: set[str] = set()
        self.title: str | None = None  # the key a string may not contain (forbid_title)


class FanOutLogitsProcessor:
    """A ``transformers`` logits processor (``__call__(input_ids, scores) -> scores``) that enforces a
    :class:`FanOutConstraint` on every row of one ``generate`` call (greedy or sampled).

    Args:
        constraint: the rules.
        tokenizer: the policy's tokenizer (token texts are read once and cached per tokenizer object).
        max_new_tokens: the call's generation cap; every answer ends (end token included) within it.
        eos_token_id: the end token (default ``<|im_end|>`` when the vocabulary has it, else the eos).
        titles: with ``constraint.forbid_title``, the title of each row (``batch`` strings); ``None``
            reads them from the rows' prompts at the first call.

    ``input_ids`` is ``(batch, prompt + generated)``, ``scores`` ``(batch, vocab)``; masked tokens get
    ``-inf``. ``generate`` applies user processors before temperature / top-p, so sampling only ever sees
    allowed tokens. The first call fixes the batch and the prompt width; a call that does not continue
    the previous one (a new ``generate`` call) starts over, but a fresh processor per call
    (:meth:`FanOutConstraint.logits_processor`, :func:`install_constraint`) is the intended use.

    Raises:
        ValueError: ``max_new_tokens`` below :meth:`FanOutConstraint.min_new_tokens` (the message gives it).
    """

    def __init__(
        self,
        constraint: FanOutConstraint,
        tokenizer: Any,
        max_new_tokens: int,
        *,
        eos_token_id: int | None = None,
        titles: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(constraint, FanOutConstraint):
            raise TypeError(f"constraint: expected a FanOutConstraint, got {type(constraint).__name__}")
        self.constraint = constraint
        self.table = _table(tokenizer)
        self.max_new_tokens = check_positive_int(max_new_tokens, "max_new_tokens")
        need = self.table.min_new_tokens(constraint.k, constraint.think)
        if self.max_new_tokens < need:
            raise ValueError(
                f"max_new_tokens: constrained decoding of k={constraint.k} subqueries"
                f"{' with a think block' if constraint.think else ''} needs at least {need} new tokens "
                f"with this tokenizer, got {self.max_new_tokens}"
            )
        self.eos = self.table.eos if eos_token_id is None else int(eos_token_id)
        spare = self.max_new_tokens - need
        self.think_budget = min(constraint.max_think_tokens, spare // 3) if constraint.think else 0
        self._limits = (constraint.max_chars, constraint.max_words)
        self.rows: list[_Row] = []
        self._prev: torch.Tensor | None = None
        self._prompt_width = 0
        self.fallbacks = 0  # steps where no rule-abiding token was left (never expected; tests check 0)
        if titles is not None and (isinstance(titles, str) or not all(isinstance(t, str) for t in titles)):
            raise ValueError(f"titles: expected a sequence of strings, got {titles!r}")
        self.titles = None if titles is None else list(titles)

    # -- state ---------------------------------------------------------------------------------------
    def _row_titles(self, ids: torch.Tensor) -> list[str | None]:
        """Each row's title: ``titles`` or, without them, the query of the row's prompt."""
        if self.titles is not None:
            if len(self.titles) != ids.shape[0]:
                raise ValueError(
                    f"titles: expected {ids.shape[0]} titles (one per row), got {len(self.titles)}"
                )
            return list(self.titles)
        decode = self.table.tokenizer.decode
        return [query_from_prompt(decode(row, skip_special_tokens=False)) for row in ids.tolist()]

    def _start(self, n_rows: int, ids: torch.Tensor) -> None:
        t = self.table
        self.rows = []
        excluded = self.constraint.excluded_keys
        titles = self._row_titles(ids) if self.constraint.forbid_title else [None] * n_rows
        for title in titles:
            row = _Row()
            row.title = _title_key(title)
            row.seen = set(excluded)
            row.forced = list(t.open_think if self.constraint.think else t.open_list)
            row.then = _THINK if self.constraint.think else _STRING
            self.rows.append(row)

    def _begin_string(self, row: _Row, used: int) -> None:
        """Open string ``row.j`` with its token limit: a fair share of what the rest leaves spare."""
        r = self.constraint.k - 1 - row.j
        spare = self.max_new_tokens - used - self.table.need_at_string_start(r)
        share = max(0, spare) // (r + 1)
        row.phase, row.text, row.n_tok, row.words = _STRING, "", 0, 0
        row.limit = 1 + min(self.constraint.max_query_tokens - 1, share)

    def _settle(self, row: _Row, used: int) -> None:
        """Leave a finished forced phase for the next one."""
        if row.phase == _FORCED and not row.forced:
            if row.then == _STRING:
                self._begin_string(row, used)
            else:
                row.phase = row.then

    def _advance(self, row: _Row, tok: int, used: int) -> None:
        """Apply the token just generated; ``used`` = tokens generated so far, this one included."""
        t = self.table
        if row.phase == _FORCED:
            if (
                not row.forced or row.forced[0] != tok
            ):  # pragma: no cover - a beam search or another processor
                self.fallbacks += 1
            row.forced = row.forced[1:]
        elif row.phase == _THINK:
            if tok == t.think_to_list[0]:
                row.phase, row.forced, row.then = _FORCED, list(t.think_to_list[1:]), _STRING
            else:
                row.think_n += 1
        elif row.phase == _STRING:
            last = row.j == self.constraint.k - 1
            closers = t.end_closers if last else t.sep_closers
            if tok in closers:
                row.seen.add(self._key(row.text) or "")
                row.j += 1
                forced = t.encode(closers[tok][1]) + ([self.eos] if last else [])
                row.phase, row.forced, row.then = _FORCED, forced, (_DONE if last else _STRING)
            else:
                row.text += t.texts[tok] or ""
                row.n_tok += 1
                row.words = len(row.text.split())
        self._settle(row, used)

    @staticmethod
    def _key(text: str) -> str | None:
        """The parser's identity of a subquery (None: unusable), so that "distinct" means what it counts.

        For the strings this processor lets through (no leading or double space, first character a letter
        or digit, no tab or newline) the parser's normalisation reduces to stripping trailing punctuation
        and spaces, then case folding; the tests check this against :func:`parser._clean`.
        """
        key = text.rstrip(_STRIP_CHARS).casefold()
        return key or None

    def _is_new(self, row: _Row, text: str) -> bool:
        key = self._key(text)
        return key is not None and key not in row.seen

    # -- masks ---------------------------------------------------------------------------------------
    def _string_allowed(self, row: _Row, scores: torch.Tensor, i: int, allowed: np.ndarray) -> None:
        """Fill ``allowed[i]`` (all False on entry) for a row inside a string."""
        t = self.table
        closers = t.end_closers if row.j == self.constraint.k - 1 else t.sep_closers
        closable = row.n_tok > 0 and self._is_new(row, row.text)
        must_close = row.n_tok > row.limit or (row.n_tok == row.limit and closable)
        out = allowed[i]
        if not must_close:
            last_space = row.text.endswith(" ")
            out[:] = t.content_mask(len(row.text), row.words, last_space, self._limits, out.shape[0])
            if row.title is not None:  # forbid_title: no token that completes the title
                out[[i for i in self.table.tokens_completing(row.text, row.title) if i < out.shape[0]]] = (
                    False
                )
            if row.n_tok == row.limit:  # a duplicate at its budget: one repair token that makes it new
                self._keep_only_new(row, scores[i], out)
            elif row.seen:
                self._forbid_stuck(row, out)
        if closable:
            out[list(closers)] = True
        if not out.any():  # pragma: no cover - the rules above leave no dead end
            self.fallbacks += 1
            out[list(closers)] = True

    def _keep_only_new(self, row: _Row, scores_row: torch.Tensor, out: np.ndarray) -> None:
        """Restrict ``out`` to tokens after which the string is new (the 16 best-scored)."""
        idx = np.flatnonzero(out)
        values = scores_row.detach().float().cpu().numpy()[idx]
        keep: list[int] = []
        for i in idx[np.argsort(-values, kind="stable")].tolist():
            if self._is_new(row, row.text + (self.table.texts[i] or "")):
                keep.append(i)
                if len(keep) == 16:
                    break
        out[:] = False
        out[keep] = True

    def _forbid_stuck(self, row: _Row, out: np.ndarray) -> None:
        """Forbid tokens that reach ``max_chars`` with a string equal to an earlier one (no way out)."""
        prefix = row.text.rstrip(_STRIP_CHARS).casefold()
        if not any(key.startswith(prefix) for key in row.seen):
            return
        room = self.constraint.max_chars - len(row.text)
        n, texts, seen, text = out.shape[0], self.table.texts, row.seen, row.text
        bad = [
            i
            for i in self.table.tokens_of_length(room)
            if i < n and (text + (texts[i] or "")).rstrip(_STRIP_CHARS).casefold() in seen
        ]
        out[bad] = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        n_rows, width = input_ids.shape
        ids = input_ids.detach().cpu()
        prev = self._prev
        if (
            prev is not None
            and prev.shape[0] == n_rows
            and prev.shape[1] + 1 == width
            and torch.equal(prev, ids[:, :-1])
        ):
            used = width - self._prompt_width
            for row, tok in zip(self.rows, ids[:, -1].tolist(), strict=True):
                if row.phase != _DONE:
                    self._advance(row, int(tok), used)
        else:  # the first step of a generate call
            self._prompt_width = width
            self._start(n_rows, ids)
        self._prev = ids.clone()

        # numpy, not torch: a few hundred tiny per-row ops per step, which torch's thread pool makes slow
        vocab = scores.shape[1]
        allowed = np.zeros((n_rows, vocab), dtype=bool)
        for i, row in enumerate(self.rows):
            if row.phase == _FORCED:
                allowed[i, row.forced[0]] = True
            elif row.phase == _DONE:
                allowed[i, self.eos] = True
            elif row.phase == _THINK:
                if row.think_n < self.think_budget:
                    allowed[i] = self.table.think_mask(vocab)
                allowed[i, self.table.think_to_list[0]] = True
            else:
                self._string_allowed(row, scores, i, allowed)
        if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64):
            values = scores.detach().numpy()
            return torch.from_numpy(np.where(allowed, values, np.array(-np.inf, dtype=values.dtype)))
        blocked = torch.from_numpy(~allowed).to(scores.device, non_blocking=True)
        return scores.masked_fill(blocked, float("-inf"))


# --------------------------------------------------------------------------------------------------
# Wiring into model.generate (TRL's GRPOTrainer, any HF generation loop)
# --------------------------------------------------------------------------------------------------


def _call_budget(model: Any, kwargs: dict[str, Any]) -> int:
    if kwargs.get("max_new_tokens") is not None:
        return int(kwargs["max_new_tokens"])
    for config in (kwargs.get("generation_config"), getattr(model, "generation_config", None)):
        value = getattr(config, "max_new_tokens", None)
        if value is not None:
            return int(value)
    raise ValueError(
        "max_new_tokens: a constrained generate call needs max_new_tokens (as an argument or in the "
        "generation_config) to plan the answer within it"
    )


def install_constraint(model: Any, constraint: FanOutConstraint, tokenizer: Any) -> Callable[[], None]:
    """Make every ``model.generate(...)`` call constrained; returns a function that undoes it.

    Each call gets a fresh :class:`FanOutLogitsProcessor` sized to its ``max_new_tokens`` (read from the
    call's arguments or ``generation_config``) and appended to the call's own ``logits_processor``. The
    method is replaced on this object only, so wrappers that delegate to it (PEFT's ``PeftModel``,
    TRL's ``unwrap_model_for_generation``) are constrained too. For TRL 1.16's ``GRPOTrainer``::

        trainer = GRPOTrainer(model=model, ...)
        install_constraint(trainer.model, FanOutConstraint(k=10), tokenizer)
        trainer.train()

    (``GRPOConfig(generation_kwargs={"logits_processor": ...})`` does not work: TRL turns
    ``generation_kwargs`` into a ``GenerationConfig``, which rejects ``logits_processor``.)
    """
    if not isinstance(constraint, FanOutConstraint):
        raise TypeError(f"constraint: expected a FanOutConstraint, got {type(constraint).__name__}")
    _table(tokenizer)  # build (and validate) the token table now, not inside training
    had_own = "generate" in vars(model)
    original = model.generate

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        from transformers import LogitsProcessorList

        processor = constraint.logits_processor(tokenizer, _call_budget(model, kwargs))
        processors = LogitsProcessorList(list(kwargs.pop("logits_processor", None) or []))
        processors.append(processor)
        return original(*args, logits_processor=processors, **kwargs)

    generate.__r4t_constraint__ = constraint  # type: ignore[attr-defined]
    model.generate = generate

    def uninstall() -> None:
        if had_own:
            model.generate = original
        else:
            with contextlib.suppress(AttributeError):
                del model.generate

    return uninstall


@contextlib.contextmanager
def constrained_generate(model: Any, constraint: FanOutConstraint, tokenizer: Any) -> Iterator[Any]:
    """Context-manager form of :func:`install_constraint`: constrained inside the ``with`` block only."""
    uninstall = install_constraint(model, constraint, tokenizer)
    try:
        yield model
    finally:
        uninstall()
