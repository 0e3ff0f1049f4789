"""Tests for r4t_fast.evaluation and the `r4t eval` CLI on small synthetic sets.jsonl files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from r4t_fast import cli
from r4t_fast import objectives as M
from r4t_fast.data import prepare as E_prepare
from r4t_fast.eval import evaluation as E
from r4t_fast.eval.baselines import DenseBaseline
from r4t_fast.eval.records import local_path, subset_record

COLORS = ["red", "blue", "green", "black", "white", "pink", "beige", "navy"]
KINDS = ["dress", "jeans", "sneakers", "handbag", "scarf", "jacket", "sandals", "skirt", "hat", "belt"]
THEMES = ["summer beach", "office day", "winter city", "party night", "garden picnic", "rainy walk"]
BUDGETS = (2, 5)
RECORD_KEYS = {
    "dataset",
    "method",
    "split",
    "n_queries",
    "query_ids_sha256",
    "metrics",
    "ci",
    "latency_ms_per_query",
    "latency_spread_ms_per_query",
    "flags",
    "machine",
    "versions",
    "command",
    "date",
    "config",
    "per_query",
}
HEADLINE_KEYS = (
    "recall_at_fair",
    "hit_at_fair",
    "fair_budget",
    "item_relevance",
    "vendi",
    "category_coverage",
)


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


def check_record(
    rec: dict, method: str, dataset: str = "mini", budgets=BUDGETS, row_terms: bool = True
) -> None:
    assert RECORD_KEYS <= set(rec)
    assert rec["method"] == method and rec["split"] == "test" and rec["dataset"] == dataset
    json.dumps(rec, allow_nan=False)  # strict JSON: no NaN/inf anywhere
    m = rec["metrics"]
    for key in HEADLINE_KEYS + ("mrecall@10", "ild", "recall_at_fair_quota", "fair_union_size"):
        assert key in m, key
    for b in budgets:
        assert f"recall@{10 * b}" in m and f"hit@{10 * b}" in m
    n_items = rec["config"]["catalog"]["n_items"]
    assert m["fair_budget"] == M.fair_budget(n_items, 10) == rec["config"]["fair_budget"]["K"]
    # every method supplies enough candidates: its union holds exactly K distinct items
    assert m["fair_union_size"] == m["fair_budget"] and rec["flags"] == []
    keys = ["row_groundedness", "row_diversity", "row_alignment", "row_composite"] if row_terms else []
    keys += ["item_relevance", "recall_at_fair", "hit_at_fair"]
    for key in keys + ([] if m["category_coverage"] is None else ["category_coverage"]):
        assert 0.0 <= m[key] <= 1.0, key
    assert not {"composite", "groundedness", "alignment", "diversity", "item_alignment"} & set(m)
    assert 1.0 <= m["vendi"] <= 10.0
    for small, big in zip(budgets, budgets[1:], strict=False):
        assert m[f"recall@{10 * small}"] <= m[f"recall@{10 * big}"] + 1e-12
    assert set(rec["ci"]) == set(m) - {"fair_budget"}
    for key, ci in rec["ci"].items():
        if ci is not None:
            assert ci[0] <= m[key] + 1e-9 <= ci[1] + 2e-9, key
    assert rec["config"]["budgets_per_row"] == list(budgets)
    assert rec["config"]["n_candidates"] >= m["fair_budget"]
    ids = rec["per_query"]["set_id"]
    assert len(ids) == rec["n_queries"]
    assert rec["query_ids_sha256"] == hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()
    for key in HEADLINE_KEYS:
        if key != "fair_budget":
            assert len(rec["per_query"][key]) == rec["n_queries"], key
    cat = rec["config"]["catalog"]
    assert len(cat["ids_sha256"]) == 64 and len(cat["embeddings_sha256"]) == 64


def test_record_schema(dense_record: dict, sets_file: Path, cache_dir: Path) -> None:
    rec = dense_record
    check_record(rec, "dense")
    lat = rec["latency_ms_per_query"]
    assert set(lat) == {"1", "8"} and all(v > 0 for v in lat.values())
    # >= 8 timed calls per batch size after a warm-up; the number is the median, with its spread
    for b in ("1", "8"):
        per = rec["config"]["latency"]["per_batch"][b]
        assert per["calls"] >= 8 and len(per["batch_ms"]) == per["calls"]
        assert per["median"] == pytest.approx(float(np.median(np.array(per["batch_ms"]) / int(b))), abs=1e-3)
        sp = rec["latency_spread_ms_per_query"][b]
        assert sp["min"] <= sp["p25"] <= lat[b] <= sp["p75"] <= sp["max"]
    assert rec["config"]["latency"]["min_calls"] >= 8
    assert "latency_breakdown_ms" not in rec  # only the diffusion retriever has one
    # the dense baseline's fair union is its top K: recall_at_fair >= the fixed quota's at K
    m = rec["metrics"]
    assert m["recall_at_fair"] == pytest.approx(m["recall_at_fair_quota"])
    cfg = rec["config"]
    assert cfg["encoder"].startswith("hashing") and cfg["k"] == 10
    assert cfg["split"]["ratios"] == [0.8, 0.1, 0.1]
    # paths relative to the cache root (records read the same on every machine), found on this one
    assert cfg["split"]["file"].startswith("$R4T_CACHE_DIR/splits/")
    assert local_path(cfg["split"]["file"], cache_dir=cache_dir).is_file()
    assert local_path(cfg["catalog"]["dir"], cache_dir=cache_dir).is_dir()
    # the test split of the synthetic file: every titled set is a query, untitled ones are counted
    from r4t_fast.data.datasets import load_jsonl
    from r4t_fast.data.splits import split_sets

    ds = load_jsonl(sets_file)
    test_ids = split_sets(ds, seed=0)["test"]
    titled = [i for i in test_ids if ds.get_set(i).query is not None]
    assert rec["n_queries"] == len(titled) > 0
    assert cfg["n_skipped_untitled"] == len(test_ids) - len(titled)
    assert rec["per_query"]["set_id"] == titled


def test_cached_catalog_and_split_are_reused(dense_record: dict, sets_file: Path, cache_dir: Path) -> None:
    data = E_prepare.load_eval_data(sets_file, encoder="hashing:32", cache_dir=cache_dir, progress=False)
    assert data.catalog_dir == local_path(dense_record["config"]["catalog"]["dir"], cache_dir=cache_dir)
    assert data.split_path == local_path(dense_record["config"]["split"]["file"], cache_dir=cache_dir)
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
    # the rows are the raw query for every non-fan-out baseline: row alignment is 1 by construction
    assert rec["metrics"]["row_alignment"] == pytest.approx(1.0)
    # ... and the diversified items are less relevant to the query than the dense top-k
    assert rec["metrics"]["item_relevance"] < dense_record["metrics"]["item_relevance"]
    assert rec["query_ids_sha256"] == dense_record["query_ids_sha256"]  # the same queries


def test_retriever_object_and_factory(dense_record: dict, sets_file: Path, cache_dir: Path) -> None:
    data = E_prepare.load_eval_data(sets_file, encoder="hashing:32", cache_dir=cache_dir, progress=False)

    class Wrapped:
        def __init__(self, catalog, encoder) -> None:
            self.inner = DenseBaseline(catalog, encoder)

        def retrieve(self, query_texts, k, *, n_candidates=0):
            return self.inner.retrieve(query_texts, k, n_candidates=n_candidates)

    kw = dict(data=data, budgets=BUDGETS, latency_batch_sizes=(1,), progress=False)
    rec = E.evaluate(Wrapped(data.catalog, data.encoder), sets_file, method_name="r4t-diffusion", **kw)
    assert rec["method"] == "r4t-diffusion"
    assert rec["metrics"] == pytest.approx(dense_record["metrics"])
    assert "latency_breakdown_ms" not in rec  # not a diffusion Retriever: no breakdown to take
    rec2 = E.evaluate(Wrapped, sets_file, method_name="r4t-diffusion", **kw)
    assert rec2["metrics"] == pytest.approx(dense_record["metrics"])
    with pytest.raises(ValueError, match="method_name"):
        E.evaluate(Wrapped(data.catalog, data.encoder), sets_file, **kw)


def test_limit_and_bad_arguments(sets_file: Path, cache_dir: Path) -> None:
    data = E_prepare.load_eval_data(sets_file, encoder="hashing:32", cache_dir=cache_dir, progress=False)
    kw = dict(data=data, budgets=BUDGETS, latency_batch_sizes=(), progress=False)
    rec = E.evaluate("dpp", sets_file, limit=2, **kw)
    assert rec["n_queries"] == 2 and rec["config"]["limit"] == 2
    full = E.evaluate("dpp", sets_file, **kw)
    assert rec["query_ids_sha256"] != full["query_ids_sha256"]
    # scoring on a subset == restricting the full record's per-query values to it
    sub = subset_record(full, rec["per_query"]["set_id"])
    assert sub["query_ids_sha256"] == rec["query_ids_sha256"] and sub["n_queries"] == 2
    assert sub["metrics"] == pytest.approx(rec["metrics"])
    assert sub["config"]["subset_of"]["query_ids_sha256"] == full["query_ids_sha256"]
    with pytest.raises(ValueError, match="set_ids: 1 of 1 were not scored"):
        subset_record(rec, ["nope"])
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
    assert "recall@50" in printed and "recall_at_fair" in printed and f"wrote {out}" in printed


@pytest.mark.parametrize("method", ["dense", "mmr", "dpp"])
def test_cli_on_any_sets_jsonl_without_categories(method: str, tmp_path: Path) -> None:
    """`r4t eval --dataset PATH/sets.jsonl --method dense|mmr|dpp --split test --out X.json` on a tiny
    generated dataset whose items have no category: every headline field is there, coverage is null."""
    from helpers import sets_jsonl

    data = sets_jsonl(tmp_path / "sets.jsonl", n=40)
    out = tmp_path / f"{method}.json"
    argv = ["eval", "--dataset", str(data), "--method", method, "--split", "test", "--out", str(out)]
    argv += ["--encoder", "hashing:32", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    argv += ["--latency-calls", "8", "--n-boot", "50"]
    assert cli.main(argv) == 0
    rec = json.loads(out.read_text())
    # 40 items: of the default budgets 10, 100, 500 per row only 10 fit in the catalog
    check_record(rec, method, dataset=data.parent.name, budgets=(10,))  # sets.jsonl: named after its dir
    m = rec["metrics"]
    assert m["category_coverage"] is None and rec["ci"]["category_coverage"] is None
    assert m["fair_budget"] == 10  # 40 items: 3.5 % is 1.4, never below k = 10
    assert set(rec["latency_ms_per_query"]) == {"1", "8", "64"}


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
    assert _eval_cli(sets_file, cache_dir, out, *args, *common, "--latency-calls", "2") == 0
    rec = json.loads(out.read_text())
    check_record(rec, "llm-zeroshot")
    st = rec["method_stats"]
    assert st["n_completions"] == 2  # the quality run's (latency calls are not counted)
    for key in ("usable_subqueries", "no_subquery_rate", "strict_format_failure_rate", "missing_row_rate"):
        assert key in st, key
    per_batch = rec["config"]["latency"]["per_batch"]
    assert per_batch["1"]["calls"] == 2 == per_batch["2"]["calls"]
    assert set(rec["latency_ms_per_query"]) == {"1", "2"}
    assert rec["config"]["method"]["max_new_tokens"] == 80  # raised to the constraint minimum (k = 10)
    assert rec["config"]["method"]["constrained"] is True and st["usable_subqueries"] == 10
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


# ----------------------------------------------------------------------------------------------------
# the diffusion retriever: same-catalog check and latency breakdown
# ----------------------------------------------------------------------------------------------------
def _tiny_retriever(catalog, encoder):
    import torch

    from r4t_fast.diffusion.model import SetDenoiser, get_preset
    from r4t_fast.diffusion.retriever import Retriever

    torch.manual_seed(0)
    model = SetDenoiser(get_preset("tiny", dim=catalog.dim, cond_dim=catalog.dim)).eval()
    with torch.no_grad():  # zero-initialised output layers would make every sample trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return Retriever(model, catalog, encoder, encoder_spec="hashing:32", steps=2)


def test_diffusion_retriever_records_its_latency_breakdown(sets_file: Path, cache_dir: Path) -> None:
    data = E_prepare.load_eval_data(sets_file, encoder="hashing:32", cache_dir=cache_dir, progress=False)
    r = _tiny_retriever(data.catalog, data.encoder)
    kw = dict(data=data, budgets=BUDGETS, latency_batch_sizes=(1, 4), latency_calls=2, progress=False)
    rec = E.evaluate(r, sets_file, **kw)
    check_record(rec, "r4t-diffusion", row_terms=False)  # an untrained model's rows are far off the items
    brk = rec["latency_breakdown_ms"]
    assert set(brk) == {"1", "4"}
    for b, parts in brk.items():
        assert set(parts) == {"encode", "sample", "ground"} and all(v > 0 for v in parts.values())
        # the parts are timed apart from retrieve(), in ms per query like it: a unit slip to microseconds
        # is off by 1000x; the bound leaves room for a busy machine (one 20 ms sampling call was seen
        # beside a 2-thread training job, against 0.9 ms per query for retrieve())
        assert sum(parts.values()) < 200 * rec["latency_ms_per_query"][b] + 50.0
    assert "generate_sets" in rec["config"]["latency"]["breakdown"]


def test_cli_refuses_a_retriever_on_another_catalog(
    sets_file: Path, cache_dir: Path, tmp_path: Path, capsys
) -> None:
    from r4t_fast import Catalog

    data = E_prepare.load_eval_data(sets_file, encoder="hashing:32", cache_dir=cache_dir, progress=False)
    cat = data.catalog
    # the evaluation catalog itself: accepted (saved and reloaded bytes are the same)
    same = tmp_path / "same"
    _tiny_retriever(cat, data.encoder).save(same)
    assert (
        _eval_cli(
            sets_file, cache_dir, tmp_path / "ok.json", "--method", str(same), "--latency-batches", "none"
        )
        == 0
    )
    assert json.loads((tmp_path / "ok.json").read_text())["method"] == "r4t-diffusion"
    # other ids (one item fewer)
    fewer = Catalog(cat.ids[:-1], cat.embeddings[:-1], cat.texts[:-1], cat.categories[:-1])
    _tiny_retriever(fewer, data.encoder).save(tmp_path / "fewer")
    out = tmp_path / "x.json"
    assert _eval_cli(sets_file, cache_dir, out, "--method", str(tmp_path / "fewer")) == 2
    err = capsys.readouterr().err
    assert "the retriever's catalog is not the evaluation catalog: item ids differ" in err
    assert f"retriever: {len(cat) - 1} items" in err and f"evaluation: {len(cat)} items" in err
    assert err.count("\n") == 1 and not out.exists()
    # the same ids, other embeddings
    emb = cat.embeddings.clone()
    emb[0] = emb[1]
    moved = Catalog(cat.ids, emb, cat.texts, cat.categories)
    _tiny_retriever(moved, data.encoder).save(tmp_path / "moved")
    assert _eval_cli(sets_file, cache_dir, out, "--method", str(tmp_path / "moved")) == 2
    err = capsys.readouterr().err
    assert f"embeddings differ (same {len(cat)} item ids" in err and "item ids differ" not in err
    # the Python API refuses a retriever object on another catalog too
    with pytest.raises(ValueError, match="embeddings differ"):
        E.evaluate(
            _tiny_retriever(moved, data.encoder), sets_file, data=data, latency_batch_sizes=(), progress=False
        )


def test_latency_protocol_warm_up_median_and_reuse() -> None:
    from r4t_fast.eval.latency import MIN_LATENCY_CALLS, measure_latency

    class Counting:
        batch_size = 64

        def __init__(self) -> None:
            self.calls: list[tuple[int, int]] = []

        def retrieve(self, query_texts, k, *, n_candidates=0):
            self.calls.append((len(query_texts), self.batch_size))
            return []

    r = Counting()
    ms, detail = measure_latency(r, ["a", "b", "c"], 10, (1, 4), calls=None, prior_times={4: [0.4, 0.8, 0.4]})
    assert MIN_LATENCY_CALLS == 8
    # batch 1: one warm-up + 8 timed calls; batch 4: 3 reused calls + 5 fresh ones, no warm-up
    assert r.calls == [(1, 1)] * 9 + [(4, 4)] * 5
    assert detail["1"]["calls"] == 8 and detail["4"]["calls"] == 8 and detail["4"]["reused_calls"] == 3
    assert detail["4"]["max"] == pytest.approx(200.0)  # the 0.8 s reused call, per query
    assert ms["4"] == pytest.approx(float(np.median(np.array(detail["4"]["batch_ms"]) / 4)), abs=1e-3)
    assert r.batch_size == 64  # restored
