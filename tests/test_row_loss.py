"""The rows' retrieval loss (issue 18, lever 1): assignment, the query as a competitor, its gradient,
the reference positives of the training pairs, and early stopping on a validation score."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import sets_jsonl
from r4t_fast.diffusion.model import get_preset
from r4t_fast.train.diffusion import DiffusionTrainConfig, train_diffusion
from r4t_fast.train.row_loss import assign_rows, row_retrieval_loss
from r4t_fast.train.targets import reference_targets, training_pairs


def _catalog(n: int = 60, d: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_assignment_is_hungarian_up_to_l_positives_then_best_row() -> None:
    s = np.array([[0.9, 0.8, 0.1], [0.85, 0.2, 0.0], [0.0, 0.1, 0.3]])
    a = assign_rows(s)  # greedy best-row would put positives 0 and 1 both on row 0
    assert sorted(a.tolist()) == [0, 1, 2]
    assert a.tolist() == [1, 0, 2]  # the assignment with the largest total score (0.85 + 0.8 + 0.3)
    wide = np.array([[0.9, 0.1, 0.8], [0.1, 0.9, 0.2]])  # P = 3 > L = 2: each positive's best row
    assert assign_rows(wide).tolist() == [0, 1, 0]


def test_the_loss_teaches_each_row_its_own_positive() -> None:
    cat = _catalog()
    pos = torch.tensor([[3, 17, 42, -1]])  # one padding entry
    rows = torch.nn.Parameter(torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(1)))
    opt = torch.optim.Adam([rows], lr=0.05)
    first = None
    for _ in range(150):
        out = row_retrieval_loss(rows, pos, cat, tau=0.05)
        first = float(out.loss.detach()) if first is None else first
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.pairs == 3 and float(out.loss.detach()) < 0.1 * first
    assigned = out.rows_assigned[0, :3].tolist()
    assert len(set(assigned)) == 3 and out.rows_assigned[0, 3] == -1  # distinct rows; padding skipped
    top1 = (F.normalize(rows.detach()[0], dim=-1) @ cat.T).argmax(-1)
    assert [int(top1[r]) for r in assigned] == [3, 17, 42]  # every positive is its row's nearest item


def test_positives_the_query_already_ranks_take_no_loss() -> None:
    cat = _catalog()
    query = cat[5:6] + 0.01  # the query's nearest item is 5
    pos = torch.tensor([[5, 30]])
    rows = torch.randn(1, 3, 8)
    out = row_retrieval_loss(rows, pos, cat, query=query, query_budget=1)
    assert out.covered_by_query == 1 and out.pairs == 1
    assert out.rows_assigned[0, 0] == -1 and out.rows_assigned[0, 1] >= 0
    off = row_retrieval_loss(rows, pos, cat, query=query, query_budget=0)
    assert off.covered_by_query == 0 and off.pairs == 2


def test_row_loss_checks_its_inputs() -> None:
    cat = _catalog()
    with pytest.raises(ValueError, match="rows: expected"):
        row_retrieval_loss(torch.randn(3, 8), torch.zeros(1, 2, dtype=torch.int64), cat)
    with pytest.raises(ValueError, match="positives: expected"):
        row_retrieval_loss(torch.randn(2, 3, 8), torch.zeros(1, 2, dtype=torch.int64), cat)
    with pytest.raises(ValueError, match="catalog: expected"):
        row_retrieval_loss(torch.randn(1, 3, 4), torch.zeros(1, 2, dtype=torch.int64), cat)
    with pytest.raises(ValueError, match="tau: expected > 0"):
        row_retrieval_loss(torch.randn(1, 3, 8), torch.zeros(1, 2, dtype=torch.int64), cat, tau=0.0)


def test_the_deep_term_is_the_soft_rank_against_the_budget() -> None:
    """Inside the budget the deep term is ~0; far outside it is ~log(rank / budget); optimised alone it
    brings a positive from deep in the ranking to within the budget (the R@5000 term, issue 18)."""
    cat = _catalog(400, 8)
    pos = torch.tensor([[7]])
    near = cat[7].reshape(1, 1, 8).clone()  # the positive is this row's top item
    out = row_retrieval_loss(near, pos, cat, deep_budget=50)
    assert out.deep is not None and float(out.deep) < 0.05
    assert row_retrieval_loss(near, pos, cat).deep is None  # off by default
    far = -cat[7].reshape(1, 1, 8).clone()  # the positive is ranked last of 400
    out = row_retrieval_loss(far, pos, cat, deep_budget=50, deep_tau=0.001)
    assert float(out.deep) == pytest.approx(np.log(1 + 400 / 50), abs=0.05)  # softplus(log(rank / budget))
    rows = torch.nn.Parameter(far.clone())
    opt = torch.optim.Adam([rows], lr=0.05)
    for _ in range(100):
        o = row_retrieval_loss(rows, pos, cat, deep_budget=50)
        opt.zero_grad()
        o.deep.backward()
        opt.step()
    rank = int(
        (
            (F.normalize(rows.detach()[0, 0], dim=-1) @ cat.T)
            > (F.normalize(rows.detach()[0, 0], dim=-1) @ cat[7])
        ).sum()
    )
    assert rank < 50
    with pytest.raises(ValueError, match="deep_budget, deep_tau"):
        row_retrieval_loss(near, pos, cat, deep_budget=-1)
    with pytest.raises(ValueError, match="retrieval_deep_tau: expected a finite float > 0"):
        DiffusionTrainConfig(retrieval_deep_tau=0.0)
    with pytest.raises(ValueError, match="retrieval_deep_budget"):
        DiffusionTrainConfig(retrieval_deep_budget=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from r4t_fast.data.prepare import load_eval_data

    root = tmp_path_factory.mktemp("rows")
    path = sets_jsonl(root / "sets.jsonl", 40)
    return load_eval_data(str(path), encoder="hashing:16", cache_dir=str(root / "cache"), progress=False)


def test_reference_pairs_carry_their_whole_set_as_positives(data) -> None:
    pairs = reference_targets(data, k=3, samples=2, seed=0)  # 4 items per set, 3 rows drawn
    by_id = {s.set_id: s for s in data.dataset.sets}
    sets = [by_id[i] for i in data.split.train if by_id[i].query is not None]
    assert pairs.positives is not None and pairs.positives.shape == (2 * len(sets), 4)
    assert pairs.catalog is not None and pairs.catalog.shape == (len(data.catalog), 16)
    for i, s in enumerate(sets):
        want = sorted(data.catalog.id_to_index(s.item_ids))
        assert sorted(pairs.positives[2 * i].tolist()) == want == sorted(pairs.positives[2 * i + 1].tolist())
        drawn = pairs.targets[2 * i]  # every drawn row is one of the positives' embeddings
        assert torch.cdist(drawn, pairs.catalog[pairs.positives[2 * i]]).min(1).values.max() < 1e-6
    shards = {"cond": pairs.cond[:5], "targets": pairs.targets[:5], "reward": torch.ones(5)}
    both = training_pairs("both", shards=shards, data=data, k=3, reference_samples=2)
    assert both.positives.shape[0] == 5 + len(pairs.cond)
    assert (both.positives[:5] == -1).all()  # teacher pairs: no reference set


def test_training_with_the_row_loss_and_early_stopping(data) -> None:
    pairs = reference_targets(data, k=4, samples=2, seed=0)
    base = dict(preset="tiny", steps=12, batch_size=8, warmup=2, log_every=4, threads=1)
    cfg = DiffusionTrainConfig(**base, retrieval_weight=1.0, select_every=4)
    with pytest.raises(ValueError, match="retrieval_weight: the rows' retrieval loss needs"):
        train_diffusion(pairs.cond, pairs.targets, cfg, progress=False)
    with pytest.raises(ValueError, match="select_every: needs a select_fn"):
        train_diffusion(pairs.cond, pairs.targets, cfg, progress=False, positives=pairs.positives,
                        catalog=pairs.catalog)  # fmt: skip
    snapshots: list[dict] = []
    scores = iter([0.1, 0.9, 0.2])

    def select(model) -> float:
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)

    model, log = train_diffusion(
        pairs.cond, pairs.targets, cfg, progress=False, positives=pairs.positives, catalog=pairs.catalog,
        select_fn=select,
    )  # fmt: skip
    assert [r["select"] for r in log if "select" in r] == [0.1, 0.9, 0.2]
    assert next(r for r in log if "selected" in r) == {"step": 8, "selected": 0.9}
    assert all("row_loss" in r and np.isfinite(r["row_loss"]) for r in log if "loss" in r)
    state = model.state_dict()
    assert all(torch.equal(state[k], snapshots[1][k]) for k in state)  # the weights scored 0.9
    assert not all(torch.equal(state[k], snapshots[2][k]) for k in state)
    json.dumps(log)  # the log stays serialisable


def test_the_row_loss_changes_what_the_model_learns(data) -> None:
    """Same seed, same batches: the retrieval term changes the trained weights (it reaches the model)."""
    pairs = reference_targets(data, k=4, samples=2, seed=0)
    base = dict(preset="tiny", steps=6, batch_size=8, warmup=2, log_every=3, threads=1)
    kw = dict(progress=False, positives=pairs.positives, catalog=pairs.catalog)
    m0, _ = train_diffusion(pairs.cond, pairs.targets, DiffusionTrainConfig(**base), **kw)
    m1, _ = train_diffusion(
        pairs.cond, pairs.targets, DiffusionTrainConfig(**base, retrieval_weight=1.0), **kw
    )
    assert get_preset("tiny").dim == 16
    diff = sum(float((a - b).abs().sum()) for a, b in zip(m0.parameters(), m1.parameters(), strict=True))
    assert diff > 0
    deep = DiffusionTrainConfig(
        **base, retrieval_weight=1.0, retrieval_deep_weight=1.0, retrieval_deep_budget=2
    )
    m2, _ = train_diffusion(pairs.cond, pairs.targets, deep, **kw)
    assert sum(float((a - b).abs().sum()) for a, b in zip(m1.parameters(), m2.parameters(), strict=True)) > 0


def test_rows_recall_scorer_is_r4t_evals_recall_of_the_rows_alone(data) -> None:
    from r4t_fast.diffusion.retriever import Retriever
    from r4t_fast.eval.evaluation import evaluate
    from r4t_fast.eval.selection import rows_recall_scorer

    pairs = reference_targets(data, k=4, samples=2, seed=0)
    cfg = DiffusionTrainConfig(preset="tiny", steps=4, batch_size=8, warmup=1, threads=1)
    model, _ = train_diffusion(pairs.cond, pairs.targets, cfg, progress=False)
    sampling = {"steps": 2, "sampler": "euler", "guidance": 0.0}
    score = rows_recall_scorer(data, split="val", k=4, sampling=sampling)(model)
    r = Retriever(model, data.catalog, data.encoder, anchor=0.3, fused=False, **sampling)
    r.defaults["anchor"] = 0.0  # the scorer ignores the retriever's anchor: rows alone
    rec = evaluate(r, data.dataset, "val", data=data, k=4, latency_batch_sizes=(), progress=False)
    assert 0.0 <= score <= 1.0 and score == pytest.approx(rec["metrics"]["recall_at_fair"], abs=1e-9)
    with pytest.raises(ValueError, match="split: early stopping scores the validation split"):
        rows_recall_scorer(data, split="test")


def test_unrolled_rows_are_the_euler_samplers_rows_with_a_graph() -> None:
    from r4t_fast.diffusion.model import EDM, SetDenoiser
    from r4t_fast.diffusion.samplers import sample_euler, sampler_sigmas
    from r4t_fast.train.diffusion import unrolled_rows

    torch.manual_seed(0)
    model = SetDenoiser(get_preset("tiny", cond_offset=0.5))
    with torch.no_grad():  # zero-initialised output layers would make the rows trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    edm, cond = EDM(model), torch.randn(3, 16)
    sigmas = sampler_sigmas("euler", 3, model.cfg)
    rows = unrolled_rows(edm, cond, sigmas, generator=torch.Generator().manual_seed(5))
    x = torch.randn((3, 4, 16), generator=torch.Generator().manual_seed(5)) * sigmas[0]
    with torch.no_grad():
        ref = edm.uncenter(sample_euler(edm, x, sigmas, cond, fused=False), cond)
    assert torch.allclose(rows.detach(), ref, atol=1e-5)
    rows.square().sum().backward()
    assert (
        all(p.grad is not None for p in model.out.parameters())
        and float(model.out.weight.grad.abs().sum()) > 0
    )


@pytest.mark.parametrize("noise", ["random", "fixed"])
def test_training_with_an_unrolled_row_loss(data, tmp_path, noise: str) -> None:
    from r4t_fast.diffusion.model import load_model

    pairs = reference_targets(data, k=4, samples=2, seed=0)
    cfg = DiffusionTrainConfig(preset="tiny", steps=4, batch_size=8, warmup=1, log_every=2, threads=1,
                               retrieval_weight=1.0, retrieval_unroll=2, retrieval_noise=noise)  # fmt: skip
    _, log = train_diffusion(pairs.cond, pairs.targets, cfg, progress=False, positives=pairs.positives,
                             catalog=pairs.catalog, out_dir=tmp_path / "m")  # fmt: skip
    assert all(np.isfinite(r["row_loss"]) and r["row_loss"] > 0 for r in log if "loss" in r)
    # the saved model names the sampler its rows were trained through (a Retriever built from it uses it)
    _, meta = load_model(tmp_path / "m")
    want = {"sampler": "euler", "steps": 2, "guidance": 0.0}
    assert meta["sampling"] == {**want, "noise": "query" if noise == "random" else "fixed"}


def test_fixed_noise_rows_are_the_retrievers_fixed_noise_rows() -> None:
    """retrieval_noise='fixed': every set starts from the one draw of seed 0, the draw a Retriever with
    noise='fixed', seed 0 starts every query from (fused and eager); the default noise='query' does not."""
    from r4t_fast import Catalog
    from r4t_fast.diffusion.model import EDM, SetDenoiser
    from r4t_fast.diffusion.retriever import Retriever
    from r4t_fast.diffusion.samplers import sampler_sigmas
    from r4t_fast.train.diffusion import unrolled_rows

    torch.manual_seed(0)
    model = SetDenoiser(get_preset("tiny", cond_offset=0.5))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    edm, cond = EDM(model), F.normalize(torch.randn(3, 16), dim=1)
    sigmas = sampler_sigmas("euler", 2, model.cfg)
    with torch.no_grad():
        rows = unrolled_rows(edm, cond, sigmas, generator=torch.Generator().manual_seed(5), fixed_seed=0)
        same = unrolled_rows(edm, cond[[0, 0]], sigmas, fixed_seed=0)
        drawn = unrolled_rows(edm, cond[[0, 0]], sigmas, generator=torch.Generator().manual_seed(5))
    assert torch.equal(same[0], same[1]) and not torch.allclose(drawn[0], drawn[1])
    cat = Catalog([f"i{j}" for j in range(64)], F.normalize(torch.randn(64, 16), dim=1))
    r = Retriever(model, cat, steps=2, sampler="euler", noise="fixed")
    for fused in (True, False):
        for b, s in enumerate(r.retrieve_embeddings(cond, 4, fused=fused)):
            got = torch.from_numpy(s.row_embeddings)  # ranked by grounding score: match as a set
            assert float(torch.cdist(got, rows[b]).min(1).values.max()) < 1e-4
    per_query = r.retrieve_embeddings(cond, 4, noise="query", fused=False)
    assert any(
        float(torch.cdist(torch.from_numpy(s.row_embeddings), rows[b]).min(1).values.max()) > 1e-2
        for b, s in enumerate(per_query)
    )
    with pytest.raises(ValueError, match="noise"):
        r.retrieve_embeddings(cond, 4, noise="shared")
    with pytest.raises(ValueError, match="retrieval_noise"):
        DiffusionTrainConfig(preset="tiny", retrieval_noise="query")


def test_fine_tune_starts_from_the_saved_model(data, tmp_path) -> None:
    """init_from (lever 2): the run starts from the saved weights and model config (sigma_data and
    cond_offset kept, the preset ignored); a wrong path or a model of other sizes fails before a step."""
    from r4t_fast.diffusion.model import load_model

    pairs = reference_targets(data, k=4, samples=2, seed=0)
    base = {"preset": "tiny", "batch_size": 8, "warmup": 1, "threads": 1}
    train_diffusion(pairs.cond, pairs.targets, DiffusionTrainConfig(steps=3, **base), progress=False,
                    out_dir=tmp_path / "edm")  # fmt: skip
    saved, meta = load_model(tmp_path / "edm")
    # lr tiny: the fine-tuned weights stay next to the saved ones, far from a fresh init's
    ft = DiffusionTrainConfig(steps=2, lr=1e-9, init_from=str(tmp_path / "edm"), retrieval_weight=1.0,
                              retrieval_unroll=2, sigma_data=123.0, **base)  # fmt: skip
    model, _ = train_diffusion(pairs.cond, pairs.targets, ft, progress=False, positives=pairs.positives,
                               catalog=pairs.catalog)  # fmt: skip
    fresh_cfg = DiffusionTrainConfig(steps=1, seed=7, lr=1e-9, **base)
    fresh, _ = train_diffusion(pairs.cond, pairs.targets, fresh_cfg, progress=False)
    assert model.cfg == saved.cfg and model.cfg.sigma_data != 123.0
    states = (model.state_dict(), saved.state_dict(), fresh.state_dict())
    for name, p in states[0].items():
        q, r = states[1][name], states[2][name]
        assert torch.allclose(p, q, atol=1e-6), name
        if float((q - r).abs().max()) > 1e-3:
            assert not torch.allclose(p, r, atol=1e-6), name
    with pytest.raises(FileNotFoundError, match="init_from: .* is not a saved set model"):
        cfg = DiffusionTrainConfig(steps=1, init_from=str(tmp_path / "nope"), **base)
        train_diffusion(pairs.cond, pairs.targets, cfg, progress=False)
    with pytest.raises(ValueError, match=r"overrides: \['hidden'\] would be ignored"):
        DiffusionTrainConfig(init_from=str(tmp_path / "edm"), overrides={"hidden": 8})
    pairs3 = reference_targets(data, k=3, samples=2, seed=0)
    with pytest.raises(ValueError, match="init_from: .* has set_size=4, the training data set_size=3"):
        cfg = DiffusionTrainConfig(steps=1, init_from=str(tmp_path / "edm"), **base)
        train_diffusion(pairs3.cond, pairs3.targets, cfg, progress=False)
