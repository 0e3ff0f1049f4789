"""Property tests (hypothesis) of the ``r4t`` error contract: one bad argument value at a time, every
other argument valid -> exit status 2, exactly one stderr line ``r4t <command>: error: <argument>: ...``
that names that argument, no traceback and no ``--out`` left behind. The expensive step after the
checks (loading the model or the data, training, generation) is replaced by a tripwire, so a check
deleted or moved after it fails the test (an AssertionError with a traceback), and the file takes
seconds."""

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
non_positive = st.integers(max_value=0)
bad_floats = st.one_of(
    st.just(math.nan),
    st.just(math.inf),
    st.just(-math.inf),
    st.floats(max_value=0.0, allow_nan=False),
)


def _check(
    capsys, tmp: Path, command: str, argv: list[str], named: tuple[str, ...], contains: str = ""
) -> None:
    before = sorted(p.name for p in tmp.iterdir())
    try:
        rc = cli.main([command, *argv])
    except SystemExit as exc:  # would be argparse refusing a value: not what these strategies make
        raise AssertionError(f"argparse refused {argv}: {exc.code}") from exc
    err = capsys.readouterr().err
    assert rc == 2, (argv, err)
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    prefix = f"r4t {command}: error: "
    assert err.startswith(prefix), err
    assert err[len(prefix) :].startswith(tuple(f"{n}: " for n in named)), (named, err)
    assert contains in err, (contains, err)
    assert sorted(p.name for p in tmp.iterdir()) == before, argv  # no --out (or sibling) left


def _tripwire(monkeypatch, target: str) -> None:
    """Reaching ``target`` means a check ran after the expensive work (or not at all)."""

    def boom(*a, **k):
        raise AssertionError(f"{target} reached with a bad argument")

    monkeypatch.setattr(target, boom)


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def model_dir(tmp_path_factory) -> Path:
    """Passes every check ``r4t retrieve`` makes before loading (a directory with retriever.json)."""
    d = tmp_path_factory.mktemp("m") / "retriever"
    d.mkdir(exist_ok=True)
    (d / "retriever.json").write_text("{}")
    return d


@SETTINGS
@given(
    bad=st.sampled_from(["-k", "--steps", "--guidance", "--seed", "--anchor", "--pull"]),
    data=st.data(),
)
def test_retrieve(capsys, monkeypatch, tmp: Path, model_dir: Path, bad, data) -> None:
    _tripwire(monkeypatch, "r4t_fast.diffusion.retrieve_cli.Retriever.from_pretrained")
    value = {
        "-k": bad_ints,
        "--steps": bad_ints,
        "--guidance": bad_floats.filter(lambda g: not math.isfinite(g) or g < -1e9),
        "--seed": st.integers(min_value=2**64, max_value=10**40),
        "--anchor": st.floats(min_value=1.0, allow_nan=False) | st.floats(max_value=-1e-9, allow_nan=False),
        "--pull": st.floats(min_value=10.5, allow_nan=False) | st.floats(max_value=-1e-9, allow_nan=False),
    }[bad]
    v = data.draw(value)
    argv = [
        "--model",
        str(model_dir),
        "--query",
        "red boots",
        f"{bad}={v}" if bad != "-k" else "-k",
        *([str(v)] if bad == "-k" else []),
    ]
    _check(capsys, tmp, "retrieve", argv, (bad,))


@SETTINGS
@given(
    option=st.sampled_from(["--samples", "--k", "--max-new-tokens", "--batch-size", "--queries-per-shard"]),
    value=non_positive,
    temperature=bad_floats,
    which=st.sampled_from(["int", "temperature"]),
)
def test_synthesize(capsys, monkeypatch, tmp: Path, option, value, temperature, which) -> None:
    _tripwire(monkeypatch, "r4t_fast.train.synthesis.synthesize")
    argv = ["--dataset", "polyvore", "--out", str(tmp / "D"), "--policy", "smollm2"]
    if which == "int":
        argv += [option, str(value)]
        named = (option, option[2:].replace("-", "_"))
    else:
        argv += [f"--temperature={temperature}"]
        named = ("--temperature", "temperature")
    _check(capsys, tmp, "synthesize", argv, named)


@SETTINGS
@given(
    which=st.sampled_from(["steps", "lr", "batch-size", "ema"]),
    steps=non_positive,
    lr=bad_floats,
    ema=st.floats(min_value=1.0, allow_nan=False) | st.floats(max_value=-1e-9, allow_nan=False),
    nested=st.booleans(),
)
def test_train_diffusion(capsys, monkeypatch, tmp: Path, which, steps, lr, ema, nested) -> None:
    _tripwire(monkeypatch, "r4t_fast.train.diffusion.cli_pairs")
    _tripwire(monkeypatch, "r4t_fast.train.diffusion.train_diffusion")
    out = tmp / "a" / "D" if nested else tmp / "D"
    argv = ["--targets", "reference", "--dataset", "polyvore", "--out", str(out)]
    value = {"steps": steps, "lr": lr, "batch-size": steps, "ema": ema}[which]
    argv += [f"--{which}={value}"]
    _check(capsys, tmp, "train-diffusion", argv, (f"--{which}", which.replace("-", "_")))


@SETTINGS
@given(
    which=st.sampled_from(["--k", "--limit", "--batch-size", "--latency-calls", "--n-boot", "--seed"]),
    value=non_positive,
    out=st.sampled_from(["new.json", "sub/new.json"]),
)
def test_eval(capsys, monkeypatch, tmp: Path, which, value, out) -> None:
    _tripwire(monkeypatch, "r4t_fast.eval.evaluation.load_eval_data")
    _tripwire(monkeypatch, "r4t_fast.eval.evaluation.evaluate")
    if which == "--seed":
        value = 2**64 + abs(value)
    argv = ["--dataset", "polyvore", "--method", "dense", "--out", str(tmp / out), which, str(value)]
    _check(capsys, tmp, "eval", argv, (which,))


@SETTINGS
@given(
    which=st.sampled_from(["--max-steps", "--set"]),
    max_steps=non_positive,
    unknown=st.sampled_from(["lr=1", "nosuch=2", "k_=3"]),
)
def test_train_rl(capsys, monkeypatch, tmp: Path, which, max_steps, unknown) -> None:
    _tripwire(monkeypatch, "r4t_fast.train.rl.train")
    argv = ["--out", str(tmp / "R"), "--policy", "smollm2"]
    argv += ["--max-steps", str(max_steps)] if which == "--max-steps" else ["--set", unknown]
    if which == "--max-steps":
        _check(capsys, tmp, "train-rl", argv, ("--max-steps", "max_steps"))
    else:  # the --set file of options: the message names the unknown key
        _check(capsys, tmp, "train-rl", argv, ("train-rl options",), contains=repr(unknown.split("=")[0]))
