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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from r4t_fast import objectives
from r4t_fast._internal import check_choice, check_float, check_k, check_positive_int
from r4t_fast.fanout.missing import fill_missing_rows
from r4t_fast.fanout.parser import ParseResult, parse_subqueries

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
    "wscr_coverage",
]

TASK_CHOICES = ("auto", "oar", "wscr", "mixed")
"""Reward regimes: ``"oar"`` (composite of the three properties), ``"wscr"`` (reference-set coverage),
``"mixed"`` (``w * coverage + (1 - w) * composite``) and ``"auto"`` (:func:`resolve_task`)."""

MISSING_CHOICES = ("query", "zero", "ignore")
"""How subqueries the completion did not write count (module docstring): fill with the raw query
(``"query"``, the ``r4t eval`` protocol), score 0 (``"zero"``: factor ``n / k``) or ``"ignore"``."""

OAR_MISSING_CHOICES = ("zero", "ignore")
"""``missing`` of :func:`oar_reward`, which sees embeddings only (the ``"query"`` fill happens on text)."""


# ----------------------------------------------------------------------------------------------------
# input helpers
# ----------------------------------------------------------------------------------------------------
def _catalog_tensor(catalog: Any) -> torch.Tensor:
    """``(N, d)`` float32/float16 CPU-or-device tensor of a Catalog, tensor or array; validated."""
    emb = getattr(catalog, "embeddings", catalog)
    if isinstance(emb, np.ndarray):
        emb = torch.from_numpy(np.ascontiguousarray(emb))
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or not emb.is_floating_point():
        got = f"{type(emb).__name__} {tuple(getattr(emb, 'shape', ()))}"
        raise ValueError(f"catalog: expected a (N, dim) float array or an object with .embeddings, got {got}")
    if emb.shape[0] < 1:
        raise ValueError(f"catalog: expected at least one item, got shape {tuple(emb.shape)}")
    if emb.dtype not in (torch.float32, torch.float16):
        emb = emb.to(torch.float32)
    if not bool(torch.isfinite(emb).all()):
        raise ValueError("catalog: embeddings contain NaN or inf")
    return emb.contiguous()


def _check_weights(weights: Sequence[float]) -> tuple[float, float, float]:
    objectives.composite(0.0, 0.0, 0.0, weights)  # validates: 3 finite numbers, error names `weights`
    return (float(weights[0]), float(weights[1]), float(weights[2]))


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


# ----------------------------------------------------------------------------------------------------
# pure reward functions
# ----------------------------------------------------------------------------------------------------
def retrieve_candidates(rows: Any, catalog: Any, budget: int = 1) -> np.ndarray:
    """The dense retriever: top-``budget`` catalog rows of every subquery by inner product, one kernel call.

    ``ids[..., j]`` = the ``j``-th best ``c`` by ``<e(q), e(c)>`` (cosine for unit-norm embeddings), ties
    by ascending catalog row, ``-1`` past the catalog size (see :func:`r4t_fast.ops.knn`).

    Args:
        rows: ``(..., d)`` subquery embeddings (any leading shape; flattened into one batch).
        catalog: ``(N, d)`` embeddings or an object with ``.embeddings`` (e.g. ``r4t_fast.Catalog``).
        budget: items per subquery, ``b >= 1``.

    Returns:
        int64 ``(..., budget)`` numpy array.

    >>> import numpy as np
    >>> rows = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    >>> retrieve_candidates(rows, np.eye(2, dtype=np.float32)).tolist()
    [[1], [0]]
    """
    from r4t_fast.kernels import ops

    budget = check_positive_int(budget, "budget")
    cat = _catalog_tensor(catalog)
    r = torch.as_tensor(np.asarray(rows, dtype=np.float32)) if not isinstance(rows, torch.Tensor) else rows
    r = r.detach().to(device=cat.device, dtype=torch.float32)
    if r.ndim < 1 or r.shape[-1] != cat.shape[1]:
        raise ValueError(f"rows: expected (..., {cat.shape[1]}) to match the catalog, got {tuple(r.shape)}")
    lead = tuple(r.shape[:-1])
    flat = r.reshape(-1, r.shape[-1]).contiguous()
    if flat.shape[0] == 0:
        return np.zeros((*lead, budget), dtype=np.int64)
    _, ids = ops.knn(flat, cat, budget, metric="ip", check_finite=True)
    return ids.cpu().numpy().astype(np.int64).reshape(*lead, budget)


@dataclass(frozen=True)
class OARTerms:
    """OAR reward terms of a batch of fan-outs (each ``(B,)`` float64).

    Attributes:
        reward: ``R = scale * composite(g, d, a)``, ``scale = n / k`` (``missing="zero"``) or 1.
        groundedness, diversity, alignment: the ``[0, 1]`` terms over the ``n`` written subqueries.
        scale: the completeness factor applied to the composite.
    """

    reward: np.ndarray
    groundedness: np.ndarray
    diversity: np.ndarray
    alignment: np.ndarray
    scale: np.ndarray


def oar_reward(
    subquery_emb: Any,
    query_emb: Any,
    catalog: Any,
    *,
    lengths: Any | None = None,
    k: int | None = None,
    weights: Sequence[float] = objectives.DEFAULT_WEIGHTS,
    missing: str = "zero",
    top1_ids: Any | None = None,
) -> OARTerms:
    """OAR composite reward of ``B`` fan-outs: ``R = (n/k) * (lg*r_ground + ld*r_div + la*r_align)``.

    ``r_ground``, ``r_div``, ``r_align`` are :func:`r4t_fast.objectives.groundedness`,
    :func:`~r4t_fast.objectives.diversity` (of the top-1 retrieved item of each subquery) and
    :func:`~r4t_fast.objectives.alignment` in their ``[0, 1]`` forms, combined by
    :func:`~r4t_fast.objectives.composite`; see the module docstring for the formulas.

    Args:
        subquery_emb: ``(B, L, d)`` subquery embeddings (padded; the first ``lengths[b]`` rows count).
        query_emb: ``(B, d)`` query embeddings.
        catalog: ``(N, d)`` item embeddings or an object with ``.embeddings``.
        lengths: ``(B,)`` written subqueries ``n`` per fan-out, ``1 <= n <= L`` (default ``L``).
        k: subqueries asked for (default ``L``); ``n > k`` is an error.
        weights: ``(lg, ld, la)``, default the paper's ``(0.6, 0.2, 0.2)``.
        missing: ``"zero"`` (default, scale ``n / k``) or ``"ignore"`` (scale 1).
        top1_ids: optional ``(B, L)`` top-1 catalog rows already retrieved (else one
            :func:`retrieve_candidates` call).

    >>> import numpy as np
    >>> cat = np.eye(3, dtype=np.float32)               # three orthogonal items
    >>> rows = np.eye(3, dtype=np.float32)[None, :2]     # two subqueries, each exactly an item
    >>> t = oar_reward(rows, np.array([[1.0, 1.0, 0.0]]), cat, k=2)
    >>> float(t.groundedness[0]), float(t.diversity[0]), round(float(t.alignment[0]), 4)
    (1.0, 1.0, 0.8536)
    >>> round(float(t.reward[0]), 4)                     # 0.6*1 + 0.2*1 + 0.2*0.8536
    0.9707
    >>> round(float(oar_reward(rows, np.array([[1.0, 1.0, 0.0]]), cat, k=4).reward[0]), 4)   # 2 of 4
    0.4854
    """
    weights = _check_weights(weights)
    missing = check_choice(missing, OAR_MISSING_CHOICES, "missing")
    if isinstance(subquery_emb, torch.Tensor):
        subquery_emb = subquery_emb.detach().cpu().to(torch.float64).numpy()
    x = np.asarray(subquery_emb, dtype=np.float64)
    if x.ndim != 3 or x.shape[1] < 1:
        raise ValueError(f"subquery_emb: expected shape (B, L, d) with L >= 1, got {x.shape}")
    b, width, _ = x.shape
    n = np.full(b, width, np.int64) if lengths is None else np.asarray(lengths, np.int64).reshape(-1)
    if n.shape != (b,) or (n < 1).any() or (n > width).any():
        raise ValueError(f"lengths: expected {b} ints in [1, {width}], got {np.asarray(lengths).tolist()}")
    k = width if k is None else check_positive_int(k, "k")
    if (n > k).any():
        raise ValueError(f"lengths: expected at most k = {k} subqueries per fan-out, got {int(n.max())}")
    cat = _catalog_tensor(catalog)
    if top1_ids is None:
        top1 = retrieve_candidates(x.astype(np.float32), cat, 1)[..., 0]
    else:
        top1 = np.asarray(top1_ids, dtype=np.int64)
        if top1.shape != (b, width):
            raise ValueError(f"top1_ids: expected shape ({b}, {width}), got {top1.shape}")
    valid = np.arange(width)[None, :] < n[:, None]
    safe = np.where(valid & (top1 >= 0), top1, 0)
    items = cat[torch.from_numpy(safe.reshape(-1)).to(cat.device)].to(torch.float64).cpu().numpy()
    items = items.reshape(b, width, -1)
    g = objectives.groundedness(x, cat, lengths=n)
    d = objectives.diversity(items, lengths=n)
    a = objectives.alignment(x, np.asarray(query_emb, dtype=np.float64), lengths=n)
    scale = n / k if missing == "zero" else np.ones(b)
    r = scale * objectives.composite(g, d, a, weights)
    return OARTerms(
        reward=np.asarray(r, dtype=np.float64),
        groundedness=np.asarray(g, dtype=np.float64),
        diversity=np.asarray(d, dtype=np.float64),
        alignment=np.asarray(a, dtype=np.float64),
        scale=np.asarray(scale, dtype=np.float64),
    )


def wscr_coverage(candidates: Sequence[Any], references: Sequence[Any]) -> np.ndarray:
    """WSCR reward ``R = |Y ∩ R(Q)| / |Y|`` per fan-out, ``R(Q)`` = union of every subquery's candidates.

    Args:
        candidates: per fan-out, an ``(n, b)`` int array: the top-``b`` catalog rows of each of its ``n``
            written subqueries (``-1`` entries are ignored; ``n = 0`` rows retrieve nothing).
        references: per fan-out, the reference set ``Y`` as catalog rows (non-empty).

    Returns:
        ``(B,)`` float64 (:func:`r4t_fast.objectives.recall_at_k` over
        :func:`r4t_fast.objectives.union_candidates`).

    >>> import numpy as np
    >>> wscr_coverage([np.array([[1, 2], [3, 1]]), np.zeros((0, 2), np.int64)], [{1, 3, 7, 9}, {1}])
    array([0.5, 0. ])
    """
    if len(candidates) != len(references):
        raise ValueError(
            f"references: expected one reference set per fan-out ({len(candidates)}), got {len(references)}"
        )
    retrieved = []
    for i, c in enumerate(candidates):
        arr = np.asarray(c)
        if arr.ndim != 2 or (arr.size and arr.dtype.kind not in "iu"):
            raise ValueError(f"candidates[{i}]: expected integer ids of shape (n, b), got {arr.shape}")
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            retrieved.append(np.zeros(0, dtype=np.int64))
        else:
            retrieved.append(objectives.union_candidates(arr.astype(np.int64), arr.shape[1]))
    refs = [[int(j) for j in y] for y in references]
    return objectives.recall_at_k(retrieved, refs)


def resolve_task(task: str, references: Sequence[Sequence[int]] | None) -> str:
    """The concrete reward regime of ``task``: ``"auto"`` is ``"wscr"`` when ``references`` (one reference
    set per training query) is given and every set is non-empty, else ``"oar"``; other tasks are returned
    as they are (``"wscr"`` / ``"mixed"`` without reference sets are errors).

    >>> resolve_task("auto", [[1, 2], [3]]), resolve_task("auto", [[1], []]), resolve_task("auto", None)
    ('wscr', 'oar', 'oar')
    """
    task = check_choice(task, TASK_CHOICES, "task")
    has_refs = references is not None and len(references) > 0 and all(len(y) > 0 for y in references)
    if task == "auto":
        return "wscr" if has_refs else "oar"
    if task in ("wscr", "mixed") and references is not None and not has_refs:
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

    def summary(self) -> dict[str, float]:
        """Batch means for logging: ``reward``, terms over parsed completions, ``usable_subqueries``,
        ``no_subquery_rate`` and ``strict_format_failure_rate``.

        Terms with no parsed completion in the batch are ``nan``.
        """

        def mean(v: np.ndarray) -> float:
            v = v[np.isfinite(v)]
            return float(v.mean()) if v.size else float("nan")

        usable = mean(self.n_subqueries.astype(np.float64))
        no_subquery = float(1.0 - self.parse_ok.mean()) if self.parse_ok.size else float("nan")
        return {
            "reward": mean(self.reward),
            "groundedness": mean(self.groundedness),
            "diversity": mean(self.diversity),
            "alignment": mean(self.alignment),
            "coverage": mean(self.coverage),
            "usable_subqueries": usable,
            "no_subquery_rate": no_subquery,
            "strict_format_failure_rate": mean(1.0 - self.format_ok.astype(np.float64)),
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
        mixed_weight: ``w`` of ``task="mixed"``, in ``[0, 1]``.
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
        cache: Any | None = None,
        query_key: str = "query",
        reference_key: str = "reference",
    ) -> None:
        self.task = check_choice(task, TASK_CHOICES[1:], "task (resolve 'auto' with resolve_task)")
        self.mixed_weight = check_float(mixed_weight, "mixed_weight", low=0.0, high=1.0)
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
        self.totals: dict[str, int] = {"completions": 0, "no_subquery": 0, "strict_format_failures": 0}

    def __repr__(self) -> str:
        return (
            f"RewardFunction(task={self.task!r}, k={self.k}, weights={self.weights}, "
            f"mixed_weight={self.mixed_weight}, "
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
            references: ``B`` reference sets as catalog rows; required for ``task="wscr"``.
        """
        b = len(completions)
        if len(queries) != b:
            raise ValueError(f"queries: expected {b} queries (one per completion), got {len(queries)}")
        for i, q in enumerate(queries):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"queries[{i}]: expected a non-empty string, got {q!r}")
        if references is not None and len(references) != b:
            raise ValueError(f"references: expected {b} reference sets, got {len(references)}")
        if self.task != "oar" and references is None:
            raise ValueError(f"references: required for task={self.task!r} (the dataset's reference column)")

        parses = [self.parse(completion_text(c)) for c in completions]
        subq = [list(p.queries[: self.k]) if p.ok else [] for p in parses]
        n = np.array([len(s) for s in subq], dtype=np.int64)
        parse_ok = n > 0
        format_ok = np.array([bool(p.format_ok) for p in parses], dtype=bool)
        scored = parse_ok & (format_ok if self.require_strict_format else True)

        nan = np.full(b, np.nan)
        g, d, a, cov, reward = nan.copy(), nan.copy(), nan.copy(), nan.copy(), np.zeros(b)
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
            if references is not None:
                cov[idx] = wscr_coverage(
                    [cand[r, : lengths[r]] for r in range(idx.size)], [references[i] for i in idx]
                )
            if self.task == "wscr":
                reward[idx] = cov[idx]
            elif self.task == "mixed":
                reward[idx] = self.mixed_weight * cov[idx] + (1.0 - self.mixed_weight) * terms.reward
            else:
                reward[idx] = terms.reward
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
        )
        self.last = batch
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
                          mixed_weight=mixed_weight, cache=cache)  # fmt: skip
