"""Does r4t share a busy machine? Three workloads alone and beside a second 2-thread torch job.

Workloads (each in a fresh process that applies the package's thread rule first, as ``r4t`` does:
``r4t_fast._threads.configure()`` before torch starts):

- ``embed``: catalog embedding with MiniLM (``data.encoders``), Polyvore item texts, batch 64: items/s;
- ``diffusion``: ``train.diffusion.train_diffusion`` (the code of ``r4t train-diffusion``), preset
  cpu-small, batch 128, Polyvore's shapes (384-d query, 10 rows of 384): optimizer steps/s;
- ``rl``: the RL stage's rollouts, SmolLM2-135M-Instruct sampling ``num_generations`` completions per
  query at the RL defaults (temperature, max completion length, k): completions/s.

Each runs alone, then beside a competitor started by this script: a plain 2-thread torch matmul loop
(no r4t, torch's default threads and OpenMP wait policy: any user's torch job), bounded in time. With
``--no-rule`` cases (the default) each also runs beside the competitor *without* the rule (torch's
default threads and wait policy: what r4t did before), the collapse the rule removes.

Every worker streams ``{"units", "seconds"}`` lines after its warm-up; the script stops it after
``--seconds`` (a collapsed run that never finishes one unit reports an upper bound). Run the whole
script under ``flock -x /tmp/r4t_cpu.lock`` on an otherwise idle machine.

    flock -x /tmp/r4t_cpu.lock python benchmarks/bench_contention.py --seconds 25
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

WORKLOADS = {
    "embed": "catalog embedding (MiniLM), items/s",
    "diffusion": "train-diffusion (cpu-small), steps/s",
    "rl": "RL rollouts (SmolLM2, GRPO group), completions/s",
}
_ENV_DROP = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "R4T_THREADS", "GOMP_SPINCOUNT")
HOG_THREADS = 2


def _clean_env() -> dict[str, str]:
    """The environment of a user who set nothing: no OMP/MKL/R4T thread variables."""
    return {k: v for k, v in os.environ.items() if k not in _ENV_DROP}


def _emit(**row: object) -> None:
    print(json.dumps(row), flush=True)


# ------------------------------------------------------------------------------------------ workers
def _worker(name: str, rule: bool, seconds: float) -> None:
    if rule:
        from r4t_fast import _threads

        decided = _threads.configure()  # what cli.main does before the command imports torch
    import torch

    if not rule:
        decided = {"threads": torch.get_num_threads(), "source": "torch default", "wait_policy": None}
    _emit(decided=decided, torch_threads=torch.get_num_threads())
    {"embed": _embed, "diffusion": _diffusion, "rl": _rl}[name](seconds)


def _loop(unit: object, seconds: float, units_per_call: int = 1) -> None:
    """Call ``unit()`` once (warm-up), then repeatedly for ``seconds``, streaming cumulative counts.
    ``unit`` returns the seconds to count (None: the wall time of the call)."""
    unit()
    done, spent = 0, 0.0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        measured = unit()
        spent += measured if measured is not None else time.perf_counter() - t
        done += units_per_call
        _emit(units=done, seconds=spent)


def _embed(seconds: float) -> None:
    from r4t_fast.data.datasets import load_dataset
    from r4t_fast.data.encoders import get_encoder

    texts = [it.text for it in load_dataset("polyvore").catalog_items]
    enc = get_encoder("minilm")
    pos = [0]

    def unit() -> None:
        i = pos[0]
        enc.encode(texts[i : i + 64], batch_size=64)
        pos[0] = (i + 64) % (len(texts) - 64)

    _loop(unit, seconds, units_per_call=64)


def _diffusion(seconds: float) -> None:
    import torch

    from r4t_fast.train.diffusion import DiffusionTrainConfig, train_diffusion

    g = torch.Generator().manual_seed(0)
    n, L, d = 2048, 10, 384
    cond = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    targets = torch.nn.functional.normalize(torch.randn(n, L, d, generator=g), dim=2)
    cfg = DiffusionTrainConfig(preset="cpu-small", steps=12, log_every=2, warmup=0)

    def unit() -> float:  # 12 steps; count steps 3-12 (model setup and the first 2 steps excluded)
        _, log = train_diffusion(cond, targets, cfg, progress=False)
        return log[-1]["elapsed_s"] - log[0]["elapsed_s"]

    _loop(unit, seconds, units_per_call=10)


def _rl(seconds: float) -> None:
    from r4t_fast.data.datasets import load_dataset
    from r4t_fast.fanout.generation import FanOutLM
    from r4t_fast.train.rl_config import RLConfig

    cfg = RLConfig()
    queries = [s.query for s in load_dataset("polyvore").sets if s.query][:64]
    lm = FanOutLM(cfg.policy)
    pos = [0]

    def unit() -> None:
        q = queries[pos[0] % len(queries)]
        pos[0] += 1
        lm.generate(
            [q],
            k=cfg.k,
            num_samples=cfg.num_generations,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_completion_length,
            batch_size=cfg.num_generations,
            seed=pos[0],
            one_shot=cfg.one_shot,
            constrained=cfg.constrained,
            think=cfg.think,
        )

    _loop(unit, seconds, units_per_call=cfg.num_generations)


def _hog(seconds: float) -> None:
    """Any user's torch job: 2 threads, torch's defaults otherwise; matmuls for ``seconds``."""
    import torch

    torch.set_num_threads(HOG_THREADS)
    a = torch.randn(768, 768)
    n, t0 = 0, time.perf_counter()
    t_report = t0 + 1.0
    while (now := time.perf_counter()) - t0 < seconds:
        a = torch.tanh(a @ a) * 0.05
        n += 1
        if now >= t_report:  # cumulative, so a killed competitor still reports its rate
            _emit(hog_matmuls=n, seconds=now - t0)
            t_report = now + 1.0
    _emit(hog_matmuls=n, seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ driver
def _spawn(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        env={**_clean_env(), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run_case(
    name: str, rule: bool, contended: bool, seconds: float, grace: float, forced: int | None = None
) -> dict:
    hog = None
    if contended:
        hog = _spawn(["--hog", str(seconds + grace + 60)])
        time.sleep(2.0)  # the competitor is busy before the worker looks at the machine
    load = os.getloadavg()
    extra = {"R4T_THREADS": str(forced)} if forced else {}
    worker = _spawn(["--worker", name, "--seconds", str(seconds), *([] if rule else ["--no-rule"])], **extra)
    try:
        out, err = worker.communicate(timeout=seconds + grace)
        finished = True
    except subprocess.TimeoutExpired:
        worker.kill()
        out, err = worker.communicate()
        finished = False
    hog_rate = None
    if hog is not None:
        hog.kill()
        hog_out, _ = hog.communicate()
        hog_rows = [json.loads(x) for x in hog_out.splitlines() if x.startswith("{")]
        if hog_rows:
            hog_rate = hog_rows[-1]["hog_matmuls"] / hog_rows[-1]["seconds"]
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    decided = next((r for r in rows if "decided" in r), {})
    progress = [r for r in rows if "units" in r]
    if worker.returncode not in (0, -9) and not progress:
        raise RuntimeError(f"worker {name} failed:\n{err[-3000:]}")
    row = {
        "workload": name,
        "rule": rule,
        "contended": contended,
        "forced_threads": forced,
        "threads": decided.get("torch_threads"),
        "decided": decided.get("decided"),
        "finished": finished,
        "load_avg_1m_at_start": round(load[0], 2),
    }
    if progress:
        last = progress[-1]
        row.update(
            units=last["units"], seconds=round(last["seconds"], 3), rate=last["units"] / last["seconds"]
        )
    else:  # not one unit after the warm-up within the limit: an upper bound
        row.update(units=0, seconds=seconds + grace, rate=None)
    row["hog_rate"] = hog_rate
    return row


def _measure_hog(seconds: float) -> float:
    hog = _spawn(["--hog", str(seconds)])
    out, _ = hog.communicate(timeout=seconds + 120)
    r = json.loads(out.strip().splitlines()[-1])
    return r["hog_matmuls"] / r["seconds"]


def _markdown(payload: dict) -> str:
    env = payload["environment"]
    m = env["machine"]
    lines = [
        "# Under contention: r4t beside a second 2-thread torch job",
        "",
        f"{env['date']} · {m['cpu']} · {m['cores']} cores · torch {env['versions'].get('torch')} · "
        f"load average at start {env['load_average_1_5_15']} · command `{env['command']}`",
        "",
        "Each workload runs in a fresh process; *rule*: `r4t_fast._threads.configure()` first (as every "
        "`r4t` command: `OMP_WAIT_POLICY=PASSIVE`, threads = every available CPU, the scheduler sharing "
        "the cores); *no rule*: torch's default "
        f"threads and wait policy (r4t before). Competitor: a plain {HOG_THREADS}-thread torch matmul "
        f"loop started {2} s before the worker, torch defaults (any user's job). Rates after a warm-up, "
        f"over ≥ {payload['seconds']:.0f} s ({payload['rl_seconds']:.0f} s for the rollouts); "
        f"a fair share of {m['cores']} cores is 50 %.",
        "",
        "| workload | alone (rule) | threads | beside job (rule) | threads | kept | beside job (no rule) "
        "| threads | kept | alone (no rule) | beside job (PASSIVE, threads = CPUs left free: the rule "
        "before) | kept |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(r: dict | None) -> str:
        if r is None:
            return "—"
        if r["rate"] is None:
            return f"< {1 / r['seconds']:.2g} (no unit in {r['seconds']:.0f} s)"
        return f"{r['rate']:.3g}"

    for name, label in WORKLOADS.items():
        rs = {
            (r["rule"], r["contended"], r.get("forced_threads")): r
            for r in payload["runs"]
            if r["workload"] == name
        }
        if not rs:
            continue
        alone = rs.get((True, False, None))

        def kept(r: dict | None, base: dict | None = alone) -> str:
            if r is None or base is None or base["rate"] is None:
                return "—"
            return f"{100 * (r['rate'] or 0) / base['rate']:.0f} %"

        c, nc, na = rs.get((True, True, None)), rs.get((False, True, None)), rs.get((False, False, None))
        ac = next((r for key, r in rs.items() if key[2]), None)
        lines.append(
            f"| {label} | {fmt(alone)} | {alone and alone['threads']} | {fmt(c)} | {c and c['threads']} "
            f"| {kept(c)} | {fmt(nc)} | {nc and nc['threads']} | {kept(nc)} | {fmt(na)} "
            f"| {fmt(ac)} | {kept(ac)} |"
        )
    hog = payload.get("hog_alone_matmuls_per_s")
    if hog:
        lines += ["", f"The competitor alone: {hog:.1f} matmuls/s."]
    lines += [
        "",
        "Targets (issue 20): beside the job, with the rule, each workload keeps ≥ 40 % of its alone speed.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=25.0, help="measured seconds per case (after warm-up)")
    ap.add_argument(
        "--rl-seconds",
        type=float,
        default=60.0,
        help="measured seconds of the rl cases (a unit takes ~10-30 s)",
    )
    ap.add_argument("--grace", type=float, default=150.0, help="extra seconds for loading and warm-up")
    ap.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="comma-separated subset of " + ", ".join(WORKLOADS)
    )
    ap.add_argument("--skip-no-rule", action="store_true", help="skip the cases without the rule")
    ap.add_argument(
        "--no-free-cpus-case",
        dest="free_cpus_case",
        action="store_false",
        help="skip the case beside the job with PASSIVE waits and threads = the CPUs the job leaves free "
        "(the rule before: R4T_THREADS = cores - the job's threads, at least 1)",
    )
    ap.add_argument("--out", default="contention_cpu", help="results name under benchmarks/results/")
    ap.add_argument("--worker", choices=list(WORKLOADS), help=argparse.SUPPRESS)
    ap.add_argument("--no-rule", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--hog", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hog is not None:
        _hog(args.hog)
        return 0
    if args.worker:
        _worker(args.worker, not args.no_rule, args.seconds)
        return 0
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in names if w not in WORKLOADS]
    if bad or not names:
        print(f"--workloads: unknown {bad}; valid choices: {', '.join(WORKLOADS)}", file=sys.stderr)
        return 2
    if args.seconds <= 0:
        print(f"--seconds: expected > 0, got {args.seconds}", file=sys.stderr)
        return 2
    from _harness import environment, write_results

    env = environment(("transformers", "sentence-transformers"))
    runs = []
    cases = [(True, False, None), (True, True, None)]
    if not args.skip_no_rule:
        cases += [(False, True, None), (False, False, None)]
    if args.free_cpus_case:  # the rule before: PASSIVE and only the CPUs the job leaves free
        cases.append((True, True, max(1, (os.cpu_count() or 1) - HOG_THREADS)))
    for name in names:
        for rule, contended, forced in cases:
            seconds = args.rl_seconds if name == "rl" else args.seconds
            r = _run_case(name, rule, contended, seconds, args.grace, forced)
            print(json.dumps(r), file=sys.stderr, flush=True)
            runs.append(r)
    payload = {
        "environment": env,
        "seconds": args.seconds,
        "rl_seconds": args.rl_seconds,
        "hog_threads": HOG_THREADS,
        "hog_alone_matmuls_per_s": _measure_hog(10.0),
        "runs": runs,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    md = _markdown(payload)
    jp, mp = write_results(args.out, payload, md)
    print(md)
    print(f"wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
