"""Before/after evaluation of ``r4t train-rl`` and its reward curve.

:func:`evaluate_policies` lets each policy write greedy fan-outs for the held-out queries and tabulates
the training reward, the OAR terms and the ``r4t eval`` metrics with paired bootstrap CIs against a
baseline policy (:func:`summary_table`, :func:`format_before_after`; :func:`rebuild_before_after`
re-renders a saved table). :func:`plot_reward_curve` draws ``steps.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r4t_fast.objectives import DEFAULT_WEIGHTS
from r4t_fast.train.rl_config import RLConfig
from r4t_fast.train.rl_setup import _load_data, _reward_function, _split_rows, _versions, rollout_constraint
from r4t_fast.train.rl_trainer import _read_steps

__all__ = [
    "evaluate_policies",
    "format_before_after",
    "plot_reward_curve",
    "rebuild_before_after",
    "summary_table",
]

_PAPER_WEIGHTS = "/".join(f"{w:g}" for w in DEFAULT_WEIGHTS)


# ----------------------------------------------------------------------------------------------------
# before/after evaluation
# ----------------------------------------------------------------------------------------------------
def _eval_policy(
    name: str,
    policy: str | os.PathLike[str],
    rows: list[dict[str, Any]],
    data: Any,
    cfg: RLConfig,
    reward_fns: dict[str, Any],
) -> dict[str, Any]:
    """Greedy fan-outs of one policy on ``rows``; per-query rewards and r4t-eval-style metrics.

    Decoded as the training rollouts are (``cfg.constrained``, ``cfg.think``: the same
    :class:`~r4t_fast.fanout.constrained.FanOutConstraint`), so both policies are scored on what they
    write under the decoding every stage uses.

    ``reward_fns``: ``"train"`` (the run's reward), ``"nk"`` (``missing="zero"``: the terms over the
    written subqueries and the ``n/k`` reward) and ``"fill"`` (``missing="query"``).
    """
    from r4t_fast.eval.metrics import evaluate_sets
    from r4t_fast.fanout.generation import FanOutLM
    from r4t_fast.fanout.missing import fill_missing_rows
    from r4t_fast.kernels import ops

    queries = [r["query"] for r in rows]
    refs = [r["reference"] for r in rows]
    lm = FanOutLM(policy)
    constraint, max_new = rollout_constraint(
        cfg, lm.tokenizer, cfg.eval_max_new_tokens, "eval_max_new_tokens"
    )
    t0 = time.time()
    outs = lm.generate(
        queries,
        k=cfg.k,
        temperature=0.0,
        max_new_tokens=max_new,
        batch_size=cfg.eval_batch_size,
        one_shot=cfg.one_shot,
        constrained=constraint if constraint is not None else False,
        think=cfg.think,
    )
    gen_s = time.time() - t0
    texts = [o[0].text for o in outs]
    batch = reward_fns["train"].score(texts, queries, refs)
    nk = reward_fns["nk"].score(texts, queries, refs)
    fill = reward_fns["fill"].score(texts, queries, refs)
    # the protocol of r4t eval: the one missing-row rule, rows grounded without repeats
    fan_rows = [fill_missing_rows(s, q, cfg.k) for s, q in zip(batch.subqueries, queries, strict=True)]
    uniq = list(dict.fromkeys([t for r in fan_rows for t in r] + queries))
    emb = reward_fns["train"]._encode(uniq)
    pos = {t: i for i, t in enumerate(uniq)}
    row_emb = np.stack([emb[[pos[t] for t in r]] for r in fan_rows]).astype(np.float32)
    q_emb = emb[[pos[q] for q in queries]]
    items, _ = ops.ground_sets(torch.from_numpy(row_emb), data.catalog.embeddings)
    sm = evaluate_sets(items.numpy(), row_emb, q_emb, data.catalog.embeddings, references=refs)
    per_query = {
        "reward": batch.reward,
        "reward_nk": nk.reward,
        "reward_fill": fill.reward,
        "groundedness": nk.groundedness,
        "diversity": nk.diversity,
        "alignment": nk.alignment,
        "vendi_top1": nk.diversity * nk.n_subqueries,
        "coverage": nk.coverage,
        "usable_subqueries": batch.n_subqueries.astype(np.float64),
        "copy_rate": np.where(
            batch.n_subqueries > 0, batch.n_copies / np.maximum(batch.n_subqueries, 1), np.nan
        ),
        "parse_ok": batch.parse_ok.astype(np.float64),
        "format_ok": batch.format_ok.astype(np.float64),
        "eval_composite": sm.per_query["row_composite"],
        "eval_groundedness": sm.per_query["row_groundedness"],
        "eval_diversity": sm.per_query["row_diversity"],
        "eval_alignment": sm.per_query["row_alignment"],
        "eval_vendi": sm.per_query["vendi"],
    }
    finished = np.array([o[0].finished for o in outs], dtype=np.float64)
    n_tokens = np.array([o[0].n_tokens for o in outs], dtype=np.float64)
    return {
        "name": name,
        "policy": str(policy),
        "generate_wall_s": round(gen_s, 1),
        "max_new_tokens": max_new,
        "per_query": per_query,
        "completions": texts,
        "finished_rate": float(finished.mean()),
        "mean_new_tokens": float(n_tokens.mean()),
        "examples": [{"query": q, "completion": t} for q, t in list(zip(queries, texts, strict=True))[:8]],
    }


_TABLE_ROWS = (
    ("reward", "this run's training reward (format failures 0)"),
    ("reward_nk", f"composite {_PAPER_WEIGHTS} x n/k (missing='zero'), format failures 0"),
    (
        "reward_fill",
        f"composite {_PAPER_WEIGHTS}, missing rows = raw query (missing='query'), format failures 0",
    ),
    ("groundedness", "r_ground over the written subqueries"),
    ("diversity", "r_div = Vendi(top-1 items) / n over the written subqueries"),
    ("alignment", "r_align over the written subqueries"),
    ("vendi_top1", "Vendi of the top-1 items of the written subqueries, in [1, n]"),
    ("eval_composite", "composite, r4t-eval protocol (missing rows = raw query)"),
    ("eval_vendi", "Vendi of the k grounded items, r4t-eval protocol"),
    ("eval_alignment", "alignment, r4t-eval protocol"),
    ("eval_groundedness", "groundedness, r4t-eval protocol"),
    ("eval_diversity", "diversity (Vendi / k), r4t-eval protocol"),
    ("coverage", "coverage of the reference set (top-b items per written subquery)"),
    ("usable_subqueries", "usable subqueries parsed (of k)"),
    ("copy_rate", "share of the written subqueries that copy the title (fanout.copies)"),
    ("parse_ok", "completions with >= 1 usable subquery"),
    ("format_ok", "completions in the strict format"),
)
"""Rows of the before/after table: per-query key, label. The written-subquery terms are undefined
(``nan``) for format failures, so their means and paired CIs use the queries where both policies
wrote at least one subquery (``n`` / ``n_paired`` in the JSON)."""


def _with_derived(per_query: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = dict(per_query)
    if "usable_subqueries" not in out and "n_subqueries" in out:  # records written before the rename
        out["usable_subqueries"] = out["n_subqueries"]
    if "vendi_top1" not in out and "diversity" in out and "usable_subqueries" in out:
        out["vendi_top1"] = np.asarray(out["diversity"], dtype=np.float64) * np.asarray(
            out["usable_subqueries"]
        )
    return out


def summary_table(
    per_query: dict[str, dict[str, Any]], baseline: str, n_boot: int = 2000
) -> dict[str, dict[str, Any]]:
    """Means, bootstrap 95% CIs and paired 95% CIs of the difference to ``baseline`` per table row.

    Args:
        per_query: policy name -> metric key -> ``(queries,)`` values (``nan`` = undefined).
        baseline: the policy the others are compared with.
        n_boot: bootstrap resamples.
    """
    from r4t_fast.eval.stats import bootstrap_ci, paired_bootstrap_ci

    if baseline not in per_query:
        raise ValueError(f"baseline: {baseline!r} is not one of the policies {list(per_query)}")
    values = {
        n: _with_derived({k: np.asarray(v, dtype=np.float64) for k, v in d.items()})
        for n, d in per_query.items()
    }
    table: dict[str, dict[str, Any]] = {}
    for name, vals in values.items():
        entry: dict[str, Any] = {}
        for key, _ in _TABLE_ROWS:
            if key not in vals:
                continue
            v = vals[key]
            fin = v[np.isfinite(v)]
            ci = bootstrap_ci(fin, n_boot=n_boot) if fin.size else None
            entry[key] = {
                "mean": float(fin.mean()) if fin.size else None,
                "ci95": [ci.low, ci.high] if ci else None,
                "n": int(fin.size),
            }
            if name != baseline and key in values[baseline]:
                b = values[baseline][key]
                both = np.isfinite(v) & np.isfinite(b)
                if both.any():
                    d = paired_bootstrap_ci(v[both], b[both], n_boot=n_boot)
                    entry[key]["diff_vs_" + baseline] = {
                        "mean": d.mean,
                        "ci95": [d.low, d.high],
                        "excludes_zero": d.excludes_zero,
                        "n_paired": int(both.sum()),
                    }
        table[name] = entry
    return table


def rebuild_before_after(eval_dir: str | os.PathLike[str], n_boot: int | None = None) -> dict[str, Any]:
    """Recompute the table of ``eval_dir/before_after.json`` from ``per_query.jsonl`` (no generation);
    rewrites ``before_after.json`` and ``before_after.md``."""
    d = Path(eval_dir)
    record = json.loads((d / "before_after.json").read_text())
    lines = [json.loads(x) for x in (d / "per_query.jsonl").read_text().splitlines() if x.strip()]
    names = list(record["policies"])
    per_query = {
        n: {
            k: np.array([np.nan if ln[n][k] is None else ln[n][k] for ln in lines], dtype=np.float64)
            for k in lines[0][n]
            if k != "completion"
        }
        for n in names
    }
    n_boot = n_boot or int(record.get("n_boot", 2000))
    record["table"] = summary_table(per_query, record["baseline"], n_boot)
    record["n_boot"] = n_boot
    (d / "before_after.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (d / "before_after.md").write_text(format_before_after(record))
    return record


def evaluate_policies(
    cfg: RLConfig,
    policies: dict[str, str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    baseline: str | None = None,
) -> dict[str, Any]:
    """Before/after table: each policy's greedy fan-outs on the held-out queries, paired CIs vs ``baseline``.

    For every query of ``cfg.eval_splits`` (titled sets, first ``eval_max_queries``) each policy writes
    one greedy completion (``eval_max_new_tokens``). Reported per policy (rows: :data:`_TABLE_ROWS`):
    the run's training reward and the composite under both missing-subquery rules (``n/k`` and query
    fill; :class:`r4t_fast.fanout.rewards.RewardFunction`, format failures 0), the OAR terms and the
    Vendi over the written subqueries, the metrics of the ``r4t eval`` protocol (missing rows = raw
    query, grounded without repeats, :func:`r4t_fast.eval.metrics.evaluate_sets`), coverage, failure
    rates and wall times.
    Each other policy gets paired bootstrap 95% CIs (:func:`r4t_fast.eval.stats.paired_bootstrap_ci`) of
    its difference to ``baseline`` (default: the first policy).

    Writes ``before_after.json``, ``before_after.md`` and ``per_query.jsonl`` (per-query values and the
    completion texts) into ``out_dir``; :func:`rebuild_before_after` re-renders the table from them.
    """
    if not policies:
        raise ValueError("policies: expected at least one name -> policy dir")
    baseline = baseline or next(iter(policies))
    if baseline not in policies:
        raise ValueError(f"baseline: {baseline!r} is not one of the policies {list(policies)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = _load_data(cfg)
    rows = _split_rows(data, cfg.eval_splits, cfg.eval_max_queries)
    if not rows:
        raise ValueError(f"eval_splits: no titled set in {cfg.eval_splits} of {cfg.dataset!r}")
    reward_fns = {
        "train": _reward_function(cfg, data),
        # the comparison rows use the paper's weights (DEFAULT_WEIGHTS) whatever the run trained with
        "nk": _reward_function(cfg.replace(missing="zero", weights=list(DEFAULT_WEIGHTS)), data),
        "fill": _reward_function(cfg.replace(missing="query", weights=list(DEFAULT_WEIGHTS)), data),
    }
    results = {name: _eval_policy(name, p, rows, data, cfg, reward_fns) for name, p in policies.items()}
    table = summary_table({n: r["per_query"] for n, r in results.items()}, baseline, cfg.eval_n_boot)
    record = {
        "dataset": cfg.dataset,
        "eval_splits": cfg.eval_splits,
        "n_queries": len(rows),
        "k": cfg.k,
        "decoding": {
            "temperature": 0.0,
            "max_new_tokens": max(r["max_new_tokens"] for r in results.values()),
            "one_shot": cfg.one_shot,
            "constrained": cfg.constrained,
            "think": cfg.think,
        },
        "reward": {
            "task": reward_fns["train"].task,
            "config_task": cfg.task,
            "mixed_weight": cfg.mixed_weight,
            "weights": cfg.weights,
            "missing": cfg.missing,
            "encoder": cfg.encoder,
        },
        "baseline": baseline,
        "policies": {
            n: {k: v for k, v in r.items() if k not in ("per_query", "completions")}
            for n, r in results.items()
        },
        "table": table,
        "n_boot": cfg.eval_n_boot,
        "eval_wall_s": round(time.time() - t0, 1),
        "versions": _versions(),
    }
    (out / "before_after.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    with open(out / "per_query.jsonl", "w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            line = {"set_id": r["set_id"], "query": r["query"]}
            for name, res in results.items():
                line[name] = {
                    k: (None if not np.isfinite(v[i]) else float(v[i])) for k, v in res["per_query"].items()
                }
                line[name]["completion"] = res["completions"][i]
            f.write(json.dumps(line) + "\n")
    (out / "before_after.md").write_text(format_before_after(record))
    return record


def format_before_after(record: dict[str, Any]) -> str:
    """The before/after record as a Markdown table."""
    names = list(record["table"])
    base = record["baseline"]
    head = (
        "| metric | "
        + " | ".join(names)
        + " | "
        + " | ".join(f"{n} − {base} (paired 95% CI)" for n in names if n != base)
        + " |"
    )
    sep = "|---" * (1 + len(names) + len(names) - 1) + "|"
    lines = [
        f"# {record['dataset']}: {record['n_queries']} held-out queries ({'+'.join(record['eval_splits'])}), "
        f"k = {record['k']}, greedy{', constrained' if record['decoding'].get('constrained') else ''}, "
        f"max_new_tokens = {record['decoding']['max_new_tokens']}",
        "",
        head,
        sep,
    ]
    for key, label in _TABLE_ROWS:
        if any(key not in record["table"][n] for n in names):
            continue
        cells = []
        for n in names:
            e = record["table"][n][key]
            nq = "" if e["n"] == record["n_queries"] else f" (n={e['n']})"
            cells.append("–" if e["mean"] is None else f"{e['mean']:.4f}{nq}")
        diffs = []
        for n in names:
            if n == base:
                continue
            d = record["table"][n][key].get("diff_vs_" + base)
            if d is None:
                diffs.append("–")
                continue
            np_ = "" if d["n_paired"] == record["n_queries"] else f" (n={d['n_paired']})"
            diffs.append(f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]{np_}")
        lines.append(f"| {key}: {label} | " + " | ".join(cells) + " | " + " | ".join(diffs) + " |")
    lines.append("")
    for n in names:
        p = record["policies"][n]
        lines.append(
            f"- **{n}** (`{p['policy']}`): generation {p['generate_wall_s']} s for "
            f"{record['n_queries']} queries, mean {p['mean_new_tokens']:.1f} new tokens, "
            f"{100 * p['finished_rate']:.0f}% ended before the cap"
        )
    lines.append(f"- evaluation wall time {record['eval_wall_s']} s")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# the reward curve
# ----------------------------------------------------------------------------------------------------
def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    out = np.full_like(y, np.nan)
    for i in range(len(y)):
        seg = y[max(0, i - window + 1) : i + 1]
        seg = seg[np.isfinite(seg)]
        if seg.size:
            out[i] = seg.mean()
    return out


def plot_reward_curve(
    steps_jsonl: str | os.PathLike[str], png: str | os.PathLike[str], title: str = ""
) -> Path:
    """Plot ``steps.jsonl``: reward and its terms (top), format failures / zero-spread groups / KL (bottom).

    Each series is drawn at the steps that logged it (rewards: the generating steps), thin with markers
    per step and thick as a trailing mean over ``max(1, points // 8)`` points. Absent series are left
    out, and so is coverage when it is all zero (a large catalog with a small per-row budget).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = _read_steps(Path(steps_jsonl))
    if not recs:
        raise ValueError(f"steps_jsonl: {steps_jsonl} has no step records")

    def draw(ax: Any, key: str, color: str, label: str | None = None, skip_zero: bool = False) -> bool:
        pts = [(r["step"], float(r[key])) for r in recs if isinstance(r.get(key), (int, float))]
        pts = [(x, y) for x, y in pts if math.isfinite(y)]
        if not pts or (skip_zero and not any(y != 0.0 for _, y in pts)):
            return False
        x = np.array([p[0] for p in pts], dtype=float)
        y = np.array([p[1] for p in pts])
        ax.plot(x, y, color=color, alpha=0.35, lw=1, marker=".", ms=4)
        ax.plot(x, _smooth(y, max(1, len(y) // 8)), color=color, lw=2, label=label or key)
        return True

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for key, color in (("reward", "k"), ("groundedness", "tab:blue"), ("diversity", "tab:green"),
                       ("alignment", "tab:orange"), ("coverage", "tab:purple")):  # fmt: skip
        draw(ax1, key, color, skip_zero=key == "coverage")
    ax1.set_ylabel("reward; terms over parsed completions")
    ax1.set_title(title or "GRPO reward")
    ax1.grid(alpha=0.3)
    ax1.legend(loc="best", fontsize=8)
    draw(ax2, "no_subquery_rate", "tab:red")
    draw(ax2, "frac_zero_spread_groups", "tab:gray")
    ax2.set_ylabel("rate")
    ax2.set_xlabel("optimizer step")
    ax2.grid(alpha=0.3)
    ax3 = ax2.twinx()
    if draw(ax3, "kl", "tab:cyan", "kl to base (right axis)"):
        ax3.set_ylabel("KL to base policy")
        ax3.legend(loc="upper right", fontsize=8)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    out = Path(png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
