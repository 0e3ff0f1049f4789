"""Crash-safe saved directories (``_internal.save_dir_atomically`` / ``verify_dir``) and the catalog on
top of them: a save that fails or is SIGKILLed at any point leaves the previous version loadable."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import kill_during_saves
from r4t_fast import Catalog
from r4t_fast import _internal as I
from r4t_fast.data.catalog import CatalogError

posix_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork and SIGKILL (POSIX)")
# the child only saves (no threads of its own), so Python 3.12's fork-with-threads warning does not apply
fork_ok = pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")


def _writer(payload: dict[str, bytes]):
    def write(tmp: Path) -> None:
        for rel, data in payload.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)

    return write


def _hidden(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# ----------------------------------------------------------------------------------------------------
# the mechanism
# ----------------------------------------------------------------------------------------------------
def test_save_publishes_a_symlink_to_a_verified_version(tmp_path: Path) -> None:
    out = I.save_dir_atomically(
        tmp_path / "d", _writer({"a.txt": b"one", "sub/b.bin": b"\0" * 10}), format="t", meta={"n": 1}
    )
    assert out == tmp_path / "d" and out.is_symlink() and os.readlink(out) == ".d.v1"
    m = I.verify_dir(out, format="t", format_versions=[1])
    assert m.path == tmp_path / ".d.v1" and m.meta == {"n": 1} and m.nested == ()
    assert m.files["sub/b.bin"] == {"bytes": 10, "sha256": I.sha256_file(out / "sub" / "b.bin")}
    assert (out / "a.txt").read_bytes() == b"one"

    I.save_dir_atomically(out, _writer({"a.txt": b"two"}), format="t", meta={"n": 2})
    I.save_dir_atomically(out, _writer({"a.txt": b"three"}), format="t", meta={"n": 3})
    assert I.verify_dir(out).meta == {"n": 3} and (out / "a.txt").read_bytes() == b"three"
    assert _hidden(tmp_path, "d") == [".d.lock", ".d.v2", ".d.v3"]  # keep=2: current + previous
    I.save_dir_atomically(out, _writer({"a.txt": b"four"}), format="t", keep=1)
    assert _hidden(tmp_path, "d") == [".d.lock", ".d.v4"]


def test_failed_write_leaves_previous_version(tmp_path: Path) -> None:
    d = I.save_dir_atomically(tmp_path / "d", _writer({"a": b"old"}), format="t")

    def failing(tmp: Path) -> None:
        (tmp / "a").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        I.save_dir_atomically(d, failing, format="t")
    assert (d / "a").read_bytes() == b"old" and I.verify_dir(d).files["a"]["bytes"] == 3
    assert _hidden(tmp_path, "d") == [".d.lock", ".d.v1"]  # the temporary is gone


def test_bad_meta_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    for meta, match in [
        ({"files": 1}, "reserved"),
        ({"x": np.float32(1.0)}, "must be strict JSON"),
        ({"x": float("nan")}, "must be strict JSON"),
    ]:
        with pytest.raises(ValueError, match=f"^meta: .*{match}"):
            I.save_dir_atomically(tmp_path / "d", _writer({"a": b"1"}), format="t", meta=meta)
    assert not (tmp_path / "d").exists()
    with pytest.raises(ValueError, match="^keep: expected a positive int"):
        I.save_dir_atomically(tmp_path / "d", _writer({}), format="t", keep=0)


def test_refuses_to_replace_what_it_did_not_write(tmp_path: Path) -> None:
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="non-empty directory without manifest.json"):
        I.save_dir_atomically(foreign, _writer({"a": b"1"}), format="t")
    assert (foreign / "notes.txt").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        I.save_dir_atomically(tmp_path / "file", _writer({}), format="t")
    os.symlink(foreign, tmp_path / "link")
    with pytest.raises(ValueError, match="symlink not made by r4t_fast"):
        I.save_dir_atomically(tmp_path / "link", _writer({}), format="t")
    other = I.save_dir_atomically(tmp_path / "other", _writer({"a": b"1"}), format="retriever")
    with pytest.raises(ValueError, match="holds a saved 'retriever', not 't'"):
        I.save_dir_atomically(other, _writer({}), format="t")
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory (e.g. made by mkdtemp) is replaced
    I.save_dir_atomically(empty, _writer({"a": b"1"}), format="t")
    assert empty.is_symlink() and I.verify_dir(empty).files["a"]["bytes"] == 1


def test_write_may_not_leave_symlinks_or_its_own_manifest(tmp_path: Path) -> None:
    def with_link(tmp: Path) -> None:
        os.symlink("/etc/passwd", tmp / "x")

    with pytest.raises(ValueError, match="is a symlink"):
        I.save_dir_atomically(tmp_path / "d", with_link, format="t")
    with pytest.raises(ValueError, match="manifest.json is reserved"):
        I.save_dir_atomically(tmp_path / "d", _writer({"manifest.json": b"{}"}), format="t")
    assert not (tmp_path / "d").exists() and _hidden(tmp_path, "d") == [".d.lock"]


def test_plain_saved_directory_is_migrated_atomically(tmp_path: Path) -> None:
    legacy = tmp_path / "cat"  # as written by r4t_fast 0.1: a plain directory with a manifest
    legacy.mkdir()
    (legacy / "a").write_bytes(b"old")
    (legacy / "manifest.json").write_text(
        json.dumps(
            {
                "format": "t",
                "format_version": 1,
                "files": {"a": {"bytes": 3, "sha256": I.sha256_file(legacy / "a")}},
            }
        )
    )
    assert I.verify_dir(legacy).path == legacy  # plain directories load too (e.g. a copy)
    I.save_dir_atomically(legacy, _writer({"a": b"new"}), format="t")
    assert legacy.is_symlink() and (legacy / "a").read_bytes() == b"new"
    assert (tmp_path / ".cat.v1" / "a").read_bytes() == b"old"  # the old one is the previous version


def test_legacy_hook_replaces_an_old_layout_without_manifest(tmp_path: Path) -> None:
    old = tmp_path / "ret"
    old.mkdir()
    (old / "retriever.json").write_text("{}")  # an old retriever directory: no manifest.json
    with pytest.raises(ValueError, match="without manifest.json"):
        I.save_dir_atomically(old, _writer({"a": b"1"}), format="retriever")
    I.save_dir_atomically(
        old, _writer({"a": b"1"}), format="retriever", legacy=lambda p: (p / "retriever.json").is_file()
    )
    assert old.is_symlink() and (tmp_path / ".ret.v1" / "retriever.json").is_file()


def test_concurrent_saves_are_serialised(tmp_path: Path) -> None:
    import threading

    errors: list[BaseException] = []

    def saver(j: int) -> None:
        try:
            for g in range(4):
                I.save_dir_atomically(tmp_path / "d", _writer({"a": f"{j}-{g}".encode() * 1000}), format="t")
                I.verify_dir(tmp_path / "d")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=saver, args=(j,)) for j in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert _hidden(tmp_path, "d") == [".d.lock", ".d.v15", ".d.v16"]


def test_nested_saved_directories(tmp_path: Path) -> None:
    def outer(tmp: Path) -> None:
        (tmp / "model.bin").write_bytes(b"weights")
        I.save_dir_atomically(tmp / "catalog", _writer({"items": b"abc"}), format="inner")

    d = I.save_dir_atomically(tmp_path / "ret", outer, format="outer")
    m = I.verify_dir(d)
    assert m.nested == ("catalog",) and set(m.files) == {"model.bin"}  # the catalog has its own manifest
    # the nested directory can be re-saved on its own without invalidating the outer manifest
    I.save_dir_atomically(d / "catalog", _writer({"items": b"abcd"}), format="inner")
    assert I.verify_dir(d).nested == ("catalog",) and (d / "catalog" / "items").read_bytes() == b"abcd"
    (d / "catalog" / "items").write_bytes(b"xxxx")  # a corrupt nested file is caught by the outer check
    with pytest.raises(I.SavedDirError, match="catalog/items: checksum mismatch"):
        I.verify_dir(d)
    I.verify_dir(d, nested=False)
    # a copy (symlinks followed) is a plain directory tree that still verifies
    copy = Path(shutil.copytree(tmp_path / "ret", tmp_path / "copy"))
    (copy / "catalog" / "items").write_bytes(b"abcd")
    assert I.verify_dir(copy).nested == ("catalog",)


def test_verify_refuses_edits_naming_the_file_and_field(tmp_path: Path) -> None:
    d = I.save_dir_atomically(tmp_path / "d", _writer({"a": b"0123456789"}), format="t")
    real = I.verify_dir(d).path
    (real / "a").write_bytes(b"012345678")
    with pytest.raises(I.SavedDirError, match=r"d/a: size 9 bytes, manifest says 10 \(truncated\?\)"):
        I.verify_dir(d)
    (real / "a").write_bytes(b"0123456780")
    with pytest.raises(I.SavedDirError, match="d/a: checksum mismatch"):
        I.verify_dir(d)
    I.verify_dir(d, verify=False)  # sizes only
    (real / "a").unlink()
    with pytest.raises(I.SavedDirError, match="d/a: missing"):
        I.verify_dir(d)

    good = json.loads((real / "manifest.json").read_text())
    cases = [
        ({**good, "format": 3}, "field 'format': expected a str"),
        ({**good, "format_version": "1"}, "field 'format_version': expected an int"),
        ({**good, "format_version": True}, "field 'format_version': expected an int"),
        ({**good, "files": []}, "field 'files': expected an object"),
        ({**good, "files": {"../x": {"bytes": 1, "sha256": "0" * 64}}}, "field 'files' key"),
        ({**good, "files": {"/etc/passwd": {"bytes": 1, "sha256": "0" * 64}}}, "field 'files' key"),
        (
            {**good, "files": {"a": {"bytes": -1, "sha256": "0" * 64}}},
            r"\['bytes'\]: expected a non-negative",
        ),
        ({**good, "files": {"a": {"bytes": 1, "sha256": "xyz"}}}, r"\['sha256'\]: expected 64 lowercase hex"),
        ({**good, "files": {"a": 5}}, r"field 'files'\['a'\]: expected an object"),
        ({**good, "nested": "x"}, "field 'nested'"),
        ([1, 2], "expected a JSON object, got list"),
    ]
    for manifest, match in cases:
        (real / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(I.SavedDirError, match=match):
            I.verify_dir(d)
    (real / "manifest.json").write_bytes(b"\xff\xfe")
    with pytest.raises(I.SavedDirError, match="not valid UTF-8"):
        I.verify_dir(d)
    (real / "manifest.json").write_text("[" * 100_000)
    with pytest.raises(I.SavedDirError, match="nested too deeply"):
        I.verify_dir(d)
    (real / "manifest.json").write_text(json.dumps({**good, "format": "other"}))
    with pytest.raises(I.SavedDirError, match="field 'format': expected 't'"):
        I.verify_dir(d, format="t")
    with pytest.raises(I.SavedDirError, match="no saved directory"):
        I.verify_dir(tmp_path / "absent")


def test_stale_temporaries_are_cleaned_and_a_lost_link_recovered(tmp_path: Path) -> None:
    d = I.save_dir_atomically(tmp_path / "d", _writer({"a": b"1"}), format="t")
    (tmp_path / ".d.tmp-9-dead").mkdir()  # what a killed save leaves
    os.symlink(".d.v1", tmp_path / ".d.link-9-dead")
    I.save_dir_atomically(d, _writer({"a": b"2"}), format="t")
    assert _hidden(tmp_path, "d") == [".d.lock", ".d.v1", ".d.v2"]
    os.unlink(d)  # as if killed just after a plain (0.1) directory was moved aside
    assert I.verify_dir(d).path == tmp_path / ".d.v2"
    I.save_dir_atomically(d, _writer({"a": b"3"}), format="t")
    assert (d / "a").read_bytes() == b"3"


# ----------------------------------------------------------------------------------------------------
# SIGKILL during save, at random points
# ----------------------------------------------------------------------------------------------------
@posix_only
@fork_ok
@pytest.mark.parametrize("index", ["exact", "usearch"])
def test_catalog_survives_sigkill_during_save(tmp_path: Path, index: str) -> None:
    n, dim = 4000, 32
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    cat = Catalog([f"item-{j}" for j in range(n)], emb, texts=[f"t{j}" for j in range(n)], index=index)
    if index == "usearch":
        cat.build_index()
    path = tmp_path / "cat"

    def save(gen: int) -> None:
        cat.metadata[0] = {"gen": gen}
        cat.save(path)

    def check(c: Catalog, gen: int | None) -> int:
        assert len(c) == n and c.ids == cat.ids and torch.equal(c.embeddings, cat.embeddings)
        got = c.metadata[0]["gen"]
        assert gen is None or got == gen
        return got

    _, mid = kill_during_saves(save, lambda: Catalog.load(path), check, tmp_path, kills=24, seed=13)
    # kills that landed inside a write (a temporary was left): only those test the crash safety
    assert mid >= 3, "too few kills landed inside a write: the test would not test anything"
    q = emb[:3].contiguous()
    assert torch.equal(Catalog.load(path).search(q, 5)[1][:, 0], torch.arange(3))


@posix_only
@fork_ok
def test_mechanism_survives_sigkill(tmp_path: Path) -> None:
    payload = {f"f{j}.bin": os.urandom(200_000) for j in range(8)}
    path = tmp_path / "cat"

    def save(gen: int) -> None:
        I.save_dir_atomically(path, _writer(payload), format="t", meta={"gen": gen})

    def check(m: I.DirManifest, gen: int | None) -> int:
        assert set(m.files) == set(payload)
        assert all((m.path / k).read_bytes() == v for k, v in payload.items())
        return m.meta["gen"]

    _, mid = kill_during_saves(save, lambda: I.verify_dir(path), check, tmp_path, kills=30, seed=7)
    assert mid >= 3, "too few kills landed inside a write: the test would not test anything"


def test_catalog_error_is_a_saved_dir_error(tmp_path: Path) -> None:
    with pytest.raises(I.SavedDirError):
        Catalog.load(tmp_path / "nothing")
    with pytest.raises(CatalogError, match="missing manifest.json"):
        Catalog.load(tmp_path / "nothing")
