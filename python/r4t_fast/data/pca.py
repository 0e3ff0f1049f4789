"""A PCA reducer to the paper's 128-d space: centred PCA fitted on catalog embeddings, outputs
re-normalised to unit length, saved as safetensors + JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from r4t_fast._internal import atomic_write_bytes, atomic_write_text, check_positive_int, unit_rows

__all__ = ["PCAReducer"]


def _as_matrix(x: Any, arg: str, dim: int | None = None) -> np.ndarray:
    """A finite float64 ``(n, d)`` copy of a numpy array / torch CPU tensor / nested list."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{arg}: expected a float (n, d) matrix, got {arr.dtype} {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{arg}: expected width {dim} (the fitted input dim), got shape {arr.shape}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{arg}: contains NaN or inf")
    return arr


class PCAReducer:
    """Centred PCA to ``out_dim`` dimensions, outputs re-normalised to unit length.

    ``fit(x)`` on catalog embeddings ``(n, in_dim)``; ``transform(x)`` -> float32 ``(m, out_dim)``
    computed as ``normalise((x - mean) @ components.T)``. Components are the top right singular vectors
    (float64 SVD), signed so that each component's largest-magnitude coefficient is positive
    (deterministic across runs).

    Args:
        out_dim: output width (default 128, the paper's embedding space).
    """

    _WEIGHTS = "pca.safetensors"
    _CONFIG = "config.json"
    _FORMAT = "r4t_fast.pca/1"

    def __init__(self, out_dim: int = 128) -> None:
        self.out_dim = check_positive_int(out_dim, "out_dim")
        self.mean: np.ndarray | None = None  # (in_dim,) float32
        self.components: np.ndarray | None = None  # (out_dim, in_dim) float32
        self.explained_variance_ratio: np.ndarray | None = None  # (out_dim,) float32

    def __repr__(self) -> str:
        state = f"in_dim={self.in_dim}" if self.fitted else "unfitted"
        return f"PCAReducer(out_dim={self.out_dim}, {state})"

    @property
    def fitted(self) -> bool:
        return self.components is not None

    @property
    def in_dim(self) -> int | None:
        return None if self.components is None else int(self.components.shape[1])

    def fit(self, x: Any) -> PCAReducer:
        """Fit on ``x`` float ``(n, in_dim)`` with ``n >= out_dim + 1`` and ``in_dim >= out_dim``."""
        arr = _as_matrix(x, "x")
        n, d = arr.shape
        if self.out_dim > d:
            raise ValueError(f"x: out_dim={self.out_dim} exceeds the input width {d} (shape {arr.shape})")
        if n <= self.out_dim:
            raise ValueError(f"x: need more than out_dim={self.out_dim} rows to fit, got shape {arr.shape}")
        mean = arr.mean(axis=0)
        centred = arr - mean
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        comps = vt[: self.out_dim]
        signs = np.sign(comps[np.arange(comps.shape[0]), np.abs(comps).argmax(axis=1)])
        comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
        var = s**2
        total = var.sum()
        self.mean = mean.astype(np.float32)
        self.components = np.ascontiguousarray(comps, dtype=np.float32)
        ratio = var[: self.out_dim] / total if total > 0 else np.zeros(self.out_dim)
        self.explained_variance_ratio = ratio.astype(np.float32)
        return self

    def transform(self, x: Any) -> np.ndarray:
        """Project ``(m, in_dim)`` -> float32 ``(m, out_dim)``, rows L2-normalised."""
        if self.components is None or self.mean is None:
            raise RuntimeError("PCAReducer: call fit() or load() before transform()")
        arr = _as_matrix(x, "x", dim=self.in_dim)
        y = (arr - self.mean.astype(np.float64)) @ self.components.astype(np.float64).T
        return unit_rows(y.astype(np.float32))

    def fit_transform(self, x: Any) -> np.ndarray:
        """``fit(x)`` then ``transform(x)``."""
        return self.fit(x).transform(x)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``<path>/pca.safetensors`` (mean, components, explained_variance_ratio) and
        ``<path>/config.json``; each file is replaced atomically."""
        if self.components is None or self.mean is None or self.explained_variance_ratio is None:
            raise RuntimeError("PCAReducer: nothing to save, call fit() first")
        from safetensors.numpy import save as st_save

        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        blob = st_save(
            {
                "mean": self.mean,
                "components": self.components,
                "explained_variance_ratio": self.explained_variance_ratio,
            },
            metadata={"format": self._FORMAT},
        )
        atomic_write_bytes(root / self._WEIGHTS, blob)
        config = {"format": self._FORMAT, "out_dim": self.out_dim, "in_dim": self.in_dim}
        atomic_write_text(root / self._CONFIG, json.dumps(config, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PCAReducer:
        """Read a reducer written by :meth:`save`; ``ValueError`` naming the file if it is malformed."""
        from safetensors.numpy import load_file

        root = Path(path)
        cfg_path, w_path = root / cls._CONFIG, root / cls._WEIGHTS
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise FileNotFoundError(
                    f"path: {p} not found (expected a directory written by PCAReducer.save)"
                )
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
            if config.get("format") != cls._FORMAT:
                raise ValueError(f"format is {config.get('format')!r}, expected {cls._FORMAT!r}")
            tensors = load_file(str(w_path))
            mean, comps, ratio = tensors["mean"], tensors["components"], tensors["explained_variance_ratio"]
        except Exception as exc:
            raise ValueError(f"path: cannot read PCA reducer from {root}: {exc}") from exc
        out_dim, in_dim = int(config["out_dim"]), int(config["in_dim"])
        if comps.shape != (out_dim, in_dim) or mean.shape != (in_dim,) or ratio.shape != (out_dim,):
            raise ValueError(
                f"path: {w_path} holds shapes mean {mean.shape}, components {comps.shape}, "
                f"explained_variance_ratio {ratio.shape}; config says out_dim={out_dim}, in_dim={in_dim}"
            )
        red = cls(out_dim)
        red.mean = mean.astype(np.float32)
        red.components = comps.astype(np.float32)
        red.explained_variance_ratio = ratio.astype(np.float32)
        return red
