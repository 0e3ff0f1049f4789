"""The diffusion Retriever: fused CPU path vs eager path, the query anchor, filters, live catalogs,
argument checks, non-finite sampling, crash-safe directories, threads and the ``r4t retrieve`` CLI.

Tolerance of fused vs eager: rows within 1e-4 of the row scale (float32 rounding, measured ~1e-6), the
same items (no near-ties on these models)."""

from __future__ import annotations

import argparse
import json
import math
import threading

import numpy as np
import pytest
import torch

from helpers import noisy_tiny_model
from r4t_fast import Catalog
from r4t_fast._internal import SavedDirError
from r4t_fast.data.encoders import HashingEncoder
from r4t_fast.diffusion.model import SetDenoiser
from r4t_fast.diffusion.options import MAX_GUIDANCE, MAX_STEPS, query_seeds
from r4t_fast.diffusion.retrieve_cli import cli_main
from r4t_fast.diffusion.retriever import Retriever
from r4t_fast.diffusion.samplers import SAMPLERS, eager_sample_sets, sampler_sigmas
from r4t_fast.kernels import reference
from r4t_fast.objectives.coverage import round_robin_union, union_candidates

STEPS = {"euler": 4, "euler_maruyama": 4, "heun": 3, "dpmpp_2m": 4, "consistency": 3}
QUERIES = ["red outfit", "blue bag", "green hat for summer"]


def _model(seed: int = 2) -> SetDenoiser:
    return noisy_tiny_model(seed)


def _catalog(enc: HashingEncoder) -> Catalog:
    texts = [
        f"item {w} {c}"
        for w in ("red", "blue", "green", "black", "white")
        for c in ("shirt", "shoe", "bag", "hat", "skirt", "scarf")
    ]
    cats = [t.split()[2] for t in texts]
    return Catalog([f"id{j}" for j in range(len(texts))], enc.encode(texts), texts, categories=cats)


def _retriever(**kw) -> Retriever:
    enc = HashingEncoder(dim=16, seed=0)
    return Retriever(_model(), _catalog(enc), enc, encoder_spec="hashing:16", steps=4, **kw)


@pytest.fixture(scope="module")
def r() -> Retriever:
    return _retriever()


# ------------------------------------------------------------------------------------ fused == eager
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("guidance", [0.0, 0.7])
def test_fused_equals_eager(r: Retriever, sampler: str, guidance: float) -> None:
    kw = dict(k=6, n_candidates=3, sampler=sampler, steps=STEPS[sampler], guidance=guidance, seed=5)
    fused = r.retrieve(QUERIES, fused=True, **kw)
    eager = r.retrieve(QUERIES, fused=False, **kw)
    auto = r.retrieve(QUERIES, **kw)  # CPU: the fused path is the default
    for f, e, a in zip(fused, eager, auto, strict=True):
        scale = float(np.abs(e.row_embeddings).max())
        assert float(np.abs(f.row_embeddings - e.row_embeddings).max()) <= 1e-4 * scale
        assert f.item_ids == e.item_ids and len(set(f.item_ids)) == 6
        np.testing.assert_array_equal(f.candidates, e.candidates)
        np.testing.assert_allclose(f.row_scores, e.row_scores, atol=1e-4 * scale)
        assert a.item_ids == f.item_ids and np.array_equal(a.row_embeddings, f.row_embeddings)


@pytest.mark.parametrize("sampler", ["heun", "consistency"])
def test_query_pull_moves_rows_toward_the_query_on_both_paths(r: Retriever, sampler: str) -> None:
    kw = dict(k=6, sampler=sampler, steps=STEPS[sampler], seed=5)
    q = torch.from_numpy(np.asarray(r.encoder.encode(QUERIES), dtype=np.float32))
    base = r.retrieve_embeddings(q, fused=False, **kw)
    for pull in (0.5, 2.0):
        fused = r.retrieve_embeddings(q, fused=True, pull=pull, **kw)
        eager = r.retrieve_embeddings(q, fused=False, pull=pull, **kw)
        for i, (b, f, e) in enumerate(zip(base, fused, eager, strict=True)):
            scale = float(np.abs(e.row_embeddings).max())
            assert float(np.abs(f.row_embeddings - e.row_embeddings).max()) <= 1e-4 * scale
            assert f.item_ids == e.item_ids
            cos_b = (b.row_embeddings @ q[i].numpy()).mean()
            assert (e.row_embeddings @ q[i].numpy()).mean() > cos_b
    stored = _retriever(pull=0.5)
    assert stored.defaults["pull"] == 0.5
    same = stored.retrieve(QUERIES[:1], 6, seed=5, sampler=sampler, steps=STEPS[sampler])[0]
    assert same.item_ids == r.retrieve(QUERIES[:1], pull=0.5, **kw)[0].item_ids
    for bad in (-0.1, math.nan, 11.0, "x"):
        with pytest.raises(ValueError, match="pull"):
            r.retrieve(QUERIES, pull=bad)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("anchor", [0.0, 0.3])
def test_candidate_pull_reads_the_lists_around_differently_pulled_rows(
    r: Retriever, fused: bool, anchor: float
) -> None:
    kw = dict(k=6, n_candidates=5, steps=4, seed=5, anchor=anchor, pull=1.0, fused=fused)
    q = torch.from_numpy(np.asarray(r.encoder.encode(QUERIES), dtype=np.float32))
    cat = np.asarray(r.catalog.embeddings, dtype=np.float32)
    pulled = r.retrieve_embeddings(q, **kw)
    for cp in (None, 1.0, 0.0, 0.3, -0.5):
        got = r.retrieve_embeddings(q, candidate_pull=cp, **kw)
        for i, (p, g) in enumerate(zip(pulled, got, strict=True)):
            assert g.item_ids == p.item_ids  # the items are grounded from the pulled rows either way
            np.testing.assert_array_equal(g.row_embeddings, p.row_embeddings)
            first = 1 if anchor else 0  # row 0 (and the appended rows) hold the query's own ranking
            np.testing.assert_array_equal(g.candidates[:first], p.candidates[:first])
            free = p.row_embeddings[first:]
            if cp is not None:
                free = free + (cp - 1.0) * q[i].numpy()
            want = np.argsort(-(free @ cat.T), axis=1, kind="stable")[:, :5]
            np.testing.assert_array_equal(g.candidates[first : first + len(free)], want)
            if cp in (None, 1.0):
                np.testing.assert_array_equal(g.candidates, p.candidates)
    stored = _retriever(candidate_pull=0.0)
    assert stored.defaults["candidate_pull"] == 0.0 and r.defaults["candidate_pull"] is None
    for bad in (-10.5, math.nan, 11.0, "x"):
        with pytest.raises(ValueError, match="candidate_pull"):
            r.retrieve(QUERIES, candidate_pull=bad)


def test_fused_option_on_the_retriever() -> None:
    eager = _retriever(fused=False)
    assert eager.fused is False and eager.with_catalog(eager.catalog).fused is False
    a = eager.retrieve(QUERIES, 4)
    b = eager.retrieve(QUERIES, 4, fused=True)
    assert [s.item_ids for s in a] == [s.item_ids for s in b]
    with pytest.raises(ValueError, match="fused: expected None"):
        _retriever(fused="yes")


def test_same_query_same_set_alone_or_in_a_batch(r: Retriever) -> None:
    for sampler in ("heun", "euler_maruyama"):
        for fused in (True, False):
            kw = dict(k=6, sampler=sampler, fused=fused, seed=3)
            batch = r.retrieve(QUERIES, **kw)
            for i, q in enumerate(QUERIES):
                alone = r.retrieve([q], **kw)[0]
                assert alone.item_ids == batch[i].item_ids
                if fused:  # the fused kernel is bitwise batch-invariant; eager torch within rounding
                    assert np.array_equal(alone.row_embeddings, batch[i].row_embeddings)
                else:
                    np.testing.assert_allclose(alone.row_embeddings, batch[i].row_embeddings, atol=1e-5)
            assert r.retrieve(QUERIES, **kw)[0].item_ids == batch[0].item_ids  # seeded
    assert query_seeds(0, torch.ones(2, 4)) == query_seeds(0, torch.ones(2, 4))[:1] * 2
    assert query_seeds(0, torch.ones(1, 4)) != query_seeds(1, torch.ones(1, 4))


# ------------------------------------------------------------------------------------ anchor
def test_anchor_row_and_candidates(r: Retriever) -> None:
    k, C, anchor = 6, 4, 0.25
    m = max(1, round(anchor * k / (1 - anchor)))
    sets = r.retrieve(QUERIES, k, n_candidates=C, anchor=anchor, seed=1)
    q = torch.from_numpy(np.asarray(r.encoder.encode(QUERIES), dtype=np.float32))
    ref_scores, ranks = reference.knn(q, r.catalog.embeddings, m * C)
    emb = r.catalog.embeddings.float()
    for b, s in enumerate(sets):
        assert len(s.item_ids) == k == len(set(s.item_ids))
        assert int(s.item_indices[0]) == int(ranks[b, 0])  # the query's nearest item
        np.testing.assert_array_equal(s.row_embeddings[0], q[b].numpy())
        assert s.candidates.shape == (k - 1 + m, C)
        ranking = s.candidates[[0, *range(k, k - 1 + m)]]  # row 0 and the appended rows
        for j in range(m):  # the query's ranking interleaved (ties tolerated: compare the scores)
            got = (emb[torch.from_numpy(ranking[j])] @ q[b]).numpy()
            np.testing.assert_allclose(got, ref_scores[b, j::m].numpy(), rtol=0, atol=1e-5)
        rows = s.candidates[1:k]  # the diffusion rows' own nearest items
        want = reference.knn(torch.from_numpy(s.row_embeddings[1:]), r.catalog.embeddings, C)[0]
        pairs = zip(rows, s.row_embeddings[1:], strict=True)
        got = torch.stack([emb[torch.from_numpy(c)] @ torch.from_numpy(e) for c, e in pairs])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        # each rank is read once: a quota of b per row holds the query's top m * b items
        quota = union_candidates(s.candidates, 2)
        assert set(ranks[b, : 2 * m].tolist()) <= set(quota.tolist())
        assert len(set(ranking[:, :2].reshape(-1).tolist())) == 2 * m
        u = round_robin_union(s.candidates, (k - 1 + m) * 2)  # and the fair union reads it in order
        assert set(ranks[b, : 2 * m].tolist()) <= set(u.tolist())
    plain = r.retrieve(QUERIES, k, seed=1)
    for a, p in zip(sets, plain, strict=True):  # the other rows are the best diffusion rows
        assert set(a.item_ids[1:]) <= set(p.item_ids) | set(a.item_ids[1:])
    stored = _retriever(anchor=0.25)
    assert stored.defaults["anchor"] == 0.25
    assert stored.retrieve(QUERIES[:1], k)[0].item_ids == r.retrieve(QUERIES[:1], k, anchor=0.25)[0].item_ids
    for bad in (1.0, -0.1, math.nan, "0.2", True):
        with pytest.raises(ValueError, match="anchor"):
            r.retrieve(QUERIES, anchor=bad)


def test_anchor_candidates_accepted_by_evaluate_sets(r: Retriever) -> None:
    from r4t_fast.eval.metrics import evaluate_sets

    sets = r.retrieve(QUERIES, 4, n_candidates=5, anchor=0.5)
    assert sets[0].candidates.shape == (7, 5)  # k - 1 + m rows, m = 4
    out = evaluate_sets(
        [s.item_indices for s in sets],
        [s.row_embeddings for s in sets],
        np.asarray(r.encoder.encode(QUERIES), dtype=np.float32),
        r.catalog.embeddings,
        references=[[0, 1], [2], [3, 4]],
        candidates=[s.candidates for s in sets],
        fair_k=8,
    )
    assert np.all(out.per_query["fair_union_size"] == 8)


# ------------------------------------------------------------------------------------ filters, catalogs
def test_allowed_filter_matches_reference(r: Retriever) -> None:
    mask = torch.tensor([c in ("shirt", "bag", "hat") for c in r.catalog.categories])
    k = 6
    for allowed in (mask, mask.numpy(), lambda c, meta: c in ("shirt", "bag", "hat")):
        for fused in (True, False):
            sets = r.retrieve(QUERIES, k, n_candidates=3, allowed=allowed, seed=2, fused=fused)
            for s in sets:
                assert len(set(s.item_ids)) == k and bool(mask[torch.from_numpy(s.item_indices)].all())
                assert bool(mask[torch.from_numpy(s.candidates.reshape(-1))].all())
    # reference: the same rows, grounded by the pure-PyTorch spec with the mask, the k best kept
    q = torch.from_numpy(np.asarray(r.encoder.encode(QUERIES), dtype=np.float32))
    n_sets = 2
    sig = sampler_sigmas("heun", 4, r.model.cfg)
    rows = eager_sample_sets(
        r.edm, q.repeat_interleave(n_sets, 0), sig, sampler="heun", guidance=0.0, seed=query_seeds(2, q)
    ).reshape(3, 8, 16)
    ids, scores = reference.ground_sets(rows, r.catalog.embeddings, allowed=mask)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    want = torch.gather(ids, 1, order)
    got = r.retrieve(QUERIES, k, allowed=mask, seed=2)
    for b in range(3):
        assert got[b].item_indices.tolist() == want[b].tolist()
    with pytest.raises(ValueError, match="allowed: only 2 catalog items pass the filter, fewer than k=6"):
        r.retrieve(QUERIES, k, allowed=["id0", "id1"])


def test_with_catalog_live_add_and_remove() -> None:
    base = _retriever()
    cat = _catalog(base.encoder)
    live = base.with_catalog(cat)
    assert live.catalog is cat and live.defaults == base.defaults
    before = live.retrieve(QUERIES[:1], 4, seed=0)[0]
    # a new item exactly along a generated row: that row now grounds to it
    row = torch.from_numpy(before.row_embeddings[:1].copy())
    cat.add(["new"], row, ["brand new item"])
    after = live.retrieve(QUERIES[:1], 4, seed=0)[0]
    assert "new" in after.item_ids
    gone = list(after.item_ids)
    cat.remove(gone)
    for s in live.retrieve(QUERIES, 4, seed=0) + live.retrieve(QUERIES, 4, seed=0, fused=False):
        assert not set(s.item_ids) & set(gone)
    with pytest.raises(ValueError, match="catalog: dimension 8"):
        base.with_catalog(Catalog(["a"], torch.ones(1, 8)))


# ------------------------------------------------------------------------------------ argument checks
def test_argument_checks(r: Retriever) -> None:
    assert len(r.retrieve(QUERIES, np.int64(4), steps=np.int32(2), seed=np.int64(3))) == 3
    cases = [
        (dict(steps=True), "steps: expected a positive int"),
        (dict(steps=0), "steps: expected a positive int"),
        (dict(steps=MAX_STEPS + 1), rf"steps: expected an int in \[1, {MAX_STEPS}\]"),
        (dict(steps=2.0), "steps: expected a positive int"),
        (dict(guidance="0.1"), "guidance: expected a number"),
        (dict(guidance=True), "guidance: expected a number"),
        (dict(guidance=math.nan), "guidance: expected a finite number"),
        (dict(guidance=math.inf), "guidance: expected a finite number"),
        (dict(guidance=1e30), "guidance: expected a number in"),
        (dict(seed=1.5), "seed: expected an int"),
        (dict(seed=True), "seed: expected an int"),
        (dict(sampler="ddim"), "sampler: expected one of"),
        (dict(n_candidates=-1), "n_candidates: expected a non-negative int"),
        (dict(fused=1), "fused: expected None"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            r.retrieve(QUERIES, 4, **kw)
    with pytest.raises(ValueError, match="k: expected a positive int"):
        r.retrieve(QUERIES, True)
    with pytest.raises(ValueError, match="steps: expected an int in"):
        _retriever().__class__(r.model, r.catalog, steps=5000)


def test_query_texts_any_iterable(r: Retriever) -> None:
    want = [s.item_ids for s in r.retrieve(QUERIES, 4)]
    assert [s.item_ids for s in r.retrieve((q for q in QUERIES), 4)] == want
    assert [s.item_ids for s in r.retrieve(tuple(QUERIES), 4)] == want
    assert r.retrieve(iter([]), 4) == []
    for bad in ("red outfit", b"red", 3, ["ok", ""], ["ok", None]):
        with pytest.raises(ValueError, match="query_texts: expected a list of non-empty strings"):
            r.retrieve(bad, 4)


def test_non_finite_sampling_raises() -> None:
    r = _retriever()
    for g in (1e30, -1e30, MAX_GUIDANCE * 1.01):
        with pytest.raises(ValueError, match=r"guidance: expected a number in \[-1000, 1000\]"):
            r.retrieve(QUERIES, 4, guidance=g)
    bad = _retriever()
    with torch.no_grad():
        next(bad.model.parameters()).view(-1)[0] = math.nan
    for fused in (True, False):
        with pytest.raises(ValueError, match="non-finite rows.*check the model weights"):
            bad.retrieve(QUERIES, 4, fused=fused)


# ------------------------------------------------------------------------------------ threads
def test_threads_equal_sequential(r: Retriever) -> None:
    """8 threads released together on a barrier (so they really overlap) give exactly the sequential
    results: ids, item scores and row scores of sets drawn from several model rows (k > 1 items, two
    samples of the L-row model per set)."""
    assert r.model.cfg.set_size > 1
    batches = [QUERIES[i % 3 :] + QUERIES[: i % 3] for i in range(8)]

    def run_once(i: int) -> list:
        sets = r.retrieve(batches[i], 6, seed=i)
        return [
            (list(s.item_ids), np.asarray(s.scores).tolist(), np.asarray(s.row_scores).tolist()) for s in sets
        ]

    want = [run_once(i) for i in range(8)]
    assert all(len(set(ids)) == 6 for w in want for ids, _, _ in w)  # 6 distinct items per set
    assert len({tuple(w[0][0]) for w in want}) > 1  # the seeds matter: threads cannot agree by accident
    got: list = [None] * 8
    errors: list = []
    barrier = threading.Barrier(8)

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=60)
            for _ in range(3):
                got[i] = run_once(i)
                assert got[i] == want[i]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == want


# ------------------------------------------------------------------------------------ persistence
def test_save_is_a_verified_saved_directory(tmp_path) -> None:
    r = _retriever(anchor=0.1)
    path = r.save(tmp_path / "ret", extra={"note": "x"})
    assert path.is_symlink() and (path / "manifest.json").is_file()
    back = Retriever.from_pretrained(path)
    assert back.defaults == r.defaults
    assert [s.item_ids for s in back.retrieve(QUERIES, 6)] == [s.item_ids for s in r.retrieve(QUERIES, 6)]
    r.save(path)  # a second save switches versions
    assert Retriever.from_pretrained(path, verify=False).defaults == r.defaults

    # a flipped weight byte: caught by the sha256 check (and not with verify=False)
    w = path / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(SavedDirError, match="model.safetensors: checksum mismatch"):
        Retriever.from_pretrained(path)
    Retriever.from_pretrained(path, verify=False)
    w.write_bytes(bytes(data[:-10]))  # truncated
    with pytest.raises(SavedDirError, match=r"model.safetensors: size .* \(truncated\?\)"):
        Retriever.from_pretrained(path, verify=False)
    r.save(path)
    (path / "retriever.json").unlink()
    with pytest.raises(SavedDirError, match="retriever.json: missing"):
        Retriever.from_pretrained(path)
    r.save(path)
    (path / "catalog" / "items.jsonl").write_text("garbage\n")
    with pytest.raises(SavedDirError, match="items.jsonl"):
        Retriever.from_pretrained(path)


def test_legacy_directory_and_missing_paths(tmp_path) -> None:
    from r4t_fast.diffusion.model import save_model

    r = _retriever()
    legacy = tmp_path / "old"
    save_model(r.model, legacy)
    r.catalog.save(legacy / "catalog")
    meta = {"format": "r4t_fast.diffusion.retriever", "encoder_spec": "hashing:16", "defaults": {"steps": 4}}
    (legacy / "retriever.json").write_text(json.dumps(meta))
    old = Retriever.from_pretrained(legacy)
    assert old.defaults["steps"] == 4 and old.defaults["anchor"] == 0.0
    assert [s.item_ids for s in old.retrieve(QUERIES, 4)] == [s.item_ids for s in r.retrieve(QUERIES, 4)]
    r.save(legacy)  # a plain 0.1 directory is replaced crash-safely
    assert legacy.is_symlink() and Retriever.from_pretrained(legacy).defaults == r.defaults
    with pytest.raises(FileNotFoundError, match="missing retriever.json"):
        Retriever.from_pretrained(tmp_path / "absent")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="missing retriever.json"):
        Retriever.from_pretrained(tmp_path / "plain")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "retriever.json").write_text("{not json")
    with pytest.raises(ValueError, match="retriever.json: corrupt"):
        Retriever.from_pretrained(bad)


# ------------------------------------------------------------------------------------ CLI
def _args(**kw) -> argparse.Namespace:
    base = dict(model="/nonexistent", query=["red outfit"], k=None, steps=None, sampler=None)
    base.update(guidance=None, seed=None, anchor=None, pull=None, precision=None, noise=None, json=False)
    base.update(dataset=None, encoder=None, data_dir=None, cache_dir=None, save=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_cli_errors_name_the_argument(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="--model: no retriever directory at /nonexistent"):
        cli_main(_args())
    for kw, msg in [
        (dict(k=0), "-k: expected a positive int"),
        (dict(query=["ok", ""]), "--query: expected non-empty text"),
        (dict(steps=0), "--steps: expected a positive int"),
        (dict(steps=MAX_STEPS + 1), "--steps: expected an int in"),
        (dict(guidance=math.nan), "--guidance: expected a finite number"),
        (dict(guidance=1e30), "--guidance: expected a number in"),
        (dict(anchor=1.0), r"--anchor: expected a number in \[0, 1\)"),
        (dict(pull=-1.0), "--pull: expected a number in"),
    ]:
        with pytest.raises(ValueError, match=msg):
            cli_main(_args(**kw))  # before any load: /nonexistent is never opened


def test_cli_json_is_strict(tmp_path, capsys) -> None:
    path = _retriever().save(tmp_path / "ret")
    assert cli_main(_args(model=str(path), query=QUERIES[:2], k=4, json=True)) == 0
    out = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
    assert [o["query"] for o in out] == QUERIES[:2] and all(len(o["item_ids"]) == 4 for o in out)
    assert cli_main(_args(model=str(path), k=4, anchor=0.2)) == 0
    assert "red outfit" in capsys.readouterr().out
