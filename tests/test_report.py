"""Tests for r4t_fast.report and the `r4t report` CLI on hand-made evaluation records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r4t_fast import cli
from r4t_fast.eval import report as R

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_record(
    dataset: str, method: str, recall: float, latency: dict | None, *, stats: bool = False
) -> dict:
    metrics = {
        "recall@100": recall,
        "hit@100": min(1.0, 3 * recall),
        "recall@1000": min(1.0, 2 * recall),
        "hit@1000": min(1.0, 4 * recall),
        "mrecall@10": 0.0,
        "vendi": 4.5,
        "groundedness": 0.8,
        "diversity": 0.45,
        "alignment": 0.9,
        "composite": 0.75,
        "ild": 0.5,
        "category_coverage": None if dataset == "spotify" else 0.3,
    }
    ci = {
        k: (None if v is None else [0.9 * v, min(1.0, 1.1 * v) if k != "vendi" else 1.1 * v])
        for k, v in metrics.items()
    }
    rec = {
        "dataset": dataset,
        "method": method,
        "split": "test",
        "n_queries": 25 if dataset == "spotify" else 140,
        "metrics": metrics,
        "ci": ci,
        "latency_ms_per_query": latency or {},
        "machine": {"cpu": "Test CPU", "cores": 2, "gpu": None},
        "versions": {"r4t_fast": "0.1.0"},
        "command": f"r4t eval --dataset {dataset} --method {method}",
        "date": "2026-11-25T00:00:00+00:00",
        "config": {"limit": 100 if method.startswith("llm") else None, "n_skipped_untitled": 3},
    }
    if stats:
        rec["method_stats"] = {"n_completions": 100, "format_failure_rate": 0.4, "fallback_row_rate": 0.2}
    return rec


@pytest.fixture
def record_files(tmp_path: Path) -> list[Path]:
    recs = [
        make_record("polyvore", "mmr", 0.05, {"1": 3.0, "8": 1.0, "64": 0.5}),
        make_record("polyvore", "dense", 0.06, {"1": 2.0, "8": 0.8, "64": 0.3}),
        make_record("polyvore", "llm-zeroshot", 0.04, {"1": 9000.0, "8": 2500.0, "64": 900.0}, stats=True),
        make_record("spotify", "dense", 0.02, {"1": 2.0, "8": 0.7, "64": 0.4}),
        make_record("spotify", "r4t-diffusion", 0.03, None),
    ]
    paths = []
    for i, r in enumerate(recs):
        p = tmp_path / f"rec{i}.json"
        p.write_text(json.dumps(r))
        paths.append(p)
    return paths


def test_markdown_rows_order_and_ci(record_files: list[Path]) -> None:
    recs = R.load_records(record_files)
    assert [(r["dataset"], r["method"]) for r in recs] == [
        ("polyvore", "dense"),
        ("polyvore", "mmr"),
        ("polyvore", "llm-zeroshot"),
        ("spotify", "dense"),
        ("spotify", "r4t-diffusion"),
    ]
    md = R.markdown_report(recs)
    assert "| polyvore | dense | 140 | 6.0 (5.4–6.6) |" in md
    assert "R@1000" in md and "H@100" in md and "MR@10" in md and "cat. cov." in md
    assert "| spotify | r4t-diffusion | – | – | – |" in md  # no latency: dashes
    assert "9000" in md and "format failures 40%" in md
    assert "(limit 100)" in md and "3 untitled sets skipped" in md
    # spotify has no categories: a dash, not "None" or "nan"
    assert "None" not in md and "nan" not in md


def test_render_writes_markdown_and_pngs(record_files: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    paths = R.render_report(record_files, out)
    assert set(paths) == {"markdown", "quality", "latency"}
    for key in ("quality", "latency"):
        data = paths[key].read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
    text = paths["markdown"].read_text()
    assert "![quality per method](quality.png)" in text and "latency.png" in text


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
