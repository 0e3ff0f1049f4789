"""``r4t serve``: the API contract, validation errors naming the field, micro-batching equal to direct
calls, back-pressure (503 + Retry-After), the live catalog (atomic swap, token, persistence), metrics,
the page and the CLI. A tiny hashing-encoder retriever: no model loads, the file runs in seconds."""

from __future__ import annotations

import asyncio
import threading

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")
from fastapi.testclient import TestClient  # noqa: E402

from r4t_fast.serve import app as app_module  # noqa: E402
from r4t_fast.serve.app import TOKEN_ENV, create_app  # noqa: E402
from r4t_fast.serve.batcher import MicroBatcher, QueueFull  # noqa: E402
from r4t_fast.serve.state import ServeState, copy_catalog  # noqa: E402
from serve_helpers import tiny_retriever, tiny_retriever_dir  # noqa: E402

QUERIES = ["red shirt", "blue bag", "green hat for summer", "black boots", "white dress", "grey scarf"]


@pytest.fixture()
def client():
    with TestClient(create_app(ServeState(tiny_retriever()))) as c:
        yield c


def _ids(resp: httpx.Response, i: int = 0) -> list[str]:
    return [it["id"] for it in resp.json()["sets"][i]["items"]]


# ------------------------------------------------------------------------------------------ contract
@pytest.mark.parametrize("method", ["r4t", "dense", "mmr", "dpp"])
def test_retrieve_returns_k_distinct_items_per_query(client: TestClient, method: str) -> None:
    r = client.post("/v1/retrieve", json={"queries": QUERIES[:3], "k": 6, "method": method})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["method"] == method and len(body["sets"]) == 3
    for q, s in zip(QUERIES[:3], body["sets"], strict=True):
        assert s["query"] == q
        ids = [it["id"] for it in s["items"]]
        assert len(ids) == 6 and len(set(ids)) == 6
        for it in s["items"]:
            assert set(it) >= {"id", "text", "category", "score", "source"}
            assert it["source"] in ("row", "query")
    t = body["timings"]
    assert t["batch_queries"] >= 3 and t["compute_ms"] > 0 and t["total_ms"] >= t["compute_ms"]


def test_results_equal_the_library(client: TestClient) -> None:
    r = tiny_retriever()
    direct = r.retrieve(QUERIES, 6)
    got = client.post("/v1/retrieve", json={"queries": QUERIES, "k": 6})
    for i, s in enumerate(direct):
        assert _ids(got, i) == list(s.item_ids)
        scores = [it["score"] for it in got.json()["sets"][i]["items"]]
        np.testing.assert_allclose(scores, s.scores, rtol=1e-5, atol=1e-6)
    q = r.encoder.encode(["red shirt"])
    _, rows = r.catalog.search(np.asarray(q, dtype=np.float32), 6)
    dense = client.post("/v1/retrieve", json={"queries": ["red shirt"], "k": 6, "method": "dense"})
    assert _ids(dense) == [r.catalog.ids[j] for j in rows[0]]


def test_anchor_provenance(client: TestClient) -> None:
    body = client.post("/v1/retrieve", json={"queries": ["red shirt"], "k": 5, "anchor": 0.3}).json()
    items = body["sets"][0]["items"]
    assert items[0]["source"] == "query" and all(it["source"] == "row" for it in items[1:])
    dense = client.post("/v1/retrieve", json={"queries": ["red shirt"], "k": 1, "method": "dense"}).json()
    assert items[0]["id"] == dense["sets"][0]["items"][0]["id"]  # the query's own nearest item leads


# ------------------------------------------------------------------------------------------ filters
@pytest.mark.parametrize("method", ["r4t", "dense", "mmr", "dpp"])
def test_filters_are_honoured(client: TestClient, method: str) -> None:
    r4t = tiny_retriever()
    flt = {"categories": ["bag", "hat"], "metadata": {"in_stock": True}}
    body = client.post("/v1/retrieve", json={"queries": QUERIES[:2], "k": 4, "method": method, "filter": flt})
    assert body.status_code == 200, body.text
    for s in body.json()["sets"]:
        for it in s["items"]:
            j = r4t.catalog.index_of(it["id"])
            assert it["category"] in ("bag", "hat") and r4t.catalog.metadata[j]["in_stock"] is True
    allowed = ["id3", "id5", "id7", "id9"]
    only = client.post(
        "/v1/retrieve", json={"queries": ["red shirt"], "k": 4, "method": method, "filter": {"ids": allowed}}
    )
    assert sorted(_ids(only)) == allowed


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"k": 3}, 422, "queries"),
        ({"queries": []}, 422, "queries"),
        ({"queries": ["ok", " "]}, 422, "queries[1]"),
        ({"queries": "red shirt"}, 422, "queries"),
        ({"queries": ["x"], "k": 0}, 422, "k"),
        ({"queries": ["x"], "k": "ten"}, 422, "k"),
        ({"queries": ["x"], "method": "bm25"}, 422, "method"),
        ({"queries": ["x"], "mmr_lamda": 0.3}, 422, "mmr_lamda"),
        ({"queries": ["x"], "mmr_lambda": 1.5}, 422, "mmr_lambda"),
        ({"queries": ["x"], "anchor": 1.0}, 422, "anchor"),
        ({"queries": ["x"], "pull": -1}, 422, "pull"),
        ({"queries": ["x"], "steps": 0}, 422, "steps"),
        ({"queries": ["x"], "k": 20, "method": "mmr", "pool": 10}, 422, "k"),
        ({"queries": ["x"], "filter": {"colour": "red"}}, 422, "filter.colour"),
        ({"queries": ["x"], "k": 49}, 400, "k"),  # the catalog holds 48 items
        ({"queries": ["x"], "k": 7, "filter": {"categories": ["bag"]}}, 400, "filter"),  # 6 bags
        ({"queries": ["x"], "k": 2, "filter": {"ids": ["id1", "nope"]}}, 400, "filter.ids"),
    ],
)
def test_bad_requests_name_the_field(client: TestClient, body: dict, status: int, field: str) -> None:
    r = client.post("/v1/retrieve", json=body)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["field"] == field and err["error"].startswith(f"{field}: ") and err["status"] == status


def test_malformed_json_is_a_422(client: TestClient) -> None:
    r = client.post("/v1/retrieve", content=b'{"queries": [', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] == "body"


# ------------------------------------------------------------------------------------------ batching
async def _concurrent(app, bodies: list[dict]) -> list[httpx.Response]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await asyncio.gather(*(c.post("/v1/retrieve", json=b) for b in bodies))


def test_micro_batches_equal_direct_calls() -> None:
    r = tiny_retriever()
    app = create_app(ServeState(r), max_batch=64, max_wait_ms=200.0)
    bodies = [{"queries": [q], "k": 5, "seed": 3} for q in QUERIES] + [
        {"queries": QUERIES[:2], "k": 5, "seed": 3}
    ]
    out = asyncio.run(_concurrent(app, bodies))
    assert all(o.status_code == 200 for o in out)
    shared = [o.json()["timings"]["batch_requests"] for o in out]
    assert max(shared) == len(bodies)  # one sampler call for every request (same options)
    for q, o in zip(QUERIES, out, strict=False):
        assert _ids(o) == list(r.retrieve([q], 5, seed=3)[0].item_ids)
    pair = r.retrieve(QUERIES[:2], 5, seed=3)
    assert [_ids(out[-1], i) for i in range(2)] == [list(s.item_ids) for s in pair]


def test_batch_cap_and_different_options_split_batches() -> None:
    app = create_app(ServeState(tiny_retriever()), max_batch=3, max_wait_ms=200.0)
    bodies = [{"queries": [q], "k": 5} for q in QUERIES] + [{"queries": ["red shirt"], "k": 4}]
    out = asyncio.run(_concurrent(app, bodies))
    t = [o.json()["timings"] for o in out]
    assert max(x["batch_queries"] for x in t) == 3  # the cap
    assert t[-1]["batch_queries"] == 1  # k=4 never shares a call with k=5


def test_queue_full_is_a_503_with_retry_after(monkeypatch) -> None:
    release = threading.Event()

    def slow(snap, req, texts):
        release.wait(10)
        return [{"items": []} for _ in texts]

    monkeypatch.setattr(app_module, "run_batch", slow)
    app = create_app(ServeState(tiny_retriever()), max_batch=1, max_wait_ms=0.0, max_queue=2)

    async def go():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                first = asyncio.create_task(c.post("/v1/retrieve", json={"queries": ["a"]}))
                await asyncio.sleep(0.2)  # running: the queue is empty again
                queued = [asyncio.create_task(c.post("/v1/retrieve", json={"queries": [q]})) for q in "bc"]
                await asyncio.sleep(0.2)
                refused = await c.post("/v1/retrieve", json={"queries": ["d"]})
                metrics = (await c.get("/metrics")).text
                release.set()
                return refused, await asyncio.gather(first, *queued), metrics

    refused, served, metrics = asyncio.run(go())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["field"] == "queue"
    assert [s.status_code for s in served] == [200, 200, 200]
    assert "r4t_queue_depth 2" in metrics


def test_batcher_checks_and_errors_reach_every_job() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(lambda k, x: x, max_batch=0)

    def boom(key, items):
        raise ValueError("k: too large")

    async def go():
        b = MicroBatcher(boom, max_wait_ms=50.0)
        await b.start()
        try:
            return await asyncio.gather(b.submit("a", [1]), b.submit("a", [2]), return_exceptions=True)
        finally:
            await b.stop()

    errs = asyncio.run(go())
    assert all(isinstance(e, ValueError) and str(e) == "k: too large" for e in errs)
    assert issubclass(QueueFull, Exception)


# ------------------------------------------------------------------------------------------ live catalog
def test_catalog_update_add_remove_and_revision(client: TestClient) -> None:
    before = _ids(
        client.post("/v1/retrieve", json={"queries": ["item red shirt"], "k": 3, "method": "dense"})
    )
    assert before[0] == "id0"
    upd = {
        "add": [
            {"id": "cape", "text": "purple velvet cape", "category": "cape", "metadata": {"in_stock": True}}
        ],
        "update": [{"id": "id1", "category": "footwear"}],
        "remove": ["id0"],
    }
    r = client.post("/v1/catalog", json=upd)
    assert r.status_code == 200 and r.json() == {"revision": 1, "items": 48}
    for method in ("r4t", "dense", "mmr", "dpp"):
        for q in ["item red shirt", "red", "shirt"]:
            got = _ids(client.post("/v1/retrieve", json={"queries": [q], "k": 10, "method": method}))
            assert "id0" not in got
    new = client.post("/v1/retrieve", json={"queries": ["purple velvet cape"], "k": 2, "method": "dense"})
    assert _ids(new)[0] == "cape"
    flt = {"categories": ["footwear"]}
    assert _ids(
        client.post("/v1/retrieve", json={"queries": ["x"], "k": 1, "method": "dense", "filter": flt})
    ) == ["id1"]
    info = client.get("/v1/info").json()
    assert info["catalog"]["revision"] == 1 and "cape" in info["catalog"]["categories"]


@pytest.mark.parametrize(
    ("upd", "field"),
    [
        ({"remove": ["nope"]}, "item_id"),
        ({"add": [{"id": "id3", "text": "dup"}]}, "ids"),
        ({"add": [{"id": "x"}]}, "add[0].text"),
        ({"add": [{"id": "x", "text": "t", "embedding": [1.0, 2.0]}]}, "add[0].embedding"),
        ({}, "add"),
        ({"add": [{"id": "x", "text": "t", "colour": "red"}]}, "add[0].colour"),
    ],
)
def test_bad_catalog_updates_change_nothing(client: TestClient, upd: dict, field: str) -> None:
    r = client.post("/v1/catalog", json=upd)
    assert 400 <= r.status_code < 500 and r.json()["field"] == field, r.text
    info = client.get("/v1/info").json()["catalog"]
    assert info["revision"] == 0 and info["items"] == 48


def test_copy_catalog_leaves_the_published_catalog_untouched() -> None:
    cat = tiny_retriever().catalog
    before = (list(cat.ids), list(cat.texts), [dict(m) for m in cat.metadata], cat.embeddings.clone())
    new = copy_catalog(cat)
    new.add(["x1"], np.ones((1, 16), dtype=np.float32), texts=["x one"], metadata=[{"colour": "x"}])
    new.update(["id1"], np.ones((1, 16), dtype=np.float32), texts=["changed"], metadata=[{"colour": "y"}])
    new.remove(["id0", "id2"])
    assert (list(cat.ids), list(cat.texts), cat.metadata) == before[:3] and "x1" not in cat
    assert cat.index_of("id3") == 3 and bool((cat.embeddings == before[3]).all())
    assert len(new) == 47 and new.index_of("x1") == 46 and new.texts[new.index_of("id1")] == "changed"
    assert new.search(np.ones((1, 16), dtype=np.float32), 1)[1][0, 0] in (
        new.index_of("x1"),
        new.index_of("id1"),
    )


def test_catalog_updates_need_the_exact_index() -> None:
    r = tiny_retriever()
    cat = r.catalog
    graph = type(cat)(cat.ids, cat.embeddings, cat.texts, cat.categories, cat.metadata, index="usearch")
    with TestClient(create_app(ServeState(r.with_catalog(graph)))) as c:
        resp = c.post("/v1/catalog", json={"remove": ["id1"]})
        assert resp.status_code == 409 and resp.json()["field"] == "catalog"
        assert c.get("/healthz").json()["catalog_items"] == 48


def test_catalog_token_guard(client: TestClient, monkeypatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    upd = {"remove": ["id5"]}
    assert client.post("/v1/catalog", json=upd).status_code == 401
    bad = client.post("/v1/catalog", json=upd, headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.json()["field"] == "authorization"
    ok = client.post("/v1/catalog", json=upd, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200


def test_catalog_changes_persist_across_restarts(tmp_path) -> None:
    from r4t_fast.diffusion.retriever import Retriever

    model = tiny_retriever_dir(tmp_path / "model")
    cdir = tmp_path / "live"
    with TestClient(create_app(ServeState(Retriever.from_pretrained(model), catalog_dir=str(cdir)))) as c:
        assert c.post("/v1/catalog", json={"remove": ["id0", "id1"]}).status_code == 200
    with TestClient(create_app(ServeState(Retriever.from_pretrained(model), catalog_dir=str(cdir)))) as c:
        assert c.get("/healthz").json() == {"status": "ok", "catalog_items": 46}


def test_readers_never_see_a_half_applied_change() -> None:
    """Batches read the snapshot once: with updates swapping 40 items in and out, every set holds
    items of one consistent catalog (all 'a' items or all 'b' items, never a mix)."""
    r = tiny_retriever()
    state = ServeState(r)
    a = [{"id": f"a{j}", "text": f"zzz alpha {j}", "category": "zzz"} for j in range(8)]
    b = [{"id": f"b{j}", "text": f"zzz beta {j}", "category": "zzz"} for j in range(8)]
    app = create_app(state, max_wait_ms=1.0)
    with TestClient(app) as c:
        c.post("/v1/catalog", json={"add": a})
        flt = {"categories": ["zzz"]}
        stop = threading.Event()
        seen: list[set[str]] = []

        def read() -> None:
            while not stop.is_set():
                got = c.post(
                    "/v1/retrieve", json={"queries": ["zzz"], "k": 8, "method": "dense", "filter": flt}
                )
                seen.append({i[0] for i in _ids(got)})

        t = threading.Thread(target=read)
        t.start()
        for i in range(6):
            old, new = (a, b) if i % 2 == 0 else (b, a)
            c.post("/v1/catalog", json={"remove": [x["id"] for x in old], "add": new})
        stop.set()
        t.join()
    assert seen and all(len(s) == 1 for s in seen)


# ------------------------------------------------------------------------------------------ ops endpoints
def test_health_info_metrics_page_docs(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "catalog_items": 48}
    info = client.get("/v1/info").json()
    assert info["catalog"]["items"] == 48 and info["catalog"]["dim"] == 16
    assert "openmp" in info["build_info"] and info["batching"]["max_batch"] == 64
    client.post("/v1/retrieve", json={"queries": QUERIES[:2], "k": 3})
    client.post("/v1/retrieve", json={"queries": []})
    m = client.get("/metrics")
    assert m.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = m.text
    assert 'r4t_requests_total{endpoint="/v1/retrieve",status="200"} 1' in text
    assert 'r4t_requests_total{endpoint="/v1/retrieve",status="422"} 1' in text
    assert 'r4t_request_latency_seconds_count{endpoint="/v1/retrieve"} 2' in text
    assert "r4t_batch_queries_sum 2" in text and "r4t_catalog_items 48" in text
    page = client.get("/")
    assert page.status_code == 200 and page.text.count('class="col" data-method=') == 3
    assert client.get("/openapi.json").json()["paths"]["/v1/retrieve"]
    assert client.get("/docs").status_code == 200


# ------------------------------------------------------------------------------------------ CLI
def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    from r4t_fast.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model" in err[0]
    assert main(["serve", "--model", str(tmp_path), "--port", "0"]) == 2
    assert "--port" in capsys.readouterr().err
