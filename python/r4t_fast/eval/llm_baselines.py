"""LLM fan-out baselines: a language model writes ``k`` subqueries, a frozen dense retriever grounds them.

Two baselines of the paper, behind the ``r4t_fast.baselines`` protocol
``retrieve(query_texts, k, *, n_candidates=0) -> list[RetrievalResult]``:

* :class:`LLMFanOutBaseline` (registry name ``llm-zeroshot``): the policy writes ``k`` subqueries per
  query with the paper's prompt (:func:`r4t_fast.llm.build_messages`), greedy by default. Loaded from a
  tuned policy directory it is the RL-tuned fan-out LM, method name ``folm``
  (``LLMFanOutBaseline(catalog, encoder, policy=MODEL_DIR, name="folm")``).
* :class:`BestOfNBaseline` (``llm-bon``): samples ``n`` fan-outs per query at a temperature and keeps the
  one with the best OAR composite reward ``0.6 g + 0.2 d + 0.2 a`` (``r4t_fast.objectives.composite``,
  ``[0, 1]`` forms).

Both decode with the constrained decoding every stage uses (``constrained=True``, ``think=False`` by
default; :class:`r4t_fast.fanout.constrained.FanOutConstraint`): every completion is then exactly ``k``
distinct short subqueries; ``constrained=False`` gives the free-running policy (``think`` then defaults
to the paper's prompt with a reasoning block, as ``FanOutLM.generate``). A ``max_new_tokens`` below the
constraint's ``min_new_tokens`` is raised to it with a warning (:meth:`LLMFanOutBaseline.config`
records the cap used).

Per query, with ``B`` queries, ``k`` rows, embedding width ``d``:

1. the policy writes a completion, parsed by :func:`r4t_fast.llm.parse_subqueries` (at most ``k``
   distinct subqueries);
2. **missing rows**: a completion with fewer than ``k`` usable subqueries (malformed, cut short,
   duplicates) has its missing rows filled with the *raw query text* -- the one missing-row rule,
   :func:`r4t_fast.fanout.missing.fill_missing_rows`, shared with RL and synthesis -- so every set has
   exactly ``k`` rows; a completion with none is the raw query ``k`` times (then the method degrades to
   dense retrieval). :attr:`stats` counts ``usable_subqueries`` (mean distinct usable subqueries per
   completion), ``no_subquery_rate`` (completions with none), ``strict_format_failure_rate``
   (completions that break the strict format, ``ParseResult.format_ok``) and ``missing_row_rate``;
3. the ``(B, k)`` row texts are embedded by the encoder into ``row_embeddings (B, k, d)``;
4. rows are grounded to catalog items with :func:`r4t_fast.ops.ground_sets` (each row its nearest item,
   no item twice in a set), giving ``item_indices (B, k)``;
5. with ``n_candidates = C > 0`` each row's ``C`` nearest catalog items are its ``candidates (k, C)``
   (the Recall@K protocol: budget ``b`` per row, ``K = k * b``).

Policies are anything :class:`r4t_fast.llm.FanOutLM` loads (``"smollm2"`` or a local Hugging Face model
dir), or an object already in memory with the same ``generate`` method (a ``FanOutLM``, a test double).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from r4t_fast._internal import MAX_K, check_positive_int, check_seed
from r4t_fast.data.results import RetrievalResult
from r4t_fast.eval.baselines import _EmbeddingBaseline
from r4t_fast.fanout.copies import copy_mask
from r4t_fast.fanout.generation import check_sampling
from r4t_fast.fanout.missing import MISSING_ROW_RULE, fill_missing_rows
from r4t_fast.kernels import ops
from r4t_fast.objectives import DEFAULT_WEIGHTS, alignment, composite, diversity, groundedness

__all__ = ["BestOfNBaseline", "FanOut", "FanOutStats", "LLMFanOutBaseline"]


@dataclass(frozen=True)
class FanOut:
    """One completion turned into exactly ``k`` rows.

    Attributes:
        rows: ``k`` row texts: the parsed subqueries, then the raw query for every missing row.
        n_generated: how many rows came from the model (``k - n_generated`` are missing rows).
        format_ok: the completion followed the strict format (``ParseResult.format_ok``).
        text: the raw completion.
        reason: the parser's reason when the format was not followed exactly, else ``None``.
    """

    rows: list[str]
    n_generated: int
    format_ok: bool
    text: str
    reason: str | None = None


@dataclass
class FanOutStats:
    """Counters over every completion since the last :meth:`LLMFanOutBaseline.reset_stats`.

    One meaning per word (the same words as :meth:`r4t_fast.fanout.rewards.RewardBatch.summary`):

    Attributes:
        n_queries: queries fanned out.
        n_completions: completions generated (``n_queries * n`` for best-of-n).
        n_usable_subqueries: distinct usable subqueries over all completions (each at most ``k``).
        n_no_subquery: completions without a single usable subquery (every row is the raw query).
        n_strict_format_failures: completions that broke the strict format (``not ParseResult.format_ok``;
            they may still hold usable subqueries).
        n_rows: rows built (``n_completions * k``).
        n_missing_rows: rows filled with the raw query (the missing-row rule).
        n_truncated: completions cut at ``max_new_tokens``.
        n_copies: usable subqueries that copy the query (:mod:`r4t_fast.fanout.copies`: contain it or
            have cosine >= 0.95 with it), counted by ``retrieve``.
        generated_tokens: tokens generated over all completions.
        decode_positions: positions the policy's ``generate`` decoded, padding included
            (:attr:`r4t_fast.fanout.generation.GenerationTiming.decode_positions`).
        generate_s: seconds spent in the policy's ``generate`` (tokenisation and parsing included).
    """

    n_queries: int = 0
    n_completions: int = 0
    n_usable_subqueries: int = 0
    n_no_subquery: int = 0
    n_strict_format_failures: int = 0
    n_rows: int = 0
    n_missing_rows: int = 0
    n_truncated: int = 0
    n_copies: int = 0
    generated_tokens: int = 0
    decode_positions: int = 0
    generate_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """The counters plus ``usable_subqueries``, ``no_subquery_rate``, ``strict_format_failure_rate``,
        ``missing_row_rate``, ``truncated_rate``, ``mean_new_tokens`` and ``copy_rate`` (copies over usable
        subqueries)."""
        out: dict[str, float] = dict(asdict(self))
        n = max(self.n_completions, 1)
        out["usable_subqueries"] = self.n_usable_subqueries / n
        out["no_subquery_rate"] = self.n_no_subquery / n
        out["strict_format_failure_rate"] = self.n_strict_format_failures / n
        out["missing_row_rate"] = self.n_missing_rows / max(self.n_rows, 1)
        out["truncated_rate"] = self.n_truncated / n
        out["mean_new_tokens"] = self.generated_tokens / n
        out["copy_rate"] = self.n_copies / max(self.n_usable_subqueries, 1)
        return out


class LLMFanOutBaseline(_EmbeddingBaseline):
    """Zero-shot LLM fan-out (``llm-zeroshot``), or the tuned ``folm`` when loaded from a tuned policy.

    Args:
        catalog: an ``r4t_fast.Catalog`` (or anything with ``.embeddings (N, d)`` and optionally
            ``.search``), the items to ground to.
        encoder: text encoder with ``.dim == d`` and ``.encode(list[str]) -> (n, d)`` unit rows.
        policy: ``"smollm2"``, a local Hugging Face model dir, or a loaded object with
            ``FanOutLM.generate``'s signature.
        k: default number of subqueries (``retrieve``'s ``k`` overrides it), ``1 <= k <= 64``.
        temperature: 0 = greedy decoding (deterministic), > 0 = sampling.
        top_p: nucleus mass when sampling.
        repetition_penalty: completion-only repetition penalty (1 = off).
        max_new_tokens: cap on generated tokens per completion.
        batch_size: queries per ``generate`` call (best-of-n generates ``batch_size * n`` sequences per call).
        max_sequences: sequences per forward batch inside a call (bounds memory: a call with more
            sequences runs as several forward batches).
        seed: sampling seed passed to every ``generate`` call.
        device: torch device of the policy when it is loaded here.
        one_shot: include the worked example in the prompt; None (default): the prompt the policy was
            tuned on (its ``r4t_policy.json``), the worked example for any other model.
        constrained: constrained decoding (default; see the module docstring); False = free-running.
        think: ask for (and, constrained, force) a ``<think>`` block; ``None`` = off when constrained,
            on otherwise (the paper's prompt).
        forbid_title: constrained decoding also keeps the query (the row's title, case-folded) out of
            every subquery (``FanOutConstraint.forbid_title``; issue 19's copies). Off by default.
        name: method name for records (default ``"llm-zeroshot"``; use ``"folm"`` for a tuned policy).

    See the module docstring for the missing-row rule and the counters in :attr:`stats`.
    """

    name = "llm-zeroshot"

    def __init__(
        self,
        catalog: Any,
        encoder: Any,
        policy: Any = "smollm2",
        k: int = 10,
        temperature: float = 0.0,
        *,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        max_new_tokens: int = 160,
        batch_size: int = 64,
        max_sequences: int = 64,
        seed: int = 0,
        device: str = "cpu",
        one_shot: bool | None = None,
        constrained: bool = True,
        think: bool | None = None,
        forbid_title: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(catalog, encoder)
        self.k = check_positive_int(k, "k", upper=MAX_K)
        self.temperature, self.top_p, self.repetition_penalty = check_sampling(
            temperature, top_p, repetition_penalty
        )
        self.max_new_tokens = check_positive_int(max_new_tokens, "max_new_tokens")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.max_sequences = check_positive_int(max_sequences, "max_sequences")
        self.seed = check_seed(seed)
        if one_shot is not None and not isinstance(one_shot, bool):
            raise ValueError(f"one_shot: expected a bool or None, got {one_shot!r}")
        if not isinstance(constrained, bool):
            raise ValueError(f"constrained: expected a bool, got {constrained!r}")
        if think is not None and not isinstance(think, bool):
            raise ValueError(f"think: expected a bool or None, got {think!r}")
        if not isinstance(forbid_title, bool):
            raise ValueError(f"forbid_title: expected a bool, got {forbid_title!r}")
        if forbid_title and not constrained:
            raise ValueError(
                "forbid_title: the title filter is part of constrained decoding; pass constrained=True"
            )
        self.forbid_title = forbid_title
        self.constrained = constrained
        self.think = (not constrained) if think is None else think
        if name is not None:
            if not isinstance(name, str) or not name:
                raise ValueError(f"name: expected a non-empty string, got {name!r}")
            self.name = name
        if callable(getattr(policy, "generate", None)):
            self.lm = policy
            self.policy = str(getattr(policy, "model_dir", None) or type(policy).__name__)
        elif isinstance(policy, (str, os.PathLike)):
            from r4t_fast.fanout.generation import FanOutLM

            self.lm = FanOutLM(policy, device=device)
            self.policy = str(self.lm.model_dir)
        else:
            raise ValueError(
                "policy: expected 'smollm2', a local model directory or an object with .generate(), "
                f"got {type(policy).__name__}"
            )
        # None: the prompt the policy was tuned on (FanOutLM.one_shot), else the worked example
        self.one_shot = bool(getattr(self.lm, "one_shot", True)) if one_shot is None else one_shot
        self._stats = FanOutStats()

    def _cap(self, k: int) -> int:
        """``max_new_tokens`` for ``k`` subqueries: raised to the constraint's minimum when constrained
        (policies without a ``tokenizer``, such as test doubles, are taken as they are)."""
        tokenizer = getattr(self.lm, "tokenizer", None)
        if not self.constrained or tokenizer is None:
            return self.max_new_tokens
        from r4t_fast.fanout.constrained import FanOutConstraint

        need = FanOutConstraint(k=k, think=self.think).min_new_tokens(tokenizer)
        if self.max_new_tokens < need:
            import warnings

            warnings.warn(
                f"max_new_tokens: constrained decoding of k={k} subqueries needs at least {need} new "
                f"tokens with this tokenizer; raised from {self.max_new_tokens} to {need}",
                stacklevel=3,
            )
            self.max_new_tokens = need
        return self.max_new_tokens

    def _constraint(self, k: int) -> Any:
        """What ``generate(constrained=...)`` takes: a bool, or with ``forbid_title`` the constraint whose
        title filter keeps each row's title (its prompt's query) out of every subquery."""
        if not self.forbid_title:
            return self.constrained
        from r4t_fast.fanout.constrained import FanOutConstraint

        return FanOutConstraint(k=k, think=self.think, forbid_title=True)

    # -- bookkeeping ---------------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, float]:
        """Counters since the last :meth:`reset_stats` (see :class:`FanOutStats`), with rates."""
        return self._stats.as_dict()

    def reset_stats(self) -> None:
        """Zero the counters of :attr:`stats`."""
        self._stats = FanOutStats()

    def config(self) -> dict[str, Any]:
        """The hyper-parameters, for evaluation records."""
        return {
            "policy": self.policy,
            "k": self.k,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "repetition_penalty": self.repetition_penalty,
            "max_new_tokens": self.max_new_tokens,
            "batch_size": self.batch_size,
            "max_sequences": self.max_sequences,
            "seed": self.seed,
            "one_shot": self.one_shot,
            "constrained": self.constrained,
            "think": self.think,
            "forbid_title": self.forbid_title,
            "missing_rows": MISSING_ROW_RULE,
        }

    # -- fan-out -------------------------------------------------------------------------------------
    def _check_k_llm(self, k: Any, n_candidates: Any) -> tuple[int, int]:
        k, c = self._check_k(k, n_candidates)
        if k > MAX_K:
            raise ValueError(f"k: expected an int in [1, {MAX_K}] (subqueries per completion), got {k}")
        return k, c

    def fan_out(
        self,
        query_texts: Sequence[str],
        k: int | None = None,
        *,
        num_samples: int = 1,
        temperature: float | None = None,
    ) -> list[list[FanOut]]:
        """Generate and parse subqueries: ``out[i][j]`` is sample ``j`` of query ``i``, ``(B, num_samples)``.

        Every :class:`FanOut` has exactly ``k`` rows (missing ones are the raw query, the missing-row
        rule). Updates :attr:`stats`.
        """
        k = self.k if k is None else check_positive_int(k, "k", upper=MAX_K)
        num_samples = check_positive_int(num_samples, "num_samples")
        temp = self.temperature if temperature is None else check_sampling(temperature)[0]
        if isinstance(query_texts, str) or not all(isinstance(t, str) and t.strip() for t in query_texts):
            raise ValueError("query_texts: expected a list of non-empty strings")
        queries = list(query_texts)
        max_new_tokens = self._cap(k)
        outs: list[list[FanOut]] = []
        for start in range(0, len(queries), self.batch_size):
            batch = queries[start : start + self.batch_size]
            generated = self.lm.generate(
                batch,
                k=k,
                num_samples=num_samples,
                temperature=temp,
                top_p=self.top_p,
                repetition_penalty=self.repetition_penalty,
                max_new_tokens=max_new_tokens,
                batch_size=min(len(batch) * num_samples, self.max_sequences),
                seed=self.seed,
                one_shot=self.one_shot,
                constrained=self._constraint(k),
                think=self.think,
            )
            timing = getattr(self.lm, "last_timing", None)
            if timing is not None:
                self._stats.generate_s += float(timing.wall_s)
                self._stats.decode_positions += int(getattr(timing, "decode_positions", 0))
            for query, samples in zip(batch, generated, strict=True):
                outs.append([self._rows(query, g, k) for g in samples])
        self._stats.n_queries += len(queries)
        return outs

    def _rows(self, query: str, gen: Any, k: int) -> FanOut:
        subqueries = list(dict.fromkeys(gen.subqueries))[:k]  # distinct, in order
        parse = getattr(gen, "parse", None)
        format_ok = bool(getattr(parse, "format_ok", False))
        st = self._stats
        st.n_completions += 1
        st.n_rows += k
        st.n_usable_subqueries += len(subqueries)
        st.n_missing_rows += k - len(subqueries)
        st.n_strict_format_failures += not format_ok
        st.n_no_subquery += not subqueries
        st.n_truncated += not bool(getattr(gen, "finished", True))
        st.generated_tokens += int(getattr(gen, "n_tokens", 0))
        rows = fill_missing_rows(subqueries, query, k)
        return FanOut(rows, len(subqueries), format_ok, gen.text, getattr(parse, "reason", None))

    def _embed_rows(self, fanouts: Sequence[FanOut]) -> np.ndarray:
        """Row texts of ``S`` fan-outs -> unit float32 ``(S, k, d)``; each distinct text is encoded once."""
        texts = [t for f in fanouts for t in f.rows]
        uniq = list(dict.fromkeys(texts))
        emb = self._encode(uniq)
        pos = {t: i for i, t in enumerate(uniq)}
        k = len(fanouts[0].rows)
        return emb[[pos[t] for t in texts]].reshape(len(fanouts), k, self._dim)

    def _count_copies(
        self, queries: Sequence[str], q: np.ndarray, fanouts: Sequence[FanOut], rows: np.ndarray
    ) -> None:
        """Add the copies of the query among each fan-out's generated rows to :attr:`stats`.

        ``fanouts[i]`` belongs to ``queries[i * len(fanouts) // len(queries)]`` (samples of a query are
        consecutive); ``q (B, d)``, ``rows (S, k, d)``."""
        per = len(fanouts) // max(len(queries), 1)
        for i, f in enumerate(fanouts):
            b, n = i // per, f.n_generated
            self._stats.n_copies += int(copy_mask(f.rows[:n], queries[b], rows[i, :n], q[b]).sum())

    def _ground(self, rows: np.ndarray) -> np.ndarray:
        """``(S, k, d)`` rows -> ``(S, k)`` int64 distinct catalog rows (``-1`` only when ``N < k``)."""
        cat = self._emb if self._emb.dtype in (torch.float32, torch.float16) else self._emb.float()
        ids, _ = ops.ground_sets(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)), cat)
        return ids.cpu().numpy().astype(np.int64)

    def _finish(
        self, q: np.ndarray, rows: np.ndarray, items: np.ndarray, n_candidates: int
    ) -> list[RetrievalResult]:
        """Build results from ``q (B, d)``, ``rows (B, k, d)``, ``items (B, k)``."""
        b, k, d = rows.shape
        cand = self._search(rows.reshape(b * k, d), n_candidates).reshape(b, k, -1) if n_candidates else None
        out = []
        for i in range(b):
            valid = items[i] >= 0
            scores = np.full(k, -np.inf, dtype=np.float64)
            scores[valid] = self._items(items[i][valid]) @ q[i].astype(np.float64)
            out.append(
                RetrievalResult(
                    item_indices=items[i].copy(),
                    row_embeddings=rows[i].astype(np.float32),
                    candidates=None if cand is None else cand[i].copy(),
                    scores=scores.astype(np.float32),
                )
            )
        return out

    def retrieve(self, query_texts: Sequence[str], k: int, *, n_candidates: int = 0) -> list[RetrievalResult]:
        """Fan out each query into ``k`` subqueries and ground them (items ``(k,)``, rows ``(k, d)``)."""
        k, c = self._check_k_llm(k, n_candidates)
        q = self._encode(query_texts)
        fanouts = [s[0] for s in self.fan_out(query_texts, k)]
        rows = self._embed_rows(fanouts)
        self._count_copies(query_texts, q, fanouts, rows)
        return self._finish(q, rows, self._ground(rows), c)


class BestOfNBaseline(LLMFanOutBaseline):
    """Best-of-N LLM fan-out (``llm-bon``): ``n`` sampled fan-outs, keep the best OAR composite reward.

    For each sample ``s`` of a query ``q`` (rows ``E_s (k, d)``, grounded items ``C_s (k, d)``):
    ``R_s = w_g * groundedness(E_s) + w_d * diversity(C_s) + w_a * alignment(E_s, e(q))`` with the
    ``[0, 1]`` forms of :mod:`r4t_fast.objectives` and ``weights = (0.6, 0.2, 0.2)`` (the paper's training
    reward); the first sample with the highest ``R_s`` wins. Samples are drawn at ``temperature``
    (default 0.8; the paper samples at 0.9) with a fixed ``seed``, so results depend on the seed and on
    how queries are batched. The rewards of the last call are in :attr:`last_rewards` ``(B, n)``.

    Args:
        n: samples per query (paper: 5).
        weights: composite weights (groundedness, diversity, alignment).
        (the rest as :class:`LLMFanOutBaseline`; ``temperature`` must be > 0).
    """

    name = "llm-bon"

    def __init__(
        self,
        catalog: Any,
        encoder: Any,
        policy: Any = "smollm2",
        k: int = 10,
        temperature: float = 0.8,
        *,
        n: int = 5,
        weights: Sequence[float] = DEFAULT_WEIGHTS,
        **kwargs: Any,
    ) -> None:
        check_sampling(temperature, sampled=True)
        super().__init__(catalog, encoder, policy, k, temperature, **kwargs)
        self.n = check_positive_int(n, "n")
        composite(0.0, 0.0, 0.0, weights)  # validates the weights
        self.weights = tuple(float(w) for w in weights)
        self.last_rewards: np.ndarray | None = None

    def config(self) -> dict[str, Any]:
        """The hyper-parameters, for evaluation records."""
        return {**super().config(), "n": self.n, "weights": list(self.weights), "selection": "composite"}

    def rewards(self, q: np.ndarray, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Composite reward per sample.

        Args:
            q: ``(B, d)`` query embeddings.
            rows: ``(B, n, k, d)`` row embeddings.
            items: ``(B, n, k)`` grounded catalog rows (``-1`` entries count as the row itself).

        Returns:
            ``(B, n)`` float64 rewards.
        """
        b, n, k, d = rows.shape
        flat = rows.reshape(b * n, k, d).astype(np.float64)
        safe = np.where(items >= 0, items, 0).reshape(b * n, k)
        item_emb = self._items(safe)
        item_emb = np.where((items.reshape(b * n, k) >= 0)[..., None], item_emb, flat)
        g = groundedness(flat, self._emb)
        dv = diversity(item_emb)
        a = alignment(flat, np.repeat(q.astype(np.float64), n, axis=0))
        return np.asarray(composite(g, dv, a, self.weights), dtype=np.float64).reshape(b, n)

    def retrieve(self, query_texts: Sequence[str], k: int, *, n_candidates: int = 0) -> list[RetrievalResult]:
        """Sample ``n`` fan-outs per query, keep the best-rewarded one, return it as in the zero-shot case."""
        k, c = self._check_k_llm(k, n_candidates)
        q = self._encode(query_texts)
        samples = self.fan_out(query_texts, k, num_samples=self.n)
        b = len(samples)
        flat = [f for s in samples for f in s]
        rows = self._embed_rows(flat)
        self._count_copies(query_texts, q, flat, rows)
        items = self._ground(rows)
        rewards = self.rewards(q, rows.reshape(b, self.n, k, -1), items.reshape(b, self.n, k))
        self.last_rewards = rewards
        best = np.argmax(rewards, axis=1)
        pick = np.arange(b) * self.n + best
        return self._finish(q, rows[pick], items[pick], c)
