"""Property tests (hypothesis) of the ``r4t`` error contract: random bad argument values for several
subcommands -> exit status 2, exactly one stderr line ``r4t <command>: error: ...``, no traceback and no
``--out`` left behind. Only the fast paths run (every example fails before any model is trained or
loaded), so the whole file takes seconds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from r4t_fast import cli  # noqa: E402

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # reproducible: the examples do not depend on the clock
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

MISSING = "/nonexistent/r4t-missing"

# values argparse accepts (ints for int options, floats for float options) but our checks refuse
bad_ints = st.one_of(st.integers(max_value=0), st.integers(min_value=10**12, max_value=10**30))
any_ints = st.one_of(bad_ints, st.integers(min_value=1, max_value=10**6))
bad_floats = st.one_of(
    st.just(math.nan),
    st.just(math.inf),
    st.just(-math.inf),
    st.floats(max_value=0.0, allow_nan=False),
)
blank = st.text(alphabet=" \t", max_size=4)
missing_paths = st.text(alphabet="abcxyz_-.", min_size=1, max_size=12).map(lambda s: f"{MISSING}/{s}")


def _check(capsys, tmp: Path, command: str, argv: list[str]) -> None:
    before = sorted(p.name for p in tmp.iterdir())
    try:
        rc = cli.main([command, *argv])
    except SystemExit as exc:  # would be argparse refusing a value: not what these strategies make
        raise AssertionError(f"argparse refused {argv}: {exc.code}") from exc
    err = capsys.readouterr().err
    assert rc == 2, (argv, err)
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    prefix = f"r4t {command}: " if command == "train-rl" else f"r4t {command}: error: "
    assert err.startswith(prefix), err
    assert sorted(p.name for p in tmp.iterdir()) == before, argv  # no --out (or sibling) left


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


@SETTINGS
@given(
    k=st.none() | bad_ints,
    steps=st.none() | bad_ints,
    guidance=st.none() | bad_floats.filter(lambda g: not math.isfinite(g) or g < -1e9),
    query=st.one_of(blank, st.just("red boots")),
    model=st.one_of(st.just(MISSING), missing_paths),
)
def test_retrieve(capsys, tmp: Path, k, steps, guidance, query, model) -> None:
    argv = ["--model", model, "--query", query]
    argv += [] if k is None else ["-k", str(k)]
    argv += [] if steps is None else ["--steps", str(steps)]
    argv += [] if guidance is None else [f"--guidance={guidance}"]
    _check(capsys, tmp, "retrieve", argv)


@SETTINGS
@given(
    option=st.sampled_from(["--samples", "--k", "--max-new-tokens", "--batch-size", "--queries-per-shard"]),
    value=bad_ints.filter(lambda v: v <= 0),
    temperature=st.none() | bad_floats,
    dataset=st.one_of(st.just("nosuch"), missing_paths.map(lambda p: p + ".jsonl")),
)
def test_synthesize(capsys, tmp: Path, option, value, temperature, dataset) -> None:
    argv = ["--dataset", dataset, "--out", str(tmp / "D"), option, str(value)]
    argv += [] if temperature is None else [f"--temperature={temperature}"]
    _check(capsys, tmp, "synthesize", argv)


@SETTINGS
@given(
    steps=st.none() | bad_ints.filter(lambda v: v <= 0),
    lr=st.none() | bad_floats,
    data=st.one_of(st.just(MISSING), missing_paths, st.just("")),
    nested=st.booleans(),
)
def test_train_diffusion(capsys, tmp: Path, steps, lr, data, nested) -> None:
    out = tmp / "a" / "D" if nested else tmp / "D"
    argv = ["--data", data, "--out", str(out)]
    argv += [] if steps is None else ["--steps", str(steps)]
    argv += [] if lr is None else [f"--lr={lr}"]
    _check(capsys, tmp, "train-diffusion", argv)


@SETTINGS
@given(
    threads=st.none() | bad_ints.filter(lambda v: v <= 0),
    latency_calls=st.none() | bad_ints.filter(lambda v: v <= 0),
    k=any_ints,
    dataset=st.one_of(st.just("nosuch"), missing_paths.map(lambda p: p + ".jsonl")),
    out=st.sampled_from(["new.json", "sub/new.json", "afile/x.json", "adir", ""]),
)
def test_eval(capsys, tmp: Path, threads, latency_calls, k, dataset, out) -> None:
    (tmp / "afile").write_text("x") if not (tmp / "afile").exists() else None
    (tmp / "adir").mkdir(exist_ok=True)
    argv = ["--dataset", dataset, "--method", "dense", "--out", str(tmp / out) if out else "", "--k", str(k)]
    argv += ["--cache-dir", str(tmp / "cache"), "--no-progress"]
    argv += [] if threads is None else ["--threads", str(threads)]
    argv += [] if latency_calls is None else ["--latency-calls", str(latency_calls)]
    _check(capsys, tmp, "eval", argv)


@SETTINGS
@given(
    max_steps=st.none() | bad_ints.filter(lambda v: v <= 0),
    config=st.none() | missing_paths.map(lambda p: p + ".json"),
    unknown=st.none() | st.sampled_from(["lr=1", "nosuch=2", "k_=3"]),
)
def test_train_rl(capsys, tmp: Path, max_steps, config, unknown) -> None:
    if max_steps is None and config is None and unknown is None:
        max_steps = 0
    argv = ["--out", str(tmp / "R")]
    argv += [] if max_steps is None else ["--max-steps", str(max_steps)]
    argv += [] if config is None else ["--config", config]
    argv += [] if unknown is None else ["--set", unknown]
    _check(capsys, tmp, "train-rl", argv)
