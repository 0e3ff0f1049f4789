"""The argument rules :mod:`r4t_fast.kernels.ops` and :mod:`r4t_fast.kernels.sample_ops` share (metric,
threads, catalog, filter mask, k and the result-size limits): one home, below both."""

from __future__ import annotations

from typing import Any

import torch

from r4t_fast.kernels._arrays import (
    MAX_THREADS,
    as_tensor,
    check_choice,
    check_mask,
    check_matrix,
    check_positive_int,
    describe,
)

_METRICS = {"ip": 0, "l2": 1}
_F32 = (torch.float32,)
_CAT = (torch.float32, torch.float16)
# k > N pads every result row with k - N sentinels; more than this many sentinel slots in one call is
# refused (a typo like k=10**8 would otherwise allocate gigabytes of -1s).
MAX_SENTINEL_SLOTS = 1 << 24
# The result of one call (B rows x k slots; ground_sets: B * L rows x candidates) is allocated at once,
# 12 bytes a slot (float32 score + int64 id): at most this many slots (3 GiB), so that a typo like
# candidates=10**9 is refused by name instead of asking the allocator for hundreds of GB.
MAX_RESULT_SLOTS = 1 << 28


def _check_slots(rows: int, per_row: int, name: str) -> None:
    if rows * per_row > MAX_RESULT_SLOTS:
        raise ValueError(
            f"{name}: {per_row} per row x {rows} rows = {rows * per_row} result slots "
            f"({rows * per_row * 12 / 2**30:.1f} GiB), more than the limit of {MAX_RESULT_SLOTS}; "
            f"pass {name} <= {max(1, MAX_RESULT_SLOTS // max(rows, 1))} or fewer rows per call"
        )


def _metric(metric: str) -> int:
    return check_choice(metric, "metric", _METRICS)


def _threads(num_threads: int | None) -> int:
    if num_threads is None:
        return 0
    return check_positive_int(num_threads, "num_threads", maximum=MAX_THREADS)


def _catalog(catalog: Any, d: int | None, check_finite: bool) -> torch.Tensor:
    c, _ = as_tensor(catalog, "catalog")
    c = check_matrix(c, "catalog", ndim=2, dtypes=_CAT, shape_doc="(N, d)", dim=d, finite=check_finite)
    if c.shape[0] == 0:
        raise ValueError(f"catalog: is empty, got {describe(c)}; add items before searching")
    return c


def _allowed(allowed: Any | None, c: torch.Tensor) -> torch.Tensor | None:
    return None if allowed is None else check_mask(allowed, "allowed", c.shape[0], c)


def _check_k(k: Any, B: int, N: int) -> int:
    k = check_positive_int(k, "k")
    if k > N and B * (k - N) > MAX_SENTINEL_SLOTS:
        raise ValueError(
            f"k: {k} exceeds the catalog size N={N}, so the ({B}, {k}) result would hold {B * (k - N)} "
            f"sentinel slots (id -1), more than the limit of {MAX_SENTINEL_SLOTS}; pass k <= {N}"
        )
    _check_slots(B, k, "k")
    return k
