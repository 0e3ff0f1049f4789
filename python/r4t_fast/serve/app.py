"""The ASGI app of ``r4t serve`` (FastAPI): retrieval with micro-batching, the live catalog, metrics, a page.

Endpoints: ``POST /v1/retrieve``, ``POST /v1/catalog`` (token-guarded when ``R4T_SERVE_TOKEN`` is set),
``GET /healthz``, ``GET /v1/info``, ``GET /metrics`` (Prometheus text), ``GET /`` (the page), ``/docs``
(OpenAPI). Every error is a JSON object ``{"error": "<field>: <what is wrong>", "field": ..., "status"}``:
422 for a body that does not validate, 400 for a request the catalog cannot answer (k larger than the
catalog, a filter too narrow, an unknown id), 409 for a catalog update on a non-exact index, 401 without
the token, 503 with ``Retry-After`` when the queue is full.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from r4t_fast.serve.batcher import MicroBatcher, QueueFull
from r4t_fast.serve.metrics import CONTENT_TYPE, Metrics
from r4t_fast.serve.schemas import CatalogUpdate, RetrieveRequest
from r4t_fast.serve.state import ConflictError, RequestError, ServeState, run_batch

__all__ = ["TOKEN_ENV", "create_app"]

TOKEN_ENV = "R4T_SERVE_TOKEN"
"""Environment variable holding the token that ``POST /v1/catalog`` requires (``Authorization: Bearer``)."""


def _error(status: int, message: str, field: str = "", headers: dict[str, str] | None = None) -> JSONResponse:
    if not field and ": " in message:
        field = message.split(": ", 1)[0]
    return JSONResponse({"error": message, "field": field, "status": status}, status, headers=headers)


def _loc(loc: tuple | list) -> str:
    """("body", "queries", 0) -> "queries[0]"; ("body", "filter", "ids") -> "filter.ids"."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


def create_app(
    state: ServeState,
    *,
    max_batch: int = 64,
    max_wait_ms: float = 2.0,
    max_queue: int = 1024,
    workers: int = 1,
) -> FastAPI:
    """The app over ``state`` (a :class:`~r4t_fast.serve.state.ServeState`); batcher settings as in
    :class:`~r4t_fast.serve.batcher.MicroBatcher`."""
    metrics = Metrics()

    def run(key: str, items: list[tuple[RetrieveRequest, str]]) -> list[Any]:
        snap = state.snapshot  # read once: the whole batch sees one catalog
        return run_batch(snap, items[0][0], [t for _, t in items])

    batcher = MicroBatcher(
        run,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        workers=workers,
        on_batch=metrics.batch,
    )

    updates: list[ThreadPoolExecutor] = []  # one thread: changes are serial and off the event loop

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        updates.append(ThreadPoolExecutor(1, thread_name_prefix="r4t-catalog"))
        try:
            yield
        finally:
            await batcher.stop()
            updates.pop().shutdown(wait=True)

    app = FastAPI(
        title="r4t_fast",
        summary="Fan-out set retrieval: R4T-Diffusion sets beside dense, MMR and DPP",
        lifespan=lifespan,
    )
    app.state.serve = state
    app.state.batcher = batcher
    app.state.metrics = metrics

    @app.middleware("http")
    async def count(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "other")
        metrics.request(endpoint, response.status_code, time.perf_counter() - t0)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request"}
        field = "body" if first.get("type") == "json_invalid" else _loc(first.get("loc", ("body",)))
        msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        if msg.startswith(f"{field}: ") or (": " in msg and field == "body"):
            message = msg  # our own model checks already name the field
            field = msg.split(": ", 1)[0] if field == "body" else field
        else:
            message = f"{field}: {msg}"
        detail = [{"field": _loc(e.get("loc", ())), "message": e.get("msg", "")} for e in errs]
        return JSONResponse({"error": message, "field": field, "status": 422, "detail": detail}, 422)

    @app.post("/v1/retrieve")
    async def retrieve(req: RetrieveRequest) -> Any:
        """Sets of ``k`` items per query: items (id, text, category, score = cos(item, query), source =
        the generated row or the query's own rank), and timings."""
        t0 = time.perf_counter()
        try:
            sets, info = await batcher.submit(req.batch_key(), [(req, q) for q in req.queries])
        except QueueFull as exc:
            return _error(503, str(exc), "queue", headers={"Retry-After": str(exc.retry_after)})
        except RequestError as exc:
            return _error(400, str(exc))
        return {
            "method": req.method,
            "k": req.k,
            "sets": [{"query": q, **s} for q, s in zip(req.queries, sets, strict=True)],
            "timings": {
                "queue_ms": round(info.queue_ms, 3),
                "compute_ms": round(info.compute_ms, 3),
                "total_ms": round((time.perf_counter() - t0) * 1000.0, 3),
                "batch_queries": info.batch_queries,
                "batch_requests": info.batch_requests,
            },
            "catalog_revision": state.snapshot.revision,
        }

    @app.post("/v1/catalog")
    async def catalog(upd: CatalogUpdate, request: Request) -> Any:
        """Remove, update and add items as one atomic change (readers see the old catalog or the new
        one); acknowledged once published (and saved, when the server persists its catalog)."""
        token = os.environ.get(TOKEN_ENV)
        if token:
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
                return _error(401, f"authorization: a valid 'Bearer' token ({TOKEN_ENV}) is required")
        try:
            snap = await asyncio.get_running_loop().run_in_executor(updates[0], state.apply, upd)
        except RequestError as exc:
            return _error(409 if isinstance(exc, ConflictError) else 400, str(exc))
        return {"revision": snap.revision, "items": len(snap.catalog)}

    @app.get("/healthz")
    async def healthz() -> Any:
        return {"status": "ok", "catalog_items": len(state.snapshot.catalog)}

    @app.get("/v1/info")
    async def info() -> Any:
        out = state.info()
        out["batching"] = {
            "max_batch": batcher.max_batch,
            "max_wait_ms": batcher.max_wait * 1000.0,
            "max_queue": batcher.max_queue,
            "workers": batcher.workers,
        }
        return out

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        snap = state.snapshot
        text = metrics.render(
            queue_depth=batcher.depth, catalog_items=len(snap.catalog), catalog_revision=snap.revision
        )
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("r4t_fast.serve").joinpath("page.html").read_text("utf-8"))

    return app
