"""Diffusion training targets (teacher shards | reference sets of the train split | both), the
crash-safe training output, and the process helpers of r4t_fast.train.targets."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from helpers import sets_jsonl
from r4t_fast.cli import main as r4t_main
from r4t_fast.train.diffusion import FORMAT, load_trained
from r4t_fast.train.targets import (
    ProcessInfo,
    process_info,
    rank_items,
    reference_targets,
    training_pairs,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from r4t_fast.data.prepare import load_eval_data

    root = tmp_path_factory.mktemp("tgt")
    path = sets_jsonl(root / "sets.jsonl", 40)
    with open(path, "a") as f:  # an untitled set: skipped
        f.write(json.dumps({"set_id": "untitled", "items": [{"item_id": "it1", "text": "red scarf"}]}) + "\n")
    d = load_eval_data(str(path), encoder="hashing:32", cache_dir=str(root / "cache"), progress=False)
    return SimpleNamespace(**{f: getattr(d, f) for f in ("dataset", "catalog", "encoder", "split")},
                           path=path, cache=str(root / "cache"))  # fmt: skip


def _train_sets(data):
    by_id = {s.set_id: s for s in data.dataset.sets}
    return [by_id[i] for i in data.split.train if by_id[i].query is not None]


def test_process_info_and_rank_items() -> None:
    assert process_info({}) == ProcessInfo(0, 1, 0)
    assert process_info({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).rank == 1
    with pytest.raises(ValueError, match="RANK: expected 0 <= RANK < WORLD_SIZE"):
        process_info({"RANK": "2", "WORLD_SIZE": "2"})
    parts = [rank_items(7, ProcessInfo(r, 3)) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(7)) and parts[1] == [1, 4]


def test_reference_targets_come_from_the_train_split_only(data) -> None:
    sets = _train_sets(data)
    pairs = reference_targets(data, k=6, samples=3, seed=1)
    assert pairs.counts["sets"] == len(sets) and pairs.counts["reference"] == 3 * len(sets)
    assert pairs.counts["sets_short"] == len(sets)  # 4 items per set < k = 6: rows re-drawn
    assert pairs.targets.shape == (3 * len(sets), 6, 32) and torch.isnan(pairs.reward).all()
    cat = data.catalog.embeddings.float()
    q = torch.from_numpy(data.encoder.encode([s.query for s in sets])).float()
    for j, s in enumerate(sets):  # in split order, `samples` draws each
        items = cat[torch.from_numpy(data.catalog.id_to_index(s.item_ids))]
        for r in range(3):
            row = 3 * j + r
            torch.testing.assert_close(pairs.cond[row], q[j])
            dist = torch.cdist(pairs.targets[row], items).min(dim=1).values
            assert (dist < 1e-5).all()  # every row is one of the set's items
            hit = torch.cdist(items, pairs.targets[row]).min(dim=1).values
            assert (hit < 1e-5).all()  # n < k: each item appears at least once
    held_out = {s.query for s in data.dataset.sets if s.set_id in set(data.split.val + data.split.test)}
    held_q = torch.from_numpy(data.encoder.encode(sorted(q_ for q_ in held_out if q_))).float()
    assert torch.cdist(pairs.cond, held_q).min() > 1e-4  # no val/test query is a condition
    with pytest.raises(ValueError, match="train split only"):
        reference_targets(data, k=4, split="val")


def test_reference_subsets_when_sets_are_larger_than_k(data) -> None:
    pairs = reference_targets(data, k=2, samples=2, seed=0)
    assert pairs.targets.shape[1:] == (2, 32) and pairs.counts["sets_short"] == 0
    distinct = torch.cdist(pairs.targets[:, :1], pairs.targets[:, 1:]).flatten()
    assert (distinct > 1e-6).any()  # rows drawn without replacement (the items differ)
    again = reference_targets(data, k=2, samples=2, seed=0)
    assert torch.equal(pairs.targets, again.targets)  # seeded


def test_training_pairs_both_and_min_reward(data) -> None:
    g = torch.Generator().manual_seed(0)
    shards = {"cond": torch.randn(5, 32, generator=g), "targets": torch.randn(5, 4, 32, generator=g)}
    shards["reward"] = torch.tensor([0.1, 0.5, 0.9, 0.2, 0.7])
    p = training_pairs("both", shards=shards, data=data, reference_samples=1, min_reward=0.4)
    n_ref = len(_train_sets(data))
    assert p.counts["teacher"] == 3 and p.counts["teacher_below_min_reward"] == 2
    assert p.counts["reference"] == n_ref and p.cond.shape == (3 + n_ref, 32)
    assert p.targets.shape == (3 + n_ref, 4, 32)  # k = the shards' set size
    assert training_pairs("teacher", shards=shards).counts == {"teacher": 5, "reference": 0}
    with pytest.raises(ValueError, match="needs the dataset"):
        training_pairs("reference")
    with pytest.raises(ValueError, match="needs the synthesis shards"):
        training_pairs("both", data=data)
    with pytest.raises(ValueError, match="targets: "):
        training_pairs("teachers", shards=shards)


def _shards(d: Path, data, split: str = "train") -> Path:
    d.mkdir()
    g = torch.Generator().manual_seed(1)
    t = {"cond": torch.randn(6, 32, generator=g), "targets_items": torch.randn(6, 4, 32, generator=g)}
    t["targets_subqueries"], t["reward"] = t["targets_items"].clone(), torch.rand(6, generator=g)
    save_file(t, str(d / "shard-00000.safetensors"))
    space = {"encoder": data.encoder.name, "encoder_spec": "hashing:32", "dataset_spec": str(data.path)}
    (d / "space.json").write_text(json.dumps(space))
    (d / "synthesis.json").write_text(json.dumps({"config": {"split": split}}))
    return d


SMALL = ["--preset", "tiny", "--steps", "3", "--batch-size", "4", "--warmup", "1", "--log-every", "1"]


def test_cli_targets_reference_both_and_teacher(data, tmp_path, capsys) -> None:
    cache = ["--cache-dir", data.cache]
    ref = [
        "train-diffusion",
        "--targets",
        "reference",
        "--dataset",
        str(data.path),
        "--encoder",
        "hashing:32",
    ]
    assert (
        r4t_main([*ref, "--reference-samples", "2", "--k", "5", "--out", str(tmp_path / "R"), *cache, *SMALL])
        == 0
    )
    model, meta = load_trained(tmp_path / "R")
    n_ref = 2 * len(_train_sets(data))
    assert meta["pairs"]["reference"] == n_ref and meta["pairs"]["teacher"] == 0 and meta["n_pairs"] == n_ref
    assert model.cfg.set_size == 5 and meta["train_config"]["targets"] == "reference"
    assert (tmp_path / "R").is_symlink() and (tmp_path / "R" / "train_log.jsonl").is_file()
    assert json.loads((tmp_path / "R" / "manifest.json").read_text())["format"] == FORMAT

    shards = _shards(tmp_path / "syn", data)
    both = ["train-diffusion", "--targets", "both", "--data", str(shards), "--min-reward", "0.0"]
    assert r4t_main([*both, "--out", str(tmp_path / "B"), *cache, *SMALL]) == 0  # dataset from space.json
    _, meta = load_trained(tmp_path / "B")
    assert meta["pairs"]["teacher"] == 6 and meta["pairs"]["reference"] == 4 * len(_train_sets(data))
    assert "saved" in capsys.readouterr().out

    assert r4t_main(["train-diffusion", "--data", str(shards), "--out", str(tmp_path / "T"), *SMALL]) == 0
    _, meta = load_trained(tmp_path / "T")
    assert meta["pairs"] == {"teacher": 6, "reference": 0} and meta["train_config"]["targets"] == "teacher"
    assert r4t_main(["train-diffusion", "--data", str(shards), "--out", str(tmp_path / "T"), *SMALL]) == 0
    assert load_trained(tmp_path / "T")[1]["n_pairs"] == 6  # a second save switches to a new version


def test_cli_target_errors(data, tmp_path, capsys) -> None:
    out = ["--out", str(tmp_path / "X"), *SMALL]
    assert r4t_main(["train-diffusion", "--targets", "teacher", *out]) == 2
    assert "data: --data (synthesis shards) is required" in capsys.readouterr().err
    assert r4t_main(["train-diffusion", "--targets", "reference", *out]) == 2
    assert "dataset: --dataset is required" in capsys.readouterr().err
    val = _shards(tmp_path / "val", data, split="val")
    assert r4t_main(["train-diffusion", "--data", str(val), *out]) == 2
    assert "synthesized from the 'val' split" in capsys.readouterr().err
    assert not (tmp_path / "X").exists()


def test_load_trained_detects_a_corrupt_file(data, tmp_path) -> None:
    shards = _shards(tmp_path / "syn", data)
    assert r4t_main(["train-diffusion", "--data", str(shards), "--out", str(tmp_path / "M"), *SMALL]) == 0
    weights = (tmp_path / "M" / "model.safetensors").resolve()
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="model.safetensors"):
        load_trained(tmp_path / "M")


def test_cli_distill_uses_the_teachers_own_targets(data, tmp_path, capsys) -> None:
    """`r4t distill` rebuilds the pairs the teacher trained on (targets, reference draws) by default."""
    cache = ["--cache-dir", data.cache]
    shards = _shards(tmp_path / "syn", data)
    train = ["train-diffusion", "--targets", "both", "--data", str(shards), "--reference-samples", "2"]
    assert r4t_main([*train, "--out", str(tmp_path / "B"), *cache, *SMALL]) == 0
    small = ["--steps", "2", "--pool-size", "4", "--teacher-steps", "2", "--batch-size", "4", *cache]
    base = ["distill", "--teacher", str(tmp_path / "B"), "--data", str(shards)]
    assert r4t_main([*base, "--out", str(tmp_path / "D"), *small]) == 0
    meta = json.loads((tmp_path / "D" / "config.json").read_text())
    n_ref = 2 * len(_train_sets(data))
    assert meta["targets"] == "both" and meta["pairs"]["teacher"] == 6 and meta["pairs"]["reference"] == n_ref
    assert meta["n_pairs"] == 6 + n_ref and "pairs (both)" in capsys.readouterr().out
    assert r4t_main([*base, "--targets", "teacher", "--out", str(tmp_path / "T"), *small]) == 0
    assert json.loads((tmp_path / "T" / "config.json").read_text())["n_pairs"] == 6
    no_data = ["distill", "--teacher", str(tmp_path / "B"), "--out", str(tmp_path / "X"), *small]
    assert r4t_main([*no_data, "--targets", "teacher"]) == 2
    assert "data: --data (synthesis shards) is required" in capsys.readouterr().err
    assert r4t_main([*no_data, "--targets", "reference"]) == 2
    assert "dataset: --dataset is required" in capsys.readouterr().err
    assert not (tmp_path / "X").exists()
