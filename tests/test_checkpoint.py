"""Resumable training of the set model (r4t_fast.train.checkpoint): a run stopped part-way and started
again ends with the very weights and log of a run that was never stopped; a checkpoint of other settings
or pairs, or a corrupt one, is never resumed; a saved model takes its checkpoint away."""

from __future__ import annotations

import pytest
import torch

from helpers import sets_jsonl
from r4t_fast.train.checkpoint import checkpoint_path
from r4t_fast.train.diffusion import DiffusionTrainConfig, train_diffusion
from r4t_fast.train.targets import reference_targets

BASE = dict(preset="tiny", steps=12, batch_size=8, warmup=2, log_every=2, threads=1, retrieval_weight=1.0,
            retrieval_unroll=2, select_every=4, checkpoint_every=4)  # fmt: skip


class Stop(Exception):
    """The process dying part-way (raised from the validation score)."""


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from r4t_fast.data.prepare import load_eval_data

    root = tmp_path_factory.mktemp("ckpt")
    data = load_eval_data(str(sets_jsonl(root / "sets.jsonl", 40)), encoder="hashing:16",
                          cache_dir=str(root / "cache"), progress=False)  # fmt: skip
    return reference_targets(data, k=4, samples=2, seed=0)


def _scores(stop_at: int | None = None):
    calls = iter(range(1, 100))

    def select(model) -> float:
        i = next(calls)
        if i == stop_at:
            raise Stop
        return [0.1, 0.9, 0.2][i - 1]

    return select


def _train(pairs, cfg, **kw):
    return train_diffusion(pairs.cond, pairs.targets, cfg, progress=False, positives=pairs.positives,
                           catalog=pairs.catalog, **kw)  # fmt: skip


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _without_times(log: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in log if "resumed" not in r]


def test_a_stopped_run_resumes_to_the_weights_of_an_unstopped_one(pairs, tmp_path) -> None:
    cfg = DiffusionTrainConfig(**BASE)
    whole, whole_log = _train(pairs, cfg, select_fn=_scores(), checkpoint=tmp_path / "a.pt")
    ck = tmp_path / "b.pt"
    with pytest.raises(Stop):  # dies at step 8's score: the checkpoint of step 4 is on disk
        _train(pairs, cfg, select_fn=_scores(stop_at=2), checkpoint=ck)
    assert torch.load(ck, weights_only=True)["step"] == 4
    # started again with the same settings (threads may differ -- they are not fingerprinted -- but then
    # float reductions may round differently); the first score, 0.1 at step 4, is in the checkpoint
    again = DiffusionTrainConfig(**BASE)
    scores = iter([0.9, 0.2])
    resumed, log = _train(pairs, again, select_fn=lambda m: next(scores), checkpoint=ck)
    assert _same_weights(resumed, whole)  # the best-scoring (step 8) EMA weights, bit for bit
    assert [r for r in log if "resumed" in r][0]["step"] == 4
    assert _without_times(log) == _without_times(whole_log)
    assert torch.load(ck, weights_only=True)["step"] == 12  # kept: the caller saves, then deletes it


def test_foreign_or_corrupt_checkpoints_are_not_resumed(pairs, tmp_path) -> None:
    cfg = DiffusionTrainConfig(**{**BASE, "select_every": 0})
    fresh, _ = _train(pairs, cfg)
    ck = tmp_path / "c.pt"
    ck.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match=r"checkpoint: .*c\.pt is unreadable"):
        model, log = _train(pairs, cfg, checkpoint=ck)
    assert _same_weights(model, fresh) and not any("resumed" in r for r in log)
    other = DiffusionTrainConfig(**{**BASE, "select_every": 0, "lr": 1e-3})  # other settings
    with pytest.warns(UserWarning, match="other settings or training pairs"):
        _, log = _train(pairs, other, checkpoint=ck)
    assert not any("resumed" in r for r in log)
    _, log = _train(pairs, other, checkpoint=ck)  # the checkpoint now is other's: resumed at its end
    assert [r["step"] for r in log if "resumed" in r] == [12]
    more = DiffusionTrainConfig(**{**BASE, "select_every": 0, "lr": 1e-3, "threads": 2, "log_every": 3})
    _, log = _train(pairs, more, checkpoint=ck)  # threads and the log's cadence are not fingerprinted
    assert [r["step"] for r in log if "resumed" in r] == [12]
    with pytest.warns(UserWarning, match="other settings or training pairs"):  # other pairs, same settings
        train_diffusion(pairs.cond, pairs.targets + 1e-3, other, progress=False, positives=pairs.positives,
                        catalog=pairs.catalog, checkpoint=ck)  # fmt: skip


def test_a_saved_model_takes_its_checkpoint_away(pairs, tmp_path) -> None:
    cfg = DiffusionTrainConfig(**BASE)
    out = tmp_path / "m"
    with pytest.raises(Stop):
        _train(pairs, cfg, select_fn=_scores(stop_at=2), out_dir=out)
    assert checkpoint_path(out).is_file() and not out.exists()
    scores = iter([0.9, 0.2])
    _train(pairs, cfg, select_fn=lambda m: next(scores), out_dir=out)
    assert (out / "model.safetensors").is_file() and not checkpoint_path(out).exists()
    off = DiffusionTrainConfig(**{**BASE, "checkpoint_every": 0})
    with pytest.raises(Stop):  # checkpoint_every 0: nothing is written
        _train(pairs, off, select_fn=_scores(stop_at=2), out_dir=tmp_path / "n")
    assert not checkpoint_path(tmp_path / "n").exists()


def test_checkpoint_every_is_checked() -> None:
    with pytest.raises(ValueError, match="checkpoint_every"):
        DiffusionTrainConfig(checkpoint_every=-1)


def test_the_cli_resumes_and_says_so(capsys, monkeypatch, tmp_path) -> None:
    from r4t_fast import cli
    from r4t_fast.train import diffusion

    data = sets_jsonl(tmp_path / "sets.jsonl", 20)
    out = tmp_path / "model"
    argv = ["train-diffusion", "--out", str(out), "--targets", "reference", "--dataset", str(data),
            "--encoder", "hashing:16", "--preset", "tiny", "--steps", "6", "--batch-size", "8",
            "--checkpoint-every", "2", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    real = diffusion.save_trained

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied", str(out))

    monkeypatch.setattr(diffusion, "save_trained", read_only)
    monkeypatch.setattr(cli, "KEEP_AFTER_S", 0.0)  # as a run of more than a minute: its work is kept
    assert cli.main(argv) == 2  # the save fails after the last step: the work is in the checkpoint
    err = capsys.readouterr().err  # one line, naming what was kept: the checkpoint (no model was saved)
    assert "Permission denied" in err and f"(kept {checkpoint_path(out)}: the run had worked" in err
    assert torch.load(checkpoint_path(out), weights_only=True)["step"] == 6
    monkeypatch.setattr(diffusion, "save_trained", real)
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.rstrip().endswith("resumed at step 6")
    assert (out / "model.safetensors").is_file() and not checkpoint_path(out).exists()
