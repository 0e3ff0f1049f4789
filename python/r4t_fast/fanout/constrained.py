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
Measured on this 2-core CPU with SmolLM2-135M, transformers 5.2, 2026-12 (benchmarks/results/
fanout_format.md): xgrammar 0.2.8 (``pip install xgrammar`` needs ``apache-tvm-ffi`` and pulls in
``triton``) works offline with transformers 5 and this tokenizer (grammar compiled in ~1 s). With a
grammar of exactly 10 strings of <= 60 safe characters it gave 10/10 *format-valid* strings, but no
grammar library (xgrammar, outlines, lm-format-enforcer, llguidance) can express the two rules that
matter here: (1) **distinctness** (JSON-schema ``uniqueItems`` is not enforced; the dominant failure of
zero-shot SmolLM2 is repeating one string), and (2) **closing within the token cap** (a grammar that
allows ten 60-character strings does not know that ``max_new_tokens`` = 128, so long answers are cut
open). Its per-step overhead on CPU was also larger than ours (per-row bitmask fill in Python plus a
CPU bitmask apply; numbers in the benchmark). The state machine below is ~1 ms of Python per row and
step on top of a ~5 ms/sequence-token model step, enforces both rules, and has no dependency.

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
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from r4t_fast._internal import check_k, check_non_negative_int, check_positive_int
from r4t_fast.fanout.parser import _STRIP_CHARS, _clean, parse_subqueries

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["FanOutConstraint", "FanOutLogitsProcessor", "constrained_generate", "install_constraint"]

# --------------------------------------------------------------------------------------------------
# The constraint (a frozen config)
# --------------------------------------------------------------------------------------------------

STRING_PUNCTUATION = "-&'./+"
"""Characters besides letters, digits and single spaces allowed inside a subquery."""

_PARSER_MAX_CHARS = 200  # parse_subqueries' default bound: a constrained string must stay under it
_OPEN_THINK = "<think>"
_THINK_TO_LIST = '</think>\n<queries>["'
_OPEN_LIST = '<queries>["'
_SEPARATORS = ('", "', '","')  # the first is canonical: a closer that is a prefix of both continues with it
_CLOSE_LIST = '"]</queries>'


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

    def __post_init__(self) -> None:
        check_k(self.k, "k")
        check_positive_int(self.max_words, "max_words")
        check_positive_int(self.max_chars, "max_chars", upper=_PARSER_MAX_CHARS)
        check_non_negative_int(self.max_think_tokens, "max_think_tokens")
        check_positive_int(self.max_query_tokens, "max_query_tokens")
        if not isinstance(self.think, bool):
            raise ValueError(f"think: expected a bool, got {self.think!r}")

    def check(self, text: str) -> str | None:
        """``None`` when ``text`` satisfies the constraint, else the first rule it breaks (for tests)."""
        parse = parse_subqueries(text, self.k)
        if parse.n_valid != self.k:
            return f"only {parse.n_valid} distinct usable subqueries of {self.k}"
        if not parse.format_ok:
            return f"not the strict format: {parse.reason}"
        if self.think != text.startswith(_OPEN_THINK):
            return f"think block {'missing' if self.think else 'not allowed'}"
        for q in parse.queries:
            if len(q) > self.max_chars or len(q.split()) > self.max_words:
                return f"subquery {q!r} exceeds {self.max_words} words / {self.max_chars} characters"
        return None

    def min_new_tokens(self, tokenizer: Any) -> int:
        """The fewest ``max_new_tokens`` with which this constraint can always finish (tokenizer-specific)."""
        return _table(tokenizer).min_new_tokens(self)

    def logits_processor(
        self, tokenizer: Any, max_new_tokens: int, *, eos_token_id: int | None = None
    ) -> FanOutLogitsProcessor:
        """A fresh processor for one ``generate`` call with this ``max_new_tokens`` (see the class)."""
        return FanOutLogitsProcessor(self, tokenizer, max_new_tokens, eos_token_id=eos_token_id)


# --------------------------------------------------------------------------------------------------
# Per-tokenizer tables: the decoded text of every token and its features
# --------------------------------------------------------------------------------------------------


def _end_token_id(tokenizer: Any) -> int:
    from r4t_fast.fanout.prompt import CHATML_END

    vocab = tokenizer.get_vocab()
    if CHATML_END in vocab:
        return int(vocab[CHATML_END])
    if isinstance(tokenizer.eos_token_id, int):
        return int(tokenizer.eos_token_id)
    raise ValueError(f"tokenizer: has neither {CHATML_END} nor an eos token; cannot end the answer")


def _token_texts(tokenizer: Any) -> list[str | None]:
    """The text each token adds after other text, or None when it is special or not whole characters.

    Decoded after an anchor token so that SentencePiece-style leading spaces are kept.
    """
    n = len(tokenizer)
    anchor_ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    anchor = tokenizer.decode(anchor_ids)
    pairs = [[*anchor_ids, i] for i in range(n)]
    decoded = tokenizer.batch_decode(pairs, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    special = set(tokenizer.all_special_ids)
    out: list[str | None] = []
    for i, text in enumerate(decoded):
        if i in special or not text.startswith(anchor) or "\ufffd" in text:
            out.append(None)
        else:
            out.append(text[len(anchor) :] or None)
    return out


def _string_safe(text: str) -> bool:
    return all(c.isalnum() or c == " " or c in STRING_PUNCTUATION for c in text) and "  " not in text


class _TokenTable:
    """The text and features of every token of one tokenizer (built once, ~1 s for a 49k vocabulary)."""

    def __init__(self, tokenizer: Any) -> None:
        import torch

        self.tokenizer = tokenizer
        texts = _token_texts(tokenizer)
        self.texts = texts
        self.n = len(texts)
        self.eos = _end_token_id(tokenizer)
        self._encode_cache: dict[str, list[int]] = {}
        self._masks: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()

        n = self.n
        names = ("safe", "starts_alnum", "lead_space", "trail_space", "first_word_char", "think_ok")
        feats = {name: torch.zeros(n, dtype=torch.bool) for name in names}
        length = torch.zeros(n, dtype=torch.int32)
        word_starts = torch.zeros(n, dtype=torch.int32)
        self._by_length: dict[int, list[int]] = {}
        for i, t in enumerate(texts):
            if t is None:
                continue
            if t.isprintable() and "<" not in t and ">" not in t:
                feats["think_ok"][i] = True
            if not _string_safe(t):
                continue
            feats["safe"][i] = True
            feats["starts_alnum"][i] = t[0].isalnum()
            feats["lead_space"][i] = t[0] == " "
            feats["trail_space"][i] = t[-1] == " "
            feats["first_word_char"][i] = t[0] != " "
            length[i] = len(t)
            # words this token begins when it follows a space (or opens the string)
            word_starts[i] = sum(1 for j, c in enumerate(t) if c != " " and (j == 0 or t[j - 1] == " "))
            self._by_length.setdefault(len(t), []).append(i)
        self.feats, self.length, self.word_starts = feats, length, word_starts

        # closers: tokens that begin a string's continuation with '"'; the rest of it is forced
        self.sep_closers = self._closers(_SEPARATORS)
        self.end_closers = self._closers((_CLOSE_LIST,))
        if not self.sep_closers or not self.end_closers:
            raise ValueError("tokenizer: no token begins with '\"'; cannot close a JSON string")
        self.c_sep = max(1 + len(self.encode(rest)) for _, rest in self.sep_closers.values())
        self.c_end = max(1 + len(self.encode(rest)) + 1 for _, rest in self.end_closers.values())
        self.open_list = self.encode(_OPEN_LIST)
        self.open_think = self.encode(_OPEN_THINK)
        self.think_to_list = self.encode(_THINK_TO_LIST)

    def encode(self, text: str) -> list[int]:
        ids = self._encode_cache.get(text)
        if ids is None:
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
            self._encode_cache[text] = ids
        return ids

    def _closers(self, targets: Sequence[str]) -> dict[int, tuple[str, str]]:
        """token id -> (its text, the forced rest) for tokens that begin one of ``targets``."""
        out: dict[int, tuple[str, str]] = {}
        for i, t in enumerate(self.texts):
            if t is None or not t.startswith('"'):
                continue
            for target in targets:  # the first target that the token begins wins
                if target.startswith(t):
                    out[i] = (t, target[len(t) :])
                    break
        return out

    def need_at_string_start(self, r: int) -> int:
        """Fewest tokens from the start of a string's content to the end token, ``r`` strings after it."""
        return 2 * (r + 1) + r * self.c_sep + self.c_end

    def min_new_tokens(self, constraint: FanOutConstraint) -> int:
        need = self.need_at_string_start(constraint.k - 1)
        if constraint.think:
            return len(self.open_think) + len(self.think_to_list) + need
        return len(self.open_list) + need

    def _cached(self, key: tuple[Any, ...], build: Callable[[], torch.Tensor]) -> torch.Tensor:
        mask = self._masks.get(key)
        if mask is None:
            mask = build()
            self._masks[key] = mask
            if len(self._masks) > 512:
                self._masks.popitem(last=False)
        else:
            self._masks.move_to_end(key)
        return mask

    def _sized(self, mask: torch.Tensor, vocab: int, device: Any) -> torch.Tensor:
        import torch

        out = torch.zeros(vocab, dtype=torch.bool)
        m = min(vocab, mask.shape[0])
        out[:m] = mask[:m]
        return out.to(device)

    def think_mask(self, vocab: int, device: Any) -> torch.Tensor:
        """Tokens allowed inside the think block (printable, no tag characters), ``(vocab,)`` bool."""
        return self._cached(
            ("think", vocab, str(device)), lambda: self._sized(self.feats["think_ok"], vocab, device)
        )

    def content_mask(
        self, chars: int, words: int, last_space: bool, limits: tuple[int, int], vocab: int, device: Any
    ) -> torch.Tensor:
        """Tokens that may extend a string of ``chars`` characters and ``words`` words, ``(vocab,)`` bool.

        ``limits`` = ``(max_chars, max_words)``. Only the length rules: closing and duplicates are
        handled by the processor.
        """
        max_chars, max_words = limits

        def build() -> torch.Tensor:
            f = self.feats
            m = f["safe"] & (self.length <= max_chars - chars)
            if chars == 0:
                m = m & f["starts_alnum"]
            if last_space:
                m = m & ~f["lead_space"]
            new_words = self.word_starts + words
            if chars > 0 and not last_space:  # the token's first word continues the string's last one
                new_words = new_words - f["first_word_char"].int()
            m = m & (new_words <= max_words) & ~(f["trail_space"] & (new_words >= max_words))
            return self._sized(m, vocab, device)

        return self._cached(("content", chars, words, last_space, limits, vocab, str(device)), build)

    def tokens_of_length(self, n: int) -> list[int]:
        """String-safe tokens of exactly ``n`` characters."""
        return self._by_length.get(n, [])


_TABLES: dict[int, tuple[Callable[[], Any], _TokenTable]] = {}


def _table(tokenizer: Any) -> _TokenTable:
    """The cached :class:`_TokenTable` of this tokenizer object."""
    entry = _TABLES.get(id(tokenizer))
    if entry is not None and entry[0]() is tokenizer:
        return entry[1]
    table = _TokenTable(tokenizer)
    try:
        ref: Callable[[], Any] = weakref.ref(tokenizer)
    except TypeError:  # pragma: no cover - tokenizer objects are weak-referenceable
        ref = lambda: tokenizer  # noqa: E731
    _TABLES[id(tokenizer)] = (ref, table)
    return table


# --------------------------------------------------------------------------------------------------
# The logits processor
# --------------------------------------------------------------------------------------------------

_FORCED, _THINK, _STRING, _DONE = range(4)


class _Row:
    """Decoding state of one sequence."""

    __slots__ = ("phase", "forced", "then", "think_n", "j", "text", "n_tok", "limit", "seen", "words")

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


class FanOutLogitsProcessor:
    """A ``transformers`` logits processor (``__call__(input_ids, scores) -> scores``) that enforces a
    :class:`FanOutConstraint` on every row of one ``generate`` call (greedy or sampled).

    Args:
        constraint: the rules.
        tokenizer: the policy's tokenizer (token texts are read once and cached per tokenizer object).
        max_new_tokens: the call's generation cap; every answer ends (end token included) within it.
        eos_token_id: the end token (default ``<|im_end|>`` when the vocabulary has it, else the eos).

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
    ) -> None:
        if not isinstance(constraint, FanOutConstraint):
            raise TypeError(f"constraint: expected a FanOutConstraint, got {type(constraint).__name__}")
        self.constraint = constraint
        self.table = _table(tokenizer)
        self.max_new_tokens = check_positive_int(max_new_tokens, "max_new_tokens")
        need = self.table.min_new_tokens(constraint)
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

    # -- state ---------------------------------------------------------------------------------------
    def _start(self, n_rows: int) -> None:
        t = self.table
        self.rows = []
        for _ in range(n_rows):
            row = _Row()
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
        """The parser's identity of a subquery (None: unusable), so "distinct" means what it counts."""
        cleaned = _clean(text, _PARSER_MAX_CHARS)
        return None if cleaned is None else cleaned.casefold()

    def _is_new(self, row: _Row, text: str) -> bool:
        key = self._key(text)
        return key is not None and key not in row.seen

    # -- masks ---------------------------------------------------------------------------------------
    def _string_allowed(self, row: _Row, scores_row: torch.Tensor, allowed_row: torch.Tensor) -> None:
        t = self.table
        closers = t.end_closers if row.j == self.constraint.k - 1 else t.sep_closers
        closable = row.n_tok > 0 and self._is_new(row, row.text)
        must_close = row.n_tok > row.limit or (row.n_tok == row.limit and closable)
        if not must_close:
            mask = t.content_mask(
                len(row.text), row.words, row.text.endswith(" "), self._limits,
                allowed_row.shape[0], allowed_row.device,
            )  # fmt: skip
            allowed_row.copy_(mask)
            if row.n_tok == row.limit:  # a duplicate at its budget: one repair token that makes it new
                self._keep_only_new(row, scores_row, allowed_row)
            elif row.seen:
                self._forbid_stuck(row, allowed_row)
        if closable:
            allowed_row[list(closers)] = True
        if not bool(allowed_row.any()):  # pragma: no cover - the rules above leave no dead end
            self.fallbacks += 1
            allowed_row[list(closers)] = True

    def _keep_only_new(self, row: _Row, scores_row: torch.Tensor, allowed_row: torch.Tensor) -> None:
        """Restrict ``allowed_row`` to tokens after which the string is new (the 16 best-scored)."""
        import torch

        idx = torch.nonzero(allowed_row, as_tuple=False).flatten()
        order = idx[torch.argsort(scores_row[idx].float(), descending=True)].tolist()
        keep: list[int] = []
        for i in order:
            if self._is_new(row, row.text + (self.table.texts[i] or "")):
                keep.append(i)
                if len(keep) == 16:
                    break
        allowed_row.zero_()
        if keep:
            allowed_row[keep] = True

    def _forbid_stuck(self, row: _Row, allowed_row: torch.Tensor) -> None:
        """Forbid tokens that reach ``max_chars`` with a string equal to an earlier one (no way out)."""
        prefix = row.text.rstrip(_STRIP_CHARS).casefold()
        if not any(key.startswith(prefix) for key in row.seen):
            return
        room = self.constraint.max_chars - len(row.text)
        n = allowed_row.shape[0]
        bad = [
            i
            for i in self.table.tokens_of_length(room)
            if i < n and not self._is_new(row, row.text + (self.table.texts[i] or ""))
        ]
        if bad:
            allowed_row[bad] = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        n_rows, width = input_ids.shape
        prev = self._prev
        if (
            prev is not None
            and prev.shape[0] == n_rows
            and prev.shape[1] + 1 == width
            and torch.equal(prev, input_ids[:, :-1])
        ):
            used = width - self._prompt_width
            for row, tok in zip(self.rows, input_ids[:, -1].tolist(), strict=True):
                if row.phase != _DONE:
                    self._advance(row, int(tok), used)
        else:  # the first step of a generate call
            self._prompt_width = width
            self._start(n_rows)
        self._prev = input_ids.detach().clone()

        vocab = scores.shape[1]
        allowed = torch.zeros((n_rows, vocab), dtype=torch.bool, device=scores.device)
        for i, row in enumerate(self.rows):
            if row.phase == _FORCED:
                allowed[i, row.forced[0]] = True
            elif row.phase == _DONE:
                allowed[i, self.eos] = True
            elif row.phase == _THINK:
                if row.think_n < self.think_budget:
                    allowed[i] = self.table.think_mask(vocab, scores.device)
                allowed[i, self.table.think_to_list[0]] = True
            else:
                self._string_allowed(row, scores[i], allowed[i])
        return scores.masked_fill(~allowed, float("-inf"))


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
