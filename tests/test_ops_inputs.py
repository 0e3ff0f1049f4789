"""Bad input at the kernel level (issue 13, defects 7, 11, 12, 13, 14) and concurrent use of the kernels.

Each test names the defect it pins down. Every refused argument raises ValueError naming the argument.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import r4t_fast
from r4t_fast import ops
from r4t_fast.kernels import _backend
from r4t_fast.kernels import reference as ref

_STEP = dict(sigma=2.0, c_skip=0.1, c_out=0.3, guidance=0.5, h=-0.4, noise_scale=0.2)


def _simd_clones() -> list[str]:
    return [c for c in r4t_fast.build_info()["simd_clones"] if "unsupported" not in c]


# ------------------------------------------------ defect 7: scratch scales with min(k, N)
@pytest.mark.parametrize("k", [10**8, 10**9, 2**62])
def test_knn_huge_k_on_small_catalog_is_refused_cleanly(k):
    q, c = torch.randn(1, 8), torch.randn(50, 8)
    with pytest.raises(ValueError, match=rf"k: {k} exceeds the catalog size N=50, .*; pass k <= 50"):
        ops.knn(q, c, k)


def test_knn_scratch_scales_with_min_k_n():
    # The kernel's heaps hold keff = min(k, N) entries whatever k is.
    assert ops.knn_plan(1, 50, 8, 10**8)["keff"] == 50
    assert ops.knn_plan(4, 10**6, 8, 7)["keff"] == 7
    # A large k that is still allowed: 50 real results, then sentinels, at the cost of the output only.
    q, c = torch.randn(2, 8), torch.randn(50, 8)
    s, i = ops.knn(q, c, 1 << 20)
    assert s.shape == i.shape == (2, 1 << 20)
    assert sorted(i[0, :50].tolist()) == list(range(50)) and bool((i[:, 50:] == -1).all())
    assert bool(torch.isneginf(s[:, 50:]).all())
    ids, _ = ops.ground_sets(torch.randn(1, 3, 8), c, candidates=10**8)  # candidates clamp to N
    assert len(set(ids[0].tolist())) == 3


@pytest.mark.skipif(bool(os.environ.get("R4T_SANITIZE")), reason="ASan's shadow memory inflates RSS")
def test_knn_peak_memory_is_the_output_not_k_times_threads():
    """In a fresh process: a (64, 200000) search over 50 rows allocates ~150 MiB of output; the old kernel
    also allocated threads x 64 x 200000 heap entries (~400 MiB more)."""
    code = """
import resource, torch
from r4t_fast import ops
q, c = torch.randn(64, 8), torch.randn(50, 8)
ops.knn(q[:1], c, 3)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
s, i = ops.knn(q, c, 200000)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grew_mib = float(out.stdout.strip().splitlines()[-1])
    output_mib = 64 * 200000 * 12 / 2**20
    assert grew_mib < output_mib + 64, (grew_mib, output_mib)


# ------------------------------------------------ defect 11: argument types
def test_numpy_integers_are_accepted_everywhere():
    rng = np.random.default_rng(0)
    q, c = rng.standard_normal((3, 8), dtype=np.float32), rng.standard_normal((40, 8), dtype=np.float32)
    base = ops.knn(q, c, 4, num_threads=1)
    for k in (np.int64(4), np.int32(4), np.uint8(4)):
        got = ops.knn(q, c, k, num_threads=np.int64(1))
        np.testing.assert_array_equal(got[1], base[1])
    rows = rng.standard_normal((2, 3, 8), dtype=np.float32)
    a = ops.ground_sets(rows, c, candidates=3)
    b = ops.ground_sets(rows, c, candidates=np.int16(3), num_threads=np.int32(2))
    np.testing.assert_array_equal(a[0], b[0])
    x = torch.randn(2, 5)
    out, _ = ops.edm_step(x, x, sigma=np.float32(2.0), c_skip=np.int64(0), c_out=np.float64(0.5), h=-1)
    want, _ = ref.edm_step(
        x, x, None, None, sigma=2.0, c_skip=0.0, c_out=0.5, guidance=0.0, h=-1.0, noise_scale=0
    )
    assert torch.allclose(out, want)


@pytest.mark.parametrize(
    "call,arg",
    [
        (lambda: ops.knn(torch.zeros(1, 2), torch.ones(3, 2), True), "k"),
        (lambda: ops.knn(torch.zeros(1, 2), torch.ones(3, 2), np.bool_(True)), "k"),
        (lambda: ops.knn(torch.zeros(1, 2), torch.ones(3, 2), "2"), "k"),
        (lambda: ops.knn(torch.zeros(1, 2), torch.ones(3, 2), torch.tensor(2)), "k"),
        (lambda: ops.knn(torch.zeros(1, 2), torch.ones(3, 2), 2, num_threads=True), "num_threads"),
        (lambda: ops.knn(torch.zeros(1, 2), torch.ones(3, 2), 2, num_threads="2"), "num_threads"),
        (lambda: ops.knn(torch.zeros(1, 2), torch.ones(3, 2), 2, num_threads=10**6), "num_threads"),
        (lambda: ops.knn(torch.zeros(1, 2), torch.ones(3, 2), 2, metric=1), "metric"),
        (lambda: ops.knn(torch.zeros(1, 2), torch.ones(3, 2), 2, metric=["ip"]), "metric"),
        (lambda: ops.knn(torch.zeros(1, 2), torch.ones(3, 2), 2, check_finite="no"), "check_finite"),
        (lambda: ops.ground_sets(torch.zeros(1, 2, 2), torch.ones(3, 2), candidates=False), "candidates"),
        (lambda: ops.ground_sets(torch.zeros(1, 2, 2), torch.ones(3, 2), candidates=1.5), "candidates"),
        (
            lambda: ops.ground(
                torch.zeros(1, 1, 1), torch.zeros(1, 1, 1, dtype=torch.int64), higher_is_better=1
            ),
            "higher_is_better",
        ),
        (lambda: ops.set_stats(torch.zeros(1, 2, 2), num_threads=0), "num_threads"),
        (
            lambda: ops.edm_step(
                torch.zeros(2), torch.zeros(2), sigma=1, c_skip=0, c_out=1, h=-0.1, guidance="0.1"
            ),
            "guidance",
        ),
        (
            lambda: ops.edm_step(torch.zeros(2), torch.zeros(2), sigma=True, c_skip=0, c_out=1, h=-0.1),
            "sigma",
        ),
        (lambda: ops.edm_step(torch.zeros(2), torch.zeros(2), sigma=1, c_skip=0, c_out=1, h=1j), "h"),
        (
            lambda: ops.edm_step(torch.zeros(2), np.zeros(2, np.float32), sigma=1, c_skip=0, c_out=1, h=0),
            "f_cond",
        ),
    ],
)
def test_bad_argument_types_name_the_argument(call, arg):
    with pytest.raises(ValueError, match=rf"^{arg}: "):
        call()


def test_type_errors_are_also_value_errors():
    with pytest.raises(TypeError, match="queries: expected a torch.Tensor"):
        ops.knn([[1.0]], torch.ones(2, 1), 1)
    with pytest.raises(ValueError, match="queries: expected a torch.Tensor"):
        ops.knn([[1.0]], torch.ones(2, 1), 1)
    with pytest.raises(ValueError, match="catalog: unsupported numpy dtype <U1"):
        ops.knn(np.zeros((1, 1), np.float32), np.array([["a"]]), 1)


def test_tensors_on_unsupported_devices_are_refused():
    with pytest.raises(ValueError, match="queries: expected a CPU or CUDA tensor, got one on meta"):
        ops.knn(torch.empty(2, 3, device="meta"), torch.ones(4, 3), 1)
    with pytest.raises(ValueError, match="x: expected a CPU or CUDA tensor"):
        ops.edm_step(
            torch.empty(3, device="meta"), torch.empty(3, device="meta"), sigma=1, c_skip=0, c_out=1, h=0
        )
    with pytest.raises(ValueError, match="catalog: expected a dense"):
        ops.knn(torch.ones(1, 3), torch.eye(3).to_sparse(), 1)


# ------------------------------------------------ defect 12: negative strides and odd numpy views
def test_negative_stride_numpy_views_are_copied_not_refused():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((6, 16), dtype=np.float32)
    c = rng.standard_normal((50, 16), dtype=np.float32)
    want_s, want_i = ops.knn(np.ascontiguousarray(q[::-1]), np.ascontiguousarray(c[::-1, ::-1]), 5)
    got_s, got_i = ops.knn(q[::-1], c[::-1, ::-1], 5)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_s, want_s)
    rows = rng.standard_normal((2, 3, 16), dtype=np.float32)
    a = ops.ground_sets(rows[::-1], c[::-1])
    b = ops.ground_sets(np.ascontiguousarray(rows[::-1]), np.ascontiguousarray(c[::-1]))
    np.testing.assert_array_equal(a[0], b[0])
    cs = np.sort(rng.standard_normal((1, 2, 3)).astype(np.float32), axis=2)[:, :, ::-1]
    ci = np.arange(6, dtype=np.int64).reshape(1, 2, 3)[:, :, ::-1]
    ids, _ = ops.ground(cs, ci)
    assert ids.shape == (1, 2)
    x = rng.standard_normal((2, 4, 8), dtype=np.float32)
    v1, _ = ops.set_stats(x[:, ::-1], np.array([4, 3], np.int64)[::-1])
    v2, _ = ops.set_stats(np.ascontiguousarray(x[:, ::-1]), np.array([3, 4], np.int64))
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    mask = np.zeros(50, bool)
    mask[::3] = True
    s1, i1 = ops.knn(q, c, 4, allowed=mask[::-1])
    s2, i2 = ops.knn(q, c, 4, allowed=np.ascontiguousarray(mask[::-1]))
    np.testing.assert_array_equal(i1, i2)


def test_big_endian_read_only_and_misaligned_numpy_inputs():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((3, 8), dtype=np.float32)
    c = rng.standard_normal((30, 8), dtype=np.float32)
    want = ops.knn(q, c, 4)
    big = c.astype(">f4")
    ro = c.copy()
    ro.flags.writeable = False
    buf = np.zeros(30 * 8 * 4 + 1, np.uint8)
    mis = np.frombuffer(buf.data, dtype=np.float32, count=30 * 8, offset=1).reshape(30, 8)
    mis[...] = c
    for variant in (big, ro, mis):
        got = ops.knn(q, variant, 4)
        np.testing.assert_array_equal(got[1], want[1])


# ------------------------------------------------ defect 13: edm_step scalars and aliasing
@pytest.mark.parametrize("arg", ["sigma", "c_skip", "c_out", "guidance", "h", "noise_scale"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, None, "1"])
def test_edm_step_validates_every_scalar(arg, bad):
    x = torch.zeros(3, 4)
    kw = dict(_STEP)
    kw[arg] = bad
    with pytest.raises(ValueError, match=rf"^{arg}: expected a (finite|real) number"):
        ops.edm_step(x, x, x, x, **kw)


def test_edm_step_refuses_partial_overlaps_and_shared_outputs():
    base = torch.randn(13)
    x = base[:12].view(3, 4)
    shifted = base[1:13].view(3, 4)  # same shape, contiguous, one element off
    f = torch.randn(3, 4)
    with pytest.raises(ValueError, match="out: partially overlaps x"):
        ops.edm_step(x, f, f, f, out=shifted, **_STEP)
    with pytest.raises(ValueError, match="denoised: partially overlaps x"):
        ops.edm_step(x, f, f, f, denoised=shifted, **_STEP)
    out = torch.empty(3, 4)
    with pytest.raises(ValueError, match="denoised: must not share memory with out"):
        ops.edm_step(x, f, f, f, out=out, denoised=out, **_STEP)
    with pytest.raises(ValueError, match="denoised: must not share memory with out"):
        ops.edm_step(x, f, f, f, out=x, denoised=x, **_STEP)


@pytest.mark.parametrize("out_is,den_is", [("x", None), ("f_cond", "x"), ("noise", "f_uncond"), (None, "x")])
def test_edm_step_exact_aliasing_is_correct(out_is, den_is, rng):
    t = {n: torch.randn(4, 6, generator=rng) for n in ("x", "f_cond", "f_uncond", "noise")}
    want_x, want_d = ref.edm_step(*(t[n].clone() for n in t), **_STEP)
    out = t[out_is] if out_is else None
    den = t[den_is] if den_is else torch.empty(4, 6)
    got_x, got_d = ops.edm_step(
        t["x"], t["f_cond"], t["f_uncond"], t["noise"], out=out, denoised=den, **_STEP
    )
    assert torch.allclose(got_x, want_x, atol=1e-6) and torch.allclose(got_d, want_d, atol=1e-6)


# ------------------------------------------------ defect 14: overflowing scores keep real ids
def _assert_ranked(scores: torch.Tensor, ids: torch.Tensor, higher_is_better: bool = True) -> None:
    """Each row is ordered by the documented total order: best score first, NaN last, ties by id."""
    for s_row, i_row in zip(scores.tolist(), ids.tolist(), strict=True):
        keys = [
            (1, 0.0, i) if math.isnan(v) else (0, -v if higher_is_better else v, i)
            for v, i in zip(s_row, i_row, strict=True)
        ]
        assert keys == sorted(keys), (s_row, i_row)


@pytest.mark.parametrize("B", [1, 20])  # direct and GEMM paths
@pytest.mark.parametrize("simd", _simd_clones())
def test_overflowing_scores_keep_real_ids(B, simd):
    # Finite inputs whose float32 scores overflow. Row 2's dot product is +inf - inf: NaN when the products
    # are rounded before the sum, +inf when an FMA absorbs the second product; either is a valid float32
    # result, and either way the row is a real result, ranked consistently with its score.
    big = 3e38
    c = torch.tensor([[big, big], [-big, -big], [big, -big], [1.0, -1.0], [-big, -big]])
    q = torch.full((B, 2), big)
    with _backend.simd(simd):
        s, i = ops.knn(q, c, 5)  # IP scores: +inf, -inf, NaN or +inf, 0, -inf
        ls, li = ops.knn(q, c, 5, metric="l2")  # L2: 0, then +inf for every other row
        ks, ki = ops.knn(q, c, 3)  # k < N: the three best are real too
    for b in range(B):
        assert sorted(i[b].tolist()) == [0, 1, 2, 3, 4]
        row = dict(zip(i[b].tolist(), s[b].tolist(), strict=True))
        assert row[0] == math.inf and row[3] == 0.0 and row[1] == row[4] == -math.inf
        assert math.isnan(row[2]) or row[2] == math.inf
        assert li[b].tolist() == [0, 1, 2, 3, 4]
        assert ls[b, 0] == 0.0 and bool(torch.isposinf(ls[b, 1:]).all())
        assert bool((ki[b] >= 0).all()) and ki[b].tolist() == i[b, :3].tolist()
    _assert_ranked(s, i)
    _assert_ranked(ls, li, higher_is_better=False)
    ids, scores = ops.ground_sets(torch.full((1, 5, 2), big), c)
    assert sorted(ids[0].tolist()) == [0, 1, 2, 3, 4]


def test_k_equal_n_returns_every_row_even_when_all_scores_are_minus_inf():
    c = torch.full((7, 3), -3e38)
    s, i = ops.knn(torch.full((2, 3), 3e38), c, 7)
    assert i.tolist() == [list(range(7))] * 2 and bool(torch.isneginf(s).all())


# ------------------------------------------------ concurrency: GIL released, 8 threads agree
def _jobs(seed: int):
    g = torch.Generator().manual_seed(seed)
    c = torch.nn.functional.normalize(torch.randn(3000, 32, generator=g), dim=1)
    q = torch.randn(40, 32, generator=g)
    rows = torch.randn(6, 5, 32, generator=g)
    x, f = torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g)
    return [
        lambda: ops.knn(q, c, 7),
        lambda: ops.knn(q[:3], c, 7, metric="l2"),
        lambda: ops.ground_sets(rows, c),
        lambda: ops.set_stats(rows),
        lambda: ops.edm_step(x, f, sigma=1.5, c_skip=0.2, c_out=0.7, h=-0.3),
    ]


def test_concurrent_calls_from_8_threads_equal_sequential():
    jobs = [job for seed in range(8) for job in _jobs(seed)]
    want = [job() for job in jobs]
    mismatches: list = []
    errors: list = []
    barrier = threading.Barrier(8)

    def same(a, b) -> bool:
        return all(x is None or torch.equal(x, y) for x, y in zip(a, b, strict=True))

    def worker(t: int) -> None:
        try:
            barrier.wait()  # all 8 threads call the kernels at once
            for rep in range(3):
                for j in range(t, len(jobs), 8):
                    if not same(jobs[j](), want[j]):
                        mismatches.append((t, rep, j))
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert not mismatches, mismatches


def test_kernels_release_the_gil():
    """While one thread is inside a long knn call, another keeps running Python code."""
    c = torch.randn(200_000, 64)
    q = torch.randn(256, 64)
    done = threading.Event()

    def work():
        ops.knn(q, c, 5, check_finite=False, num_threads=1)
        done.set()

    t = threading.Thread(target=work)
    start = time.perf_counter()
    t.start()
    ticks = 0
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    t.join()
    elapsed = time.perf_counter() - start
    assert elapsed > 0.02  # the call really took a while (else the test proves nothing)
    assert ticks >= 5, f"main thread ran {ticks} times in {elapsed:.3f} s: the GIL was held"


# ------------------------------------------------ CUDA: the tensors' device, the caller's workspace
@pytest.mark.cuda
def test_cuda_knn_workspace_comes_from_torch_allocator():
    """The kNN scratch is a torch allocation on the current stream (visible to torch's allocator stats)
    and is returned to the cache after the call, not a private cudaMallocAsync."""
    q = torch.randn(64, 128, device="cuda")
    c = torch.randn(100_000, 128, device="cuda")
    ops.knn(q, c, 10)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    lib = _backend.lib()
    need = lib.knn_cuda_workspace_bytes(0, 0, 64, 100_000, 128, 10, torch.cuda.current_device())
    s, i = ops.knn(q, c, 10)
    torch.cuda.synchronize()
    outputs = s.numel() * 4 + i.numel() * 8
    assert need > 0 and torch.cuda.max_memory_allocated() >= base + need
    assert torch.cuda.memory_allocated() <= base + outputs + 1024
    rs, ri = ref.knn(q.cpu(), c.cpu(), 10)
    assert torch.allclose(s.cpu(), rs, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_calls_run_on_the_tensors_device():
    g = torch.Generator().manual_seed(0)
    q, c = (
        torch.randint(-3, 4, (5, 32), generator=g).float(),
        torch.randint(-3, 4, (400, 32), generator=g).float(),
    )
    want = ref.knn(q, c, 7)
    x, f = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    want_x, _ = ref.edm_step(
        x, f, None, None, sigma=1.0, c_skip=0.2, c_out=0.5, guidance=0.0, h=-0.2, noise_scale=0
    )
    with torch.cuda.device(0):  # current device 0, tensors on device 1
        s, i = ops.knn(q.to("cuda:1"), c.to("cuda:1"), 7)
        ids, _ = ops.ground_sets(q.reshape(1, 5, 32).to("cuda:1"), c.to("cuda:1"))
        v, _ = ops.set_stats(q.reshape(1, 5, 32).to("cuda:1"))
        out, _ = ops.edm_step(x.to("cuda:1"), f.to("cuda:1"), sigma=1.0, c_skip=0.2, c_out=0.5, h=-0.2)
        assert torch.cuda.current_device() == 0  # restored
    assert s.device.index == 1 and torch.equal(i.cpu(), want[1]) and torch.equal(s.cpu(), want[0])
    assert torch.equal(ids.cpu(), ops.ground_sets(q.reshape(1, 5, 32), c)[0])
    assert torch.allclose(v.cpu(), ops.set_stats(q.reshape(1, 5, 32))[0], rtol=1e-5)
    assert torch.allclose(out.cpu(), want_x, atol=1e-6)


@pytest.mark.cuda
def test_cuda_knn_small_batches_and_edges_match_cpu():
    """Query tiles sized for B = 1 / 8 / 16; -inf and overflowing scores; k > N sentinels; like the CPU."""
    g = torch.Generator().manual_seed(3)
    c = torch.randint(-3, 4, (3000, 64), generator=g).float()
    for B in (1, 2, 8, 9, 16, 17, 40):
        q = torch.randint(-3, 4, (B, 64), generator=g).float()
        for metric in ("ip", "l2"):
            want = ops.knn(q, c, 33, metric=metric)
            got = ops.knn(q.cuda(), c.cuda(), 33, metric=metric)
            assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[0].cpu(), want[0])
    big = torch.full((6, 2), -3e38)
    s, i = ops.knn(torch.full((2, 2), 3e38).cuda(), big.cuda(), 6)
    assert i.cpu().tolist() == [list(range(6))] * 2 and bool(torch.isneginf(s).all())
    s, i = ops.knn(torch.ones(2, 2).cuda(), torch.eye(2).cuda(), 5)
    assert bool((i[:, 2:] == -1).all()) and bool(torch.isneginf(s[:, 2:]).all())
