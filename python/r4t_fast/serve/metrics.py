"""Prometheus text exposition (format 0.0.4) of the server's counters, without a client library.

Series: ``r4t_requests_total{endpoint,status}``, ``r4t_request_latency_seconds`` (histogram per
endpoint), ``r4t_batch_queries`` and ``r4t_batch_requests`` (histograms of the micro-batches),
``r4t_queue_depth`` (queries waiting), ``r4t_catalog_items`` and ``r4t_catalog_revision`` (gauges).
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

__all__ = ["CONTENT_TYPE", "Histogram", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    """Cumulative-bucket histogram (``le`` upper bounds, plus ``+Inf``), sum and count."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, acc = [], 0
        sep = "," if labels else ""
        for le, c in zip([*map(_fmt, self.buckets), "+Inf"], self.counts, strict=True):
            acc += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {acc}')
        brace = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{brace} {_fmt(self.sum)}", f"{name}_count{brace} {self.count}"]
        return out


def _fmt(x: float) -> str:
    return repr(float(x)) if not float(x).is_integer() else str(int(x)) if abs(x) < 1e15 else repr(x)


class Metrics:
    """Thread-safe counters of one server (observed from the event loop and the batch threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.batch_queries = Histogram(BATCH_BUCKETS)
        self.batch_requests = Histogram(BATCH_BUCKETS)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, int(status))] += 1
            h = self.latency.get(endpoint)
            if h is None:
                h = self.latency[endpoint] = Histogram(LATENCY_BUCKETS)
            h.observe(seconds)

    def batch(self, queries: int, requests: int) -> None:
        with self._lock:
            self.batch_queries.observe(queries)
            self.batch_requests.observe(requests)

    def render(self, *, queue_depth: int, catalog_items: int, catalog_revision: int) -> str:
        """The exposition text."""
        with self._lock:
            lines = [
                "# HELP r4t_requests_total HTTP requests by endpoint and status",
                "# TYPE r4t_requests_total counter",
            ]
            for (ep, st), n in sorted(self.requests.items()):
                lines.append(f'r4t_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
            lines += [
                "# HELP r4t_request_latency_seconds request latency by endpoint",
                "# TYPE r4t_request_latency_seconds histogram",
            ]
            for ep, h in sorted(self.latency.items()):
                lines += h.lines("r4t_request_latency_seconds", f'endpoint="{ep}"')
            for name, h, what in (
                ("r4t_batch_queries", self.batch_queries, "queries per batched call"),
                ("r4t_batch_requests", self.batch_requests, "requests per batched call"),
            ):
                lines += [f"# HELP {name} {what}", f"# TYPE {name} histogram", *h.lines(name)]
        for name, value, what in (
            ("r4t_queue_depth", queue_depth, "queries waiting for a batch"),
            ("r4t_catalog_items", catalog_items, "items in the live catalog"),
            ("r4t_catalog_revision", catalog_revision, "catalog changes applied since start"),
        ):
            lines += [f"# HELP {name} {what}", f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"
