"""Sampling options of the diffusion retriever: their limits, the one validation rule (constructor,
``retrieve``, the CLI and the server) and the query-anchored layout's arithmetic."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from r4t_fast._internal import check_choice, check_float, check_positive_int, check_seed
from r4t_fast.diffusion.layout import CANDIDATE_LAYOUTS
from r4t_fast.diffusion.samplers import SAMPLERS
from r4t_fast.kernels import sample_ops

__all__ = [
    "MAX_GUIDANCE",
    "MAX_K_RETRIEVE",
    "MAX_PULL",
    "MAX_STEPS",
    "NOISE_MODES",
    "PRECISIONS",
    "check_options",
    "query_budget_share",
    "query_rows",
    "query_seeds",
]

MAX_STEPS = 1000
"""Largest ``steps`` a retrieval accepts (16 is the default; thousands of steps are a typo)."""
MAX_GUIDANCE = 1000.0
"""Largest |guidance| a retrieval accepts (useful weights are 0-10; beyond this float32 rows overflow)."""
MAX_K_RETRIEVE = 1024
"""Most items per set: grounding a set costs O(k^2) (k rows x k candidates, then greedy; k = 4,000
took 27 s on 2 CPU cores, k = 8,000 2 GB eager), so larger sets are refused with this limit's name."""
PRECISIONS = tuple(p for p in sample_ops.PRECISIONS if p != "bf16-emulated")
"""The sampler's GEMM precision: float32, or bf16 inputs and weights with float32 accumulation (a speed
option of the fused CPU kernel: AVX512-BF16 where the CPU has it; the eager path runs float32)."""
NOISE_MODES = ("query", "fixed")
"""Where a query's initial noise comes from: its own seed (``query_seeds``: a different draw per query)
or one draw of ``seed`` shared by every query (a model trained with ``retrieval_noise='fixed'``)."""
MAX_PULL = 10.0
"""Largest query pull accepted (rows are unit-scale; beyond a few units every row is the query)."""


def check_options(o: dict[str, Any]) -> dict[str, Any]:
    """Validate sampling options (the one rule for the constructor, ``retrieve`` and the CLI)."""
    out = dict(o)
    out["steps"] = check_positive_int(o["steps"], "steps", upper=MAX_STEPS)
    out["sampler"] = check_choice(o["sampler"], sorted(SAMPLERS), "sampler")
    out["guidance"] = check_float(o["guidance"], "guidance", low=-MAX_GUIDANCE, high=MAX_GUIDANCE)
    out["seed"] = check_seed(o["seed"], "seed")
    out["anchor"] = check_float(o.get("anchor", 0.0), "anchor")
    if not 0.0 <= out["anchor"] < 1.0:
        raise ValueError(f"anchor: expected a number in [0, 1) (the query's share), got {o['anchor']!r}")
    out["pull"] = check_float(o.get("pull", 0.0), "pull", low=0.0, high=MAX_PULL)
    cp = o.get("candidate_pull")
    if cp is not None:  # the candidate lists' own pull (negative: away from the query); None = pull
        cp = check_float(cp, "candidate_pull", low=-MAX_PULL, high=MAX_PULL)
    out["candidate_pull"] = cp
    out["precision"] = check_choice(o.get("precision", "fp32"), PRECISIONS, "precision")
    out["noise"] = check_choice(o.get("noise", "query"), NOISE_MODES, "noise")
    out["candidate_layout"] = check_choice(
        o.get("candidate_layout", "rows"), CANDIDATE_LAYOUTS, "candidate_layout"
    )
    ds = o.get("deep_share")
    if ds is not None:  # the query's share of the "ranked" candidates past the fair budget; None = anchor's
        ds = check_float(ds, "deep_share", low=0.0, high=1.0)
    out["deep_share"] = ds
    return out


def query_rows(anchor: float, k: int) -> int:
    """``m``: the candidate rows holding the query's own ranking at ``anchor`` (row 0 and ``m - 1``
    appended rows; 0 without an anchor). The one home of ``max(1, round(anchor * k / (1 - anchor)))``.

    >>> query_rows(0.3, 10), query_rows(0.1, 10), query_rows(0.0, 10)
    (4, 1, 0)
    """
    return max(1, round(anchor * k / (1 - anchor))) if anchor > 0 else 0


def query_budget_share(anchor: float, k: int) -> float:
    """The share of the fair candidate budget that the query's own dense ranking takes at ``anchor``.

    With ``anchor > 0``, row 0 is the query itself (one of the ``k`` items is the query's nearest item)
    and ``m = max(1, round(anchor * k / (1 - anchor)))`` of the ``k - 1 + m`` candidate rows hold the
    query's ranking interleaved (row 0 and ``m - 1`` appended rows; row j reads ranks j, j + m, ...), so a
    round-robin union or a fixed quota per row reads the ranking in order, without reading a rank twice:
    ``m / (k - 1 + m)`` of the budget; 0 without an anchor row.

    >>> round(query_budget_share(0.3, 10), 4), query_budget_share(0.0, 10)
    (0.3077, 0.0)
    """
    if anchor <= 0:
        return 0.0
    m = query_rows(anchor, k)
    return m / (k - 1 + m)


def query_seeds(seed: int, q: torch.Tensor) -> list[int]:
    """One seed per query, from ``seed`` and the query embedding's float32 bytes: the same query gets
    the same noise (hence the same set) alone or anywhere in any batch."""
    base = int(seed).to_bytes(16, "little", signed=True)
    rows = q.detach().cpu().float().contiguous().numpy()
    return [int.from_bytes(hashlib.sha256(base + r.tobytes()).digest()[:8], "little") >> 1 for r in rows]
