"""Confidence intervals for per-query metrics: percentile bootstrap, unpaired and paired."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from r4t_fast._internal import check_positive_int
from r4t_fast.objectives import describe

__all__ = ["ConfidenceInterval", "bootstrap_ci", "paired_bootstrap_ci"]

ArrayLike = Any


# ----------------------------------------------------------------------------------------------------
# confidence intervals
# ----------------------------------------------------------------------------------------------------
class ConfidenceInterval(NamedTuple):
    """A percentile-bootstrap interval around a sample mean (or a mean difference)."""

    mean: float
    low: float
    high: float
    alpha: float

    @property
    def excludes_zero(self) -> bool:
        """True when 0 lies strictly outside ``[low, high]``."""
        return self.low > 0.0 or self.high < 0.0


def _vector(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or arr.size < 1:
        raise ValueError(f"{name}: expected a non-empty 1-D array of per-query values, got {describe(arr)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: expected finite values, got {int((~np.isfinite(arr)).sum())} non-finite")
    return arr


def _boot(values: np.ndarray, n_boot: int, seed: int, alpha: float) -> ConfidenceInterval:
    n_boot = check_positive_int(n_boot, "n_boot")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha: expected a float in (0, 1), got {alpha!r}")
    rng = np.random.Generator(np.random.PCG64(seed))
    n = values.size
    means = np.empty(n_boot, dtype=np.float64)
    step = max(1, (1 << 22) // n)  # bound the (boots, n) index block to ~4M entries
    for s in range(0, n_boot, step):
        m = min(step, n_boot - s)
        means[s : s + m] = values[rng.integers(0, n, size=(m, n))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return ConfidenceInterval(float(values.mean()), float(low), float(high), float(alpha))


def bootstrap_ci(
    values: ArrayLike, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> ConfidenceInterval:
    """Percentile bootstrap CI of the mean of per-query values.

    Resamples the ``n`` queries with replacement ``n_boot`` times (numpy PCG64 seeded with ``seed``) and
    returns the sample mean with the ``alpha/2`` and ``1 - alpha/2`` quantiles of the resampled means.

    >>> ci = bootstrap_ci([1.0, 1.0, 1.0])
    >>> (ci.mean, ci.low, ci.high)
    (1.0, 1.0, 1.0)
    """
    return _boot(_vector(values, "values"), n_boot, seed, alpha)


def paired_bootstrap_ci(
    a: ArrayLike, b: ArrayLike, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> ConfidenceInterval:
    """Paired percentile bootstrap CI of ``mean(a) - mean(b)`` over the same queries.

    The per-query differences ``a_i - b_i`` are resampled jointly (query ``i`` keeps its pair), so the
    interval reflects the per-query correlation of the two systems. ``ci.excludes_zero`` is the
    "95% CI excludes zero" test at the default ``alpha = 0.05``.

    >>> ci = paired_bootstrap_ci([0.5, 0.7, 0.9, 0.6], [0.1, 0.2, 0.3, 0.2])
    >>> round(ci.mean, 3), ci.excludes_zero
    (0.475, True)
    """
    av, bv = _vector(a, "a"), _vector(b, "b")
    if av.shape != bv.shape:
        raise ValueError(f"b: expected the same number of queries as a ({av.size}), got {bv.size}")
    return _boot(av - bv, n_boot, seed, alpha)
