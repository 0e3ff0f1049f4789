"""The ``r4t`` dispatcher's error contract: a user error prints one line ``r4t <command>: error: ...`` on
stderr and exits 2 (never a traceback) and leaves no ``--out`` it created; a bug keeps its traceback;
``R4T_DEBUG=1`` re-raises. Commands run in-process through :func:`r4t_fast.cli.main`; two end-to-end
checks run the real ``python -m r4t_fast.cli``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from helpers import sets_jsonl
from r4t_fast import cli
from r4t_fast._internal import SavedDirError
from r4t_fast.diffusion.retriever import Retriever


def _one_error_line(capsys, command: str, *, prefix: str = "error: ") -> str:
    """The single stderr line of a failed command (asserts the contract), without its prefix."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    head = f"r4t {command}: {prefix}"
    assert err.startswith(head), err
    return err[len(head) : -1]


def _listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# ----------------------------------------------------------------------------------------------------
# the defects of issue 13, command by command
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ([], "--model"),
        (["-k", "0"], "-k"),
        (["-k", "-5"], "-k"),
        (["--steps", "0"], "--steps"),
        (["--guidance", "nan"], "--guidance"),
    ],
)
def test_retrieve_bad_arguments(capsys, extra: list[str], named: str) -> None:
    assert cli.main(["retrieve", "--model", "/nonexistent", "--query", "x", *extra]) == 2
    assert _one_error_line(capsys, "retrieve").startswith(f"{named}: ")


@pytest.mark.parametrize("query", ["", "   "])
def test_retrieve_empty_query(capsys, query: str) -> None:
    assert cli.main(["retrieve", "--model", "/nonexistent", "--query", query]) == 2
    assert _one_error_line(capsys, "retrieve").startswith("--query: ")


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> dict[str, Path]:
    """A sets.jsonl, its cache and a tiny (untrained) retriever directory on its catalog."""
    import torch

    from r4t_fast.data import prepare
    from r4t_fast.diffusion.model import SetDenoiser, get_preset
    from r4t_fast.diffusion.retriever import Retriever

    root = tmp_path_factory.mktemp("cli")
    sets = sets_jsonl(root / "sets.jsonl", 40)
    cache = root / "cache"
    out: dict[str, Path] = {"root": root, "sets": sets, "cache": cache}
    for dim in (32, 64):
        data = prepare.load_eval_data(sets, encoder=f"hashing:{dim}", cache_dir=cache, progress=False)
        torch.manual_seed(0)
        model = SetDenoiser(get_preset("tiny", dim=dim, cond_dim=dim)).eval()
        r = Retriever(model, data.catalog, data.encoder, encoder_spec=f"hashing:{dim}", steps=2)
        out[f"retriever{dim}"] = r.save(root / f"retriever{dim}")
    return out


@pytest.mark.parametrize(
    ("extra", "named"),
    [(["-k", "0"], "-k"), (["--steps", "0"], "--steps"), (["-k", "100000"], "-k"), (["-k", "200"], "k")],
)
def test_retrieve_bad_arguments_on_a_real_model(tiny_world, capsys, extra, named) -> None:
    model = str(tiny_world["retriever32"])
    assert cli.main(["retrieve", "--model", model, "--query", "red outfit", *extra]) == 2
    assert _one_error_line(capsys, "retrieve").startswith(f"{named}: ")
    assert cli.main(["retrieve", "--model", model, "--query", ""]) == 2
    assert _one_error_line(capsys, "retrieve").startswith("--query: ")
    assert cli.main(["retrieve", "--model", model, "--query", "red outfit", "-k", "2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert len(got) == 1 and len(got[0]["item_ids"]) == 2
    argv = ["retrieve", "--model", model, "--query", "red outfit", "-k", "2", "--json", "--precision", "bf16"]
    assert cli.main(argv) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["item_ids"]) == 2
    # --noise fixed: every query from the one draw of the seed (two queries, the Retriever's own answer)
    argv = [
        "retrieve",
        "--model",
        model,
        "--query",
        "red outfit",
        "--query",
        "blue",
        "--json",
        "--noise",
        "fixed",
    ]
    assert cli.main(argv) == 0
    got = [x["item_ids"] for x in json.loads(capsys.readouterr().out)]
    r = Retriever.from_pretrained(model)
    assert got == [list(s.item_ids) for s in r.retrieve(["red outfit", "blue"], noise="fixed")]


@pytest.mark.parametrize("command", ["synthesize", "pipeline", "train-rl"])
def test_unknown_dataset_leaves_no_out(tmp_path: Path, capsys, command: str) -> None:
    out = tmp_path / "D"
    assert cli.main([command, "--dataset", "nosuch", "--out", str(out)]) == 2
    # train-rl reports the error itself ("r4t train-rl: <message>", see the report for its patch)
    msg = _one_error_line(capsys, command, prefix="" if command == "train-rl" else "error: ")
    assert "unknown dataset 'nosuch'" in msg and "polyvore" in msg
    assert _listing(tmp_path) == []


def test_missing_dataset_file_leaves_no_nested_out(tmp_path: Path, capsys) -> None:
    out = tmp_path / "a" / "b" / "D"
    missing = tmp_path / "none.jsonl"
    assert cli.main(["synthesize", "--dataset", str(missing), "--out", str(out)]) == 2
    assert str(missing) in _one_error_line(capsys, "synthesize")
    assert _listing(tmp_path) == []  # the parents it made are gone too


def test_existing_out_is_kept(tmp_path: Path, capsys) -> None:
    out = tmp_path / "D"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (tmp_path / ".D.tmp-old").mkdir()  # an older sibling: not this run's, kept
    assert cli.main(["pipeline", "--dataset", "nosuch", "--out", str(out)]) == 2
    _one_error_line(capsys, "pipeline")
    assert _listing(out) == ["keep.txt"] and (tmp_path / ".D.tmp-old").is_dir()


def test_train_diffusion_missing_data(tmp_path: Path, capsys) -> None:
    out = tmp_path / "D"
    assert cli.main(["train-diffusion", "--data", "/nonexistent", "--out", str(out)]) == 2
    assert _one_error_line(capsys, "train-diffusion").startswith("data: no shard-*.safetensors files")
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("extra", [["--set", "foo=1"], ["--max-steps", "0"], ["--config", "/nonexistent"]])
def test_train_rl_validation_leaves_no_out(tmp_path: Path, capsys, extra: list[str]) -> None:
    assert cli.main(["train-rl", "--out", str(tmp_path / "R"), *extra]) == 2
    _one_error_line(capsys, "train-rl", prefix="")
    assert _listing(tmp_path) == []


def test_pipeline_bad_set_message_is_one_line(tmp_path: Path, capsys) -> None:
    # pipeline raises SystemExit("--set: ...") itself: a message, not a status -> a user error
    assert cli.main(["pipeline", "--dataset", "nosuch", "--out", str(tmp_path / "D"), "--set", "x"]) == 2
    assert _one_error_line(capsys, "pipeline").startswith("--set: expected STAGE.KEY=JSON")
    assert _listing(tmp_path) == []


def test_argparse_errors_still_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["retrieve", "--query", "x"])  # --model missing
    assert exc.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# r4t eval: --out checked before the run; a retriever on another catalog refused
# ----------------------------------------------------------------------------------------------------
def _eval(world: dict[str, Path], out: Path, *extra: str) -> int:
    argv = ["eval", "--dataset", str(world["sets"]), "--encoder", "hashing:32"]
    argv += ["--cache-dir", str(world["cache"]), "--out", str(out), "--k", "3", "--budgets", "2"]
    argv += ["--n-boot", "20", "--latency-batches", "none", "--no-progress"]
    return cli.main([*argv, *extra])


def test_eval_bad_out_is_refused_before_the_run(tiny_world, tmp_path: Path, capsys, monkeypatch) -> None:
    from r4t_fast.eval import evaluation

    def no_run(*args, **kwargs):
        raise AssertionError("the run started before --out was checked")

    monkeypatch.setattr(evaluation, "load_eval_data", no_run)
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    a_dir = tmp_path / "adir"
    a_dir.mkdir()
    assert _eval(tiny_world, a_file / "o.json", "--method", "dense") == 2
    assert "is not a directory" in _one_error_line(capsys, "eval")
    assert _eval(tiny_world, a_file / "sub" / "o.json", "--method", "dense") == 2
    assert f"{a_file} is not a directory" in _one_error_line(capsys, "eval")
    assert _eval(tiny_world, a_dir, "--method", "dense") == 2
    assert "is a directory; expected a JSON file path" in _one_error_line(capsys, "eval")
    assert _listing(tmp_path) == ["adir", "afile"] and _listing(a_dir) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_eval_unwritable_out_dir(tiny_world, tmp_path: Path, capsys) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert _eval(tiny_world, ro / "o.json", "--method", "dense") == 2
        assert "no write permission" in _one_error_line(capsys, "eval")
    finally:
        ro.chmod(0o700)


def test_eval_writes_into_new_parents(tiny_world, tmp_path: Path, capsys) -> None:
    out = tmp_path / "new" / "o.json"
    assert _eval(tiny_world, out, "--method", "dense") == 0
    assert json.loads(out.read_text())["method"] == "dense"
    assert _listing(out.parent) == ["o.json"]  # no temporary file left beside it


def test_eval_refuses_a_retriever_of_another_encoder(tiny_world, tmp_path: Path, capsys) -> None:
    """A retriever on the 64-d catalog fails first on the query dimension; the catalog check names
    what differs and both sides instead."""
    out = tmp_path / "r.json"
    assert _eval(tiny_world, out, "--method", str(tiny_world["retriever64"])) == 2
    msg = _one_error_line(capsys, "eval")
    assert msg.startswith("method: the retriever's catalog is not the evaluation catalog: embeddings differ")
    assert "(retriever, dim 64)" in msg and "(evaluation, dim 32)" in msg
    assert str(tiny_world["retriever64"]) in msg and "dataset 'cli" in msg
    assert _listing(tmp_path) == []
    # its own catalog is accepted
    assert _eval(tiny_world, out, "--method", str(tiny_world["retriever32"])) == 0
    assert json.loads(out.read_text())["method"] == "r4t-diffusion"


# ----------------------------------------------------------------------------------------------------
# the dispatcher's rules, on a fake command
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def fake(monkeypatch, tmp_path: Path):
    """A ``r4t fake --out D`` whose cli_main creates ``D``, ``.D.tmp-1`` and ``D.tmp``, then raises
    ``state["exc"]`` (or returns ``state["rc"]``)."""
    state: dict = {"exc": None, "rc": 0}
    mod = types.ModuleType("r4t_fake_cmd")

    def add_cli_arguments(p):
        p.add_argument("--out", default=None)

    def cli_main(args):
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "part").write_text("x")
            (out.parent / f".{out.name}.tmp-1").mkdir()
            (out.parent / f"{out.name}.tmp").write_text("x")
        if state["exc"] is not None:
            raise state["exc"]
        return state["rc"]

    mod.add_cli_arguments, mod.cli_main = add_cli_arguments, cli_main
    monkeypatch.setitem(sys.modules, "r4t_fake_cmd", mod)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("r4t_fake_cmd", "a test command"))
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    return state


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("n: expected a positive int, got 0"),
        TypeError("queries: expected a tensor, got str"),
        KeyError("dataset: unknown dataset 'x'; expected one of polyvore, spotify"),
        FileNotFoundError(2, "No such file or directory", "/x"),
        NotADirectoryError("data: /x is not a directory"),
        IsADirectoryError("out: /x is a directory"),
        PermissionError("out: cannot write /x"),
        FileExistsError("out: /x exists"),
        SavedDirError("/x/manifest.json: field 'files': missing"),
        json.JSONDecodeError("Expecting value", "{", 1),
        SystemExit("--set: expected KEY=VALUE"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_user_errors_are_one_line_and_undo_out(fake, tmp_path: Path, capsys, exc) -> None:
    fake["exc"] = exc
    assert cli.main(["fake", "--out", str(tmp_path / "D")]) == 2
    assert _one_error_line(capsys, "fake") == cli.user_error_message(exc)
    assert _listing(tmp_path) == []


def test_multi_line_message_is_joined(fake, capsys) -> None:
    fake["exc"] = ValueError("config: two problems:\n  a is bad\n  b is bad\n")
    assert cli.main(["fake"]) == 2
    assert _one_error_line(capsys, "fake") == "config: two problems: a is bad b is bad"


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("boom"),
        TypeError("'NoneType' object is not callable"),
        KeyError("weights"),
        AttributeError("x"),
        ZeroDivisionError("division by zero"),
    ],
    ids=lambda e: f"{type(e).__name__}-{e}",
)
def test_bugs_keep_their_traceback_and_out(fake, tmp_path: Path, exc) -> None:
    fake["exc"] = exc
    with pytest.raises(type(exc)):
        cli.main(["fake", "--out", str(tmp_path / "D")])
    assert (tmp_path / "D" / "part").is_file()  # left for debugging


def test_debug_env_reraises_user_errors(fake, tmp_path: Path, monkeypatch) -> None:
    fake["exc"] = ValueError("n: expected a positive int, got 0")
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="^n: expected"):
        cli.main(["fake", "--out", str(tmp_path / "D")])
    monkeypatch.setenv(cli.DEBUG_ENV, "0")
    assert cli.main(["fake", "--out", str(tmp_path / "E")]) == 2


def test_status_2_from_the_command_undoes_out(fake, tmp_path: Path) -> None:
    fake["rc"] = 2  # the command printed its own error line
    assert cli.main(["fake", "--out", str(tmp_path / "D")]) == 2
    assert _listing(tmp_path) == []
    fake["rc"] = 0
    assert cli.main(["fake", "--out", str(tmp_path / "D")]) == 0
    assert (tmp_path / "D" / "part").is_file()


# ----------------------------------------------------------------------------------------------------
# end to end: the real console entry point
# ----------------------------------------------------------------------------------------------------
def _run(*argv: str, debug: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
    if debug:
        env[cli.DEBUG_ENV] = "1"
    cmd = [sys.executable, "-m", "r4t_fast.cli", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)


def test_end_to_end_retrieve_missing_model() -> None:
    p = _run("retrieve", "--model", "/nonexistent", "--query", "x")
    assert p.returncode == 2, p.stderr
    assert p.stderr == "r4t retrieve: error: --model: no retriever directory at /nonexistent\n"
    p = _run("retrieve", "--model", "/nonexistent", "--query", "x", debug=True)
    assert p.returncode == 1 and "Traceback" in p.stderr and "FileNotFoundError" in p.stderr


def test_end_to_end_synthesize_unknown_dataset(tmp_path: Path) -> None:
    p = _run("synthesize", "--dataset", "nosuch", "--out", str(tmp_path / "D"))
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("r4t synthesize: error: name_or_path: ")
    assert _listing(tmp_path) == []


def test_a_late_user_error_keeps_out(fake, tmp_path: Path, capsys, monkeypatch) -> None:
    """Past validation a run may hold hours of checkpoints: a late user error keeps --out and says so."""
    monkeypatch.setattr(cli, "KEEP_AFTER_S", -1.0)
    fake["exc"] = ValueError("eval: expected x, got y")
    assert cli.main(["fake", "--out", str(tmp_path / "D")]) == 2
    msg = _one_error_line(capsys, "fake")
    assert msg.startswith("eval: expected x, got y (kept ") and str(tmp_path / "D") in msg
    assert (tmp_path / "D" / "part").is_file()
