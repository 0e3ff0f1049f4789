"""Dynamic micro-batching: requests that arrive within a few milliseconds share one batched call.

Each request is a job ``(key, n queries)``; jobs with the same key (same method and options) can share
a call. A worker takes the oldest job, waits at most ``max_wait_ms`` for more jobs of its key (less when
the batch is already full), and runs up to ``max_batch`` queries in one call of ``run(key, payloads)`` on
a thread pool, outside the event loop. While a batch runs, new jobs queue up, so under load batches grow
by themselves and at low load a request waits at most ``max_wait_ms``.

The queue is bounded (``max_queue`` queries waiting): a job that does not fit raises :class:`QueueFull`
at once (the app answers 503 with ``Retry-After``) instead of queueing without limit.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from r4t_fast._internal import check_float, check_positive_int

__all__ = ["BatchInfo", "MicroBatcher", "QueueFull"]


class QueueFull(Exception):
    """The batcher's queue holds ``max_queue`` queries already: retry after ``retry_after`` seconds."""

    def __init__(self, depth: int, limit: int, retry_after: int = 1) -> None:
        super().__init__(f"queue: {depth} queries waiting, the limit is {limit}; retry later")
        self.retry_after = retry_after


@dataclass(frozen=True)
class BatchInfo:
    """How a job ran: time waiting in the queue, the batched call's time, and its size in queries."""

    queue_ms: float
    compute_ms: float
    batch_queries: int
    batch_requests: int


@dataclass(eq=False)
class _Job:
    key: str
    payload: Sequence[Any]
    future: asyncio.Future
    t: float = field(default_factory=time.perf_counter)

    @property
    def n(self) -> int:
        return len(self.payload)


class MicroBatcher:
    """Groups jobs by key into calls of ``run(key, items) -> results`` (one result per item, in order).

    Args:
        run: the batched call (runs on a worker thread; may raise: every job of the batch gets the error).
        max_batch: most queries per call (a single larger job still runs, alone).
        max_wait_ms: longest a job waits for others to join its batch when a worker is free.
        max_queue: most queries waiting; beyond it :meth:`submit` raises :class:`QueueFull`.
        workers: concurrent batched calls (threads).
        on_batch: called with ``(queries, requests)`` after each batch (metrics).
    """

    def __init__(
        self,
        run: Callable[[str, list[Any]], list[Any]],
        *,
        max_batch: int = 64,
        max_wait_ms: float = 2.0,
        max_queue: int = 1024,
        workers: int = 1,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        self.run = run
        self.max_batch = check_positive_int(max_batch, "max_batch")
        self.max_wait = check_float(max_wait_ms, "max_wait_ms", low=0.0, high=10_000.0) / 1000.0
        self.max_queue = check_positive_int(max_queue, "max_queue")
        self.workers = check_positive_int(workers, "workers", upper=64)
        self.on_batch = on_batch
        self._pending: deque[_Job] = deque()
        self._depth = 0
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._pool: ThreadPoolExecutor | None = None

    @property
    def depth(self) -> int:
        """Queries waiting (not yet in a running batch)."""
        return self._depth

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="r4t-batch")
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.workers)]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError("server: shutting down"))
        self._depth = 0
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    async def submit(self, key: str, payload: Sequence[Any]) -> tuple[list[Any], BatchInfo]:
        """Queue ``payload`` (n items) under ``key``; returns its n results and how the batch ran."""
        if self._wake is None:
            raise RuntimeError("MicroBatcher: call start() first")
        n = len(payload)
        if self._depth + n > self.max_queue and self._depth > 0:
            raise QueueFull(self._depth, self.max_queue)
        job = _Job(key, payload, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._depth += n
        self._wake.set()
        return await job.future

    def _queued(self, key: str) -> int:
        return sum(j.n for j in self._pending if j.key == key)

    async def _worker(self) -> None:
        assert self._wake is not None and self._pool is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            first = self._pending[0]
            while self._queued(first.key) < self.max_batch:
                left = first.t + self.max_wait - time.perf_counter()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except TimeoutError:
                    break
            if not any(j is first for j in self._pending):
                continue  # another worker took it meanwhile
            jobs = self._take(first.key)
            items = [x for j in jobs for x in j.payload]
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._pool, self.run, first.key, items)
                if len(results) != len(items):
                    raise RuntimeError(f"run: returned {len(results)} results for {len(items)} items")
            except Exception as exc:  # every job of the batch gets the error
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            compute = (time.perf_counter() - t0) * 1000.0
            if self.on_batch is not None:
                self.on_batch(len(items), len(jobs))
            lo = 0
            for j in jobs:
                info = BatchInfo((t0 - j.t) * 1000.0, compute, len(items), len(jobs))
                if not j.future.done():
                    j.future.set_result((results[lo : lo + j.n], info))
                lo += j.n

    def _take(self, key: str) -> list[_Job]:
        """Remove and return the oldest jobs of ``key`` up to ``max_batch`` queries (at least one job)."""
        taken: list[_Job] = []
        kept: deque[_Job] = deque()
        total = 0
        for j in self._pending:
            if j.key == key and (not taken or total + j.n <= self.max_batch):
                taken.append(j)
                total += j.n
            else:
                kept.append(j)
        self._pending = kept
        self._depth -= total
        return taken
