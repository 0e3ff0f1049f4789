"""Load test of ``r4t serve`` on loopback: 1, 8 and 64 concurrent clients for 60 s each, then the same with
a catalog update every second; beside it, ``Retriever.retrieve`` called directly with batch 64.

    python benchmarks/bench_serve.py --model RETRIEVER_DIR            # a saved Retriever directory
    python benchmarks/bench_serve.py --model MODEL_DIR --dataset polyvore --work /tmp/serve-model
        # a `r4t train-diffusion` model dir: wrapped with the dataset's catalog and MiniLM into a Retriever

The server runs in its own process (``r4t serve``), the clients in this one (asyncio + httpx, one
request = one query, method r4t, k = 10, queries from the dataset's validation split). Bounded: each phase
stops after ``--duration`` seconds or ``--max-requests`` requests; only 127.0.0.1 is contacted.

Per phase: throughput (queries/s), p50 / p99 latency, errors by status (503 = documented back-pressure),
server RSS after warm-up and at the end, mean micro-batch size (from ``/metrics``). With updates, each
second one item that was just returned is removed (and a new item added); a response to a request sent
after the removal was acknowledged that still holds the item counts as a violation. Time it alone:
``flock -x /tmp/r4t_cpu.lock python benchmarks/bench_serve.py ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _harness import environment, write_results

OUT = "serve/bench_serve"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def prepare_model(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """The retriever directory to serve and the validation queries used as load."""
    from r4t_fast.data.prepare import load_eval_data
    from r4t_fast.diffusion.model import load_model
    from r4t_fast.diffusion.retriever import Retriever

    data = load_eval_data(args.dataset, encoder="minilm", progress=False)
    by_id = {s.set_id: s for s in data.dataset.sets}
    queries = [by_id[i].query for i in data.split.val if by_id[i].query]
    model = Path(args.model)
    if (model / "retriever.json").is_file():
        return model, queries
    work = Path(args.work)
    if not (work / "retriever.json").is_file():
        m, _ = load_model(model)
        Retriever(m, data.catalog, data.encoder, encoder_spec="minilm", steps=args.steps).save(work)
    return work, queries


def direct_baseline(model: Path, queries: list[str], seconds: float, batch: int) -> dict:
    """Queries/s of Retriever.retrieve on batches of ``batch`` queries (encoding included), this process."""
    from r4t_fast.diffusion.retriever import Retriever

    r = Retriever.from_pretrained(model)
    r.retrieve(queries[:batch], 10)  # warm-up
    n, t0, i = 0, time.perf_counter(), 0
    lat = []
    while time.perf_counter() - t0 < seconds:
        qs = [queries[(i + j) % len(queries)] for j in range(batch)]
        t = time.perf_counter()
        r.retrieve(qs, 10)
        lat.append(time.perf_counter() - t)
        n += batch
        i += batch
    wall = time.perf_counter() - t0
    return {
        "batch": batch,
        "queries": n,
        "seconds": round(wall, 2),
        "qps": round(n / wall, 2),
        "ms_per_batch_p50": round(1000 * float(np.median(lat)), 2),
    }


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


async def run_phase(
    url: str, pid: int, queries: list[str], clients: int, seconds: float, args, updates: bool
):
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    status: collections.Counter = collections.Counter()
    recent: collections.Counter = collections.Counter()
    removed: list[tuple[float, str]] = []  # (ack time, id)
    gone_ids: set[str] = set()
    lat: list[float] = []
    counts = {"violations": 0, "update_errors": 0, "sent": 0, "added": 0}
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as c:

        async def client(ci: int, t_end: float, record: bool) -> None:
            j = ci
            while time.perf_counter() < t_end and counts["sent"] < args.max_requests:
                q = queries[(j * 7919) % len(queries)]
                j += clients
                t = time.perf_counter()
                try:
                    r = await c.post("/v1/retrieve", json={"queries": [q], "k": 10})
                except httpx.HTTPError as exc:
                    if record:
                        status[type(exc).__name__] += 1
                    continue
                if not record:
                    continue
                counts["sent"] += 1
                lat.append(time.perf_counter() - t)
                status[r.status_code] += 1
                if r.status_code != 200:
                    continue
                ids = [it["id"] for it in r.json()["sets"][0]["items"]]
                recent.update(ids)
                for ack, gone in removed:
                    if ack <= t and gone in ids:
                        counts["violations"] += 1

        async def updater(t_end: float, record: bool) -> None:
            while time.perf_counter() < t_end - 0.5:
                await asyncio.sleep(1.0)
                victim = next(
                    (i for i, _ in recent.most_common() if not i.startswith("bench-") and i not in gone_ids),
                    None,
                )
                recent.clear()
                if victim is None:
                    continue
                n = counts["added"]
                body = {
                    "remove": [victim],
                    "add": [{"id": f"bench-{clients}-{n}", "text": f"bench item {n} {victim}"}],
                }
                r = await c.post("/v1/catalog", json=body)
                counts["added"] += 1
                if r.status_code == 200:
                    gone_ids.add(victim)
                    if record:
                        removed.append((time.perf_counter(), victim))
                elif record:
                    counts["update_errors"] += 1

        async def load(seconds: float, record: bool) -> float:
            t0 = time.perf_counter()
            t_end = t0 + seconds
            tasks = [client(i, t_end, record) for i in range(clients)]
            tasks += [updater(t_end, record)] if updates else []
            await asyncio.gather(*tasks)
            return time.perf_counter() - t0

        await load(args.warmup, False)  # the same workload (updates included), not recorded
        m0 = (await c.get("/metrics")).text
        rss0 = _rss_mib(pid)
        wall = await load(seconds, True)
        m1 = (await c.get("/metrics")).text
        rss1 = _rss_mib(pid)
    violations, update_errors = counts["violations"], counts["update_errors"]
    ok = status.get(200, 0)
    bq = _metric(m1, "r4t_batch_queries_sum") - _metric(m0, "r4t_batch_queries_sum")
    bn = _metric(m1, "r4t_batch_queries_count") - _metric(m0, "r4t_batch_queries_count")
    lat_ms = 1000.0 * np.asarray(lat) if lat else np.zeros(1)
    return {
        "clients": clients,
        "catalog_updates": updates,
        "seconds": round(wall, 2),
        "requests": int(sum(status.values())),
        "ok": ok,
        "qps": round(ok / wall, 2),
        "p50_ms": round(float(np.percentile(lat_ms, 50)), 2),
        "p99_ms": round(float(np.percentile(lat_ms, 99)), 2),
        "status": {str(k): v for k, v in sorted(status.items(), key=lambda kv: str(kv[0]))},
        "errors_5xx_not_503": sum(
            v for k, v in status.items() if isinstance(k, int) and k >= 500 and k != 503
        ),
        "errors_other": sum(v for k, v in status.items() if not isinstance(k, int) or (400 <= k < 500)),
        "mean_batch_queries": round(bq / bn, 2) if bn else None,
        "rss_mib_after_warmup": round(rss0, 1),
        "rss_mib_end": round(rss1, 1),
        "rss_growth_pct": round(100.0 * (rss1 - rss0) / rss0, 2),
        "updates_acknowledged": len(removed),
        "update_errors": update_errors,
        "removed_item_returned_after_ack": violations,
    }


def markdown(payload: dict) -> str:
    env, d = payload["environment"], payload["direct"]
    lines = [
        "# `r4t serve` under load (loopback)",
        "",
        f"{env['date']} · {env['machine']['cpu']} ({env['machine']['cores']} cores) · load average before "
        f"{env['load_average_1_5_15']} · torch {env['versions'].get('torch')} · fastapi "
        f"{env['versions'].get('fastapi')} · uvicorn {env['versions'].get('uvicorn')}",
        "",
        f"Model: `{payload['model']}` ({payload['catalog_items']} items). "
        f"Server: `{payload['server_command']}`. "
        "One request = one query (method r4t, k = 10), validation-split queries; clients in one asyncio "
        "process on the same 2 cores as the server.",
        "",
        f"Direct `Retriever.retrieve`, batch {d['batch']}: **{d['qps']} queries/s** "
        f"({d['ms_per_batch_p50']} ms per batch).",
        "",
        "| clients | catalog update / s | queries/s | direct b64 ÷ served | p50 ms | p99 ms | mean batch "
        "| 5xx (not 503) | 503 | RSS MiB (warm → end) | removed item returned after ack |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in payload["phases"]:
        ratio = d["qps"] / p["qps"] if p["qps"] else float("inf")
        lines.append(
            f"| {p['clients']} | {'yes' if p['catalog_updates'] else 'no'} | {p['qps']} "
            f"| {ratio:.2f} "
            f"| {p['p50_ms']} | {p['p99_ms']} | {p['mean_batch_queries']} | {p['errors_5xx_not_503']} "
            f"| {p['status'].get('503', 0)} | {p['rss_mib_after_warmup']} → {p['rss_mib_end']} "
            f"({p['rss_growth_pct']:+.1f} %) | "
            + (
                f"{p['removed_item_returned_after_ack']} ({p['updates_acknowledged']} updates)"
                if p["catalog_updates"]
                else "–"
            )
            + " |"
        )
    lines += ["", f"Load average after: {payload['load_average_after']}.", ""]
    if payload.get("note"):
        lines += [f"Note: {payload['note']}", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Retriever dir, or a train-diffusion model dir (+ --work)")
    ap.add_argument("--dataset", default="polyvore")
    ap.add_argument("--work", default="/tmp/r4t_bench_serve_model", help="where a wrapped retriever is saved")
    ap.add_argument("--steps", type=int, default=16, help="sampler steps of a wrapped retriever")
    ap.add_argument("--clients", default="1,8,64")
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--max-requests", type=int, default=500_000)
    ap.add_argument("--direct-seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of the same load before measuring")
    ap.add_argument("--max-wait-ms", type=float, default=2.0, help="the server's --max-wait-ms")
    ap.add_argument("--note", default="", help="a remark stored with the record (e.g. what else ran)")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    env = environment(("fastapi", "uvicorn", "httpx", "pydantic"))  # load average before the run
    model, queries = prepare_model(args)
    direct = direct_baseline(model, queries, args.direct_seconds, 64)
    print("direct", direct, flush=True)
    port = _free_port()
    r4t = str(Path(sys.executable).with_name("r4t"))
    cmd = [
        r4t,
        "serve",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-batch",
        "64",
        "--max-wait-ms",
        str(args.max_wait_ms),
    ]
    server_log = open(Path(tempfile.gettempdir()) / "r4t_bench_serve_server.log", "w")  # noqa: SIM115
    server = subprocess.Popen(cmd, stdout=server_log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.time() + 120
        while True:
            try:
                info = httpx.get(f"{url}/v1/info", timeout=2).json()
                break
            except httpx.HTTPError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("server did not start") from None
                time.sleep(0.5)
        phases = []
        for updates in (False, True):
            for n in [int(x) for x in args.clients.split(",")]:
                p = asyncio.run(run_phase(url, server.pid, queries, n, args.duration, args, updates))
                print(json.dumps(p), flush=True)
                phases.append(p)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        server_log.close()
    payload = {
        "environment": env,
        "model": str(args.model),
        "catalog_items": info["catalog"]["items"],
        "server_command": " ".join(["r4t", *cmd[1:]]),
        "direct": direct,
        "phases": phases,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "note": args.note,
    }
    jp, mp = write_results(args.out, payload, markdown(payload))
    print(f"wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
