"""A live catalog: add / update / remove without retraining, for both backends (exact and usearch):
a new item is retrievable at once, a removed one is never returned, changes persist crash-safely;
query-time filters; the SearchBackend interface; read-only memory-mapped serving."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from r4t_fast import Catalog
from r4t_fast.data.backends import BACKENDS, ExactBackend, SearchBackend, UsearchBackend

BACKEND_KINDS = ["exact", "usearch"]


def _clustered(n: int, d: int, seed: int = 0, clusters: int = 20) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, d, generator=g)
    x = centers[torch.randint(0, clusters, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def _catalog(index: str, n: int = 1500, d: int = 24, seed: int = 0) -> Catalog:
    e = _clustered(n, d, seed)
    return Catalog(
        [f"item-{j}" for j in range(n)],
        e,
        texts=[f"text {j}" for j in range(n)],
        categories=[["top", "shoe", "bag"][j % 3] for j in range(n)],
        metadata=[{"price": j % 100, "in_stock": j % 2 == 0} for j in range(n)],
        index=index,
        index_params={"expansion_search": 128} if index == "usearch" else None,
    )


def _ids(c: Catalog, rows) -> list[list[str]]:
    return [[c.ids[r] for r in row if r >= 0] for row in rows.tolist()]


def _recall(a, b) -> float:
    return float(np.mean([len(set(x) & set(y)) / max(len(y), 1) for x, y in zip(a, b, strict=True)]))


def test_backends_implement_the_protocol():
    for kind, cls in BACKENDS.items():
        be = cls()
        assert isinstance(be, SearchBackend) and be.kind == kind


@pytest.mark.parametrize("index", BACKEND_KINDS)
def test_added_items_are_retrievable_at_once(index):
    c = _catalog(index)
    q = _clustered(40, 24, seed=5)
    c.search(q, 10)  # builds the graph before the change: the change must update it incrementally
    new = torch.nn.functional.normalize(
        q[:8] + 0.01 * torch.randn(8, 24, generator=torch.Generator().manual_seed(1))
    )
    rev = c.revision
    c.add([f"new-{j}" for j in range(8)], new, texts=[f"n{j}" for j in range(8)], categories=["top"] * 8)
    assert c.revision == rev + 1 and len(c) == 1508
    _, rows = c.search(q[:8], 3)
    assert [r[0] for r in _ids(c, rows)] == [f"new-{j}" for j in range(8)]
    if index == "usearch":
        assert c.backend.built and c.index_changes == 0  # incremental: no rebuild happened


@pytest.mark.parametrize("index", BACKEND_KINDS)
def test_removed_items_are_never_returned(index):
    c = _catalog(index)
    q = _clustered(60, 24, seed=9)
    _, before = c.search(q, 10)
    gone = sorted({i for row in _ids(c, before) for i in row[:4]})  # the best hits: the likeliest to leak
    c.remove(gone)
    assert not any(i in c for i in gone)
    for k in (1, 10, 50):
        _, rows = c.search(q, k)
        hits = {i for row in _ids(c, rows) for i in row}
        assert not hits & set(gone)
        assert (rows >= 0).all() and (rows < len(c)).all()
    _, exact = c.search(q, 10, exact=True)
    _, approx = c.search(q, 10)
    assert _recall(_ids(c, approx), _ids(c, exact)) > 0.9
    if index == "usearch":
        assert c.index_changes == len(gone)


@pytest.mark.parametrize("index", BACKEND_KINDS)
def test_update_changes_vectors_and_fields_in_place(index):
    c = _catalog(index)
    q = _clustered(5, 24, seed=11)
    c.search(q, 5)
    row = c.index_of("item-7")
    c.update(["item-7"], q[:1], texts=["moved"], metadata=[{"price": 1}])
    assert c.index_of("item-7") == row and c.texts[row] == "moved" and c.metadata[row] == {"price": 1}
    assert c.categories[row] == "shoe"  # not given: unchanged
    _, rows = c.search(q[:1], 1)
    assert rows[0, 0].item() == row
    c.update(["item-7"], -q[:1])  # moved away: no longer the best hit, and returned only once
    _, rows = c.search(q[:1], 20)
    assert rows[0, 0].item() != row and (rows[0] == row).sum() <= 1
    c.update(["item-8"], categories=["hat"])
    assert c.categories[c.index_of("item-8")] == "hat"
    with pytest.raises(KeyError, match="'nope' is not in the catalog"):
        c.update(["nope"], texts=["x"])
    with pytest.raises(ValueError, match="ids: 'item-1' is given twice"):
        c.update(["item-1", "item-1"], texts=["a", "b"])
    with pytest.raises(ValueError, match="embeddings: expected dimension 24"):
        c.update(["item-1"], torch.randn(1, 5))
    with pytest.raises(ValueError, match="texts: expected 1 entries"):
        c.update(["item-1"], texts=["a", "b"])


@pytest.mark.parametrize("index", BACKEND_KINDS)
def test_failed_changes_change_nothing(index):
    c = _catalog(index, n=200)
    ids, emb, rev = list(c.ids), c.embeddings.clone(), c.revision
    with pytest.raises(ValueError, match="duplicate item id 'item-3'"):
        c.add(["fresh", "item-3"], torch.randn(2, 24))
    with pytest.raises(ValueError, match=r"metadata: item 1 must be a dict"):
        c.add(["fresh", "fresh2"], torch.randn(2, 24), metadata=[{}, 3])
    with pytest.raises(KeyError, match="'nope'"):
        c.remove(["item-1", "nope"])
    assert c.ids == ids and torch.equal(c.embeddings, emb) and c.revision == rev and "fresh" not in c


@pytest.mark.parametrize("index", BACKEND_KINDS)
def test_live_changes_persist_and_keep_working_after_load(tmp_path, index):
    c = _catalog(index)
    q = _clustered(30, 24, seed=3)
    c.search(q, 5)
    c.add(["new-0"], q[:1])
    c.remove(["item-0", "item-1"])
    c.update(["item-2"], q[1:2])
    d = c.save(tmp_path / "cat")
    c2 = Catalog.load(d)
    assert c2.ids == c.ids and torch.equal(c2.embeddings, c.embeddings)
    assert torch.equal(c2.search(q, 5)[1], c.search(q, 5)[1])
    assert c2.index_changes == c.index_changes
    # the loaded graph keeps its keys: further changes still work incrementally
    c2.remove(["new-0"])
    c2.add(["new-1"], q[2:3])
    _, rows = c2.search(q[:3], 1)
    assert _ids(c2, rows)[0][0] != "new-0" and _ids(c2, rows)[2][0] == "new-1"
    assert _ids(c2, rows)[1][0] == "item-2"
    c2.save(d)
    assert Catalog.load(d).ids == c2.ids


def test_rebuild_resets_the_change_count():
    c = _catalog("usearch", n=400)
    c.search(c.embeddings[:2].float(), 3)
    c.remove([f"item-{j}" for j in range(50)])
    assert c.index_changes == 50
    c.build_index(expansion_search=200)
    assert c.index_changes == 0 and c.index_params["expansion_search"] == 200
    with pytest.raises(ValueError, match="build_index: the catalog's index is 'exact'"):
        _catalog("exact", n=10).build_index()
    with pytest.raises(ValueError, match=r"index_params\['connectivity'\]: expected a positive int"):
        c.build_index(connectivity=0)
    with pytest.raises(ValueError, match="index_params: unknown key 'ef'"):
        Catalog(["a"], torch.ones(1, 2), index="usearch", index_params={"ef": 3})
    with pytest.raises(ValueError, match="index_params: unknown key 'connectivity' for index='exact'"):
        Catalog(["a"], torch.ones(1, 2), index_params={"connectivity": 3})


@pytest.mark.parametrize("quantization", ["f16", "i8"])
def test_quantized_graph_reports_exact_scores_and_reranks(quantization):
    c = _catalog("usearch", n=3000, d=32)
    c.build_index(quantization=quantization, rerank=40)
    q = _clustered(50, 32, seed=21)
    s, rows = c.search(q, 10)
    es, erows = c.search(q, 10, exact=True)
    assert _recall(_ids(c, rows), _ids(c, erows)) > 0.95
    want = torch.einsum("bd,bkd->bk", q, c.embeddings[rows].float())
    assert torch.allclose(s, want, atol=1e-5)  # true inner products, not quantized distances


@pytest.mark.parametrize("index", BACKEND_KINDS)
def test_filters(index):
    c = _catalog(index)
    q = _clustered(20, 24, seed=4)
    shoes = c.filter_mask(lambda category, meta: category == "shoe" and meta["in_stock"])
    assert shoes.dtype == torch.bool and int(shoes.sum()) == sum(
        1 for j in range(len(c)) if j % 3 == 1 and j % 2 == 0
    )
    s, rows = c.search(q, 10, allowed=shoes)
    assert (rows >= 0).all() and shoes[rows].all()
    assert all(len(set(r)) == 10 for r in rows.tolist())
    _, exact = c.search(q, 10, exact=True, allowed=shoes)
    assert _recall(_ids(c, rows), _ids(c, exact)) > 0.9
    few = c.filter_mask(["item-3", "item-30", "item-300"])  # fewer allowed than k: sentinels
    s, rows = c.search(q, 5, allowed=few)
    assert sorted(rows[0, :3].tolist()) == [3, 30, 300] and (rows[:, 3:] == -1).all()
    assert torch.isneginf(s[:, 3:]).all()
    half = c.filter_mask(np.arange(len(c)) < 750)  # a wide filter: the graph path with over-fetch
    _, rows = c.search(q, 10, allowed=half)
    assert (rows < 750).all() and (rows >= 0).all()
    with pytest.raises(ValueError, match=r"allowed: expected a bool mask \(1500,\)"):
        c.search(q, 3, allowed=torch.ones(10, dtype=torch.bool))
    with pytest.raises(KeyError, match="'nope' is not in the catalog"):
        c.filter_mask(["nope"])
    with pytest.raises(ValueError, match="allowed: the predicate must return a bool"):
        c.filter_mask(lambda category, meta: meta)


def test_view_serves_read_only(tmp_path):
    c = _catalog("usearch")
    q = _clustered(10, 24, seed=8)
    d = c.save(tmp_path / "cat")
    v = Catalog.load(d, view=True)
    assert v.read_only and torch.equal(v.search(q, 5)[1], c.search(q, 5)[1])
    assert torch.equal(v.search(q, 5, exact=True)[1], c.search(q, 5, exact=True)[1])
    for change in (
        lambda: v.add(["x"], torch.randn(1, 24)),
        lambda: v.remove(["item-1"]),
        lambda: v.update(["item-1"], texts=["x"]),
        lambda: v.build_index(),
    ):
        with pytest.raises(ValueError, match=r"read-only.*view=False"):
            change()
    v.save(tmp_path / "copy")  # a view can still be saved elsewhere
    assert torch.equal(Catalog.load(tmp_path / "copy").embeddings, c.embeddings)
    e = Catalog.load(_catalog("exact").save(tmp_path / "exact"), view=True)
    assert e.read_only and torch.equal(e.search(q, 3)[1], c.search(q, 3, exact=True)[1])


def test_interface_is_row_based_and_replaceable():
    """Any SearchBackend can stand behind a catalog (here: a recording wrapper around exact)."""

    class Recording(ExactBackend):
        def __init__(self):
            super().__init__()
            self.events = []

        def appended(self, embeddings, start):
            self.events.append(("appended", start, int(embeddings.shape[0])))

        def removed(self, keep):
            self.events.append(("removed", keep.tolist()))

        def updated(self, embeddings, rows):
            self.events.append(("updated", rows.tolist()))

    c = Catalog(["a", "b", "c"], torch.eye(3))
    c._backend = be = Recording()
    c.add(["d"], torch.ones(1, 3))
    c.remove(["b"])
    c.update(["c"], torch.tensor([[1.0, 0.0, 0.0]]))
    assert be.events == [("appended", 3, 4), ("removed", [0, 2, 3]), ("updated", [1])]
    assert isinstance(UsearchBackend(), SearchBackend)
