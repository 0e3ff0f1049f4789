"""Shared benchmark harness: environment record, timing, result files."""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from r4t_fast._internal import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"

CPU_SMALL_EDM: dict = {"preset": "cpu-small", "batch_size": 128, "lr": 5e-4, "warmup": 100, "ema": 0.995}
"""The cpu-small set model's EDM training settings (the cpu-small pipeline preset's diffusion stage before
issue 18 turned the row loss on there): the base of rows_val.py's levers and bench_sampler.py's model."""


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def environment(extra_packages: tuple[str, ...] = ()) -> dict:
    """Machine, versions and build info recorded next to every number."""
    import r4t_fast

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        },
        "python": sys.version.split()[0],
        "versions": {
            p: _version(p) for p in ("r4t_fast", "torch", "numpy", *extra_packages) if _version(p) is not None
        },
        "build_info": r4t_fast.build_info(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    try:
        import torch

        env["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        pass
    return env


def timeit(
    fn: Callable[[], object], repeat: int = 3, warmup: int = 1, sync: Callable[[], None] | None = None
) -> dict:
    """Run ``fn`` ``warmup`` + ``repeat`` times; return min/median seconds."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(repeat):
        gc.collect()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return {"min_s": times[0], "median_s": times[len(times) // 2], "repeat": repeat}


def median_ms(fn: Callable[[], object], calls: int, warmup: int = 1, per: int = 1) -> float:
    """Median wall milliseconds of ``calls`` back-to-back calls of ``fn`` after ``warmup`` untimed ones,
    divided by ``per`` (queries per call). No ``gc.collect()`` between calls (unlike :func:`timeit`): for
    sub-millisecond calls whose cache state is part of what is measured."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return (
        1000.0 * ts[len(ts) // 2] / per
        if len(ts) % 2
        else 500.0 * (ts[len(ts) // 2 - 1] + ts[len(ts) // 2]) / per
    )


def write_results(name: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    jp = RESULTS / f"{name}.json"
    mp = RESULTS / f"{name}.md"
    jp.parent.mkdir(parents=True, exist_ok=True)
    jp.write_text(json.dumps(payload, indent=2) + "\n")
    mp.write_text(markdown)
    return jp, mp


def paired_ci(a: dict, b: dict, key: str) -> dict | None:
    """Paired 95 % bootstrap CI of record ``a`` minus record ``b`` on ``key`` over their common queries
    (:func:`r4t_fast.eval.records.paired_difference`) as a JSON-ready dict; None when not comparable."""
    from r4t_fast.eval.records import paired_difference

    diff = paired_difference(a, b, key, n_boot=1000, seed=0)
    if diff is None:
        return None
    ci, n = diff
    return {"n": n, "mean": ci.mean, "low": ci.low, "high": ci.high, "excludes_zero": ci.excludes_zero}


def ci_cell(d: dict | None, scale: float, digits: int) -> str:
    """A table cell for a :func:`paired_ci` dict: ``+1.2* (+0.3, +2.0)`` (``*``: the CI excludes 0)."""
    if not d:
        return "–"
    star = "*" if d.get("excludes_zero") else ""
    lo, hi = d["low"] * scale, d["high"] * scale
    return f"{d['mean'] * scale:+.{digits}f}{star} ({lo:+.{digits}f}, {hi:+.{digits}f})"


def finish(name: str, res: dict, md: list[str]) -> int:
    """Append the machine line to the Markdown ``md``, write ``name``.json / .md and print the table."""
    md = [
        *md,
        "",
        f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores; wall {res['wall_s']:.0f} s.",
    ]
    write_results(name, res, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0
