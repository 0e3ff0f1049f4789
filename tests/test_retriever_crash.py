"""A Retriever save SIGKILLed at random points leaves the previous version or the new one loadable
(the pattern of ``tests/test_crash_safety.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import kill_during_saves
from r4t_fast import Catalog
from r4t_fast.data.encoders import HashingEncoder
from r4t_fast.diffusion.model import SetDenoiser, get_preset
from r4t_fast.diffusion.retriever import Retriever

posix_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork and SIGKILL (POSIX)")
# the child only saves (no threads of its own), so Python 3.12's fork-with-threads warning does not apply
fork_ok = pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")


@posix_only
@fork_ok
def test_retriever_survives_sigkill_during_save(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SetDenoiser(get_preset("tiny")).eval()
    enc = HashingEncoder(dim=16, seed=0)
    n = 3000  # a catalog big enough that kills land inside the writes
    emb = torch.nn.functional.normalize(torch.randn(n, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    r = Retriever(model, Catalog([f"i{j}" for j in range(n)], emb), enc, encoder_spec="hashing:16")
    path = tmp_path / "ret"

    def save(gen: int) -> None:
        r.defaults["seed"] = gen  # the generation marker, stored in retriever.json
        r.save(path)

    def check(loaded: Retriever, gen: int | None) -> int:
        assert len(loaded.catalog) == n and torch.equal(loaded.catalog.embeddings, r.catalog.embeddings)
        for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values(), strict=True):
            assert torch.equal(a, b)
        got = loaded.defaults["seed"]
        assert gen is None or got == gen
        return got

    kills, mid_write = kill_during_saves(
        save,
        lambda: Retriever.from_pretrained(path),
        check,
        tmp_path,
        kills=22,
        seed=7,
        tmp_prefix=".ret.tmp-",
    )
    last = check(Retriever.from_pretrained(path), None)
    assert mid_write >= 3, "too few kills landed inside a write: the test would not test anything"
    save(last + 1)  # a later save cleans up what the kills left
    assert check(Retriever.from_pretrained(path), last + 1) == last + 1
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".link-" in p.name]
    assert not leftovers
