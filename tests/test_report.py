"""Tests for r4t_fast.eval.report and the `r4t report` CLI on hand-made evaluation records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r4t_fast import cli
from r4t_fast.eval import report as R
from r4t_fast.eval.records import query_ids_sha256

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_record(
    dataset: str,
    method: str,
    recall: float,
    latency: dict | None,
    *,
    stats: bool = False,
    n: int | None = None,
    offset: float = 0.0,
) -> dict:
    """A hand-made record with the issue-10 schema; ``per_query`` has ``n`` queries whose recall is
    ``recall`` on average (spread +-0.01), plus ``offset``."""
    n = n if n is not None else (25 if dataset == "spotify" else 140)
    ids = [f"{dataset}-{i:03d}" for i in range(n)]
    per_recall = [recall + offset + (0.01 if i % 2 else -0.01) for i in range(n)]
    metrics = {
        "recall_at_fair": recall + offset,
        "hit_at_fair": min(1.0, 3 * recall),
        "fair_budget": 660,
        "fair_union_size": 660,
        "recall_at_fair_quota": 0.9 * recall,
        "hit_at_fair_quota": min(1.0, 2.5 * recall),
        "item_relevance": 0.7 + recall,
        "vendi": 4.5 + 10 * recall,
        "category_coverage": None if dataset == "spotify" else 0.3,
        "ild": 0.5,
        "recall@100": recall,
        "hit@100": min(1.0, 3 * recall),
        "recall@1000": min(1.0, 2 * recall),
        "hit@1000": min(1.0, 4 * recall),
        "mrecall@10": 0.0,
        "row_groundedness": 0.8,
        "row_diversity": 0.45,
        "row_alignment": 0.9,
        "row_composite": 0.75,
    }
    ci = {
        k: (None if v is None else [0.9 * v, min(1.0, 1.1 * v) if k != "vendi" else 1.1 * v])
        for k, v in metrics.items()
        if k != "fair_budget"
    }
    rec = {
        "dataset": dataset,
        "method": method,
        "split": "test",
        "n_queries": n,
        "query_ids_sha256": query_ids_sha256(ids),
        "metrics": metrics,
        "ci": ci,
        "latency_ms_per_query": latency or {},
        "latency_spread_ms_per_query": {
            b: {"p25": 0.9 * v, "p75": 1.1 * v, "min": 0.8 * v, "max": 1.3 * v}
            for b, v in (latency or {}).items()
        },
        "flags": [],
        "machine": {"cpu": "Test CPU", "cores": 2, "gpu": None},
        "versions": {"r4t_fast": "0.1.0"},
        "command": f"r4t eval --dataset {dataset} --method {method}",
        "date": "2026-11-25T00:00:00+00:00",
        "config": {
            "limit": 100 if method.startswith("llm") else None,
            "n_skipped_untitled": 3,
            "k": 10,
            "latency": {"min_calls": 8} if latency else {},
        },
        "per_query": {"set_id": ids, "recall_at_fair": per_recall, "vendi": [4.5 + 10 * recall] * n},
    }
    if stats:
        rec["method_stats"] = {
            "n_completions": 100,
            "usable_subqueries": 2.5,
            "no_subquery_rate": 0.4,
            "strict_format_failure_rate": 0.9,
            "missing_row_rate": 0.2,
            "mean_new_tokens": 120,
        }
    return rec


def _write(tmp_path: Path, recs: list[dict]) -> list[Path]:
    paths = []
    for i, r in enumerate(recs):
        p = tmp_path / f"rec{i}-{r['dataset']}-{r['method']}.json"
        p.write_text(json.dumps(r))
        paths.append(p)
    return paths


@pytest.fixture
def record_files(tmp_path: Path) -> list[Path]:
    return _write(
        tmp_path,
        [
            make_record("polyvore", "mmr", 0.05, {"1": 3.0, "8": 1.0, "64": 0.5}),
            make_record("polyvore", "dense", 0.06, {"1": 2.0, "8": 0.8, "64": 0.3}),
            make_record(
                "polyvore", "llm-zeroshot", 0.04, {"1": 9000.0, "8": 2500.0, "64": 900.0}, stats=True
            ),
            make_record("spotify", "dense", 0.02, {"1": 2.0, "8": 0.7, "64": 0.4}),
            make_record("spotify", "r4t-diffusion", 0.03, None),
        ],
    )


def test_markdown_leads_with_the_headline_table(record_files: list[Path]) -> None:
    recs = R.load_records(record_files)
    assert [(r["dataset"], r["method"]) for r in recs] == [
        ("polyvore", "dense"),
        ("polyvore", "mmr"),
        ("polyvore", "llm-zeroshot"),
        ("spotify", "dense"),
        ("spotify", "r4t-diffusion"),
    ]
    md = R.markdown_report(recs)
    poly = md[md.index("## polyvore / test") : md.index("## spotify / test")]
    # the first table of a section is the headline: item-level metrics + ms/query at batch 8
    first = poly[poly.index("| method") :].split("\n\n")[0]
    header = first.splitlines()[0]
    for label in ("R@fair (K = 660)", "H@fair", "item rel.", "Vendi", "cat. cov.", "ILD", "ms/query @8"):
        assert label in header, label
    assert "row" not in header and "composite" not in header  # row-based terms never in the headline
    # best value per column in bold: dense has the best recall and the lowest latency
    assert "| dense | 140 | **6.0** (5.4–6.6) |" in first
    assert "| **0.80** |" in first
    assert "**30.0**" not in first  # a column where every method ties has no bold
    assert "| mmr | 140 | 5.0 (4.5–5.5) |" in first
    # row-based terms and the fixed-quota protocol come after, labelled as secondary
    assert poly.index("Secondary, row-based") > poly.index("| method")
    assert "row composite" in poly and "R@fair quota" in poly and "R@1000" in poly and "MR@10" in poly
    assert "| spotify" not in md  # one table per dataset: no dataset column needed
    sp = md[md.index("## spotify / test") :]
    assert "| r4t-diffusion | 25 |" in sp and "| – |" in sp  # no latency, no categories: dashes
    assert "usable subqueries 2.50 of 10" in md and "no usable subquery 40%" in md
    assert "strict-format failures 90%" in md and "format failures 40" not in md
    assert "(limit 100)" in md and "3 untitled sets skipped" in md
    assert "None" not in md and "nan" not in md


def test_paired_differences_with_bootstrap_cis(record_files: list[Path]) -> None:
    md = R.markdown_report(R.load_records(record_files))
    poly = md[md.index("## polyvore / test") : md.index("## spotify / test")]
    assert "Paired differences against **dense**" in poly
    diff = poly[poly.index("Paired differences") :].split("\n\n")[1]
    # mmr - dense: recall -1.0 points and Vendi -0.10 on every query (the same per-query pattern), so
    # the CI is a point that excludes 0; metrics without per-query values get a dash
    assert "| mmr | -1.0* (-1.0, -1.0) | – | – | -0.10* (-0.10, -0.10) | – | – |" in diff
    assert "| llm-zeroshot | -2.0* (-2.0, -2.0) |" in diff
    assert "| dense |" not in diff
    sp = md[md.index("## spotify / test") :]
    assert "Paired differences against **r4t-diffusion**" in sp  # the default reference when present
    md2 = R.markdown_report(R.load_records(record_files), reference="mmr")
    assert "Paired differences against **mmr**" in md2


def test_records_on_different_queries_are_refused(tmp_path: Path, capsys) -> None:
    full = make_record("polyvore", "dense", 0.06, None, n=139)
    sub = make_record("polyvore", "llm-zeroshot", 0.04, None, n=48)
    paths = _write(tmp_path, [full, sub])
    with pytest.raises(R.ReportError, match="polyvore/test: records scored on different queries"):
        R.markdown_report(R.load_records(paths))
    assert cli.main(["report", *map(str, paths), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("r4t report: error: polyvore/test: records scored on different queries")
    assert err.count("\n") == 1  # one line
    assert "n=139" in err and "n=48" in err and full["query_ids_sha256"][:12] in err
    assert not (tmp_path / "o" / "report.md").exists()
    # the same 48 queries: accepted; the full record can go to the appendix
    (tmp_path / "same").mkdir()
    same = _write(tmp_path / "same", [make_record("polyvore", "dense", 0.06, None, n=48)])
    out = R.render_report([paths[1], *same], tmp_path / "ok", appendix=[paths[0]])
    text = out["markdown"].read_text()
    assert "## Appendix" in text and "### polyvore / test: 139 queries" in text
    # a record from before the rule (no hash) is refused by name
    old = dict(full)
    del old["query_ids_sha256"]
    p = tmp_path / "old.json"
    p.write_text(json.dumps(old))
    with pytest.raises(R.ReportError, match="old.json: no query_ids_sha256"):
        R.load_records([p])


def test_render_writes_markdown_and_pngs(record_files: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    paths = R.render_report(record_files, out)
    assert set(paths) == {"markdown", "quality", "frontier", "latency"}
    for key in ("quality", "frontier", "latency"):
        data = paths[key].read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
    text = paths["markdown"].read_text()
    assert "![quality per method](quality.png)" in text and "latency.png" in text
    assert "![recall vs Vendi per method](frontier.png)" in text
    assert "median (p25–p75)" in text and "0.80 (0.72–0.88)" in text


def test_no_latency_means_no_latency_plot(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    p.write_text(json.dumps(make_record("polyvore", "dense", 0.1, None)))
    paths = R.render_report([p], tmp_path / "out")
    assert "latency" not in paths and paths["quality"].is_file()


def test_cli_report(record_files: list[Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    notes = tmp_path / "notes.md"
    notes.write_text("LLM runs used one thread.\n")
    argv = ["report", *map(str, record_files), "--out", str(out), "--title", "T", "--notes", str(notes)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# T") and "wrote quality" in printed
    assert (out / "quality.png").is_file()
    assert "## Notes\n\nLLM runs used one thread." in (out / "report.md").read_text()
    assert cli.main([*argv, "--reference", "mmr"]) == 0
    assert "against **mmr**" in (out / "report.md").read_text()
    argv[-1] = str(tmp_path / "missing.md")
    assert cli.main(argv) == 2
    assert "--notes: cannot read" in capsys.readouterr().err


def test_bad_inputs(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dataset": "x"}))
    assert cli.main(["report", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.json: not an r4t eval record" in capsys.readouterr().err
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(R.ReportError, match="garbage.json: not a JSON file"):
        R.load_records([garbage])
    with pytest.raises(R.ReportError, match="does not exist"):
        R.load_records([tmp_path / "missing.json"])
    with pytest.raises(R.ReportError, match="at least one"):
        R.load_records([])
    good = tmp_path / "good.json"
    good.write_text(json.dumps(make_record("polyvore", "dense", 0.1, None)))
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(R.ReportError, match="not a directory"):
        R.render_report([good], afile)


def test_paired_z_is_the_mean_difference_in_standard_errors() -> None:
    from r4t_fast.eval.records import paired_z

    def rec(vals: list[float], ids: list[str] | None = None) -> dict:
        ids = ids or [f"q{i}" for i in range(len(vals))]
        return {"per_query": {"set_id": ids, "recall_at_fair": vals}}

    a, b = rec([0.3, 0.5, 0.1, 0.4]), rec([0.1, 0.2, 0.2, 0.1])
    d = [0.2, 0.3, -0.1, 0.3]
    mean, sd = sum(d) / 4, (sum((x - sum(d) / 4) ** 2 for x in d) / 3) ** 0.5
    assert paired_z(a, b, "recall_at_fair") == pytest.approx(mean / (sd / 2))
    assert paired_z(b, a, "recall_at_fair") == pytest.approx(-mean / (sd / 2))
    # a noisy lead scores below a smaller lead that holds on every query
    noisy, steady = rec([0.9, 0.0, 0.9, 0.0]), rec([0.12, 0.11, 0.12, 0.11])
    base = rec([0.1, 0.1, 0.1, 0.1])
    assert paired_z(steady, base, "recall_at_fair") > paired_z(noisy, base, "recall_at_fair")
    # only common queries count; constant differences; too few queries
    two, three = rec([0.5, 0.5], ["x", "y"]), rec([0.1, 0.1, 0.9], ["x", "y", "z"])
    assert paired_z(two, three, "recall_at_fair") == float("inf")
    assert paired_z(base, base, "recall_at_fair") == 0.0
    assert paired_z(rec([0.5], ["x"]), rec([0.1], ["x"]), "recall_at_fair") is None
    assert paired_z(a, {"per_query": {}}, "recall_at_fair") is None
