"""Run by tests/test_multiprocess.py under ``accelerate launch --multi_gpu --num_processes 2`` (not a
test module): each rank leaves evidence of what it did, so the test can check that the processes
really cooperated.

    mp_worker.py diffusion OUT      train_diffusion on fixed pairs; every rank saves its EMA weights
    mp_worker.py rl OUT -- ARGV     ``r4t`` ARGV (train-rl); every rank records the queries its reward
                                    function was called with in OUT/queries-rank<R>.jsonl
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def pairs(n: int = 32, L: int = 4, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed training pairs: the same on every rank and in the test's own one-process run."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    targets = torch.nn.functional.normalize(cond[:, None, :] + 0.5 * torch.randn(n, L, d, generator=g), dim=2)
    return cond, targets


def diffusion_config():
    from r4t_fast.train.diffusion import DiffusionTrainConfig

    # sigma_data and cond_offset fixed: "auto" would derive them from the data a run sees
    return DiffusionTrainConfig(
        preset="tiny", steps=6, batch_size=8, warmup=2, log_every=2, ema=0.5, sigma_data=0.5,
        cond_offset=0.0, seed=0, threads=1,
    )  # fmt: skip


def main(argv: list[str]) -> int:
    mode, out = argv[0], Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    if mode == "diffusion":
        from safetensors.torch import save_file

        from r4t_fast.train.diffusion import train_diffusion

        cond, targets = pairs()
        model, _ = train_diffusion(cond, targets, diffusion_config(), progress=False)
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"rank{rank}.safetensors")
        )
        return 0
    if mode == "rl":
        from r4t_fast import cli
        from r4t_fast.fanout import rewards

        original = rewards.RewardFunction.__call__

        def recording(self, prompts=None, completions=None, log_metric=None, **kwargs):
            with open(out / f"queries-rank{rank}.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(list(kwargs.get(self.query_key) or [])) + "\n")
            return original(self, prompts, completions, log_metric, **kwargs)

        rewards.RewardFunction.__call__ = recording
        return cli.main(argv[argv.index("--") + 1 :])
    raise SystemExit(f"mode: expected diffusion or rl, got {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
