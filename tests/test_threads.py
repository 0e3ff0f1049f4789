"""The thread rule (r4t_fast._threads): free CPUs now, passive OpenMP waits, set before torch starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from r4t_fast import _threads

_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "R4T_THREADS",
    "LOCAL_WORLD_SIZE",
    "OPENBLAS_NUM_THREADS",
)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _VARS}
    env.update(extra)
    return env


def _run(code: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env=_clean_env(**extra), capture_output=True, text=True, timeout=120
    )


def test_auto_takes_every_available_cpu_and_records_the_load() -> None:
    """With passive waits the scheduler shares the cores: the count is not cut to the CPUs left free."""
    out = _probe()
    assert out["d"]["threads"] == _threads.available_cpus() and out["d"]["source"] == "auto"
    assert out["d"]["busy_cpus"] is not None and out["d"]["busy_cpus"] >= 0


def test_busy_cpus_is_a_non_negative_measurement() -> None:
    busy, source = _threads.busy_cpus(0.05)
    assert busy >= 0.0
    assert source in ("proc_stat", "loadavg_1m", "none")
    if sys.platform.startswith("linux"):
        assert source == "proc_stat"


# Each case runs in a fresh process: the rule must act before torch starts its pool.
_PROBE = """
import json, os, sys
{pre}
from r4t_fast import _threads
d = _threads.configure({arg})
assert "torch" not in sys.modules
import torch, numpy, threadpoolctl
blas = [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
print(json.dumps({{"d": d, "torch": torch.get_num_threads(), "policy": os.environ.get("OMP_WAIT_POLICY"),
                   "omp": os.environ.get("OMP_NUM_THREADS"), "blas": blas}}))
"""


def _probe(arg: str = "", pre: str = "", **env: str) -> dict:
    r = _run(_PROBE.format(arg=arg, pre=pre), **env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_configure_before_torch_sets_policy_and_threads() -> None:
    out = _probe()
    n = out["d"]["threads"]
    assert out["d"]["source"] == "auto"
    assert 1 <= n <= _threads.available_cpus()
    assert out["policy"] == "PASSIVE"
    assert out["omp"] == str(n)
    assert out["torch"] == n  # torch's pool follows the exported count
    assert out["d"]["blas"] == "env" and out["blas"] and set(out["blas"]) == {1}  # numpy's BLAS: one thread
    late = _probe(pre="import numpy")  # numpy loaded first: the limit comes through threadpoolctl
    assert late["d"]["blas"] == "threadpoolctl" and late["blas"] and set(late["blas"]) == {1}


def test_what_the_user_set_wins() -> None:
    out = _probe("1", OMP_WAIT_POLICY="ACTIVE")
    assert (out["d"]["source"], out["torch"], out["policy"]) == ("argument", 1, "ACTIVE")
    out = _probe(R4T_THREADS="1")
    assert (out["d"]["source"], out["torch"]) == ("R4T_THREADS", 1)
    out = _probe(OMP_NUM_THREADS="1")
    assert (out["d"]["source"], out["torch"], out["omp"]) == ("OMP_NUM_THREADS", 1, "1")
    out = _probe(OPENBLAS_NUM_THREADS="2")
    assert out["d"]["blas"] == "user" and set(out["blas"]) == {2}


def test_bad_values_name_the_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="threads"):
        _threads.configure(0)
    monkeypatch.setenv("R4T_THREADS", "many")
    with pytest.raises(ValueError, match="R4T_THREADS"):
        _threads.configure()


def test_resolve_applies_an_explicit_count_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    before = torch.get_num_threads()
    saved = {k: os.environ.get(k) for k in _VARS}
    try:
        assert _threads.resolve(1) == 1
        assert torch.get_num_threads() == 1
        assert _threads.decided()["source"] == "argument"
        assert _threads.resolve(0) == 1  # 0 / None: what was decided
        assert _threads.resolve(None) == 1
    finally:
        torch.set_num_threads(before)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _threads._DECIDED.clear()


_CLI = """
import os, sys, types
m = types.ModuleType("fake_cmd")
m.add_cli_arguments = lambda p: p.add_argument("--threads", type=int, default=0)
def run(args):
    print(os.environ.get("OMP_WAIT_POLICY"), os.environ.get("OMP_NUM_THREADS"), "torch" in sys.modules)
    return 0
m.cli_main = run
sys.modules["fake_cmd"] = m
from r4t_fast import cli
cli.COMMANDS["fake"] = ("fake_cmd", "a probe")
sys.exit(cli.main(["fake", *sys.argv[1:]]))
"""


def test_cli_applies_the_rule_before_the_command_runs() -> None:
    r = subprocess.run(
        [sys.executable, "-c", _CLI, "--threads", "1"], env=_clean_env(), capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["PASSIVE", "1", "False"]
    r = subprocess.run([sys.executable, "-c", _CLI], env=_clean_env(), capture_output=True, text=True)
    policy, n, _ = r.stdout.split()
    assert policy == "PASSIVE" and 1 <= int(n) <= _threads.available_cpus()
    r = subprocess.run(
        [sys.executable, "-c", _CLI, "--threads", "-2"], env=_clean_env(), capture_output=True, text=True
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["r4t fake: error: --threads: expected a positive int, got -2"]
