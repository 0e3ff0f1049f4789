"""Two processes on the CPU: ``r4t synthesize``, ``r4t train-diffusion`` and ``r4t train-rl`` under
``accelerate launch`` give complete, loadable outputs (synthesis: the same shards as one process), and
the processes really cooperate: after DDP training both replicas hold the same weights, which differ
from what one process trains on its half of the pairs (gradients are averaged); in GRPO both ranks
score different queries and the saved policy differs from the one it started from
(``tests/mp_worker.py`` leaves the per-rank evidence).

Launched as ``accelerate launch --multi_gpu --num_processes 2`` (torchrun underneath; our code keeps
the CPU): in accelerate 1.15, ``accelerate launch --cpu --num_processes 2`` starts a single process
unless an MPI hostfile is given, so it would not test two processes. Slow: about a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_tiny_policy, sets_jsonl

WORKER = str(Path(__file__).with_name("mp_worker.py"))

pytestmark = pytest.mark.slow

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
LAUNCH += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
CLI = [sys.executable, "-m", "r4t_fast.cli"]


def _run(argv: list[str], timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    return p, time.perf_counter() - t0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    return {
        "root": root,
        "policy": make_tiny_policy(root / "policy"),
        "ds": sets_jsonl(root / "sets.jsonl", 24),
        "cache": str(root / "cache"),
    }


def _synth_args(setup, out: Path) -> list[str]:
    return ["synthesize", "--dataset", str(setup["ds"]), "--out", str(out), "--encoder", "hashing:32",
            "--cache-dir", setup["cache"], "--policy", str(setup["policy"]), "--samples", "3", "--keep", "2",
            "--k", "3", "--max-new-tokens", "48", "--batch-size", "8", "--queries-per-shard", "4",
            "--min-subqueries", "1", "--wait-poll-s", "0.2"]  # fmt: skip


def test_synthesis_and_diffusion_on_two_processes(setup) -> None:
    root = setup["root"]
    two, wall_syn = _run([*LAUNCH, "-m", "r4t_fast.cli", *_synth_args(setup, root / "syn2")])
    assert two.returncode == 0, two.stderr[-3000:]
    one, _ = _run([*CLI, *_synth_args(setup, root / "syn1")])
    assert one.returncode == 0, one.stderr[-3000:]
    s2 = json.loads((root / "syn2" / "synthesis.json").read_text())
    s1 = json.loads((root / "syn1" / "synthesis.json").read_text())
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    for key in ("sampled", "kept", "dropped_filter", "dropped_format"):
        assert s2["counts"][key] == s1["counts"][key], key
    assert s2["counts"]["kept"] == 2 * s2["n_queries"]
    shards = sorted(p.name for p in (root / "syn2").glob("shard-*.safetensors"))
    assert shards == sorted(p.name for p in (root / "syn1").glob("shard-*.safetensors"))
    assert len(shards) == s2["n_shards"] and s2["rank0"]["shards_written"] == (len(shards) + 1) // 2
    for name in shards:  # shard i is seeded by i: the same whichever process wrote it
        a, b = load_file(str(root / "syn2" / name)), load_file(str(root / "syn1" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name

    from r4t_fast.train.diffusion import load_trained

    args = ["train-diffusion", "--data", str(root / "syn2"), "--targets", "both", "--reference-samples", "2",
            "--cache-dir", setup["cache"], "--preset", "tiny", "--steps", "6", "--batch-size", "8",
            "--warmup", "2", "--log-every", "2"]  # fmt: skip
    dif, wall_dif = _run([*LAUNCH, "-m", "r4t_fast.cli", *args, "--out", str(root / "dif2")])
    assert dif.returncode == 0, dif.stderr[-3000:]
    assert dif.stdout.count("saved ") == 1  # rank 0 alone saves and reports
    model, meta = load_trained(root / "dif2")
    assert meta["world_size"] == 2 and meta["pairs"]["teacher"] == s2["counts"]["kept"]
    assert (
        meta["pairs"]["reference"] > 0
        and meta["n_pairs"] == meta["pairs"]["teacher"] + meta["pairs"]["reference"]
    )
    log = [json.loads(x) for x in (root / "dif2" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6] and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    print(f"\nwall: synthesis 2 procs {wall_syn:.1f}s, train-diffusion 2 procs {wall_dif:.1f}s")


def test_ddp_replicas_agree_and_average_gradients(tmp_path) -> None:
    """Both ranks end with bitwise-equal weights (every step's gradients all-reduced), and those differ
    from one process trained on rank 0's half of the pairs with rank 0's draws (what rank 0 would hold
    if its gradients were not averaged with rank 1's)."""
    import mp_worker
    from r4t_fast.train.diffusion import train_diffusion
    from r4t_fast.train.targets import ProcessInfo, rank_items

    p, _ = _run([*LAUNCH, WORKER, "diffusion", str(tmp_path)])
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    cond, targets = mp_worker.pairs()
    half = torch.tensor(rank_items(len(cond), ProcessInfo(0, 2)))
    cfg = mp_worker.diffusion_config()
    cfg.batch_size //= 2  # rank 0's per-process batch
    alone, _ = train_diffusion(cond[half], targets[half], cfg, progress=False)
    diff = max(float((alone.state_dict()[k] - r0[k]).abs().max()) for k in r0)
    assert diff > 1e-4, "the two-process weights equal one process on half the data: no gradient averaging"


def test_train_rl_on_two_processes(setup) -> None:
    root = setup["root"]
    cfg = {"encoder": "hashing:32", "cache_dir": setup["cache"], "k": 3, "one_shot": False,
           "num_generations": 2, "max_completion_length": 48, "num_iterations": 1, "lora_r": 4,
           "lora_alpha": 8, "lora_target_modules": ["q_proj", "v_proj"], "save_steps": 1,
           "num_threads": 1, "max_train_queries": 4, "log_kl": False}  # fmt: skip
    (root / "rl.json").write_text(json.dumps(cfg))
    args = ["train-rl", "--dataset", str(setup["ds"]), "--policy", str(setup["policy"]), "--out",
            str(root / "rl2"), "--config", str(root / "rl.json"), "--max-steps", "1"]  # fmt: skip
    rl, wall = _run([*LAUNCH, WORKER, "rl", str(root / "seen"), "--", *args])
    print(f"\nwall: train-rl 2 procs {wall:.1f}s")
    assert rl.returncode == 0, rl.stderr[-4000:]
    assert (root / "rl2" / "policy" / "config.json").is_file()
    record = json.loads((root / "rl2" / "rl_config.json").read_text())
    assert record["reward_task"] == "wscr"
    seen = {}
    for r in (0, 1):  # the queries each rank's reward function scored
        lines = (root / "seen" / f"queries-rank{r}.jsonl").read_text().splitlines()
        seen[r] = {q for line in lines for q in json.loads(line)}
    assert seen[0] and seen[1] and seen[0] != seen[1], seen
    before = load_file(str(setup["policy"] / "model.safetensors"))
    after = load_file(str(root / "rl2" / "policy" / "model.safetensors"))
    changed = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    assert changed, "the tuned policy equals the initial one"
