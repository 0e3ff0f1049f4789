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
    with pytest.raises(CatalogError, match=r"field 'format_version': expected one of \[1, 2\]"):
        Catalog.load(d)


# ----------------------------------------------------------------------------------------------------
# issue 13 regressions
# ----------------------------------------------------------------------------------------------------
def _rewrite(d, name: str, data: bytes) -> None:
    """Replace file ``name`` of saved catalog ``d`` and fix its manifest entry (a consistent edit that
    checksums cannot catch: the loader's own validation must)."""
    from r4t_fast._internal import sha256_file

    real = d.resolve()
    (real / name).write_bytes(data)
    m = json.loads((real / "manifest.json").read_text())
    m["files"][name] = {"bytes": len(data), "sha256": sha256_file(real / name)}
    (real / "manifest.json").write_text(json.dumps(m))


def _edit_manifest(d, **changes) -> None:
    real = d.resolve()
    m = json.loads((real / "manifest.json").read_text())
    for key, value in changes.items():
        if value is KeyError:
            m.pop(key)
        else:
            m[key] = value
    (real / "manifest.json").write_text(json.dumps(m))


def test_defect1_numpy_metadata_serialises_and_a_failed_overwrite_keeps_the_old_version(tmp_path):
    c = _catalog(n=20, d=8)
    c.metadata[3] = {"price": 3}
    c2 = Catalog(c.ids, c.embeddings, metadata=[{"p": np.float32(1.5), "v": np.arange(2)}] * 20)
    assert c2.metadata[0] == {"p": 1.5, "v": [0, 1]} and type(c2.metadata[0]["p"]) is float
    d = c2.save(tmp_path / "cat")
    assert Catalog.load(d).metadata[0] == {"p": 1.5, "v": [0, 1]}

    c2.metadata[7] = {"p": {1, 2}}  # edited after construction: not JSON
    with pytest.raises(ValueError, match=r"metadata: item 7\['p'\]: a set .* is not JSON data"):
        c2.save(d)
    old = Catalog.load(d)  # the previous version, intact
    assert old.metadata[7] == {"p": 1.5, "v": [0, 1]} and len(old) == 20
    c2.metadata[7] = {"p": float("nan")}
    with pytest.raises(ValueError, match=r"metadata: item 7\['p'\]: nan is not valid JSON"):
        c2.save(d)
    Catalog.load(d)
    with pytest.raises(ValueError, match=r"metadata: item 0\['x'\]: inf is not valid JSON"):
        Catalog(["a"], torch.ones(1, 2), metadata=[{"x": float("inf")}])
    with pytest.raises(ValueError, match=r"metadata: item 0: key 1 is a int; JSON keys are strings"):
        Catalog(["a"], torch.ones(1, 2), metadata=[{1: "x"}])


def test_defect2_usearch_single_query_and_k_checks():
    c = _catalog(n=300, d=16, index="usearch")
    q = c.embeddings[5:6].float()
    s, rows = c.search(q, 4)  # B = 1 crashed: 'Matches' object has no attribute 'counts'
    assert rows.shape == (1, 4) and rows[0, 0].item() == 5 and s[0, 0].item() == pytest.approx(1.0, abs=1e-5)
    s, rows = c.search(q.numpy(), 400)  # k > N: sentinels
    assert isinstance(rows, np.ndarray) and (rows[0, 300:] == -1).all() and np.isneginf(s[0, 300:]).all()
    assert sorted(rows[0, :300].tolist()) == list(range(300))
    for bad in (2.7, True, 0, "3", np.float64(2.0)):
        for exact in (False, True):
            with pytest.raises(ValueError, match=r"^k: expected a positive int"):
                c.search(q, bad, exact=exact)
    s, rows = c.search(torch.zeros(0, 16), 3)
    assert rows.shape == (0, 3)


def test_defect8_edited_manifest_names_the_file_and_field(tmp_path):
    d = _catalog(n=30, d=8).save(tmp_path / "cat")
    good = json.loads((d / "manifest.json").read_text())
    cases = [
        (dict(n=KeyError), "field 'n': expected a non-negative int, got None"),
        (dict(n="30"), "field 'n': expected a non-negative int, got '30'"),
        (dict(dim=0), "field 'dim': expected a positive int"),
        (dict(dtype="float64"), "field 'dtype': expected one of"),
        (dict(dtype=["float32"]), "field 'dtype': expected one of"),
        (dict(dtype="float16"), "embeddings.safetensors: dtype float32, manifest field 'dtype' says float16"),
        (dict(index="bogus"), r"field 'index': expected one of \['exact', 'usearch', 'milvus'\], got"),
        (dict(index="usearch"), "field 'files': no entry for 'index.usearch'"),
        (dict(index_params=[1]), "field 'index_params': expected an object"),
        (dict(index_params={"bogus": 1}), "field 'index_params': index_params: unknown key 'bogus'"),
        (dict(n=31), r"shape \(30, 8\), manifest fields 'n', 'dim' say \(31, 8\)"),
        (dict(files={}), "field 'files': no entry for 'embeddings.safetensors'"),
        (dict(files=KeyError), "field 'files': expected an object"),
        (dict(format_version=KeyError), "field 'format_version': expected an int"),
    ]
    for changes, match in cases:
        (d.resolve() / "manifest.json").write_text(json.dumps(good))
        _edit_manifest(d, **changes)
        with pytest.raises(CatalogError, match=match) as info:
            Catalog.load(d)
        assert str(info.value).startswith(str(d)), str(info.value)
    (d.resolve() / "manifest.json").write_bytes(b'{"format": "\xff"}')
    with pytest.raises(CatalogError, match=r"manifest.json: corrupt manifest \(not valid UTF-8"):
        Catalog.load(d)


def test_defect8_items_are_validated_on_load(tmp_path):
    c = _catalog(n=5, d=4)
    d = c.save(tmp_path / "cat")
    lines = (d / "items.jsonl").read_bytes().splitlines(keepends=True)

    def item(**o):
        base = {"id": "x", "text": "t", "category": None, "meta": {}}
        return (json.dumps({**base, **o}) + "\n").encode()

    cases = [
        (
            lines[:1] + [lines[0]] + lines[2:],
            r"items.jsonl:2: field 'id': duplicate id 'item-0' \(first at line 1\)",
        ),
        (lines[:4], r"items.jsonl: 4 items, manifest field 'n' says 5"),
        (lines[:4] + [item(id="")], r"items.jsonl:5: field 'id': expected a non-empty str"),
        (lines[:4] + [item(id=7)], r"items.jsonl:5: field 'id': expected a non-empty str, got 7"),
        (lines[:4] + [item(text=None)], r"items.jsonl:5: field 'text': expected a str"),
        (lines[:4] + [item(category=3)], r"items.jsonl:5: field 'category': expected a str or null"),
        (lines[:4] + [item(meta=[1])], r"items.jsonl:5: field 'meta': expected an object"),
        (lines[:4] + [b"[1]\n"], r"items.jsonl:5: expected a JSON object, got list"),
        (lines[:4] + [b"\xff\xfe\n"], r"items.jsonl:5: not valid UTF-8"),
        (lines[:4] + [b"[" * 100_000 + b"\n"], r"items.jsonl:5: malformed item \(nested too deeply\)"),
        (lines[:4] + [b"{not json\n"], r"items.jsonl:5: malformed item"),
    ]
    for data, match in cases:
        _rewrite(d, "items.jsonl", b"".join(data))
        with pytest.raises(CatalogError, match=match):
            Catalog.load(d)
    _rewrite(d, "embeddings.safetensors", b"garbage!")
    with pytest.raises(CatalogError, match="embeddings.safetensors: unreadable"):
        Catalog.load(d)


def test_defect16_ids_texts_and_metadata_must_be_per_item_sequences():
    e = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"^ids: expected a sequence with one entry per item, got a str"):
        Catalog("abcde", e)
    c = Catalog((f"id{j}" for j in range(5)), e)  # a generator of ids is accepted
    assert c.ids == [f"id{j}" for j in range(5)]
    with pytest.raises(ValueError, match=r"^ids: expected a sequence"):
        Catalog(5, e)
    with pytest.raises(ValueError, match=r"^ids: item 0 must be a non-empty str, got 1"):
        Catalog([1, 2, 3, 4, 5], e)
    with pytest.raises(ValueError, match=r"^metadata: item 1 must be a dict or None, got list"):
        Catalog(list("abcde"), e, metadata=[{}, [1, 2], {}, {}, {}])
    with pytest.raises(ValueError, match=r"^metadata: expected a sequence .* got a dict"):
        Catalog(list("abcde"), e, metadata={"a": 1})
    with pytest.raises(ValueError, match=r"^texts: expected a sequence .* got a str"):
        Catalog(list("abcde"), e, texts="hello")
    with pytest.raises(ValueError, match=r"^categories: item 2 must be a str or None, got int"):
        Catalog(list("abcde"), e, categories=["a", "b", 3, None, "c"])
    c = Catalog(list("abcde"), e, metadata=(m for m in [{"a": 1}, None, {}, {}, {}]))
    assert c.metadata[:2] == [{"a": 1}, {}]


def test_format1_catalog_still_loads(tmp_path):
    """A catalog written by r4t_fast 0.1 (format 1: a plain directory, graph keys = row numbers)."""
    import shutil

    c = _catalog(n=500, d=16, index="usearch")
    c.build_index()
    new = c.save(tmp_path / "new")
    old = tmp_path / "old"
    shutil.copytree(new.resolve(), old)
    (old / "index_keys.npy").unlink()
    m = json.loads((old / "manifest.json").read_text())
    m["format_version"] = 1
    del m["files"]["index_keys.npy"], m["index_changes"]
    (old / "manifest.json").write_text(json.dumps(m))
    c1 = Catalog.load(old)
    q = c.embeddings[:7].float()
    assert torch.equal(c1.search(q, 5)[1], c.search(q, 5)[1])
    c1.save(old)  # replaced by the current format, atomically
    assert old.is_symlink() and Catalog.load(old).ids == c.ids
