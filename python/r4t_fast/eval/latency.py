"""Latency of a retriever: the median wall time per query of ``retrieve(queries, k)`` over at least
``MIN_LATENCY_CALLS`` timed calls per batch size, after a warm-up call, with its spread
(:func:`measure_latency`); where the time of a diffusion query goes (:func:`diffusion_breakdown`); and
the record's ``latency_*`` fields built from them (:func:`latency_record`, used by
:func:`r4t_fast.eval.evaluation.evaluate`).

Every method -- dense, MMR, DPP, the LLM fan-outs, the diffusion retriever -- is timed with the same
protocol, so the numbers compare. The diffusion breakdown times the retriever's three parts separately
with the retriever's own settings: the text encoder (``retriever.encoder.encode``), the sampler
(:func:`r4t_fast.diffusion.samplers.generate_sets` with ``retriever.defaults``) and the grounding
(:func:`r4t_fast.kernels.ops.ground_sets` on the generated rows against the retriever's catalog); the
ranking of grounded rows and the building of the results are the remainder of ``retrieve``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_LATENCY_BATCHES",
    "MIN_LATENCY_CALLS",
    "diffusion_breakdown",
    "embedding_latency",
    "embedding_latency_interleaved",
    "latency_record",
    "measure_latency",
    "measure_latency_interleaved",
]

DEFAULT_LATENCY_BATCHES = (1, 8, 64)
MIN_LATENCY_CALLS = 8
"""Timed calls per batch size (after a warm-up call), for every method."""

PROTOCOL = (
    "median wall time of retrieve(batch, k) per query over >= {calls} timed calls per batch size, "
    "n_candidates=0, after one untimed warm-up call at that batch size; batches cycle through the "
    "evaluated queries; spread = p25/p75/min/max of the per-call ms per query"
)


def _sync(device: Any) -> None:
    try:
        import torch

        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
    except (ImportError, RuntimeError, TypeError):  # no torch / not a device: nothing to wait for
        pass


def _spread(ms_per_query: Sequence[float]) -> dict[str, float]:
    v = np.asarray(ms_per_query, dtype=np.float64)
    p25, med, p75 = np.quantile(v, [0.25, 0.5, 0.75])
    return {
        "median": float(med),
        "p25": float(p25),
        "p75": float(p75),
        "min": float(v.min()),
        "max": float(v.max()),
    }


def _calls(calls: int | dict[int, int] | None, b: int) -> int:
    if calls is None:
        return MIN_LATENCY_CALLS
    if isinstance(calls, dict):
        return max(1, int(calls.get(b, MIN_LATENCY_CALLS)))
    return max(1, int(calls))


class TimedEncoder:
    """A text encoder's proxy that adds the wall seconds of every ``encode`` call to :attr:`seconds`
    (every other attribute is the encoder's); swapped in by :func:`measure_latency` for the breakdown."""

    def __init__(self, encoder: Any) -> None:
        self._encoder = encoder
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)

    def encode(self, texts: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self._encoder.encode(texts, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


class PrecomputedEncoder:
    """A text encoder's proxy that answers ``encode`` from embeddings computed once for ``texts`` (any
    other text goes to the encoder): a retriever then runs from query embeddings, with the code path of
    its text entry point (:func:`embedding_latency`)."""

    def __init__(self, encoder: Any, texts: Sequence[str]) -> None:
        self._encoder = encoder
        uniq = list(dict.fromkeys(texts))
        emb = np.asarray(encoder.encode(uniq), dtype=np.float32)
        self._rows = {t: emb[i] for i, t in enumerate(uniq)}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)

    def encode(self, texts: Any, *args: Any, **kwargs: Any) -> np.ndarray:
        texts = list(texts)
        if all(t in self._rows for t in texts):
            return np.stack([self._rows[t] for t in texts])
        return self._encoder.encode(texts, *args, **kwargs)


@contextlib.contextmanager
def swapped_encoder(retriever: Any, proxy: Any) -> Iterator[Any]:
    """Use ``proxy`` as ``retriever.encoder`` inside the block (restored after, also on error)."""
    old = retriever.encoder
    retriever.encoder = proxy
    try:
        yield proxy
    finally:
        retriever.encoder = old


def _llm_counters(retriever: Any) -> tuple[float, float, float]:
    """(seconds in the policy's generate, tokens generated, positions decoded) so far: an LLM baseline's
    ``stats``."""
    st = getattr(retriever, "stats", None)
    if not isinstance(st, dict) or "generate_s" not in st:
        return 0.0, 0.0, 0.0
    return float(st["generate_s"]), float(st.get("generated_tokens", 0)), float(st.get("decode_positions", 0))


class _Cycle:
    """Batches of ``b`` queries, cycling through the pool."""

    def __init__(self, pool: Sequence[str]) -> None:
        if not pool:
            raise ValueError("queries: expected at least one query for the latency measurement")
        self.pool = list(pool)
        self.cursor = 0

    def take(self, b: int) -> list[str]:
        out = [self.pool[(self.cursor + i) % len(self.pool)] for i in range(b)]
        self.cursor += b
        return out


def measure_latency(
    retriever: Any,
    queries: Sequence[str],
    k: int,
    batch_sizes: Sequence[int] = DEFAULT_LATENCY_BATCHES,
    calls: int | dict[int, int] | None = None,
    *,
    prior_times: dict[int, list[float]] | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Median wall time per query of ``retriever.retrieve(batch, k)`` at each batch size.

    Per batch size ``B``: one untimed warm-up call, then ``calls`` timed calls (default
    ``MIN_LATENCY_CALLS``), batches filled by cycling through ``queries``. A retriever with an int
    ``batch_size`` attribute (the LLM baselines' generation batch) has it set to ``B`` during the
    measurement, so a batch of ``B`` queries is one forward batch.

    Args:
        retriever: object with ``retrieve(query_texts, k, *, n_candidates=0)``.
        queries: the query pool (non-empty).
        k: set size.
        batch_sizes: batch sizes to time.
        calls: timed calls per batch size: an int for all or ``{batch: calls}``.
        prior_times: ``{batch: [seconds, ...]}`` of calls already timed elsewhere (the quality run's
            full batches of an LLM method); they count towards ``calls`` and replace the warm-up.

    Returns:
        ``({str(B): median ms per query}, {str(B): {"calls", "queries", "batch_ms", "median", "p25",
        "p75", "min", "max", "parts_ms"}})`` (the spread in ms per query). ``parts_ms`` (fresh calls only):
        the median ms per query spent in the text encoder (``encode``: the queries, and an LLM method's
        subqueries; a retriever with an ``encoder``), in the policy's generate (``generate``, LLM methods,
        with ``tokens_per_s`` and ``positions_per_s``: decoded positions, padding included) and in the
        rest (``rest``: search / sampling, grounding, assembling).
    """
    prior = {"_": prior_times} if prior_times else None
    out = measure_latency_interleaved({"_": retriever}, queries, k, batch_sizes, calls, prior_times=prior)
    return out["_"]


def measure_latency_interleaved(
    retrievers: dict[str, Any],
    queries: Sequence[str],
    k: int,
    batch_sizes: Sequence[int] = DEFAULT_LATENCY_BATCHES,
    calls: int | dict[int, int] | None = None,
    *,
    prior_times: dict[str, dict[int, list[float]]] | None = None,
    block: int | None = None,
    warmup: int = 1,
) -> dict[str, tuple[dict[str, float], dict[str, Any]]]:
    """:func:`measure_latency` for several retrievers at once, their timed calls interleaved, so that the
    machine's drift falls on each alike; ``{name: measure_latency's (ms, detail)}``. Every retriever gets
    the same batches of queries in the same order.

    ``block=None``: at each batch size every retriever makes its warm-up call, then timed call ``i`` of
    every retriever (in the dict's order) comes before call ``i + 1`` of any -- for methods whose calls
    take seconds (the LLM fan-outs). ``block=n``: rounds in which every retriever in turn makes
    ``warmup`` untimed calls (its own data back in the caches: a batch-1 dense search takes ~7 calls to
    get its 29 MB catalog back into the L3 after another method ran) and then ``n`` timed calls -- for
    millisecond methods, each timed in its steady state (call-by-call alternation would time each in
    the state the other left). ``prior_times``: ``{name: {batch: [seconds, ...]}}``, as
    :func:`measure_latency`'s."""
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"block: expected None or a positive int, got {block!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"warmup: expected a positive int, got {warmup!r}")
    names = list(retrievers)
    cycles = {n: _Cycle(queries) for n in names}
    prior = {n: {int(b): list(v) for b, v in ((prior_times or {}).get(n) or {}).items()} for n in names}
    ms: dict[str, dict[str, float]] = {n: {} for n in names}
    detail: dict[str, dict[str, Any]] = {n: {} for n in names}
    with contextlib.ExitStack() as stack:
        timers = {n: stack.enter_context(_timed(retrievers[n])) for n in names}
        for b in (int(x) for x in batch_sizes):
            n_calls = _calls(calls, b)
            times = {n: list(prior[n].get(b, [])) for n in names}
            parts: dict[str, list[tuple[float, ...]]] = {n: [] for n in names}
            for n in names:
                _set_batch(retrievers[n], b)
                if block is None and len(times[n]) < n_calls and not times[n]:
                    retrievers[n].retrieve(cycles[n].take(b), k)  # warm-up
            while any(len(times[n]) < n_calls for n in names):
                for n in names:
                    if len(times[n]) >= n_calls:
                        continue
                    for _ in range(warmup if block is not None else 0):
                        retrievers[n].retrieve(cycles[n].take(b), k)  # the round's warm-up
                    for _ in range(min(block or 1, n_calls - len(times[n]))):
                        t, part = _timed_call(retrievers[n], timers[n], cycles[n].take(b), k)
                        times[n].append(t)
                        parts[n].append(part)
            for n in names:
                ms[n][str(b)], detail[n][str(b)] = _summary(times[n], parts[n], b, len(prior[n].get(b, [])))
    return {n: (ms[n], detail[n]) for n in names}


@contextlib.contextmanager
def _timed(retriever: Any) -> Iterator[TimedEncoder | None]:
    """The retriever with its encoder behind a :class:`TimedEncoder` (None: it has none) and its
    ``batch_size`` (when an int) restored after."""
    had_bs = isinstance(getattr(retriever, "batch_size", None), int)
    old_bs = retriever.batch_size if had_bs else None
    has_enc = getattr(retriever, "encoder", None) is not None
    timer = TimedEncoder(retriever.encoder) if has_enc else None
    try:
        with swapped_encoder(retriever, timer) if has_enc else contextlib.nullcontext():
            yield timer
    finally:
        if had_bs:
            retriever.batch_size = old_bs


def _set_batch(retriever: Any, b: int) -> None:
    if isinstance(getattr(retriever, "batch_size", None), int):
        retriever.batch_size = b


def _timed_call(retriever: Any, timer: TimedEncoder | None, batch: list[str], k: int) -> tuple[float, tuple]:
    """One timed ``retrieve(batch, k)``: (seconds, (encode s, generate s, rest s, tokens, positions))."""
    e0 = timer.seconds if timer else 0.0
    g0, tok0, pos0 = _llm_counters(retriever)
    t0 = time.perf_counter()
    retriever.retrieve(batch, k)
    _sync(getattr(retriever, "device", "cpu"))
    t = time.perf_counter() - t0
    g1, tok1, pos1 = _llm_counters(retriever)
    enc = (timer.seconds - e0) if timer else 0.0
    return t, (enc, g1 - g0, t - enc - (g1 - g0), tok1 - tok0, pos1 - pos0)


def _summary(times: list[float], parts: list[tuple], b: int, reused: int) -> tuple[float, dict[str, Any]]:
    """(median ms per query, measure_latency's detail for one batch size)."""
    per_query = [1000.0 * t / b for t in times]
    sp = _spread(per_query)
    out: dict[str, Any] = {
        "calls": len(times),
        "queries": len(times) * b,
        "batch_ms": [round(1000.0 * t, 3) for t in times],
        **sp,
    }
    if parts:
        arr = np.asarray(parts)
        med = np.median(arr[:, :3], axis=0) * 1000.0 / b
        pm: dict[str, float] = {"encode": float(med[0]), "rest": float(med[2])}
        if arr[:, 1].sum() > 0:
            pm["generate"] = float(med[1])
            pm["tokens_per_s"] = float(arr[:, 3].sum() / arr[:, 1].sum())
            if arr[:, 4].sum() > 0:
                pm["positions_per_s"] = float(arr[:, 4].sum() / arr[:, 1].sum())
        out["parts_ms"] = pm
    if reused:
        out["reused_calls"] = reused
    return sp["median"], out


def embedding_latency(
    retriever: Any,
    queries: Sequence[str],
    k: int,
    batch_sizes: Sequence[int] = DEFAULT_LATENCY_BATCHES,
    calls: int | dict[int, int] | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """:func:`measure_latency` from query embeddings: the same calls of ``retrieve(batch, k)``, with the
    retriever's encoder answering from embeddings computed beforehand for ``queries``
    (:class:`PrecomputedEncoder`), so what is timed is everything after the text encoding. For methods
    whose work starts from the query embedding (dense, MMR, DPP, the diffusion retriever); an LLM
    fan-out (which reads the query text) raises ValueError."""
    return embedding_latency_interleaved({"_": retriever}, queries, k, batch_sizes, calls)["_"]


def embedding_latency_interleaved(
    retrievers: dict[str, Any],
    queries: Sequence[str],
    k: int,
    batch_sizes: Sequence[int] = DEFAULT_LATENCY_BATCHES,
    calls: int | dict[int, int] | None = None,
    *,
    block: int | None = None,
    warmup: int = 1,
) -> dict[str, tuple[dict[str, float], dict[str, Any]]]:
    """:func:`embedding_latency` for several retrievers, interleaved as :func:`measure_latency_interleaved`
    (``block``, ``warmup``)."""
    for r in retrievers.values():
        if any(_llm_counters(r)) or getattr(r, "lm", None) is not None:
            raise ValueError(
                "retriever: an LLM fan-out starts from the query text; it has no embedding latency"
            )
        if getattr(r, "encoder", None) is None:
            raise ValueError("retriever: needs a text encoder (its embeddings are precomputed)")
    with contextlib.ExitStack() as stack:
        for r in retrievers.values():
            stack.enter_context(swapped_encoder(r, PrecomputedEncoder(r.encoder, list(queries))))
        return measure_latency_interleaved(
            retrievers, queries, k, batch_sizes, calls, block=block, warmup=warmup
        )


def is_diffusion_retriever(retriever: Any) -> bool:
    """True for the diffusion retriever (:class:`r4t_fast.diffusion.retriever.Retriever`)."""
    try:
        from r4t_fast.diffusion.retriever import Retriever
    except ImportError:  # pragma: no cover - the diffusion room is part of the package
        return False
    return isinstance(retriever, Retriever)


def diffusion_breakdown(
    retriever: Any,
    queries: Sequence[str],
    k: int,
    batch_sizes: Sequence[int] = DEFAULT_LATENCY_BATCHES,
    calls: int | dict[int, int] | None = None,
) -> dict[str, dict[str, float]]:
    """Where a diffusion query's time goes: median ms per query of encode, sample and ground per batch size.

    For each batch size ``B`` (one warm-up, then ``calls`` timed repetitions): ``encode`` =
    ``retriever.encoder.encode(batch)``; ``sample`` = :func:`r4t_fast.diffusion.samplers.generate_sets`
    on the ``B * ceil(k / L)`` conditions with the retriever's ``steps``/``sampler``/``guidance``/``seed``;
    ``ground`` = :func:`r4t_fast.kernels.ops.ground_sets` of the generated rows against the retriever's
    catalog. CUDA work is synchronised before each clock read.

    Returns:
        ``{str(B): {"encode": ms, "sample": ms, "ground": ms}}`` per query.
    """
    import torch

    from r4t_fast.diffusion.samplers import generate_sets
    from r4t_fast.kernels import ops

    if getattr(retriever, "encoder", None) is None:
        raise ValueError("retriever: the latency breakdown needs a retriever with a text encoder")
    cfg = retriever.model.cfg
    opts = retriever.defaults
    device = retriever.device
    n_sets = math.ceil(int(k) / cfg.set_size)
    catalog = retriever.catalog.embeddings.to(device)
    cycle = _Cycle(queries)
    out: dict[str, dict[str, float]] = {}

    def once(batch: list[str]) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        q = np.asarray(retriever.encoder.encode(batch), dtype=np.float32)
        cond = torch.from_numpy(q).to(device).repeat_interleave(n_sets, dim=0)
        _sync(device)
        t1 = time.perf_counter()
        rows = generate_sets(
            retriever.edm,
            cond,
            steps=opts["steps"],
            sampler=opts["sampler"],
            guidance=opts["guidance"],
            seed=opts["seed"],
        )
        rows = rows.reshape(len(batch), n_sets * cfg.set_size, cfg.dim).float().contiguous()
        _sync(device)
        t2 = time.perf_counter()
        ops.ground_sets(rows, catalog, check_finite=False)
        _sync(device)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    with torch.no_grad():
        for b in (int(x) for x in batch_sizes):
            once(cycle.take(b))  # warm-up
            parts = np.array([once(cycle.take(b)) for _ in range(_calls(calls, b))])
            med = np.median(parts, axis=0) * 1000.0 / b
            out[str(b)] = {"encode": float(med[0]), "sample": float(med[1]), "ground": float(med[2])}
    return out


def latency_record(
    retriever: Any,
    queries: Sequence[str],
    k: int,
    latency_batch_sizes: Sequence[int],
    *,
    is_llm: bool,
    latency_calls: int | dict[int, int] | None,
    batch_size: int,
    batch_times: Sequence[tuple[int, float]],
    n_cand: int,
) -> tuple[dict[str, float | None], dict[str, Any], dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """The record's latency fields for ``latency_batch_sizes`` (empty: skipped).

    ``queries`` are the evaluated queries; ``batch_times`` holds ``(queries, seconds)`` per ``retrieve``
    call of the quality run (batches of ``batch_size`` with ``n_cand`` candidates). For an LLM method,
    the quality run's full batches at a timed batch size (after its first call, the warm-up) are reused
    as timed calls: its seconds of generation dwarf the milliseconds of the Recall candidates.

    Returns:
        ``(latency_ms_per_query, config.latency, latency_spread_ms_per_query, latency_breakdown_ms)``;
        the breakdown is empty except for the diffusion retriever.
    """
    latency: dict[str, float | None] = {}
    spread: dict[str, dict[str, float]] = {}
    breakdown: dict[str, dict[str, float]] = {}
    latency_cfg: dict[str, Any] = {"batch_sizes": [int(b) for b in latency_batch_sizes]}
    if not latency_batch_sizes:
        return latency, latency_cfg, spread, breakdown
    prior: dict[int, list[float]] = {}
    if is_llm:
        full = [t for n, t in batch_times if n == batch_size][1:]
        if int(batch_size) in {int(b) for b in latency_batch_sizes} and full:
            prior[int(batch_size)] = full
    lat, detail = measure_latency(
        retriever, queries, k, latency_batch_sizes, latency_calls, prior_times=prior
    )
    for b in latency_batch_sizes:
        d = detail[str(int(b))]
        latency[str(int(b))] = lat[str(int(b))]
        spread[str(int(b))] = {key: d[key] for key in ("p25", "p75", "min", "max")}
        if d.get("reused_calls"):
            d["source"] = (
                f"{d['reused_calls']} of the quality run's full batches (n_candidates={n_cand}) "
                "plus fresh calls"
            )
    n_min = min(d["calls"] for d in detail.values())
    latency_cfg.update(
        {
            "protocol": PROTOCOL.format(calls=n_min),
            "min_calls": n_min,
            "query_pool": len(queries),
            "per_batch": {str(int(b)): detail[str(int(b))] for b in latency_batch_sizes},
        }
    )
    if is_diffusion_retriever(retriever):
        breakdown = diffusion_breakdown(retriever, queries, k, latency_batch_sizes, latency_calls)
        latency_cfg["breakdown"] = (
            "median ms per query of encode (retriever.encoder.encode), sample "
            "(r4t_fast.diffusion.samplers.generate_sets with the retriever's steps/sampler/guidance/seed) "
            "and ground (r4t_fast.kernels.ops.ground_sets on the generated rows), timed separately over "
            "the same number of calls after a warm-up; the rest of retrieve (ranking rows, building "
            "results) is not in the breakdown"
        )
    return latency, latency_cfg, spread, breakdown


# ---------------------------------------------------------------------------------------------- tables
def sig2(x: float | None) -> str:
    """``x`` to two significant figures, without an exponent: 1116.3 -> '1,100', 5.23 -> '5.2'.

    >>> sig2(1116.3), sig2(5.23), sig2(0.01234), sig2(None)
    ('1,100', '5.2', '0.012', '—')
    """
    if x is None or not math.isfinite(x):
        return "—"
    if x == 0:
        return "0"
    digits = 1 - int(math.floor(math.log10(abs(x))))
    v = round(x, digits)
    return f"{v:,.0f}" if digits <= 0 else f"{v:,.{digits}f}"


def ratio_with_spread(num: dict[str, float], den: dict[str, float]) -> tuple[float, float, float]:
    """``num`` / ``den`` of two latency details (``median``, ``p25``, ``p75`` ms per query): the ratio of
    the medians and its spread (``num.p25 / den.p75``, ``num.p75 / den.p25``)."""
    return num["median"] / den["median"], num["p25"] / den["p75"], num["p75"] / den["p25"]


def format_ratio(num: dict[str, float] | None, den: dict[str, float] | None) -> str:
    """'590× (510–660)' (two significant figures, the spread of :func:`ratio_with_spread`), or '—'."""
    if not num or not den:
        return "—"
    r, lo, hi = ratio_with_spread(num, den)
    return f"{sig2(r)}× ({sig2(lo)}–{sig2(hi)})"


def tokens_per_s_agreement(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    """Tokens/s of two LLM methods' latency details at one batch size (``parts_ms.tokens_per_s``): their
    ratio and whether it is within 10 % (same base model and settings should generate at the same rate;
    a LoRA adapter left unmerged, for one, would not). None where either has no token rate."""
    pa, pb = a.get("parts_ms") or {}, b.get("parts_ms") or {}
    ta, tb = pa.get("tokens_per_s"), pb.get("tokens_per_s")
    if not ta or not tb:
        return None
    out = {"a": ta, "b": tb, "ratio": ta / tb, "within_10pct": abs(ta / tb - 1.0) <= 0.10}
    qa, qb = pa.get("positions_per_s"), pb.get("positions_per_s")
    if qa and qb:  # decoded positions (padding included): the compute rate, whatever the answers' lengths
        out.update(positions_a=qa, positions_b=qb, positions_within_10pct=abs(qa / qb - 1.0) <= 0.10)
    return out


def latency_table(
    details: dict[str, dict[str, Any]], batches: Sequence[int], *, reference: str | None = None
) -> list[str]:
    """Markdown rows: per method and batch size the median ms per query (p25–p75), the parts (encode /
    generate / rest, ms per query) and, with ``reference``, the ratio to it (two significant figures,
    with its spread). ``details``: ``{method: measure_latency's detail}``."""
    head = "| method | " + " | ".join(f"B = {b}: ms/query (p25–p75) | parts e / g / r" for b in batches)
    if reference:
        head += " | " + " | ".join(f"B = {b}: × {reference}" for b in batches)
    n_cols = len(batches) * (3 if reference else 2)
    lines = [head + " |", "|---|" + "---:|" * n_cols]
    for name, det in details.items():
        cells = []
        for b in batches:
            d = det.get(str(b))
            if d is None:
                cells += ["—", "—"]
                continue
            cells.append(f"{d['median']:.3g} ({d['p25']:.3g}–{d['p75']:.3g}), {d['calls']} calls")
            p = d.get("parts_ms")
            cells.append(
                "—"
                if not p
                else f"{p['encode']:.3g} / {p['generate']:.3g} / {p['rest']:.3g}"
                if "generate" in p
                else f"{p['encode']:.3g} / — / {p['rest']:.3g}"
            )
        if reference:
            ref = details.get(reference, {})
            cells += [format_ratio(det.get(str(b)), ref.get(str(b))) for b in batches]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines
