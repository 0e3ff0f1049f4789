"""Regression tests of issue 22's twelve defects (what a new user hit), one section per defect, plus the
two import circles. Each test failed on the code before its fix. The CLI tests replace the expensive
step after validation (loading data, training, generation) with a tripwire, so a check that runs too
late fails the test instead of making it slow."""

from __future__ import annotations

import ast
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import noisy_tiny_model, sets_jsonl
from r4t_fast import Catalog, cli, ops
from r4t_fast._internal import check_seed
from r4t_fast.data.encoders import HashingEncoder
from r4t_fast.diffusion.model import SetDenoiser
from r4t_fast.diffusion.options import MAX_K_RETRIEVE
from r4t_fast.diffusion.retriever import Retriever
from r4t_fast.kernels import _backend

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PKG = Path(__file__).resolve().parents[1] / "python" / "r4t_fast"


def _model(seed: int = 2) -> SetDenoiser:
    return noisy_tiny_model(seed)


def _retriever(**kw) -> Retriever:
    enc = HashingEncoder(dim=16, seed=0)
    texts = [
        f"item {w} {c}" for w in ("red", "blue", "green", "black") for c in ("shirt", "shoe", "bag", "hat")
    ]
    cat = Catalog([f"id{j}" for j in range(len(texts))], enc.encode(texts), texts)
    return Retriever(_model(), cat, enc, encoder_spec="hashing:16", steps=2, **kw)


def _err(capsys, command: str) -> str:
    """The one stderr line of a failed command, after ``r4t <command>: error: ``."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    head = f"r4t {command}: error: "
    assert err.startswith(head), err
    return err[len(head) : -1]


def _tripwire(monkeypatch, target: str, attr: str) -> None:
    """Replace an expensive step: reaching it means a cheap check ran too late (a bug, with traceback)."""

    def boom(*a, **k):
        raise AssertionError(f"{target}.{attr} reached: an argument check ran after the expensive work")

    monkeypatch.setattr(f"{target}.{attr}", boom)


# -------------------------------------------------------------------------------- 1. Catalog text None
def test_catalog_refuses_a_none_text_everywhere(tmp_path: Path) -> None:
    emb = torch.eye(3)
    with pytest.raises(ValueError, match="texts: item 1 must be a str, got NoneType"):
        Catalog(["a", "b", "c"], emb, texts=["ok", None, "x"])
    cat = Catalog(["a", "b", "c"], emb, texts=["ok", "y", "x"])
    with pytest.raises(ValueError, match="texts: item 0 must be a str"):
        cat.update(["b"], texts=[None])
    with pytest.raises(ValueError, match="texts: item 0 must be a str"):
        cat.add(["d"], torch.ones(1, 3), texts=[None])
    cat.add(["d"], torch.ones(1, 3))  # no texts given: the default "" is stored
    cat.save(tmp_path / "cat")
    cat.texts[1] = None  # edited in place after it was checked: save must refuse, not write it
    with pytest.raises(ValueError, match=r"texts: item 1 \('b'\) must be a str"):
        cat.save(tmp_path / "cat")
    back = Catalog.load(tmp_path / "cat")  # the previous version is still there and loads
    assert back.texts == ["ok", "y", "x", ""]


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 5),
    texts=st.none() | st.lists(st.none() | st.text(max_size=12) | st.integers(), min_size=5, max_size=5),
    cats=st.none() | st.lists(st.none() | st.text(max_size=6), min_size=5, max_size=5),
    metas=st.none()
    | st.lists(st.none() | st.dictionaries(st.text(max_size=5), _json, max_size=3), min_size=5, max_size=5),
    dtype=st.sampled_from(["float32", "float16"]),
)
def test_whatever_save_accepts_load_returns_equal(tmp_path_factory, n, texts, cats, metas, dtype) -> None:
    emb = torch.nn.functional.normalize(torch.arange(1.0, 1.0 + 4 * n).reshape(n, 4).sin(), dim=1)
    try:
        cat = Catalog(
            [f"i{j}" for j in range(n)],
            emb,
            texts=None if texts is None else texts[:n],
            categories=None if cats is None else cats[:n],
            metadata=None if metas is None else metas[:n],
            dtype=dtype,
        )
    except ValueError:
        return  # refused up front: nothing was saved
    d = tmp_path_factory.mktemp("c") / "cat"
    try:
        cat.save(d)
    except ValueError:
        return  # refused at save: nothing was written
    back = Catalog.load(d)
    assert back.ids == cat.ids and back.texts == cat.texts and back.categories == cat.categories
    assert json.dumps(back.metadata, sort_keys=True) == json.dumps(cat.metadata, sort_keys=True)
    assert torch.equal(back.embeddings, cat.embeddings) and back.dtype == cat.dtype


# -------------------------------------------------------------------------------- 2. pipeline --set
@pytest.mark.parametrize(
    ("item", "named"),
    [
        ("foo.bar=1", "unknown stage 'foo'"),
        ("diffusion.stpes=5", "unknown key 'stpes' of stage 'diffusion'"),
        ("rl.max_stepz=1", "unknown key 'max_stepz' of stage 'rl'"),
    ],
)
def test_pipeline_set_keys_checked_before_any_work(capsys, monkeypatch, tmp_path, item, named) -> None:
    _tripwire(monkeypatch, "r4t_fast.pipeline", "run_pipeline")
    argv = ["pipeline", "--dataset", "polyvore", "--out", str(tmp_path / "run"), "--set", "eval.limit=3"]
    assert cli.main([*argv, "--set", item]) == 2
    msg = _err(capsys, "pipeline")
    assert msg.startswith("--set: ") and named in msg, msg
    assert "valid" in msg and not (tmp_path / "run").exists()
    if "stpes" in msg:
        assert "steps" in msg.split("valid keys: ")[1].split(", ")


def test_every_preset_key_is_a_valid_set_key() -> None:
    from r4t_fast.pipeline import PIPELINE_PRESETS, _set_keys

    valid = _set_keys()
    for name, preset in PIPELINE_PRESETS.items():
        for stage, conf in preset.items():
            if isinstance(conf, dict):
                assert set(conf) <= valid[stage], (name, stage, set(conf) - valid[stage])


# -------------------------------------------------------------------------------- 3. train-diffusion --out
def test_train_diffusion_checks_out_before_training(capsys, monkeypatch, tmp_path) -> None:
    ret = _retriever().save(tmp_path / "ret")
    _tripwire(monkeypatch, "r4t_fast.train.diffusion", "train_diffusion")
    _tripwire(monkeypatch, "r4t_fast.train.diffusion", "cli_pairs")
    data = sets_jsonl(tmp_path / "sets.jsonl")
    base = ["train-diffusion", "--targets", "reference", "--dataset", str(data), "--encoder", "hashing:16"]
    assert cli.main([*base, "--out", str(ret)]) == 2
    assert _err(capsys, "train-diffusion").startswith(f"--out: {ret} holds a saved 'r4t_fast.retriever'")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    assert cli.main([*base, "--out", str(tmp_path / "notes")]) == 2
    assert "without manifest.json" in _err(capsys, "train-diffusion")
    assert (tmp_path / "notes" / "a.txt").read_text() == "mine"


# -------------------------------------------------------------------------------- 4. train -> retrieve
def test_cli_only_path_from_data_to_a_retrieved_set(capsys, tmp_path) -> None:
    data = sets_jsonl(tmp_path / "sets.jsonl")
    cache = ["--cache-dir", str(tmp_path / "cache")]
    model = tmp_path / "model"
    argv = ["train-diffusion", "--out", str(model), "--targets", "reference", "--dataset", str(data)]
    argv += ["--encoder", "hashing:16", "--preset", "tiny", "--steps", "3", "--batch-size", "8", *cache]
    assert cli.main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    # the model directory and the dataset it was trained on (recorded in its config.json) ...
    q = ["--query", "red outfit", "-k", "4", "--json", "--steps", "2"]
    assert cli.main(["retrieve", "--model", str(model), *q, *cache, "--save", str(tmp_path / "ret")]) == 0
    first = json.loads(capsys.readouterr().out)
    assert len(first[0]["item_ids"]) == 4 and all(i.startswith("it") for i in first[0]["item_ids"])
    # ... or a dataset named explicitly; and the retriever saved by --save is a retriever directory
    assert cli.main(["retrieve", "--model", str(model), "--dataset", str(data), *q, *cache]) == 0
    assert json.loads(capsys.readouterr().out) == first
    assert cli.main(["retrieve", "--model", str(tmp_path / "ret"), *q]) == 0
    assert json.loads(capsys.readouterr().out) == first
    assert cli.main(["retrieve", "--model", str(tmp_path / "ret"), "--dataset", "x", *q]) == 2
    assert _err(capsys, "retrieve").startswith("--dataset/--encoder: only with a train-diffusion model")


# -------------------------------------------------------------------------------- 5. 64-bit seeds
def test_seeds_are_bounded_to_64_bits(capsys) -> None:
    assert check_seed(2**64 - 1) == 2**64 - 1 and check_seed(-(2**63)) == -(2**63)
    for bad in (2**64, -(2**63) - 1, 2**200):
        with pytest.raises(ValueError, match=r"seed: expected a 64-bit int in \[-2\*\*63, 2\*\*64 - 1\]"):
            check_seed(bad)
    r = _retriever()
    with pytest.raises(ValueError, match="seed: expected a 64-bit int"):
        r.retrieve(["red outfit"], 4, seed=2**200)
    torch.manual_seed(2**64 - 1)  # the bound is what torch accepts
    big = str(10**41)
    assert cli.main(["retrieve", "--model", "/nonexistent", "--query", "a", "--seed", big]) == 2
    assert _err(capsys, "retrieve").startswith("--seed: expected a 64-bit int")
    for cmd, extra in [
        ("train-diffusion", ["--out", "/nonexistent-dir/m", "--targets", "reference"]),
        ("synthesize", ["--out", "/nonexistent-dir/s", "--dataset", "polyvore"]),
        ("distill", ["--out", "/nonexistent-dir/d", "--teacher", "/nonexistent/t"]),
    ]:
        assert cli.main([cmd, *extra, "--seed", big]) == 2
        assert _err(capsys, cmd).startswith("--seed: expected a 64-bit int")


# -------------------------------------------------------------------------------- 6. devices
def test_unusable_device_is_one_message_naming_it(capsys, tmp_path) -> None:
    with pytest.raises(
        ValueError, match=r"device: r4t_fast runs on 'cpu' or 'cuda\[:N\]', got 'tpu' \(build_info"
    ):
        _retriever(device="tpu")
    with pytest.raises(ValueError, match=r"^--device: r4t_fast runs on 'cpu' or 'cuda\[:N\]', got 'x:1'"):
        ops.check_device("x:1", "--device")
    assert ops.check_device("cpu") == torch.device("cpu")
    if not (_backend.build_info()["cuda"] and torch.cuda.is_available()):
        with pytest.raises(ValueError, match=r"device: 'cuda' .*build_info\(\): cuda="):
            _retriever(device="cuda")
        argv = ["train-diffusion", "--out", str(tmp_path / "m"), "--device", "cuda", "--targets", "reference"]
        assert cli.main(argv) == 2
        assert _err(capsys, "train-diffusion").startswith("--device: 'cuda' ")
        assert not (tmp_path / "m").exists()


# -------------------------------------------------------------------------------- 7. checks before work
@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--limit", "0"], "--limit: expected a positive int"),
        (["--k", "-1"], "--k: expected a positive int"),
        (["--method", "nosuch"], "--method: unknown method 'nosuch'"),
        (["--method", "mmr", "--method-arg", "lambda_=abc"], "--method-arg lambda_: expected a number"),
        (
            ["--method", "mmr", "--method-arg", "lambbda=0.3"],
            "--method-arg: 'lambbda' is not an argument of mmr",
        ),
        (["--seed", str(2**70)], "--seed: expected a 64-bit int"),
    ],
)
def test_eval_checks_arguments_before_loading(capsys, monkeypatch, tmp_path, extra, named) -> None:
    _tripwire(monkeypatch, "r4t_fast.eval.evaluation", "load_eval_data")
    argv = ["eval", "--dataset", "polyvore", "--out", str(tmp_path / "r.json"), "--method", "dense", *extra]
    assert cli.main(argv) == 2
    assert _err(capsys, "eval").startswith(named)


def test_demo_synthesize_train_rl_check_before_loading(capsys, monkeypatch, tmp_path) -> None:
    _tripwire(monkeypatch, "r4t_fast.data.datasets", "load_dataset")
    assert cli.main(["demo", "--mmr-lambda", "5"]) == 2
    assert _err(capsys, "demo").startswith("--mmr-lambda: expected a number in [0, 1], got 5")
    _tripwire(monkeypatch, "r4t_fast.train.synthesis", "synthesize")
    argv = ["synthesize", "--dataset", "polyvore", "--out", str(tmp_path / "s"), "--policy", "/nonexistent/p"]
    assert cli.main(argv) == 2
    assert _err(capsys, "synthesize").startswith("--policy: '/nonexistent/p' does not exist")
    _tripwire(monkeypatch, "r4t_fast.train.rl", "train")
    assert cli.main(["train-rl", "--out", str(tmp_path / "r"), "--policy", str(tmp_path)]) == 2
    assert _err(capsys, "train-rl").startswith(f"--policy: '{tmp_path}' has no config.json")


# -------------------------------------------------------------------------------- 8. bounded work
def test_ground_sets_candidates_guard_names_candidates() -> None:
    rows = torch.nn.functional.normalize(torch.randn(100, 10, 8), dim=2)
    cat = torch.nn.functional.normalize(torch.randn(300_000, 8), dim=1)
    with pytest.raises(ValueError, match=r"^candidates: 300000 per row x 1000 rows = 300000000 result slots"):
        ops.ground_sets(rows, cat, candidates=10**9)  # would ask for 3.4 GB at once
    ids, _ = ops.ground_sets(rows[:2], cat[:1000], candidates=10**9)  # capped at N, small: fine
    assert ids.shape == (2, 10)
    with pytest.raises(ValueError, match=r"^k: .* result slots"):
        ops.knn(rows[:, 0].contiguous().repeat(3000, 1), cat, 100_000)


def test_retrieve_bounds_k_and_n_candidates() -> None:
    r = _retriever()
    with pytest.raises(ValueError, match=rf"^k: expected an int in \[1, {MAX_K_RETRIEVE}\]"):
        r.retrieve(["a"], MAX_K_RETRIEVE + 1)
    with pytest.raises(ValueError, match=r"^n_candidates: 1000000000 exceeds the catalog size \(16\)"):
        r.retrieve(["a"], 4, n_candidates=10**9)
    assert len(r.retrieve(["a"], 4, n_candidates=16)[0].item_ids) == 4


# -------------------------------------------------------------------------------- 9. missing manifest
def test_copy_without_manifest_warns_unless_unverified(tmp_path: Path) -> None:
    path = _retriever().save(tmp_path / "ret")
    copy = tmp_path / "copy"
    shutil.copytree(path.resolve(), copy)
    (copy / "manifest.json").unlink()
    with open(copy / "model.safetensors", "r+b") as f:  # a corrupted weight byte at the end
        f.seek(-1, os.SEEK_END)
        f.write(b"\x7f")
    with pytest.warns(UserWarning, match=r"no manifest.json: loaded UNVERIFIED"):
        Retriever.from_pretrained(copy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Retriever.from_pretrained(copy, verify=False)  # the caller vouches for it: no warning
        Retriever.from_pretrained(path)  # a saved directory verifies quietly


# -------------------------------------------------------------------------------- 10. zero rows
def test_set_stats_refuses_zero_rows() -> None:
    with pytest.raises(ValueError, match=r"^x: row 0 of set 0 is all zeros"):
        ops.set_stats(torch.zeros(1, 3, 4))
    x = torch.eye(4)[None, :3].repeat(2, 1, 1)
    x[1, 2] = 0.0
    with pytest.raises(ValueError, match=r"^x: row 2 of set 1 is all zeros"):
        ops.set_stats(x)
    vendi, _ = ops.set_stats(x, torch.tensor([3, 2]))  # the zero row is not counted: fine
    assert vendi.tolist() == pytest.approx([3.0, 2.0], abs=1e-5)


# -------------------------------------------------------------------------------- 11. closed pipe
def test_closed_stdout_pipe_exits_quietly(tmp_path: Path, capsys, monkeypatch) -> None:
    path = _retriever().save(tmp_path / "ret")

    class Closed:
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    rc = cli.main(["retrieve", "--model", str(path), "--query", "red outfit", "--json"])
    monkeypatch.undo()
    assert rc == cli.EXIT_BROKEN_PIPE and capsys.readouterr().err == ""
    # the real thing: a pipe whose reader has gone before anything was written
    read, write = os.pipe()
    os.close(read)
    argv = [sys.executable, "-m", "r4t_fast.cli", "retrieve", "--model", str(path), "--query", "a", "--json"]
    proc = subprocess.run(argv, stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    assert proc.returncode == cli.EXIT_BROKEN_PIPE and proc.stderr == "", proc.stderr


# -------------------------------------------------------------------------------- 12. messages
def test_messages_name_the_right_thing(capsys, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "rep")]) == 2
    assert _err(capsys, "report").startswith(f"files: {tmp_path / 'empty'} is a directory (0 .json records")
    assert cli.main(["distill", "--teacher", "/nonexistent/t", "--out", str(tmp_path / "d")]) == 2
    assert _err(capsys, "distill").startswith("--teacher: ")
    r = _retriever()
    with pytest.raises(ValueError, match=r"^n_candidates: "):
        r.retrieve(["a"], 4, n_candidates=10**9)
    for bad in (-0.5, 1.0, 7.0):
        with pytest.raises(ValueError, match=r"^anchor: expected a number in \[0, 1\) \(the query's share\)"):
            r.retrieve(["a"], 4, anchor=bad)
    with pytest.raises(ValueError, match="^anchor: expected a finite number"):
        r.retrieve(["a"], 4, anchor=math.inf)


# -------------------------------------------------------------------------------- import circles
def _graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere (TYPE_CHECKING blocks and functions included),
    ``__init__`` files left out (they re-export their room)."""
    mods = {
        ".".join(("r4t_fast", *p.relative_to(PKG).with_suffix("").parts)): p
        for p in PKG.rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    }
    out: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for cand in (node.module, *(f"{node.module}.{a.name}" for a in node.names)):
                    deps.update({cand} & set(mods))
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
        out[name] = deps - {name}
    return out


def test_no_import_circles() -> None:
    graph, state, cycles = _graph(), {}, []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join([*stack[stack.index(d) :], d]))
            elif d not in state:
                visit(d, [*stack, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
    # the two circles of issue 22, by name: the shared names moved down
    assert "r4t_fast.data.encoders" not in graph["r4t_fast.data.embedding_cache"]
    assert "r4t_fast.fanout.constrained" not in graph["r4t_fast.fanout.tokens"]


def test_encoder_protocol_still_importable_from_encoders() -> None:
    from r4t_fast.data import embedding_cache, encoders

    assert encoders.TextEncoder is embedding_cache.TextEncoder
    assert isinstance(HashingEncoder(dim=8), encoders.TextEncoder)
    assert np.asarray(HashingEncoder(dim=8).encode(["a"])).shape == (1, 8)


# -------------------------------------------------------------------------------- portable records
def test_evaluation_record_paths_are_relative_to_the_cache_root(tmp_path: Path) -> None:
    from r4t_fast.eval.evaluation import evaluate

    data = sets_jsonl(tmp_path / "sets.jsonl")
    cache = tmp_path / "cache"
    rec = evaluate(
        "dense", data, "val", encoder="hashing:16", cache_dir=cache, latency_batch_sizes=(), n_boot=10,
        progress=False,
    )  # fmt: skip
    cfg = rec["config"]
    assert cfg["catalog"]["dir"].startswith("$R4T_CACHE_DIR/catalogs/"), cfg["catalog"]["dir"]
    assert cfg["split"]["file"].startswith("$R4T_CACHE_DIR/splits/"), cfg["split"]["file"]
    assert str(cache) not in json.dumps(rec)
