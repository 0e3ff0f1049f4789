"""RL rewards for the fan-out LM: the paper's OAR composite and WSCR coverage, batched over a group.

A completion is parsed into at most ``k`` subqueries ``q_1..q_n`` (:func:`r4t_fast.llm.parse_subqueries`);
the subqueries are embedded by a frozen text encoder ``e`` and run against the catalog ``D`` by the
project's fused kernel (:func:`r4t_fast.ops.knn`, inner product on unit vectors = cosine). The terms are
the ``[0, 1]`` forms of :mod:`r4t_fast.objectives`, which this module calls rather than re-derives:

==============  =====================================================  =====================================
term            formula (rows ``q_1..q_L`` of one fan-out, see below)  computed by
==============  =====================================================  =====================================
r_ground        ``1 - (1/L) sum_i min_c ||e(q_i) - e(c)||_2 / 2``      :func:`~.objectives.groundedness`
r_div           ``Vendi(e(top1(q_1)), ..., e(top1(q_L))) / L``         :func:`~.objectives.diversity`
r_align         ``(1 + (1/L) sum_i cos(e(q_i), e(q))) / 2``            :func:`~.objectives.alignment`
OAR reward      ``R = s * (lg * r_ground + ld * r_div + la * r_align)``  :func:`~.objectives.composite`
                ``(lg, ld, la) = (0.6, 0.2, 0.2)``
WSCR reward     ``R = |Y ∩ R(Q)| / |Y|``, ``R(Q)`` = union of the top   :func:`~.objectives.recall_at_k`,
                ``b`` items of every row                                ``union_candidates``
mixed reward    ``R = w * R_WSCR + (1 - w) * R_OAR``, ``w`` =            both of the above
                ``mixed_weight`` (default 0.5)
==============  =====================================================  =====================================

The task ``"auto"`` is ``"wscr"`` when every training query has a non-empty reference set, else
``"oar"`` (:func:`resolve_task`). :func:`build_reward` is the one constructor every stage calls (RL,
synthesis, evaluation), so a reward means the same everywhere.

Project decisions where the paper is silent (documented, configurable where it matters):

* **Missing subqueries** (the completion wrote ``n < k`` usable ones), option ``missing``:

  - ``"query"`` (default): the ``k - n`` missing rows are the raw query, ``L = k``, ``s = 1``: the one
    missing-row rule (:func:`r4t_fast.fanout.missing.fill_missing_rows`), shared with ``r4t eval`` and
    synthesis, so the policy is trained on what it is evaluated on. Padding with the query costs
    diversity (repeated rows share their top-1 item) and buys alignment, so neither short lists nor
    off-topic filler (e.g. copying the prompt's worked example) pays.
  - ``"zero"``: rows are the ``n`` written subqueries, ``L = n``, ``s = n / k``: each missing
    subquery contributes 0 to every term. In a committed Spotify run this made copying the one-shot
    example's ten subqueries the best policy (``benchmarks/results/rl/``).
  - ``"ignore"``: ``L = n``, ``s = 1``. Hackable: one subquery earns the maximal ``Vendi / 1 = 1``.
* **Malformed output scores 0**: a completion without a single usable subquery (``ParseResult.ok`` is
  False: empty, chatter, no list) gets ``R = 0`` and counts in ``no_subquery_rate``. Completions that
  parse but break the strict format (``ParseResult.format_ok``) are scored normally and counted
  separately (``strict_format_failure_rate``); ``require_strict_format=True`` zeroes them too.
  ``usable_subqueries`` is the mean number of usable subqueries per completion.
* ``top1`` is the dense retriever's best item (one :func:`r4t_fast.ops.knn` call for all subqueries of
  the batch); groundedness uses the fused nearest-item search of :mod:`r4t_fast.objectives` (one more
  batched call). For unit-norm embeddings both find the same item.

:class:`RewardFunction` wraps all of this as a TRL reward function (``reward_funcs=[fn]``): TRL passes
the dataset columns as keyword arguments (``query``, and ``reference`` for WSCR) and the completions as
chat messages (``completions[i][-1]["content"]``). Every call encodes all texts of the batch with one
encoder call and searches the catalog with one kernel call; it never raises on a completion's content.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from r4t_fast import objectives
from r4t_fast._internal import check_choice, check_float, check_k, check_positive_int
from r4t_fast.fanout.copies import copy_mask
from r4t_fast.fanout.missing import fill_missing_rows
from r4t_fast.fanout.parser import ParseResult, parse_subqueries
from r4t_fast.fanout.reward_terms import (
    OAR_MISSING_CHOICES,
    OARTerms,
    _catalog_tensor,
    _check_weights,
    oar_reward,
    retrieve_candidates,
    soft_wscr_coverage,
    wscr_coverage,
)

__all__ = [
    "MISSING_CHOICES",
    "OAR_MISSING_CHOICES",
    "TASK_CHOICES",
    "OARTerms",
    "RewardBatch",
    "RewardFunction",
    "build_reward",
    "completion_text",
    "oar_reward",
    "resolve_task",
    "retrieve_candidates",
    "soft_wscr_coverage",
    "wscr_coverage",
]

__test__ = {  # doctest.testmod(rewards) also runs the doctests of the pure terms (now in reward_terms)
    "retrieve_candidates": retrieve_candidates,
    "oar_reward": oar_reward,
    "wscr_coverage": wscr_coverage,
    "soft_wscr_coverage": soft_wscr_coverage,
}

TASK_CHOICES = ("auto", "oar", "wscr", "mixed", "soft", "soft-mixed")
"""Reward regimes: ``"oar"`` (composite of the three properties), ``"wscr"`` (reference-set coverage),
``"mixed"`` (``w * coverage + (1 - w) * composite``), ``"soft"`` (smooth coverage,
:func:`soft_wscr_coverage`), ``"soft-mixed"`` (``w * soft + (1 - w) * coverage``) and ``"auto"``
(:func:`resolve_task`)."""

COVERAGE_TASKS = ("wscr", "mixed", "soft", "soft-mixed")
"""Tasks whose reward reads the reference sets."""

MISSING_CHOICES = ("query", "zero", "ignore")
"""How subqueries the completion did not write count (module docstring): fill with the raw query
(``"query"``, the ``r4t eval`` protocol), score 0 (``"zero"``: factor ``n / k``) or ``"ignore"``."""


def completion_text(completion: Any) -> str | None:
    """The generated text of one completion as TRL passes it, or ``None`` when it has no text.

    Accepts a plain string, a chat message ``{"role", "content"}`` or a list of messages (the text of
    the last one). Content given as a list of parts (``[{"type": "text", "text": ...}]``) is joined.

    >>> completion_text([{"role": "assistant", "content": "hi"}])
    'hi'
    >>> completion_text("plain") , completion_text([]), completion_text(None)
    ('plain', None, None)
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)):
        if not completion:
            return None
        completion = completion[-1]
    if isinstance(completion, Mapping):
        content = completion.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, (list, tuple)):
            parts = [
                p.get("text") for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str)
            ]
            return "".join(parts) if parts else None
    return None


def resolve_task(task: str, references: Sequence[Sequence[int]] | None) -> str:
    """The concrete reward regime of ``task``: ``"auto"`` is ``"wscr"`` when ``references`` (one reference
    set per training query) is given and every set is non-empty, else ``"oar"``; other tasks are returned
    as they are (the :data:`COVERAGE_TASKS` with an empty reference set are errors).

    >>> resolve_task("auto", [[1, 2], [3]]), resolve_task("auto", [[1], []]), resolve_task("auto", None)
    ('wscr', 'oar', 'oar')
    """
    task = check_choice(task, TASK_CHOICES, "task")
    has_refs = references is not None and len(references) > 0 and all(len(y) > 0 for y in references)
    if task == "auto":
        return "wscr" if has_refs else "oar"
    if task in COVERAGE_TASKS and references is not None and not has_refs:
        raise ValueError(f"task: {task!r} needs a non-empty reference set for every query")
    return task


# ----------------------------------------------------------------------------------------------------
# the TRL reward function
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RewardBatch:
    """Everything :meth:`RewardFunction.score` computed for ``B`` completions (arrays are ``(B,)``).

    Attributes:
        reward: the training reward (0 for format failures).
        groundedness, diversity, alignment: OAR terms over the scored rows (with ``missing="query"``
            the rows include the query fill); ``nan`` where no subquery was written; also filled for
            ``task="wscr"``, for monitoring.
        coverage: WSCR coverage with ``budget_per_row`` items per row (``nan`` without reference sets).
        n_subqueries: usable subqueries parsed (0..k).
        parse_ok: at least one usable subquery (False = format failure, reward 0).
        format_ok: the strict format was followed.
        subqueries: the parsed subqueries of each completion.
        soft_coverage: smooth coverage (:func:`soft_wscr_coverage`; ``nan`` without reference sets or
            where nothing parsed); ``None`` when not computed.
        n_copies: written subqueries that copy the title (:mod:`r4t_fast.fanout.copies`); ``None``
            when not computed.
    """

    reward: np.ndarray
    groundedness: np.ndarray
    diversity: np.ndarray
    alignment: np.ndarray
    coverage: np.ndarray
    n_subqueries: np.ndarray
    parse_ok: np.ndarray
    format_ok: np.ndarray
    subqueries: list[list[str]] = field(repr=False)
    soft_coverage: np.ndarray | None = None
    n_copies: np.ndarray | None = None

    def summary(self) -> dict[str, float]:
        """Batch means for logging: ``reward``, terms over parsed completions, ``usable_subqueries``,
        ``no_subquery_rate``, ``strict_format_failure_rate``, and when computed ``soft_coverage`` and
        ``copy_rate`` (copies over all written subqueries of the batch).

        Terms with no parsed completion in the batch are ``nan``.
        """

        def mean(v: np.ndarray) -> float:
            v = v[np.isfinite(v)]
            return float(v.mean()) if v.size else float("nan")

        usable = mean(self.n_subqueries.astype(np.float64))
        no_subquery = float(1.0 - self.parse_ok.mean()) if self.parse_ok.size else float("nan")
        extra: dict[str, float] = {}
        if self.soft_coverage is not None:
            extra["soft_coverage"] = mean(self.soft_coverage)
        if self.n_copies is not None:
            written = int(self.n_subqueries.sum())
            extra["copy_rate"] = float(self.n_copies.sum()) / written if written else float("nan")
        return {
            "reward": mean(self.reward),
            "groundedness": mean(self.groundedness),
            "diversity": mean(self.diversity),
            "alignment": mean(self.alignment),
            "coverage": mean(self.coverage),
            "usable_subqueries": usable,
            "no_subquery_rate": no_subquery,
            "strict_format_failure_rate": mean(1.0 - self.format_ok.astype(np.float64)),
            **extra,
        }


class RewardFunction:
    """The R4T training reward as a TRL reward function (also callable directly via :meth:`score`).

    Args:
        catalog: ``r4t_fast.Catalog``, or ``(N, d)`` unit-norm item embeddings.
        encoder: a text encoder (``r4t_fast.encoders.TextEncoder``) with ``dim == d``.
        task: ``"oar"`` (composite, default), ``"wscr"`` (coverage of the ``reference`` column) or
            ``"mixed"`` (``mixed_weight * coverage + (1 - mixed_weight) * composite``); resolve
            ``"auto"`` first (:func:`build_reward` does).
        k: subqueries asked for per completion (the prompt's ``k``).
        weights: OAR weights ``(lg, ld, la)``.
        budget_per_row: WSCR items retrieved per subquery (``b``; ``K = k * b``).
        missing: how unwritten subqueries count: ``"query"`` (default; rows filled with the raw query, the
            ``r4t eval`` protocol), ``"zero"`` (factor ``n / k``) or ``"ignore"``.
        require_strict_format: also score 0 completions that parse but break the strict format.
        mixed_weight: ``w`` of ``task="mixed"`` / ``"soft-mixed"``, in ``[0, 1]``.
        copy_penalty: ``lambda`` in ``[0, 1]``: the reward of a scored completion loses
            ``lambda * c / k`` for its ``c`` subqueries that copy the title (:mod:`r4t_fast.fanout.copies`);
            0 (default) = off (copies are still counted: ``copy_rate``).
        soft_tau: temperature of the smooth coverage (tasks ``"soft"``, ``"soft-mixed"``; logged for
            every task with reference sets), cosine units ``> 0``.
        cache: optional :class:`r4t_fast.encoders.EmbeddingCache` for the encoder calls.
        query_key, reference_key: the dataset columns TRL passes (default ``"query"``, ``"reference"``).

    Calling it as TRL does, ``fn(prompts=..., completions=..., query=[...], **kwargs) -> list[float]``,
    scores the batch, stores the result in :attr:`last`, adds to the running counters :attr:`totals`, and
    when TRL passes ``log_metric`` logs ``r4t/<term>`` means (see :meth:`RewardBatch.summary`).

    Example::

        fn = RewardFunction(catalog, get_encoder("minilm"), k=10)
        trainer = GRPOTrainer(model, reward_funcs=[fn], train_dataset=ds_with_query_column, ...)
    """

    __name__ = "r4t_reward"  # TRL names reward columns after it

    def __init__(
        self,
        catalog: Any,
        encoder: Any,
        *,
        task: str = "oar",
        k: int = 10,
        weights: Sequence[float] = objectives.DEFAULT_WEIGHTS,
        budget_per_row: int = 10,
        missing: str = "query",
        require_strict_format: bool = False,
        mixed_weight: float = 0.5,
        copy_penalty: float = 0.0,
        soft_tau: float = objectives.SOFT_COVERAGE_TAU,
        cache: Any | None = None,
        query_key: str = "query",
        reference_key: str = "reference",
    ) -> None:
        self.task = check_choice(task, TASK_CHOICES[1:], "task (resolve 'auto' with resolve_task)")
        self.mixed_weight = check_float(mixed_weight, "mixed_weight", low=0.0, high=1.0)
        self.copy_penalty = check_float(copy_penalty, "copy_penalty", low=0.0, high=1.0)
        self.soft_tau = check_float(soft_tau, "soft_tau", low=0.0)
        if self.soft_tau <= 0.0:
            raise ValueError(f"soft_tau: expected a number > 0, got {soft_tau!r}")
        self.k = check_k(k)
        self.weights = _check_weights(weights)
        self.budget_per_row = check_positive_int(budget_per_row, "budget_per_row")
        self.missing = check_choice(missing, MISSING_CHOICES, "missing")
        self.require_strict_format = bool(require_strict_format)
        self._cat = _catalog_tensor(catalog)
        if not callable(getattr(encoder, "encode", None)) or not hasattr(encoder, "dim"):
            raise ValueError(f"encoder: expected a TextEncoder (.encode, .dim), got {type(encoder).__name__}")
        if int(encoder.dim) != self._cat.shape[1]:
            raise ValueError(
                f"encoder: expected dim == catalog dim ({self._cat.shape[1]}), "
                f"got encoder.dim = {encoder.dim}"
            )
        self.encoder = encoder
        self.cache = cache
        self.query_key = query_key
        self.reference_key = reference_key
        self.last: RewardBatch | None = None
        self.last_seconds = 0.0  # wall time of the last score() call (the RL step log's reward time)
        self.totals: dict[str, int] = {"completions": 0, "no_subquery": 0, "strict_format_failures": 0}

    def __repr__(self) -> str:
        return (
            f"RewardFunction(task={self.task!r}, k={self.k}, weights={self.weights}, "
            f"mixed_weight={self.mixed_weight}, copy_penalty={self.copy_penalty}, "
            f"catalog={tuple(self._cat.shape)}, encoder={getattr(self.encoder, 'name', self.encoder)!r})"
        )

    # -- scoring -------------------------------------------------------------------------------------
    def _encode(self, texts: list[str]) -> np.ndarray:
        from r4t_fast.data.encoders import encode_cached

        if not texts:
            return np.zeros((0, self._cat.shape[1]), dtype=np.float32)
        emb = np.asarray(encode_cached(self.encoder, texts, self.cache), dtype=np.float32)
        if emb.shape != (len(texts), self._cat.shape[1]):
            raise ValueError(
                f"encoder: returned shape {emb.shape} for {len(texts)} texts, expected "
                f"({len(texts)}, {self._cat.shape[1]})"
            )
        return emb

    def parse(self, text: Any) -> ParseResult:
        """Parse one completion (any object; non-text counts as a format failure, never raises)."""
        if not isinstance(text, str):
            return ParseResult([], False, "completion has no text", 0, "none", False)
        try:
            return parse_subqueries(text, self.k)
        except Exception as exc:  # the parser never raises on strings; guard training anyway
            return ParseResult([], False, f"parser error: {exc!r}", 0, "none", False)

    def score(
        self,
        completions: Sequence[Any],
        queries: Sequence[str],
        references: Sequence[Sequence[int]] | None = None,
    ) -> RewardBatch:
        """Score ``B`` completions against their queries (and reference sets for WSCR).

        One encoder call embeds every distinct subquery and query of the batch; one
        :func:`retrieve_candidates` call retrieves for every subquery (top-``budget_per_row`` for WSCR,
        top-1 otherwise).

        Args:
            completions: ``B`` completion texts (or TRL chat messages; anything else scores 0).
            queries: ``B`` query strings.
            references: ``B`` reference sets as catalog rows; required for the :data:`COVERAGE_TASKS`.
        """
        t_start = time.perf_counter()
        b = len(completions)
        if len(queries) != b:
            raise ValueError(f"queries: expected {b} queries (one per completion), got {len(queries)}")
        for i, q in enumerate(queries):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"queries[{i}]: expected a non-empty string, got {q!r}")
        if references is not None and len(references) != b:
            raise ValueError(f"references: expected {b} reference sets, got {len(references)}")
        if self.task in COVERAGE_TASKS and references is None:
            raise ValueError(f"references: required for task={self.task!r} (the dataset's reference column)")

        parses = [self.parse(completion_text(c)) for c in completions]
        subq = [list(p.queries[: self.k]) if p.ok else [] for p in parses]
        n = np.array([len(s) for s in subq], dtype=np.int64)
        parse_ok = n > 0
        format_ok = np.array([bool(p.format_ok) for p in parses], dtype=bool)
        scored = parse_ok & (format_ok if self.require_strict_format else True)

        nan = np.full(b, np.nan)
        g, d, a, cov, reward = nan.copy(), nan.copy(), nan.copy(), nan.copy(), np.zeros(b)
        soft, copies = nan.copy(), np.zeros(b, dtype=np.int64)
        idx = np.flatnonzero(parse_ok)
        if idx.size:
            if self.missing == "query":  # the one missing-row rule (r4t_fast.fanout.missing)
                rows_text = {i: fill_missing_rows(subq[i], queries[i], self.k) for i in idx}
            else:
                rows_text = {i: subq[i] for i in idx}
            lengths = np.array([len(rows_text[i]) for i in idx], dtype=np.int64)
            texts = [t for i in idx for t in rows_text[i]] + [queries[i] for i in idx]
            uniq = list(dict.fromkeys(texts))
            emb = self._encode(uniq)
            pos = {t: j for j, t in enumerate(uniq)}
            width = int(lengths.max())
            rows = np.zeros((idx.size, width, emb.shape[1]), dtype=np.float32)
            for r, i in enumerate(idx):
                rows[r, : lengths[r]] = emb[[pos[t] for t in rows_text[i]]]
            qemb = emb[[pos[queries[i]] for i in idx]]
            budget = self.budget_per_row if references is not None else 1
            cand = retrieve_candidates(rows, self._cat, budget)  # (m, width, budget): one kernel call
            terms = oar_reward(
                rows,
                qemb,
                self._cat,
                lengths=lengths,
                k=self.k,
                weights=self.weights,
                missing="zero" if self.missing == "zero" else "ignore",
                top1_ids=cand[..., 0],
            )
            g[idx], d[idx], a[idx] = terms.groundedness, terms.diversity, terms.alignment
            for r, i in enumerate(idx):  # the written subqueries come first in rows_text[i]
                copies[i] = int(copy_mask(subq[i], queries[i], rows[r, : n[i]], qemb[r]).sum())
            if references is not None:
                refs = [references[i] for i in idx]
                cov[idx] = wscr_coverage([cand[r, : lengths[r]] for r in range(idx.size)], refs)
                soft[idx] = soft_wscr_coverage(
                    rows, cand, self._cat, refs, lengths=lengths, tau=self.soft_tau
                )
            w = self.mixed_weight
            reward[idx] = {
                "wscr": lambda: cov[idx],
                "mixed": lambda: w * cov[idx] + (1.0 - w) * terms.reward,
                "soft": lambda: soft[idx],
                "soft-mixed": lambda: w * soft[idx] + (1.0 - w) * cov[idx],
                "oar": lambda: terms.reward,
            }[self.task]()
            reward[idx] -= self.copy_penalty * copies[idx] / self.k
        if references is not None:
            cov[~parse_ok] = 0.0
        reward[~scored] = 0.0
        batch = RewardBatch(
            reward=reward,
            groundedness=g,
            diversity=d,
            alignment=a,
            coverage=cov,
            n_subqueries=n,
            parse_ok=parse_ok,
            format_ok=format_ok,
            subqueries=subq,
            soft_coverage=soft if references is not None else None,
            n_copies=copies,
        )
        self.last = batch
        self.last_seconds = time.perf_counter() - t_start
        self.totals["completions"] += b
        self.totals["no_subquery"] += int((~parse_ok).sum())
        self.totals["strict_format_failures"] += int((~format_ok).sum())
        return batch

    # -- TRL entry point -----------------------------------------------------------------------------
    def __call__(
        self,
        prompts: Sequence[Any] | None = None,
        completions: Sequence[Any] | None = None,
        log_metric: Callable[[str, float], None] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        """TRL's reward-function protocol: returns one float per completion.

        The queries come from the ``query_key`` column (keyword argument), reference sets from
        ``reference_key`` (WSCR). Other keyword arguments TRL passes (``completion_ids``,
        ``trainer_state``, ``log_extra``, ...) are ignored.
        """
        if completions is None:
            raise ValueError("completions: required (TRL passes them as a keyword argument)")
        queries = kwargs.get(self.query_key)
        if queries is None:
            raise ValueError(
                f"{self.query_key}: missing; the training dataset needs a {self.query_key!r} column "
                "with the raw query of each prompt"
            )
        references = kwargs.get(self.reference_key)
        batch = self.score(list(completions), list(queries), references)
        if log_metric is not None:
            for key, value in batch.summary().items():
                if key != "reward" and not (isinstance(value, float) and math.isnan(value)):
                    log_metric(f"r4t/{key}", value)
        return [float(r) for r in batch.reward]


def build_reward(
    task: str,
    catalog: Any,
    encoder: Any,
    *,
    references: Sequence[Sequence[int]] | None = None,
    k: int = 10,
    weights: Sequence[float] = objectives.DEFAULT_WEIGHTS,
    mixed_weight: float = 0.5,
    budget_per_row: int = 10,
    missing: str = "query",
    require_strict_format: bool = False,
    copy_penalty: float = 0.0,
    soft_tau: float = objectives.SOFT_COVERAGE_TAU,
    cache: Any | None = None,
) -> RewardFunction:
    """The reward of ``task`` over ``catalog``: the one constructor RL, synthesis and evaluation call.

    ``task`` is one of :data:`TASK_CHOICES`; ``"auto"`` is resolved by :func:`resolve_task` from
    ``references`` (the reference sets, as catalog rows, of the training queries; ``None``: none known).
    Score with ``fn.score(completions, queries, references)`` or pass ``fn`` to TRL.
    """
    task = resolve_task(task, references)
    return RewardFunction(catalog, encoder, task=task, k=k, weights=weights, budget_per_row=budget_per_row,
                          missing=missing, require_strict_format=require_strict_format,
                          mixed_weight=mixed_weight, copy_penalty=copy_penalty, soft_tau=soft_tau,
                          cache=cache)  # fmt: skip
