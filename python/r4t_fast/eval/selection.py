"""Retrieval-time settings of a trained diffusion retriever, chosen on the validation split.

The pipeline's ``select`` stage (and anyone tuning a retriever) calls :func:`select_retrieval_settings`
on the **validation** split, never the test split. Two steps, each scored with the yardstick of
:func:`r4t_fast.eval.evaluation.evaluate` (same queries for every setting, item-level metrics, the fair
candidate budget):

1. **Quality settings** at the reference sampler (Heun, 16 steps = 31 network evaluations): every
   ``anchor`` (the query-anchored row's share of the candidate budget) × ``guidance`` × ``pull``; rule
   ``"recall"``: the one with the highest ``recall_at_fair`` is kept (ties: higher ``vendi``) -- which
   always takes the largest anchor offered; rule ``"rails"`` (issue 18): the highest ``recall_at_fair``
   among the settings within the guard rails against dense kNN and MMR scored on the same queries
   (:data:`DEFAULT_RAILS`), so diversity is not traded away for the query's own ranking.
2. **Fewest network evaluations**: at those settings, every ``(sampler, steps)`` of ``grid``; the one with
   the fewest NFE whose ``recall_at_fair`` and ``vendi`` are at least ``tolerance[0]`` / ``tolerance[1]``
   of the reference's and whose ``item_relevance`` is at least ``tolerance[2]`` of it (issue 12: 97 %,
   97 %, 99 %) is kept; the reference itself when none qualifies.

The result records every row scored, so the choice can be audited (``selection.json`` in a pipeline run).

A distilled model (``r4t distill``) is put through the same rule by :func:`select_distilled`: its
consistency steps (1 NFE each, guidance 0: the student learnt the teacher's guided ODE) against the
*teacher's* reference row, at the reference's anchor; the fewest steps that qualify are kept, or none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from r4t_fast._internal import check_choice, check_float

__all__ = [
    "DEFAULT_ANCHORS",
    "DEFAULT_CONSISTENCY_STEPS",
    "DEFAULT_GRID",
    "DEFAULT_GUIDANCES",
    "DEFAULT_RAILS",
    "choose_by_rails",
    "meets_fair_rails",
    "meets_tolerance",
    "rows_recall_scorer",
    "select_distilled",
    "select_retrieval_settings",
]

DEFAULT_ANCHORS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
"""Query-anchored row shares tried (0: no anchor row)."""
DEFAULT_GUIDANCES: tuple[float, ...] = (0.0, 1.0)
"""Classifier-free guidance strengths tried."""
DEFAULT_GRID: tuple[tuple[str, int], ...] = (
    ("heun", 16),
    ("heun", 8),
    ("dpmpp_2m", 8),
    ("heun", 4),
    ("dpmpp_2m", 4),
    ("dpmpp_2m", 2),
    ("euler", 1),
)
"""(sampler, steps) pairs tried for the fewest network evaluations; the first is the reference."""

_SETTINGS = (
    "sampler", "steps", "guidance", "anchor", "pull", "candidate_pull", "precision",
    "candidate_layout", "deep_share",
)  # fmt: skip
_LAYOUT = ("pull", "candidate_pull", "candidate_layout", "deep_share")  # carried from the reference setting

DEFAULT_RAILS: tuple[float, float, float] = (0.01, 0.08, 1.0)
"""Issue 18's guard rails of the ``"rails"`` rule: recall_at_fair at most 0.01 below dense kNN's,
item_relevance at most 0.08 below dense's, vendi at least 1.0 above MMR's."""

DEFAULT_CONSISTENCY_STEPS: tuple[int, ...] = (1, 2, 3, 4)
"""Consistency step counts of a distilled model tried by :func:`select_distilled`."""

_KEYS = ("recall_at_fair", "vendi", "item_relevance", "hit_at_fair", "row_groundedness", "recall@5000")


def choose_by_rails(
    rows: Sequence[dict[str, Any]],
    dense: dict[str, Any],
    mmr: dict[str, Any],
    rails: tuple[float, float, float] = DEFAULT_RAILS,
    deep_margin: float | None = None,
) -> tuple[int, str]:
    """Issue 18's guard-rail rule, the one home of it (the pipeline's ``select`` stage and
    ``benchmarks/frontier.py``): the index of the chosen row of ``rows`` (metric dicts scored on the same
    queries as ``dense`` and ``mmr``) and which tier chose it.

    Tier ``"all"``: among the rows with ``recall_at_fair >= dense - rails[0]``, ``item_relevance >= dense
    - rails[1]``, ``vendi >= mmr + rails[2]`` and, when ``deep_margin`` is given, ``recall@5000 >= dense +
    deep_margin``, the highest ``recall_at_fair`` (ties: higher ``vendi``); tier ``"fair"`` (no row clears
    the deep rail): among those meeting the first three, the highest ``recall@5000``; tier ``"none"``:
    the highest ``recall_at_fair + vendi / 100``.

    >>> d = {"recall_at_fair": 0.15, "item_relevance": 0.77, "recall@5000": 0.38}
    >>> m = {"vendi": 5.2}
    >>> rows = [{"recall_at_fair": 0.16, "item_relevance": 0.70, "vendi": 6.7, "recall@5000": 0.39},
    ...         {"recall_at_fair": 0.145, "item_relevance": 0.70, "vendi": 6.7, "recall@5000": 0.41}]
    >>> choose_by_rails(rows, d, m), choose_by_rails(rows, d, m, deep_margin=0.02)
    ((0, 'all'), (1, 'all'))
    """
    if not rows:
        raise ValueError("rows: needs at least one scored setting")

    def fair(r: dict[str, Any]) -> bool:
        return meets_fair_rails(r, dense, mmr, rails)

    def deep(r: dict[str, Any]) -> bool:
        if deep_margin is None:
            return True
        return (r.get("recall@5000") or 0.0) >= (dense.get("recall@5000") or 0.0) + deep_margin

    idx = range(len(rows))
    ok = [i for i in idx if fair(rows[i]) and deep(rows[i])]
    if ok:
        return max(ok, key=lambda i: (rows[i]["recall_at_fair"], rows[i]["vendi"])), "all"
    ok = [i for i in idx if fair(rows[i])]
    if ok:
        return max(ok, key=lambda i: rows[i].get("recall@5000") or 0.0), "fair"
    return max(idx, key=lambda i: rows[i]["recall_at_fair"] + rows[i]["vendi"] / 100), "none"


def meets_fair_rails(
    row: dict[str, Any], dense: dict[str, Any], mmr: dict[str, Any], rails: tuple[float, float, float]
) -> bool:
    """The first three rails of :func:`choose_by_rails` (the fair budget's): ``recall_at_fair >= dense -
    rails[0]``, ``item_relevance >= dense - rails[1]``, ``vendi >= mmr + rails[2]``."""
    return bool(
        row["recall_at_fair"] >= dense["recall_at_fair"] - rails[0]
        and row["item_relevance"] >= dense["item_relevance"] - rails[1]
        and row["vendi"] >= mmr["vendi"] + rails[2]
    )


def _score(retriever: Any, data: Any, split: str, limit: int | None, settings: dict[str, Any]) -> dict:
    from r4t_fast.diffusion.samplers import nfe
    from r4t_fast.eval.evaluation import evaluate

    saved = dict(retriever.defaults)
    retriever.defaults.update(settings)
    try:
        rec = evaluate(
            retriever,
            data.dataset,
            split,
            method_name="r4t-diffusion",
            data=data,
            limit=limit,
            latency_batch_sizes=(),
            n_boot=100,
            progress=False,
        )
    finally:
        retriever.defaults.clear()
        retriever.defaults.update(saved)
    row = {**settings, "nfe": nfe(settings["sampler"], settings["steps"]), "n_queries": rec["n_queries"]}
    row.setdefault("precision", saved.get("precision", "fp32"))
    row.update({k: rec["metrics"].get(k) for k in _KEYS})
    return row


def rows_recall_scorer(
    data: Any,
    *,
    split: str = "val",
    k: int = 10,
    sampling: dict[str, Any] | None = None,
    limit: int | None = None,
) -> Callable[[Any], float]:
    """``score(model) -> float``: the mean ``recall_at_fair`` of the set model's **rows alone** (anchor 0,
    no pull) on ``split``'s titled sets -- the early-stopping score of a training run
    (``DiffusionTrainConfig.select_every``). The rows' ranked candidates read round-robin into the fair
    union of exactly ``K = fair_budget(N, k)`` distinct items, as ``r4t eval``'s ``recall_at_fair``; eager
    sampling (the weights change between calls) with ``sampling`` (default: ``SAMPLING_DEFAULTS``)."""
    import numpy as np
    import torch

    from r4t_fast.data.datasets import query_text
    from r4t_fast.diffusion.retriever import Retriever
    from r4t_fast.diffusion.samplers import SAMPLING_DEFAULTS
    from r4t_fast.objectives import fair_budget, recall_at_k, round_robin_union

    if split == "test":
        raise ValueError("split: early stopping scores the validation split, not 'test'")
    by_id = {s.set_id: s for s in data.dataset.sets}
    sets = [by_id[i] for i in getattr(data.split, split) if by_id[i].query is not None][:limit]
    if not sets:
        raise ValueError(f"split: no titled sets in {split!r} to score the rows on")
    # Encoded in r4t eval's batches (64): each query's sampling noise is seeded from its embedding's
    # bytes, and a transformer encoder's output changes in the last bits with the batch it is padded in.
    texts = [query_text(s) for s in sets]
    q = torch.cat(
        [
            torch.from_numpy(np.asarray(data.encoder.encode(texts[i : i + 64]), dtype=np.float32))
            for i in range(0, len(texts), 64)
        ]
    )
    refs = [data.catalog.id_to_index(s.item_ids) for s in sets]
    big_k = fair_budget(len(data.catalog), k)
    opts = {**SAMPLING_DEFAULTS.as_dict(), **(sampling or {})}

    def score(model: Any) -> float:
        r = Retriever(model, data.catalog, data.encoder, **opts)
        # up to K candidates per row: overlapping rows still fill a union of exactly K distinct items
        n_cand = min(big_k, len(data.catalog))
        out = r.retrieve_embeddings(q, k, n_candidates=n_cand, anchor=0.0, pull=0.0, fused=False)
        unions = [round_robin_union(np.asarray(x.candidates), big_k) for x in out]
        return float(np.mean(recall_at_k(unions, refs)))

    return score


def _score_baseline(method: str, kwargs: dict | None, data: Any, split: str, limit: int | None) -> dict:
    from r4t_fast.eval.evaluation import evaluate

    rec = evaluate(method, data.dataset, split, data=data, limit=limit, method_kwargs=kwargs,
                   latency_batch_sizes=(), n_boot=100, progress=False)  # fmt: skip
    return {"method": method, "kwargs": kwargs, "n_queries": rec["n_queries"],
            **{k: rec["metrics"].get(k) for k in _KEYS}}  # fmt: skip


def meets_tolerance(row: dict[str, Any], ref: dict[str, Any], tol: Sequence[float]) -> bool:
    """The one rule of issue 12: ``row`` keeps ``tol[0]`` of ``ref``'s ``recall_at_fair``, ``tol[1]`` of its
    ``vendi`` and ``tol[2]`` of its ``item_relevance``."""
    return bool(
        row["recall_at_fair"] >= tol[0] * ref["recall_at_fair"]
        and row["vendi"] >= tol[1] * ref["vendi"]
        and row["item_relevance"] >= tol[2] * ref["item_relevance"]
    )


def _check_tolerance(tolerance: Sequence[float]) -> tuple[float, ...]:
    tol = tuple(check_float(t, "tolerance", low=0.0, high=1.0) for t in tolerance)
    if len(tol) != 3:
        raise ValueError(f"tolerance: expected 3 fractions, got {tolerance!r}")
    return tol


def select_retrieval_settings(
    retriever: Any,
    data: Any,
    *,
    split: str = "val",
    anchors: Sequence[float] = DEFAULT_ANCHORS,
    guidances: Sequence[float] = DEFAULT_GUIDANCES,
    grid: Sequence[tuple[str, int]] = DEFAULT_GRID,
    pulls: Sequence[float] = (0.0,),
    candidate_pulls: Sequence[float | None] = (None,),
    deep_shares: Sequence[float | None] = (),
    tolerance: tuple[float, float, float] = (0.97, 0.97, 0.99),
    limit: int | None = None,
    apply: bool = True,
    progress: bool = True,
    rule: str = "recall",
    rails: tuple[float, float, float] = DEFAULT_RAILS,
    deep_margin: float | None = None,
    mmr_lambda: float = 0.9,
    precisions: Sequence[str] = ("fp32", "bf16"),
) -> dict[str, Any]:
    """Choose ``anchor``, ``guidance``, ``sampler``, ``steps`` and ``precision`` for ``retriever`` on
    ``split`` (module doc).

    Args:
        retriever: a :class:`~r4t_fast.Retriever` whose catalog is ``data.catalog``.
        data: the :class:`~r4t_fast.data.prepare.EvalData` of the dataset.
        split: the split scored (``"val"``; refusing ``"test"`` keeps the test split for the report).
        anchors, guidances: the quality settings tried at the reference ``grid[0]``.
        pulls: query pulls (``Retriever.retrieve_embeddings(pull=...)``) tried with them; the default
            (0) keeps the model's rows. Recall rises with the pull while Vendi falls, so the highest-recall
            rule favours the largest pull offered: offer only pulls whose Vendi you accept.
        candidate_pulls: the candidate lists' own pulls (``Retriever`` ``candidate_pull``; None: the
            items' pull) tried with each pull; a pull equal to the candidate pull is tried once.
        deep_shares: with ``rule="rails"``, the ``"ranked"`` candidate layout (``Retriever``
            ``candidate_layout``; its fair-budget metrics are the ``"rows"`` layout's) is scored at each of
            these ``deep_share`` values (None: the anchor's share) for every setting that meets the fair
            rails, and competes in the rule beside it; empty (the default): the ``"rows"`` layout only.
        grid: ``(sampler, steps)`` pairs; ``grid[0]`` is the reference.
        tolerance: fractions of the reference's ``recall_at_fair``, ``vendi``, ``item_relevance``.
        limit: score only the first ``limit`` queries of the split.
        apply: store the choice in ``retriever.defaults``.
        rule: how step 1 picks the quality setting. ``"recall"``: the highest ``recall_at_fair`` (ties:
            higher ``vendi``). ``"rails"`` (issue 18): dense kNN and MMR (``mmr_lambda``) are scored on the
            same queries; among the settings with ``recall_at_fair >= dense - rails[0]``,
            ``item_relevance >= dense - rails[1]`` and ``vendi >= MMR + rails[2]``, the highest
            ``recall_at_fair``; when none meets them, the highest ``recall_at_fair + vendi / 100``.
        deep_margin: with ``rule="rails"``, also ask ``recall@5000 >= dense + deep_margin`` (the paper's
            budget; :func:`choose_by_rails`); None: no deep rail.
        precisions: the grid runs at ``precisions[0]``; each other precision (``"bf16"``: the fused
            sampler's bf16 GEMMs, faster) is scored at the chosen setting and taken when it meets
            ``tolerance`` of that setting's row (the first that does).

    Returns:
        ``{"chosen": {...}, "reference": row, "rows": [...], "rule": str, "split": split}``.
    """
    if split == "test":
        raise ValueError("split: settings are chosen on the validation split, not 'test'")
    deep_shares = list(dict.fromkeys(deep_shares))
    if not anchors or not guidances or not grid or not pulls or not candidate_pulls:
        raise ValueError("anchors, guidances, grid, pulls, candidate_pulls: each needs at least one value")
    tol = _check_tolerance(tolerance)
    check_choice(rule, ("recall", "rails"), "rule")
    from r4t_fast.diffusion.options import PRECISIONS

    if not precisions or any(p not in PRECISIONS for p in precisions):
        raise ValueError(f"precisions: expected a non-empty list of 'fp32' / 'bf16', got {precisions!r}")
    if retriever.model.cfg.cond_dim != retriever.model.cfg.dim:
        # anchor row and pulls need the query in the rows' space
        anchors, pulls, candidate_pulls = (0.0,), (0.0,), (None,)
    ref_sampler, ref_steps = grid[0]
    rows: list[dict[str, Any]] = []

    def log(row: dict[str, Any]) -> None:
        rows.append(row)
        if progress:
            shown = {k: row[k] for k in _SETTINGS}
            print(
                f"[select] {shown}: recall_at_fair {row['recall_at_fair']:.4f} vendi {row['vendi']:.3f} "
                f"item_relevance {row['item_relevance']:.4f}",
                flush=True,
            )

    quality = []
    for a in anchors:
        for w in guidances:
            for pl, cp in dict.fromkeys(
                (float(pl), None if cp is None or float(cp) == float(pl) else float(cp))
                for pl in pulls
                for cp in candidate_pulls
            ):
                s = {"sampler": ref_sampler, "steps": ref_steps, "guidance": float(w), "anchor": float(a)}
                s.update(pull=pl, candidate_pull=cp, precision=precisions[0])
                s.update(candidate_layout="rows", deep_share=None)
                row = _score(retriever, data, split, limit, s)
                log(row)
                quality.append(row)
    baselines: dict[str, dict[str, Any]] = {}
    if rule == "recall":
        ref = max(quality, key=lambda r: (r["recall_at_fair"], r["vendi"]))
        rule_text = f"anchor x guidance: the highest recall_at_fair at {ref_sampler} {ref_steps} steps"
    else:
        dense = baselines["dense"] = _score_baseline("dense", None, data, split, limit)
        mmr = baselines["mmr"] = _score_baseline("mmr", {"lambda_": mmr_lambda}, data, split, limit)
        # the ranked layout changes only the deep budget: traced where the fair rails are met
        for row in [r for r in quality if meets_fair_rails(r, dense, mmr, rails)] if deep_shares else []:
            for ds in deep_shares if row["anchor"] > 0 else [None]:
                s = {k: row[k] for k in _SETTINGS} | {"candidate_layout": "ranked", "deep_share": ds}
                log(ranked := _score(retriever, data, split, limit, s))
                quality.append(ranked)
        i, tier = choose_by_rails(quality, dense, mmr, rails, deep_margin)
        ref = quality[i]
        deep = "" if deep_margin is None else f" and recall@5000 >= dense + {deep_margin:g}"
        layouts = (
            f" x ranked layout at deep shares {deep_shares} where the fair rails hold" if deep_shares else ""
        )
        rule_text = (
            f"anchor x guidance x pull x candidate pull{layouts} at {ref_sampler} {ref_steps} steps: "
            f"among the settings with recall_at_fair >= dense - {rails[0]:g}, item_relevance >= dense - "
            f"{rails[1]:g}, vendi >= MMR(lambda {mmr_lambda:g}) + {rails[2]:g}{deep} on the same queries, "
            "the highest recall_at_fair; without one, among those meeting the fair rails the highest "
            f"recall@5000; else the highest recall_at_fair + vendi / 100 (chosen by tier {tier!r})"
        )
    best = ref
    for sampler, steps in grid[1:]:
        s = {"sampler": sampler, "steps": steps, "guidance": ref["guidance"], "anchor": ref["anchor"]}
        s.update({k: ref[k] for k in _LAYOUT}, precision=precisions[0])
        row = _score(retriever, data, split, limit, s)
        log(row)
        ok = row["meets_tolerance"] = meets_tolerance(row, ref, tol)
        if ok and row["nfe"] < best["nfe"]:
            best = row
    at = best
    for prec in precisions[1:]:
        row = _score(retriever, data, split, limit, {**{k: at[k] for k in _SETTINGS}, "precision": prec})
        log(row)
        row["meets_tolerance"] = meets_tolerance(row, at, tol)
        if row["meets_tolerance"] and best is at:
            best = row
    chosen = {k: best[k] for k in _SETTINGS}
    if apply:
        retriever.defaults.update(chosen)
    return {
        "split": split,
        "chosen": chosen,
        "reference": ref,
        "rows": rows,
        "baselines": baselines,
        "rule": (
            f"{rule_text}; then the fewest NFE with recall_at_fair >= {tol[0]:.0%}, vendi >= {tol[1]:.0%} "
            f"and item_relevance >= {tol[2]:.0%} of that reference; then precision "
            f"{' / '.join(precisions[1:]) or '-'} in place of {precisions[0]} when it meets the same "
            "tolerance of that choice"
        ),
    }


def select_distilled(
    student: Any,
    data: Any,
    reference: dict[str, Any],
    *,
    split: str = "val",
    steps: Sequence[int] = DEFAULT_CONSISTENCY_STEPS,
    tolerance: tuple[float, float, float] = (0.97, 0.97, 0.99),
    limit: int | None = None,
    apply: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """The fewest consistency ``steps`` of the distilled ``student`` retriever whose quality on ``split``
    meets ``tolerance`` of the teacher's ``reference`` row (``select_retrieval_settings(...)["reference"]``),
    sampled at guidance 0 and the reference's ``anchor``.

    Returns ``{"chosen": {...} | None, "reference": reference, "rows": [...], "rule": str, "split": split}``;
    with ``apply`` and a qualifying point, ``student.defaults`` takes the choice. ``n_queries`` of every
    row must equal the reference's (same queries)."""
    if split == "test":
        raise ValueError("split: settings are chosen on the validation split, not 'test'")
    if not steps:
        raise ValueError("steps: needs at least one consistency step count")
    tol = _check_tolerance(tolerance)
    missing = {"recall_at_fair", "vendi", "item_relevance", "nfe", "anchor"} - set(reference)
    if missing:
        raise ValueError(f"reference: a row of select_retrieval_settings, missing {sorted(missing)}")
    rows: list[dict[str, Any]] = []
    best = None
    for n in sorted(int(x) for x in steps):
        s = {"sampler": "consistency", "steps": n, "guidance": 0.0, "anchor": float(reference["anchor"])}
        s["pull"] = float(reference.get("pull", 0.0))
        s["candidate_pull"] = reference.get("candidate_pull")
        s["candidate_layout"] = reference.get("candidate_layout", "rows")
        s["deep_share"] = reference.get("deep_share")
        s["precision"] = str(reference.get("precision", "fp32"))
        row = _score(student, data, split, limit, s)
        if row["n_queries"] != reference.get("n_queries", row["n_queries"]):
            raise ValueError(
                f"reference: scored on {reference['n_queries']} queries, the student on {row['n_queries']}"
            )
        row["meets_tolerance"] = meets_tolerance(row, reference, tol)
        rows.append(row)
        if progress:
            print(
                f"[select-distilled] consistency {n}: recall_at_fair {row['recall_at_fair']:.4f} vendi "
                f"{row['vendi']:.3f} item_relevance {row['item_relevance']:.4f} "
                f"meets {row['meets_tolerance']}",
                flush=True,
            )
        if row["meets_tolerance"] and best is None and row["nfe"] < reference["nfe"]:
            best = row
    chosen = None if best is None else {k: best[k] for k in _SETTINGS}
    if apply and chosen is not None:
        student.defaults.update(chosen)
    return {
        "split": split,
        "chosen": chosen,
        "reference": reference,
        "rows": rows,
        "rule": (
            f"the fewest consistency steps with recall_at_fair >= {tol[0]:.0%}, vendi >= {tol[1]:.0%} and "
            f"item_relevance >= {tol[2]:.0%} of the teacher's reference ({reference.get('sampler')} "
            f"{reference.get('steps')} steps, {reference['nfe']} NFE)"
        ),
    }
