"""The shared rules of r4t_fast._internal and the 0.1 module aliases of r4t_fast._compat."""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from r4t_fast import _compat
from r4t_fast import _internal as I


# ----------------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------------
def test_check_positive_int() -> None:
    assert I.check_positive_int(3, "k") == 3
    assert I.check_positive_int(np.int64(3), "k") == 3 and type(I.check_positive_int(np.int64(3), "k")) is int
    for bad in (0, -1, True, np.bool_(True), 2.0, "3", None):
        with pytest.raises(ValueError, match=r"^k: expected a positive int, got"):
            I.check_positive_int(bad, "k")
    with pytest.raises(ValueError, match=r"^k: expected an int in \[1, 5\], got 6"):
        I.check_positive_int(6, "k", upper=5)


def test_check_k_and_non_negative() -> None:
    assert I.check_k(I.MAX_K) == I.MAX_K
    for bad in (0, I.MAX_K + 1, 2.7, True):
        with pytest.raises(ValueError, match=r"^k: expected an int in \[1, 64\]"):
            I.check_k(bad)
    assert I.check_non_negative_int(0, "n") == 0
    with pytest.raises(ValueError, match=r"^n: expected a non-negative int, got -1"):
        I.check_non_negative_int(-1, "n")


def test_check_float_seed_choice() -> None:
    assert I.check_float(np.float32(0.5), "w", low=0.0) == 0.5
    for bad, msg in (
        ("0.1", "a number"),
        (True, "a number"),
        (float("nan"), "a finite"),
        (-1.0, r"a number in \[0"),
    ):
        with pytest.raises(ValueError, match=rf"^w: expected {msg}"):
            I.check_float(bad, "w", low=0.0)
    assert I.check_seed(np.int32(7)) == 7
    with pytest.raises(ValueError, match=r"^seed: expected an int, got 1.5"):
        I.check_seed(1.5)
    assert I.check_choice("a", ("a", "b"), "mode") == "a"
    with pytest.raises(ValueError, match=r"^mode: expected one of 'a', 'b', got 'c'"):
        I.check_choice("c", ("a", "b"), "mode")


def test_unit_rows_numpy_and_torch_keep_zero_rows() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(I.unit_rows(x), [[0.6, 0.8], [0.0, 0.0]])
    t = I.unit_rows(torch.tensor([[[0.0, 2.0]], [[0.0, 0.0]]]))
    assert torch.equal(t, torch.tensor([[[0.0, 1.0]], [[0.0, 0.0]]]))
    with pytest.raises(ValueError, match="^x: expected a torch tensor or numpy array"):
        I.unit_rows([1.0, 2.0])


# ----------------------------------------------------------------------------------------------------
# atomic IO
# ----------------------------------------------------------------------------------------------------
def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    I.atomic_write_text(f, "old")

    def failing(p: Path) -> None:
        p.write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        I.atomic_write(f, failing)
    assert f.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # no temporary left behind
    I.atomic_write_bytes(f, b"new")
    assert f.read_bytes() == b"new"
    assert I.sha256_file(f) == "11507a0e2f5e69d5dfa40a62a1bd7b6ee57e6bcd85c67c9b8431b36fff21c437"


def test_publish_dir_replaces_and_keeps(tmp_path: Path) -> None:
    target = tmp_path / "d"
    I.publish_dir(target, lambda p: (p / "x").write_text("1"))
    assert (target / "x").read_text() == "1"
    I.publish_dir(target, lambda p: (p / "y").write_text("2"))  # replaced whole
    assert sorted(p.name for p in target.iterdir()) == ["y"]
    I.publish_dir(target, lambda p: (p / "z").write_text("3"), is_complete=lambda p: True)  # kept
    assert sorted(p.name for p in target.iterdir()) == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_default_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("R4T_CACHE_DIR", str(tmp_path))
    assert I.default_cache_dir() == tmp_path
    monkeypatch.delenv("R4T_CACHE_DIR")
    assert I.default_cache_dir() == Path.home() / ".cache" / "r4t_fast"


def test_machine_description_and_versions() -> None:
    m = I.machine_description()
    assert {"cpu", "cores", "torch_threads", "platform"} <= set(m)
    v = I.package_versions(["numpy", "no-such-package-r4t"])
    assert v["numpy"] == np.__version__ and v["no-such-package-r4t"] == "not installed"


# ----------------------------------------------------------------------------------------------------
# old module paths (one release)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("old", sorted(_compat.ALIASES))
def test_old_module_paths_still_import(old: str) -> None:
    name = f"r4t_fast.{old}"
    sys.modules.pop(name, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = importlib.import_module(name)
    assert any(issubclass(w.category, DeprecationWarning) and name in str(w.message) for w in caught)
    targets = _compat.ALIASES[old]
    if len(targets) == 1:
        assert mod is importlib.import_module(targets[0])  # the very module: patches reach the code
    for t in targets:
        new = importlib.import_module(t)
        for n in getattr(new, "__all__", []):
            assert getattr(mod, n) is getattr(new, n), (old, n)


def test_old_package_level_names() -> None:
    from r4t_fast import data, diffusion, fanout
    from r4t_fast.data.datasets import load_dataset
    from r4t_fast.diffusion.model import SetDenoiser
    from r4t_fast.eval.llm_baselines import LLMFanOutBaseline
    from r4t_fast.fanout.parser import parse_subqueries

    assert data.load_dataset is load_dataset
    assert diffusion.SetDenoiser is SetDenoiser and diffusion.PRESETS is diffusion.MODEL_PRESETS
    assert fanout.parse_subqueries is parse_subqueries
    with pytest.warns(DeprecationWarning, match="r4t_fast.eval.llm_baselines"):
        assert fanout.LLMFanOutBaseline is LLMFanOutBaseline
    from r4t_fast import Catalog, Retriever, ops  # the public API does not move
    from r4t_fast.data.catalog import Catalog as C
    from r4t_fast.diffusion.retriever import Retriever as R
    from r4t_fast.kernels import ops as O

    assert (Catalog, Retriever, ops) == (C, R, O)
