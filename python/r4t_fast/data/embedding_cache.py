"""An on-disk cache of text embeddings keyed by (encoder name, sha256 of the text), and
:func:`encode_cached`, which computes each (encoder, text) once through it.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from r4t_fast._internal import atomic_write_bytes, check_positive_int

__all__ = ["CacheError", "EmbeddingCache", "TextEncoder", "encode_cached", "text_key"]


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


class CacheError(RuntimeError):
    """The embedding cache holds vectors that do not fit the encoder (e.g. another width)."""


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
        max_shards = check_positive_int(max_shards, "max_shards")
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
        atomic_write_bytes(path, blob)
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
