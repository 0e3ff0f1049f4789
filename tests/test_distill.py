"""Consistency distillation (``r4t distill``): few-step sets on a small synthetic problem, the saved
directory, the CLI's input checks, and the quality-vs-NFE scorer."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import save_file

from r4t_fast import Catalog
from r4t_fast.cli import main as r4t_main
from r4t_fast.diffusion.model import EDM, get_preset, load_model, save_model
from r4t_fast.diffusion.retriever import Retriever
from r4t_fast.diffusion.samplers import generate_sets
from r4t_fast.train.diffusion import DiffusionTrainConfig, train_diffusion
from r4t_fast.train.distill import (
    DistillConfig,
    consistency_levels,
    distill_consistency,
    nfe_grid,
    quality_vs_nfe,
    save_distilled,
)
from test_diffusion import _coverage, _modes_problem


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP's spinning threads
    cost several times the work: run this module single-threaded."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def modes(one_thread):
    """The mode-coverage problem of test_diffusion.py, a teacher trained on it and its distilled student."""
    cond, modes, targets, c = _modes_problem()
    tcfg = DiffusionTrainConfig(
        preset="tiny", steps=400, batch_size=128, lr=2e-3, warmup=50, ema=0.99, log_every=100
    )
    teacher, _ = train_diffusion(c, targets, tcfg, progress=False)
    dcfg = DistillConfig(steps=400, lr=1e-3, pool_size=512, ema=0.98, log_every=100)
    student, log = distill_consistency(teacher, c, targets, dcfg, progress=False)
    return {
        "cond": cond,
        "modes": modes,
        "targets": targets,
        "c": c,
        "teacher": teacher,
        "student": student,
        "log": log,
        "cfg": dcfg,
    }


def _cov(model, m, sampler, steps) -> float:
    out = generate_sets(EDM(model), m["cond"], steps=steps, sampler=sampler, seed=1)
    return float(_coverage(out, m["modes"]).mean())


def test_distilled_model_covers_the_modes_in_two_steps(modes):
    """Each query's set is 3 separated unit vectors. At 2 network evaluations the teacher's best few-step
    solver places no row near a mode; the distilled model at 2 consistency steps covers most modes and
    beats the teacher at 8 evaluations (measured: 0.67 vs 0.00 at 2 NFE, 0.56 at 8, 0.78 at 31)."""
    teacher, student = modes["teacher"], modes["student"]
    assert modes["log"][-1]["loss"] < modes["log"][0]["loss"] / 2
    two = _cov(student, modes, "consistency", 2)
    assert _cov(teacher, modes, "dpmpp_2m", 2) < 0.1
    assert two >= 0.55, two
    assert two > _cov(teacher, modes, "dpmpp_2m", 8) - 0.05
    assert two >= 0.7 * _cov(teacher, modes, "heun", 16)


def test_save_distilled_is_a_retriever_directory(modes, tmp_path):
    """Distilled from a retriever directory: the output is one too (catalog copied, consistency
    sampling recorded), loads with load_model and Retriever.from_pretrained, and replaces an old one."""
    from r4t_fast.data.encoders import HashingEncoder

    enc = HashingEncoder(dim=16, seed=0)
    emb = torch.nn.functional.normalize(modes["modes"].reshape(-1, 16), dim=1)
    cat = Catalog([f"m{i}" for i in range(len(emb))], emb, [f"mode {i}" for i in range(len(emb))])
    Retriever(modes["teacher"], cat, enc, encoder_spec="hashing:16").save(tmp_path / "teacher")
    out = tmp_path / "distilled"
    out.mkdir()  # a plain model directory of an older save (no manifest): replaced, not refused
    (out / "model.safetensors").write_bytes(b"old version")
    (out / "stale.txt").write_text("old version")
    save_distilled(modes["student"], out, modes["cfg"], modes["log"], teacher_dir=tmp_path / "teacher")
    assert not (out / "stale.txt").exists() and (out / "manifest.json").is_file()  # checksummed
    model, meta = load_model(out)
    assert meta["sampling"] == {"sampler": "consistency", "steps": 2, "guidance": 0.0}
    assert meta["distill_config"]["method"] == "ode"
    assert len((out / "distill_log.jsonl").read_text().splitlines()) == len(modes["log"])
    r = Retriever.from_pretrained(out)
    assert r.defaults["sampler"] == "consistency" and r.defaults["steps"] == 2
    sets = r.retrieve_embeddings(modes["cond"][:3].contiguous(), 3)
    assert all(len(set(s.item_ids)) == 3 for s in sets)
    a = generate_sets(EDM(model), modes["cond"], steps=2, sampler="consistency", seed=4)
    b = generate_sets(EDM(modes["student"]), modes["cond"], steps=2, sampler="consistency", seed=4)
    assert torch.equal(a, b)


def test_quality_vs_nfe_scores_every_grid_point(modes):
    """Item-level metrics per (sampler, steps) on the same queries; a catalog of the modes themselves."""
    emb = torch.nn.functional.normalize(modes["modes"].reshape(-1, 16), dim=1)
    cat = Catalog([f"m{i}" for i in range(len(emb))], emb, None)
    r = Retriever(modes["student"], cat, steps=2, sampler="consistency")
    refs = [[3 * q + j for j in range(3)] for q in range(len(modes["cond"]))]
    grid = [("heun", 2), ("dpmpp_2m", 2), ("consistency", 1), ("consistency", 2)]
    rows = quality_vs_nfe(r, modes["cond"].numpy(), refs, grid, k=3, budget=6)
    assert [(x["sampler"], x["steps"], x["nfe"]) for x in rows] == [
        ("heun", 2, 3),
        ("dpmpp_2m", 2, 2),
        ("consistency", 1, 1),
        ("consistency", 2, 2),
    ]
    for x in rows:
        assert x["fair_budget"] == 6 and x["queries"] == 12
        assert 0 <= x["recall_at_fair"] <= 1 and 1 <= x["vendi"] <= 3
        assert 0 <= x["item_relevance"] <= 1 and x["row_groundedness"] <= 1
    by = {(x["sampler"], x["steps"]): x for x in rows}
    assert by[("consistency", 2)]["recall_at_fair"] > 0.5
    default = quality_vs_nfe(r, modes["cond"].numpy(), refs, k=3, budget=6)
    assert ("consistency", 4) in [(x["sampler"], x["steps"]) for x in default]


def test_grid_and_levels():
    assert nfe_grid(["heun", "consistency"], [1, 2, 16, 31]) == [
        ("heun", 1),
        ("heun", 16),
        ("consistency", 1),
        ("consistency", 2),
    ]
    levels = consistency_levels(DistillConfig(), get_preset("tiny", sigma_data=0.1))
    assert levels[0] == 80.0 and levels[-1] == pytest.approx(0.1) and len(levels) == 5


def test_distill_config_validation():
    with pytest.raises(ValueError, match="method: expected 'ode' or 'cd'"):
        DistillConfig(method="pd")
    with pytest.raises(ValueError, match="sample_steps: expected 1, 2, 3 or 4"):
        DistillConfig(sample_steps=8)
    with pytest.raises(ValueError, match="levels: expected an int >= 2"):
        DistillConfig(levels=1)
    with pytest.raises(ValueError, match="target_ema"):
        DistillConfig(target_ema=1.0)


def test_cd_method_runs_and_respects_the_boundary(one_thread):
    """The bootstrapped CD loop (Song et al.) runs and lowers its loss on a tiny problem."""
    g = torch.Generator().manual_seed(0)
    cond = torch.nn.functional.normalize(torch.randn(32, 16, generator=g), dim=1)
    targets = cond[:, None, :].expand(-1, 4, -1) + 0.05 * torch.randn(32, 4, 16, generator=g)
    teacher, _ = train_diffusion(
        cond, targets, DiffusionTrainConfig(preset="tiny", steps=30, warmup=5), progress=False
    )
    _, log = distill_consistency(
        teacher,
        cond,
        targets,
        DistillConfig(method="cd", steps=40, lr=1e-3, levels=6, batch_size=32, log_every=10),
        progress=False,
    )
    assert all(math.isfinite(r["loss"]) for r in log) and log[-1]["loss"] < log[0]["loss"]
    with pytest.raises(ValueError, match="do not match the teacher"):
        distill_consistency(teacher, cond, targets[:, :3], DistillConfig(steps=1), progress=False)


def _shards(path, cond, targets):
    path.mkdir(parents=True, exist_ok=True)
    save_file(
        {"cond": cond.contiguous(), "targets": targets.contiguous()}, str(path / "shard-00000.safetensors")
    )
    return path


def test_cli_distill_end_to_end_and_input_errors(tmp_path, capsys, one_thread):
    torch.manual_seed(0)
    from r4t_fast.diffusion.model import SetDenoiser

    teacher = SetDenoiser(get_preset("tiny")).eval()
    save_model(teacher, tmp_path / "teacher")
    g = torch.Generator().manual_seed(0)
    data = _shards(tmp_path / "data", torch.randn(8, 16, generator=g), torch.randn(8, 4, 16, generator=g))
    base = ["distill", "--teacher", str(tmp_path / "teacher"), "--data", str(data)]
    small = ["--steps", "2", "--pool-size", "4", "--teacher-steps", "2", "--batch-size", "4"]
    assert r4t_main([*base, "--out", str(tmp_path / "out"), *small]) == 0
    model, meta = load_model(tmp_path / "out")
    assert meta["sampling"]["sampler"] == "consistency" and meta["n_pairs"] == 8
    assert "saved" in capsys.readouterr().out

    bad = _shards(tmp_path / "bad", torch.randn(8, 16), torch.randn(8, 3, 16))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = [
        (["--teacher", str(tmp_path / "nope")], "--teacher: .* is not a directory"),
        (["--teacher", str(tmp_path / "empty")], "--teacher: .* is not a diffusion model directory"),
        (["--data", str(tmp_path / "empty")], "--data: no shard-"),
        (["--data", str(bad)], r"--data: pairs cond \(n, 16\), targets \(n, 3, 16\) do not match"),
        (["--out", str(tmp_path / "afile")], "--out: .* exists and is not a directory"),
        (["--out", str(tmp_path / "teacher")], "--out: .* is the teacher directory"),
        (["--sample-steps", "7"], "sample_steps: expected 1, 2, 3 or 4"),
    ]
    for extra, pattern in cases:
        argv = dict(zip(base[1::2], base[2::2], strict=True))
        argv["--out"] = str(tmp_path / "o2")
        argv.update(dict(zip(extra[::2], extra[1::2], strict=True)))
        code = r4t_main(["distill", *[t for kv in argv.items() for t in kv], *small])
        err = capsys.readouterr().err.strip()
        assert code == 2, (extra, err)
        assert len(err.splitlines()) == 1 and err.startswith("r4t distill: "), err
        assert re.search(pattern, err), (pattern, err)
    assert not (tmp_path / "o2").exists()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["format"] == "r4t_fast.diffusion"
