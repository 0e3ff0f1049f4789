"""The shared latency protocol (r4t_fast.eval.latency): parts of a call (encode / generate / rest), the
from-embeddings measurement, and the table's ratios with their spread."""

from __future__ import annotations

import time

import numpy as np
import pytest

from r4t_fast.eval.latency import (
    embedding_latency,
    embedding_latency_interleaved,
    format_ratio,
    latency_table,
    measure_latency,
    measure_latency_interleaved,
    sig2,
    tokens_per_s_agreement,
)


class SlowEncoder:
    dim = 4

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0

    def encode(self, texts, batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        self.calls += 1
        time.sleep(self.seconds)
        return np.ones((len(texts), self.dim), dtype=np.float32)


class FakeMethod:
    """encode the queries (through self.encoder), then `work` seconds of search."""

    def __init__(self, encode_s: float, work_s: float) -> None:
        self.encoder = SlowEncoder(encode_s)
        self.work_s = work_s

    def retrieve(self, texts, k, *, n_candidates: int = 0):
        self.encoder.encode(list(texts))
        time.sleep(self.work_s)
        return [None] * len(texts)


class FakeLLM(FakeMethod):
    """An LLM fan-out: generate (counted in stats) 20 tokens per query in `gen_s` seconds."""

    def __init__(self, gen_s: float) -> None:
        super().__init__(0.001, 0.001)
        self.gen_s = gen_s
        self.lm = object()
        self.batch_size = 1
        self._st = {"generate_s": 0.0, "generated_tokens": 0, "decode_positions": 0}

    @property
    def stats(self):
        return dict(self._st)

    def retrieve(self, texts, k, *, n_candidates: int = 0):
        time.sleep(self.gen_s)
        self._st["generate_s"] += self.gen_s
        self._st["generated_tokens"] += 20 * len(texts)
        self._st["decode_positions"] += 30 * len(texts)  # the batch's longest answer: 30 positions
        return super().retrieve(texts, k)


def test_parts_split_a_call() -> None:
    m = FakeMethod(encode_s=0.02, work_s=0.01)
    _, det = measure_latency(m, ["a", "b", "c"], 5, (1,), calls=3)
    p = det["1"]["parts_ms"]
    assert p["encode"] == pytest.approx(20, rel=0.5)
    assert p["rest"] == pytest.approx(10, rel=0.9)
    assert "generate" not in p
    assert isinstance(m.encoder, SlowEncoder)  # the proxy is gone after the measurement
    llm = FakeLLM(gen_s=0.02)
    _, det = measure_latency(llm, ["a", "b"], 5, (2,), calls=2)
    p = det["2"]["parts_ms"]
    assert p["generate"] == pytest.approx(10, rel=0.5)  # 20 ms per batch of 2
    assert p["tokens_per_s"] == pytest.approx(40 / 0.02)
    assert p["positions_per_s"] == pytest.approx(60 / 0.02)
    assert det["2"]["calls"] == 2


def test_interleaved_calls_alternate_on_the_same_batches() -> None:
    log: list[tuple[str, tuple[str, ...], int]] = []

    class Logged(FakeLLM):
        def __init__(self, name: str, gen_s: float) -> None:
            super().__init__(gen_s)
            self.name = name

        def retrieve(self, texts, k, *, n_candidates: int = 0):
            log.append((self.name, tuple(texts), self.batch_size))
            return super().retrieve(texts, k)

    a, b = Logged("a", 0.002), Logged("b", 0.006)
    out = measure_latency_interleaved({"a": a, "b": b}, ["x", "y", "z"], 5, (2,), calls=3)
    # warm-ups first, then a1 b1 a2 b2 a3 b3, each pair on the same batch, at generation batch 2
    assert [n for n, _, _ in log] == ["a", "b"] * 4
    assert all(log[i][1] == log[i + 1][1] and log[i][2] == 2 for i in range(0, 8, 2))
    assert a.batch_size == 1 and b.batch_size == 1  # restored
    assert out["a"][1]["2"]["calls"] == 3 and out["b"][1]["2"]["calls"] == 3
    assert out["b"][0]["2"] > out["a"][0]["2"]
    assert out["a"][1]["2"]["parts_ms"]["tokens_per_s"] == pytest.approx(40 / 0.002)
    # prior times per method count towards the calls and replace that method's warm-up
    log.clear()
    out = measure_latency_interleaved(
        {"a": a, "b": b}, ["x"], 5, (2,), calls=2, prior_times={"a": {2: [1.0]}}
    )
    assert [n for n, _, _ in log] == ["b", "a", "b", "b"]
    assert out["a"][1]["2"]["reused_calls"] == 1 and out["a"][1]["2"]["calls"] == 2


def test_block_interleaving_times_each_method_in_rounds() -> None:
    log: list[str] = []

    class Logged(FakeMethod):
        def __init__(self, name: str) -> None:
            super().__init__(0.0, 0.0)
            self.name = name

        def retrieve(self, texts, k, *, n_candidates: int = 0):
            log.append(self.name)
            return super().retrieve(texts, k)

    out = measure_latency_interleaved(
        {"a": Logged("a"), "b": Logged("b")}, ["x", "y"], 5, (1,), calls=5, block=2
    )
    # rounds: a warm-up + 2 timed, b warm-up + 2 timed, ..., the last round 1 timed each
    assert log == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3 + ["a"] * 2 + ["b"] * 2
    assert out["a"][1]["1"]["calls"] == 5 and out["b"][1]["1"]["calls"] == 5
    with pytest.raises(ValueError, match="block"):
        measure_latency_interleaved({"a": Logged("a")}, ["x"], 5, (1,), calls=1, block=0)
    log.clear()
    ms = embedding_latency_interleaved({"a": Logged("a"), "b": Logged("b")}, ["x"], 5, (1,), calls=1, block=1)
    assert set(ms) == {"a", "b"} and log == ["a", "a", "b", "b"]


def test_embedding_latency_skips_the_encoder() -> None:
    m = FakeMethod(encode_s=0.05, work_s=0.001)
    texts = ["a", "b", "c", "d"]
    ms_text, _ = measure_latency(m, texts, 5, (2,), calls=3)
    m.encoder.calls = 0
    ms_emb, det = embedding_latency(m, texts, 5, (2,), calls=3)
    assert m.encoder.calls == 1  # once, beforehand, for every query; none in the timed calls
    assert ms_emb["2"] < ms_text["2"] / 5
    assert det["2"]["calls"] == 3
    with pytest.raises(ValueError, match="LLM"):
        embedding_latency(FakeLLM(0.001), texts, 5, (1,), calls=1)


def test_ratios_two_significant_figures_with_spread() -> None:
    assert sig2(1116.3) == "1,100" and sig2(5.23) == "5.2" and sig2(0.01234) == "0.012"
    num = {"median": 600.0, "p25": 500.0, "p75": 700.0}
    den = {"median": 1.0, "p25": 0.9, "p75": 1.1}
    assert format_ratio(num, den) == "600× (450–780)"
    assert format_ratio(None, den) == "—"
    ok = tokens_per_s_agreement({"parts_ms": {"tokens_per_s": 50.0}}, {"parts_ms": {"tokens_per_s": 54.0}})
    bad = tokens_per_s_agreement({"parts_ms": {"tokens_per_s": 19.5}}, {"parts_ms": {"tokens_per_s": 54.5}})
    assert ok["within_10pct"] and not bad["within_10pct"]
    assert tokens_per_s_agreement({}, {"parts_ms": {"tokens_per_s": 1.0}}) is None
    # answers of other lengths: tokens/s differ, the decoded positions/s (padding included) agree
    a = {"parts_ms": {"tokens_per_s": 61.0, "positions_per_s": 80.0}}
    b = {"parts_ms": {"tokens_per_s": 54.7, "positions_per_s": 78.0}}
    both = tokens_per_s_agreement(a, b)
    assert not both["within_10pct"] and both["positions_within_10pct"]
    assert not tokens_per_s_agreement(a, {"parts_ms": {"tokens_per_s": 54.7, "positions_per_s": 50.0}})[
        "positions_within_10pct"
    ]
    row = {"median": 2.0, "p25": 1.5, "p75": 2.5, "calls": 3, "parts_ms": {"encode": 1.0, "rest": 1.0}}
    lines = latency_table(
        {"dense": {"1": row}, "r4t": {"1": dict(row, median=4.0, p25=3.0, p75=5.0)}}, [1], reference="dense"
    )
    assert len(lines) == 4
    assert lines[3].endswith("| 2.0× (1.2–3.3) |")
    assert "1 / — / 1" in lines[2]
