"""Catalog construction, search, mutation and on-disk round trip (including corrupt files)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from r4t_fast import Catalog
from r4t_fast.data.catalog import CatalogError


def _clustered(n: int, d: int, seed: int = 0, clusters: int = 20) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, d, generator=g)
    x = centers[torch.randint(0, clusters, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def _catalog(n=200, d=16, **kw) -> Catalog:
    e = _clustered(n, d)
    return Catalog(
        [f"item-{j}" for j in range(n)],
        e,
        texts=[f"text {j}" for j in range(n)],
        categories=[["top", "shoe", None][j % 3] for j in range(n)],
        metadata=[{"price": j} for j in range(n)],
        **kw,
    )


def test_construction_normalises_and_searches():
    c = Catalog(["a", "b", "c"], np.array([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=np.float32))
    assert torch.allclose(c.embeddings.norm(dim=1), torch.ones(3))
    s, rows = c.search(torch.tensor([[1.0, 0.0]]), 2)
    assert rows.tolist() == [[0, 2]] and s[0, 0].item() == pytest.approx(1.0)
    assert [c.ids[r] for r in rows[0]] == ["a", "c"]
    s, rows = c.search(torch.tensor([[1.0, 0.0]]), 5)  # k > N: documented sentinel
    assert rows[0, 3:].tolist() == [-1, -1] and torch.isneginf(s[0, 3:]).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(ids=["a", "a"], embeddings=torch.ones(2, 3)), "ids: duplicate item id 'a'"),
        (dict(ids=["a", ""], embeddings=torch.ones(2, 3)), "ids: item 1 must be a non-empty str"),
        (dict(ids=["a"], embeddings=torch.ones(2, 3)), r"embeddings: expected 1 rows"),
        (dict(ids=["a", "b"], embeddings=torch.tensor([[1.0, 0.0], [0.0, 0.0]])), "row 1 has zero norm"),
        (
            dict(ids=["a"], embeddings=torch.tensor([[float("nan"), 1.0]])),
            "embeddings: contains 1 non-finite",
        ),
        (dict(ids=["a"], embeddings=torch.ones(1, 2), texts=["x", "y"]), "texts: expected 1 entries"),
        (dict(ids=["a"], embeddings=torch.ones(1, 2), dtype="int8"), "dtype: expected one of"),
        (dict(ids=["a"], embeddings=torch.ones(1, 2), index="faiss"), "index: expected one of"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Catalog(**kwargs)


def test_empty_catalog_refuses_search():
    c = Catalog([], torch.zeros(0, 4))
    assert len(c) == 0
    with pytest.raises(ValueError, match="catalog: is empty"):
        c.search(torch.zeros(1, 4), 3)


def test_add_remove_keep_ids_stable():
    c = _catalog(n=10, d=8)
    c.add(["new-1", "new-2"], torch.randn(2, 8), texts=["n1", "n2"])
    assert len(c) == 12 and c.index_of("new-2") == 11 and c.texts[11] == "n2"
    with pytest.raises(ValueError, match="duplicate item id 'item-3'"):
        c.add(["item-3"], torch.randn(1, 8))
    with pytest.raises(ValueError, match="embeddings: expected dimension 8"):
        c.add(["x"], torch.randn(1, 9))
    emb5 = c.embeddings[c.index_of("item-5")].clone()
    c.remove(["item-2", "new-1"])
    assert len(c) == 10 and "item-2" not in c and "new-1" not in c
    assert torch.equal(c.embeddings[c.index_of("item-5")], emb5)  # same item, same vector
    assert c.metadata[c.index_of("item-5")] == {"price": 5}
    with pytest.raises(KeyError, match="'nope' is not in the catalog"):
        c.remove(["nope"])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_save_load_round_trip(tmp_path, dtype):
    c = _catalog(dtype=dtype)
    c.save(tmp_path / "cat")
    c2 = Catalog.load(tmp_path / "cat")
    assert c2.ids == c.ids and c2.texts == c.texts and c2.categories == c.categories
    assert c2.metadata == c.metadata and c2.dtype == dtype
    assert torch.equal(c2.embeddings, c.embeddings)
    q = _clustered(5, 16, seed=3)
    assert torch.equal(c.search(q, 7)[1], c2.search(q, 7)[1])
    assert not list((tmp_path / "cat").glob(".*.tmp"))  # no temp files left behind


def test_usearch_index_round_trip_and_recall(tmp_path):
    c = _catalog(n=2000, d=32, index="usearch", index_params={"expansion_search": 128})
    q = _clustered(50, 32, seed=7)
    exact = c.search(q, 10, exact=True)[1]
    approx = c.search(q, 10)[1]
    recall = np.mean(
        [len(set(a) & set(b)) / 10 for a, b in zip(approx.tolist(), exact.tolist(), strict=True)]
    )
    assert recall > 0.95
    c.save(tmp_path / "cat")
    c2 = Catalog.load(tmp_path / "cat")
    assert c2.index_kind == "usearch" and torch.equal(c2.search(q, 10)[1], approx)


def test_load_refuses_corrupt_files(tmp_path):
    d = _catalog().save(tmp_path / "cat")
    emb = d / "embeddings.safetensors"
    data = emb.read_bytes()

    emb.write_bytes(data[:-100])  # truncated
    with pytest.raises(CatalogError, match="truncated"):
        Catalog.load(d)

    edited = bytearray(data)
    edited[-5] ^= 0xFF  # same size, one byte changed
    emb.write_bytes(bytes(edited))
    with pytest.raises(CatalogError, match="checksum mismatch"):
        Catalog.load(d)
    emb.write_bytes(data)
    Catalog.load(d)  # restored: loads again

    items = d / "items.jsonl"
    items.write_text(items.read_text().replace("text 1", "text X", 1))
    with pytest.raises(CatalogError, match="items.jsonl: checksum mismatch"):
        Catalog.load(d)

    (d / "manifest.json").write_text("{not json")
    with pytest.raises(CatalogError, match="corrupt manifest"):
        Catalog.load(d)
    with pytest.raises(CatalogError, match="missing manifest.json"):
        Catalog.load(tmp_path / "elsewhere")


def test_load_rejects_other_formats(tmp_path):
    d = _catalog().save(tmp_path / "cat")
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CatalogError, match="format version 1"):
        Catalog.load(d)
