"""Per-tokenizer tables for constrained fan-out decoding: the decoded text of every token, its features
(string-safe, word starts, length) and the cached masks the logits processor applies; and the format
literals of a fan-out answer (``<queries>["...", ...]</queries>``)."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from r4t_fast.fanout.prompt import CHATML_END

STRING_PUNCTUATION = "-&'./+"
"""Characters besides letters, digits and single spaces allowed inside a subquery."""

_PARSER_MAX_CHARS = 200  # parse_subqueries' default bound: a constrained string must stay under it
_OPEN_THINK = "<think>"
_THINK_TO_LIST = '</think>\n<queries>["'
_OPEN_LIST = '<queries>["'
_SEPARATORS = ('", "', '","')  # the first is canonical: a closer that is a prefix of both continues with it
_CLOSE_LIST = '"]</queries>'


# --------------------------------------------------------------------------------------------------
# Per-tokenizer tables: the decoded text of every token and its features
# --------------------------------------------------------------------------------------------------


def _end_token_id(tokenizer: Any) -> int:

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
        self.tokenizer = tokenizer
        texts = _token_texts(tokenizer)
        self.texts = texts
        self.n = len(texts)
        self.eos = _end_token_id(tokenizer)
        self._encode_cache: dict[str, list[int]] = {}
        self._masks: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()

        n = self.n
        names = ("safe", "starts_alnum", "lead_space", "trail_space", "first_word_char", "think_ok")
        feats = {name: np.zeros(n, dtype=bool) for name in names}
        length = np.zeros(n, dtype=np.int32)
        word_starts = np.zeros(n, dtype=np.int32)
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

    def min_new_tokens(self, k: int, think: bool) -> int:
        """Fewest new tokens that always finish a list of ``k`` strings (after a think block if ``think``)."""
        need = self.need_at_string_start(k - 1)
        if think:
            return len(self.open_think) + len(self.think_to_list) + need
        return len(self.open_list) + need

    def _cached(self, key: tuple[Any, ...], build: Callable[[], np.ndarray]) -> np.ndarray:
        mask = self._masks.get(key)
        if mask is None:
            mask = build()
            self._masks[key] = mask
            if len(self._masks) > 512:
                self._masks.popitem(last=False)
        else:
            self._masks.move_to_end(key)
        return mask

    @staticmethod
    def _sized(mask: np.ndarray, vocab: int) -> np.ndarray:
        out = np.zeros(vocab, dtype=bool)
        m = min(vocab, mask.shape[0])
        out[:m] = mask[:m]
        return out

    def think_mask(self, vocab: int) -> np.ndarray:
        """Tokens allowed inside the think block (printable, no tag characters), ``(vocab,)`` bool."""
        return self._cached(("think", vocab), lambda: self._sized(self.feats["think_ok"], vocab))

    def content_mask(
        self, chars: int, words: int, last_space: bool, limits: tuple[int, int], vocab: int
    ) -> np.ndarray:
        """Tokens that may extend a string of ``chars`` characters and ``words`` words, ``(vocab,)`` bool.

        ``limits`` = ``(max_chars, max_words)``. Only the length rules: closing and duplicates are
        handled by the processor.
        """
        max_chars, max_words = limits

        def build() -> np.ndarray:
            f = self.feats
            m = f["safe"] & (self.length <= max_chars - chars)
            if chars == 0:
                m &= f["starts_alnum"]
            if last_space:
                m &= ~f["lead_space"]
            new_words = self.word_starts + words
            if chars > 0 and not last_space:  # the token's first word continues the string's last one
                new_words = new_words - f["first_word_char"]
            m &= (new_words <= max_words) & ~(f["trail_space"] & (new_words >= max_words))
            return self._sized(m, vocab)

        return self._cached(("content", chars, words, last_space, limits, vocab), build)

    def tokens_of_length(self, n: int) -> list[int]:
        """String-safe tokens of exactly ``n`` characters."""
        return self._by_length.get(n, [])

    def _folded(self) -> tuple[list[str], list[int]]:
        """String-safe tokens' case-folded texts, sorted, and their ids (for prefix searches)."""
        index = getattr(self, "_fold_index", None)
        if index is None:
            pairs = sorted((t.casefold(), i) for i, t in enumerate(self.texts) if t and self.feats["safe"][i])
            index = ([p[0] for p in pairs], [p[1] for p in pairs])
            self._fold_index = index
        return index

    def tokens_with_prefix(self, prefix: str) -> list[int]:
        """String-safe tokens whose case-folded text starts with ``prefix`` (case-folded)."""
        import bisect

        texts, ids = self._folded()
        lo = bisect.bisect_left(texts, prefix)
        hi = bisect.bisect_left(texts, prefix + "\U0010ffff")
        return ids[lo:hi]

    def tokens_containing(self, key: str) -> list[int]:
        """String-safe tokens whose case-folded text contains ``key`` (cached per key)."""
        cache = self.__dict__.setdefault("_containing", {})
        if key not in cache:
            texts, ids = self._folded()
            cache[key] = [i for t, i in zip(texts, ids, strict=True) if key in t]
        return cache[key]

    def tokens_completing(self, text: str, key: str) -> list[int]:
        """String-safe tokens after which the case-folded ``text + token`` contains ``key`` for the first
        time (``text`` does not contain it): the token holds ``key`` whole, or ``text`` ends with a
        prefix ``key[:j]`` and the token starts with the rest ``key[j:]``."""
        folded = text.casefold()
        out = list(self.tokens_containing(key))
        for j in range(1, len(key)):
            if folded.endswith(key[:j]):
                out += self.tokens_with_prefix(key[j:])
        return out


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
