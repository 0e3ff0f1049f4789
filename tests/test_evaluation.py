"""Tests for r4t_fast.evaluation and the `r4t eval` CLI on small synthetic sets.jsonl files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from r4t_fast import cli
from r4t_fast import evaluation as E
from r4t_fast.baselines import DenseBaseline

COLORS = ["red", "blue", "green", "black", "white", "pink", "beige", "navy"]
KINDS = ["dress", "jeans", "sneakers", "handbag", "scarf", "jacket", "sandals", "skirt", "hat", "belt"]
THEMES = ["summer beach", "office day", "winter city", "party night", "garden picnic", "rainy walk"]
BUDGETS = (2, 5)
RECORD_KEYS = {
    "dataset",
    "method",
    "split",
    "n_queries",
    "metrics",
    "ci",
    "latency_ms_per_query",
    "machine",
    "versions",
    "command",
    "date",
    "config",
}


def write_sets(path: Path, n_sets: int = 80, n_untitled: int = 6) -> Path:
    """A deterministic synthetic sets.jsonl: titled sets of 4-6 items, plus some untitled ones."""
    rng = np.random.Generator(np.random.PCG64(7))
    with open(path, "w", encoding="utf-8") as f:
        for s in range(n_sets):
            color = COLORS[s % len(COLORS)]
            kinds = rng.choice(len(KINDS), size=4 + s % 3, replace=False)
            items = [
                {
                    "item_id": f"{color}-{KINDS[j]}-{s % 5}",
                    "text": f"{color} {KINDS[j]} v{s % 5}",
                    "category": KINDS[j],
                }
                for j in kinds
            ]
            title = None if s < n_untitled else f"{color} {THEMES[s % len(THEMES)]} look"
            f.write(json.dumps({"set_id": f"s{s:03d}", "query": title, "items": items}) + "\n")
    return path


@pytest.fixture(scope="module")
def sets_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sets(tmp_path_factory.mktemp("data") / "mini.jsonl")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def dense_record(sets_file: Path, cache_dir: Path) -> dict:
    return E.evaluate(
        "dense",
        sets_file,
        encoder="hashing:32",
        cache_dir=cache_dir,
        budgets=BUDGETS,
        latency_batch_sizes=(1, 8),
        n_boot=200,
        progress=False,
    )


def check_record(rec: dict, method: str) -> None:
    assert RECORD_KEYS <= set(rec)
    assert rec["method"] == method and rec["split"] == "test" and rec["dataset"] == "mini"
    json.dumps(rec, allow_nan=False)  # strict JSON: no NaN/inf anywhere
    m = rec["metrics"]
    for key in ("recall@20", "hit@20", "recall@50", "hit@50", "mrecall@10", "vendi"):
        assert key in m, key
    for key in ("groundedness", "diversity", "alignment", "item_alignment", "composite", "category_coverage"):
        assert 0.0 <= m[key] <= 1.0, key
    assert 1.0 <= m["vendi"] <= 10.0
    assert m["recall@20"] <= m["recall@50"] + 1e-12 and m["hit@20"] <= m["hit@50"] + 1e-12
    assert set(rec["ci"]) == set(m)
    for key, ci in rec["ci"].items():
        if ci is not None:
            assert ci[0] <= m[key] + 1e-9 <= ci[1] + 2e-9, key
    assert rec["config"]["budgets_per_row"] == list(BUDGETS)
    assert len(rec["per_query"]["set_id"]) == rec["n_queries"]


def test_record_schema(dense_record: dict, sets_file: Path) -> None:
    rec = dense_record
    check_record(rec, "dense")
    lat = rec["latency_ms_per_query"]
    assert set(lat) == {"1", "8"} and all(v > 0 for v in lat.values())
    cfg = rec["config"]
    assert cfg["encoder"].startswith("hashing") and cfg["k"] == 10
    assert cfg["split"]["ratios"] == [0.8, 0.1, 0.1]
    assert Path(cfg["split"]["file"]).is_file() and Path(cfg["catalog"]["dir"]).is_dir()
    # the test split of the synthetic file: every titled set is a query, untitled ones are counted
    from r4t_fast.data import load_jsonl, split_sets

    ds = load_jsonl(sets_file)
    test_ids = split_sets(ds, seed=0)["test"]
    titled = [i for i in test_ids if ds.get_set(i).query is not None]
    assert rec["n_queries"] == len(titled) > 0
    assert cfg["n_skipped_untitled"] == len(test_ids) - len(titled)
    assert rec["per_query"]["set_id"] == titled


def test_cached_catalog_and_split_are_reused(dense_record: dict, sets_file: Path, cache_dir: Path) -> None:
    data = E.load_eval_data(sets_file, encoder="hashing:32", cache_dir=cache_dir, progress=False)
    assert data.catalog_dir == Path(dense_record["config"]["catalog"]["dir"])
    assert str(data.split_path) == dense_record["config"]["split"]["file"]
    rec = E.evaluate("dense", sets_file, data=data, budgets=BUDGETS, latency_batch_sizes=(), progress=False)
    assert rec["metrics"] == pytest.approx(dense_record["metrics"])
    assert rec["latency_ms_per_query"] == {}


def test_mmr_raises_vendi_over_dense(dense_record: dict, sets_file: Path, cache_dir: Path) -> None:
    rec = E.evaluate(
        "mmr",
        sets_file,
        encoder="hashing:32",
        cache_dir=cache_dir,
        budgets=BUDGETS,
        latency_batch_sizes=(),
        method_kwargs={"lambda_": 0.3},
        progress=False,
    )
    check_record(rec, "mmr")
    assert rec["config"]["method"]["lambda_"] == 0.3
    assert rec["metrics"]["vendi"] > dense_record["metrics"]["vendi"]
    # the rows are the raw query for every non-fan-out baseline: alignment is 1
    assert rec["metrics"]["alignment"] == pytest.approx(1.0)
    # ... and the diversified items are less relevant to the query than the dense top-k
    assert rec["metrics"]["item_alignment"] < dense_record["metrics"]["item_alignment"]


def test_retriever_object_and_factory(dense_record: dict, sets_file: Path, cache_dir: Path) -> None:
    data = E.load_eval_data(sets_file, encoder="hashing:32", cache_dir=cache_dir, progress=False)

    class Wrapped:
        def __init__(self, catalog, encoder) -> None:
            self.inner = DenseBaseline(catalog, encoder)

        def retrieve(self, query_texts, k, *, n_candidates=0):
            return self.inner.retrieve(query_texts, k, n_candidates=n_candidates)

    kw = dict(data=data, budgets=BUDGETS, latency_batch_sizes=(1,), progress=False)
    rec = E.evaluate(Wrapped(data.catalog, data.encoder), sets_file, method_name="r4t-diffusion", **kw)
    assert rec["method"] == "r4t-diffusion"
    assert rec["metrics"] == pytest.approx(dense_record["metrics"])
    rec2 = E.evaluate(Wrapped, sets_file, method_name="r4t-diffusion", **kw)
    assert rec2["metrics"] == pytest.approx(dense_record["metrics"])
    with pytest.raises(ValueError, match="method_name"):
        E.evaluate(Wrapped(data.catalog, data.encoder), sets_file, **kw)


def test_limit_and_bad_arguments(sets_file: Path, cache_dir: Path) -> None:
    data = E.load_eval_data(sets_file, encoder="hashing:32", cache_dir=cache_dir, progress=False)
    kw = dict(data=data, budgets=BUDGETS, latency_batch_sizes=(), progress=False)
    rec = E.evaluate("dpp", sets_file, limit=2, **kw)
    assert rec["n_queries"] == 2 and rec["config"]["limit"] == 2
    with pytest.raises(ValueError, match="split"):
        E.evaluate("dense", sets_file, split="dev", **kw)
    with pytest.raises(ValueError, match="valid choices: dense, dpp, llm-bon, llm-zeroshot, mmr"):
        E.evaluate("bm25", sets_file, **kw)
    with pytest.raises(ValueError, match="limit"):
        E.evaluate("dense", sets_file, limit=0, **kw)
    with pytest.raises(ValueError, match="budgets"):
        E.evaluate("dense", sets_file, **{**kw, "budgets": (0,)})
    with pytest.raises(ValueError, match="folm"):
        E.evaluate("folm", sets_file, **kw)
    with pytest.raises(ValueError, match="method_kwargs"):
        E.evaluate("mmr", sets_file, method_kwargs={"temperature": 0.5}, **kw)


def _eval_cli(sets_file: Path, cache_dir: Path, out: Path, *extra: str) -> int:
    return cli.main(
        [
            "eval",
            "--dataset",
            str(sets_file),
            "--encoder",
            "hashing:32",
            "--cache-dir",
            str(cache_dir),
            "--out",
            str(out),
            "--budgets",
            "2,5",
            "--n-boot",
            "100",
            "--no-progress",
            *extra,
        ]
    )


def test_cli_end_to_end(sets_file: Path, cache_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "nested" / "mmr.json"
    assert _eval_cli(sets_file, cache_dir, out, "--method", "mmr", "--latency-batches", "1,8") == 0
    rec = json.loads(out.read_text())
    check_record(rec, "mmr")
    assert set(rec["latency_ms_per_query"]) == {"1", "8"}
    assert rec["command"].startswith("r4t eval") and "--method mmr" in rec["command"]
    printed = capsys.readouterr().out
    assert "recall@50" in printed and f"wrote {out}" in printed


def test_cli_llm_methods_with_a_tiny_policy(sets_file: Path, cache_dir: Path, tmp_path: Path) -> None:
    from helpers import make_tiny_policy

    policy = make_tiny_policy(tmp_path / "policy")
    common = ("--limit", "2", "--max-new-tokens", "4")
    out = tmp_path / "zs.json"
    args = (
        "--method",
        "llm-zeroshot",
        "--policy",
        str(policy),
        "--latency-batches",
        "1,2",
        "--batch-size",
        "2",
    )
    assert _eval_cli(sets_file, cache_dir, out, *args, *common) == 0
    rec = json.loads(out.read_text())
    check_record(rec, "llm-zeroshot")
    assert rec["method_stats"]["n_completions"] == 2
    assert rec["config"]["latency"]["sample"].startswith("small sample")
    per_batch = rec["config"]["latency"]["per_batch"]
    assert "source" not in per_batch["1"] and per_batch["2"]["source"].startswith("the quality run")
    assert set(rec["latency_ms_per_query"]) == {"1", "2"}
    assert rec["config"]["method"]["max_new_tokens"] == 4
    out = tmp_path / "folm.json"
    assert (
        _eval_cli(sets_file, cache_dir, out, "--method", str(policy), "--latency-batches", "none", *common)
        == 0
    )
    assert json.loads(out.read_text())["method"] == "folm"
    out = tmp_path / "bon.json"
    rc = _eval_cli(
        sets_file,
        cache_dir,
        out,
        "--method",
        "llm-bon",
        "--policy",
        str(policy),
        "--bon-n",
        "2",
        "--latency-batches",
        "none",
        *common,
    )
    assert rc == 0
    rec = json.loads(out.read_text())
    assert rec["method"] == "llm-bon" and rec["config"]["method"]["n"] == 2
    assert rec["method_stats"]["n_completions"] == 4


def test_cli_bad_inputs(sets_file: Path, cache_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.json"
    assert _eval_cli(sets_file, cache_dir, out, "--method", "bm25") == 2
    err = capsys.readouterr().err
    assert "unknown method 'bm25'" in err and "valid choices: dense, dpp, llm-bon, llm-zeroshot, mmr" in err
    missing = tmp_path / "nope" / "sets.jsonl"
    assert _eval_cli(missing, cache_dir, out, "--method", "dense") == 2
    assert str(missing) in capsys.readouterr().err
    assert _eval_cli(sets_file, cache_dir, out, "--method", "dense", "--policy", "smollm2") == 2
    assert "--policy" in capsys.readouterr().err
    assert _eval_cli(sets_file, cache_dir, out, "--method", "dense", "--bon-n", "3") == 2
    assert not out.exists()
    with pytest.raises(SystemExit):
        _eval_cli(sets_file, cache_dir, out, "--method", "dense", "--split", "dev")
