// Exact fused top-k (inner product or L2) on the CPU: the driver. The per-ISA compute bodies live in
// knn_impl.h (GEMM path and direct path; see its header comment), compiled here once per instruction set:
// x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA + F16C) and the baseline, chosen at runtime from the CPU's
// features (R4T_SIMD=baseline|x86-64-v3|x86-64-v4 in the environment, or set_cpu_simd, overrides).
//
// Plan of one call (knn_cpu_plan):
//   keff      = min(k, number of allowed rows): heaps and merge buffers scale with keff, never with k; the
//               output slots keff..k-1 are written as sentinels (id -1, score -inf for IP / +inf for L2).
//   threads   = min(requested, allowed rows / 256, max(B, 8) * allowed * d / 4M): small searches stay
//               on the calling thread (waking a team costs more than the work); a single query over a
//               catalog of >= 1M floats gets a second thread (it is memory-bound).
//   path      = direct when B = 1, small-B when 2 <= B < W (the vector width in floats), else GEMM.
//               (Measured on a 2-core AMD EPYC, AVX-512, 18,800 x 384, one thread, thread CPU time: B = 11
//               3.2-3.4 ms small-B vs 4.2-4.8 ms direct; B = 2-4 1.1-1.7 vs 2.2-3.3 ms; noisy, shared
//               machine. R4T_KNN_SMALL=0 falls back to the direct path for comparisons.)
//   chunking  = queries in chunks of at most 4096, fewer when T * chunk * keff heap entries would
//               exceed 256 MiB.
//   rows      = each thread owns a contiguous range of catalog rows holding an equal share of the
//               allowed rows; per-thread heaps are merged per query at the end.
// Scores: IP = <q, c>; L2 = sum((q - c)^2) accumulated directly (no norm expansion, so no cancellation for
// near-identical vectors; the GEMM path then costs two vector operations per multiply-add). The CUDA
// kernel uses the same formulas. Ties and non-finite scores: see knn_detail.h (Entry).
// No exception is thrown inside a parallel region: all scratch is allocated before the regions.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <ctime>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define R4T_X86_DISPATCH 1
#include <immintrin.h>
#endif

#include "common.h"
#include "cpu/knn_detail.h"
#include "kernels.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"                // vector types only cross always_inline boundaries
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // false positive in _mm512_cvtph_ps (GCC 12)
#endif

namespace r4t {

#if defined(R4T_X86_DISPATCH)
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define R4T_ISA_NS isa_v4
#define R4T_ISA_NAME "x86-64-v4"
#define R4T_W 16
#define R4T_NR 8
#define R4T_NVMAX 3
#define R4T_DR 8
#define R4T_ISA_LEVEL 4
#include "cpu/knn_impl.h"
#undef R4T_ISA_NS
#undef R4T_ISA_NAME
#undef R4T_W
#undef R4T_NR
#undef R4T_NVMAX
#undef R4T_DR
#undef R4T_ISA_LEVEL
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define R4T_ISA_NS isa_v3
#define R4T_ISA_NAME "x86-64-v3"
#define R4T_W 8
#define R4T_NR 6
#define R4T_NVMAX 2
#define R4T_DR 4
#define R4T_ISA_LEVEL 3
#include "cpu/knn_impl.h"
#undef R4T_ISA_NS
#undef R4T_ISA_NAME
#undef R4T_W
#undef R4T_NR
#undef R4T_NVMAX
#undef R4T_DR
#undef R4T_ISA_LEVEL
#pragma GCC pop_options
#endif

#define R4T_ISA_NS isa_base
#define R4T_ISA_NAME "baseline"
#define R4T_W 4
#define R4T_NR 6
#define R4T_NVMAX 2
#define R4T_DR 4
#define R4T_ISA_LEVEL 0
#include "cpu/knn_impl.h"
#undef R4T_ISA_NS
#undef R4T_ISA_NAME
#undef R4T_W
#undef R4T_NR
#undef R4T_NVMAX
#undef R4T_DR
#undef R4T_ISA_LEVEL

namespace {

using knn_detail::Entry;
using knn_detail::IsaInfo;
using knn_detail::Job;
using knn_detail::QBlock;
using knn_detail::Slice;

constexpr int64_t kQueryChunk = 4096;
constexpr int64_t kHeapBudgetBytes = int64_t(1) << 28;  // per query chunk, all threads
constexpr int64_t kTileBytes = 1 << 20;                 // GEMM path: catalog tile per thread (L2)
constexpr int64_t kQueryBlockL1Bytes = 32 * 1024;       // K-blocking: a query block's feature slice
constexpr int64_t kWorkPerThread = int64_t(1) << 22;    // multiply-adds per extra thread
// The direct and small-B paths prefetch the rows ahead for catalogs larger than this (half a 32 MiB L3).
// benchmarks/results/knn_prefetch_cpu_18800.md (2-core EPYC, alternating processes, 11 rounds): 18,800 x 384
// fp32 (29 MB) at B = 11 1.26 vs 2.37 ms with / without, at B = 1 0.43 vs 0.51 ms; knn_prefetch_cpu.md
// (5 rounds): B = 1 0.38 vs 0.56, B = 11 1.64 vs 1.68, 6,000 x 384 (9 MB) at B = 1 0.10 vs 0.08, slower
// with it. Noisy: an earlier 5-round run (not kept) had 18,800 at B = 1 the other way, 0.31 vs 0.26.
constexpr int64_t kPrefetchBytes = int64_t(16) << 20;

// Compiled ISAs, best first, and whether this CPU runs them.
struct IsaEntry {
  IsaInfo info;
  const char* description;
  bool supported;
};

std::vector<IsaEntry> make_isas() {
  std::vector<IsaEntry> v;
#if defined(R4T_X86_DISPATCH)
  __builtin_cpu_init();
  v.push_back(
      {isa_v4::info(), "x86-64-v4 (AVX-512F/BW/DQ/VL, FMA, F16C)", __builtin_cpu_supports("x86-64-v4") != 0});
  v.push_back({isa_v3::info(), "x86-64-v3 (AVX2, FMA, F16C)", __builtin_cpu_supports("x86-64-v3") != 0});
  v.push_back({isa_base::info(), "x86-64 (SSE2 baseline)", true});
#else
  v.push_back({isa_base::info(), "portable (128-bit vectors, compiler lowering)", true});
#endif
  return v;
}

const std::vector<IsaEntry>& isas() {
  static const std::vector<IsaEntry> v = make_isas();
  return v;
}

int detected_isa() {
  static const int best = []() {
    const auto& v = isas();
    const char* env = std::getenv("R4T_SIMD");
    if (env != nullptr && *env != '\0') {
      for (size_t i = 0; i < v.size(); ++i) {
        if (v[i].supported && std::string(env) == v[i].info.name) return static_cast<int>(i);
      }
    }
    for (size_t i = 0; i < v.size(); ++i) {
      if (v[i].supported) return static_cast<int>(i);
    }
    return static_cast<int>(v.size()) - 1;
  }();
  return best;
}

std::atomic<int> g_isa_override{-1};

// The small-B kernel (knn_impl.h) for 2 <= B < W; R4T_KNN_SMALL=0 in the environment falls back to the
// direct path (for comparisons; read once).
bool small_enabled() {
  static const bool on = []() {
    const char* env = std::getenv("R4T_KNN_SMALL");
    return env == nullptr || std::string(env) != "0";
  }();
  return on;
}

// Software prefetch in the direct / small-B paths (kPrefetchBytes); R4T_KNN_PREFETCH=0 / 1 in the
// environment forces it off / on (for comparisons; read once).
int prefetch_override() {
  static const int v = []() {
    const char* env = std::getenv("R4T_KNN_PREFETCH");
    if (env == nullptr) return -1;
    const std::string s(env);
    return s == "0" ? 0 : s == "1" ? 1 : -1;
  }();
  return v;
}

const IsaEntry& active() {
  const int o = g_isa_override.load(std::memory_order_relaxed);
  return isas()[static_cast<size_t>(o >= 0 ? o : detected_isa())];
}

int64_t count_range(const uint8_t* allowed, int64_t a, int64_t b) {
  int64_t c = 0;
  for (int64_t i = a; i < b; ++i) c += allowed[i] != 0;  // vectorised by the compiler
  return c;
}

int64_t count_allowed(const uint8_t* allowed, int64_t N) {
  return allowed == nullptr ? N : count_range(allowed, 0, N);
}

// Row ranges [b[t], b[t+1]) holding about equal numbers of allowed rows: counts per block of 4096 rows,
// then a row-by-row walk only inside the block where a boundary falls.
std::vector<int64_t> split_rows(const uint8_t* allowed, int64_t N, int64_t n_allowed, int T) {
  std::vector<int64_t> b(static_cast<size_t>(T) + 1, N);
  b[0] = 0;
  if (allowed == nullptr) {
    const int64_t per = (N + T - 1) / T;
    for (int t = 1; t < T; ++t) b[t] = std::min(N, t * per);
    return b;
  }
  constexpr int64_t kBlock = 4096;
  int64_t seen = 0;
  int t = 1;
  for (int64_t b0 = 0; b0 < N && t < T; b0 += kBlock) {
    const int64_t b1 = std::min(N, b0 + kBlock);
    const int64_t c = count_range(allowed, b0, b1);
    if ((seen + c) * T < n_allowed * t) {  // no boundary in this block
      seen += c;
      continue;
    }
    for (int64_t i = b0; i < b1 && t < T; ++i) {
      seen += allowed[i] != 0;
      while (t < T && seen * T >= n_allowed * t) b[t++] = i + 1;
    }
  }
  return b;
}

}  // namespace

KnnPlan knn_cpu_plan(const KnnParams& p) {
  check(p.B >= 0 && p.N >= 0 && p.d > 0 && p.k > 0,
        "knn: invalid sizes (B=" + std::to_string(p.B) + ", N=" + std::to_string(p.N) +
            ", d=" + std::to_string(p.d) + ", k=" + std::to_string(p.k) + ")");
  const IsaEntry& isa = active();
  const IsaInfo& I = isa.info;
  KnnPlan plan;
  plan.isa = I.name;
  plan.n_allowed = count_allowed(p.allowed, p.N);
  plan.keff = std::min(p.k, plan.n_allowed);
  // Work: multiply-adds, but at least the catalog's floats read: a single query is memory-bound, and a
  // second thread doubles its bandwidth once the catalog is a few MiB.
  const int64_t work = std::max(p.B, int64_t{8}) * plan.n_allowed * p.d;
  plan.threads = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>({max_threads(p.num_threads), plan.n_allowed / 256, work / kWorkPerThread})));
  plan.direct = p.B < I.W;
  plan.small = plan.direct && p.B >= 2 && small_enabled();
  plan.coarse = knn_coarse_applies(p);
  const int64_t cat_bytes = p.N * p.d * (p.catalog_dtype == DType::F16 ? 2 : 4);
  const int force = prefetch_override();
  plan.prefetch = plan.direct && (force >= 0 ? force == 1 : cat_bytes > kPrefetchBytes);
  const int64_t lanes = int64_t(I.NVMAX) * I.W;
  int64_t chunk = kQueryChunk;
  if (plan.keff > 0) {
    chunk = std::min(chunk, kHeapBudgetBytes / (int64_t(sizeof(Entry)) * plan.threads * plan.keff));
  }
  chunk = std::max<int64_t>(chunk, plan.direct ? 1 : I.W);
  if (!plan.direct) chunk = chunk >= lanes ? chunk / lanes * lanes : chunk / I.W * I.W;
  plan.query_chunk = std::min(chunk, std::max<int64_t>(p.B, 1));
  plan.tile_rows = std::max<int64_t>(I.NR, kTileBytes / (4 * p.d) / I.NR * I.NR);
  const int64_t nkb = std::max<int64_t>(1, (lanes * 4 * p.d + kQueryBlockL1Bytes - 1) / kQueryBlockL1Bytes);
  plan.kc = plan.direct ? p.d : (p.d + nkb - 1) / nkb;
  return plan;
}

void knn_cpu(const KnnParams& p) {
  check(p.queries != nullptr || p.B == 0, "knn: queries is null");
  check(p.metric == Metric::IP || p.metric == Metric::L2,
        "metric: expected IP or L2, got " + std::to_string(static_cast<int>(p.metric)));
  check(p.catalog_dtype == DType::F32 || p.catalog_dtype == DType::F16,
        "catalog_dtype: expected F32 or F16, got " + std::to_string(static_cast<int>(p.catalog_dtype)));
  const KnnPlan plan = knn_cpu_plan(p);
  if (p.B == 0) return;
  check(p.out_scores != nullptr && p.out_ids != nullptr, "knn: null output pointer");
  check(p.N == 0 || p.catalog != nullptr, "knn: catalog is null");
  const int64_t B = p.B, N = p.N, d = p.d, k = p.k, keff = plan.keff;
  const bool l2 = p.metric == Metric::L2;
  if (keff == 0) {  // nothing to search (every row filtered out)
    for (int64_t i = 0; i < B; ++i) knn_detail::write_result(nullptr, 0, k, l2, p.out_scores + i * k, p.out_ids + i * k);
    return;
  }
  if (plan.coarse) {
    knn_cpu_coarse(p, plan);
    return;
  }
  const IsaInfo& I = active().info;
  const int T = plan.threads;
  const int64_t W = I.W, lanes = int64_t(I.NVMAX) * W;
  const int64_t dpad = (d + W - 1) / W * W;
  const int64_t chunk = plan.query_chunk;
  const int64_t chunk_pad = (chunk + lanes - 1) / lanes * lanes + lanes;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();

  // Scratch, all allocated here (never inside a parallel region).
  const int64_t tile_rows = plan.direct ? I.DR : plan.tile_rows;
  const std::vector<int64_t> bounds = split_rows(p.allowed, N, plan.n_allowed, T);
  std::vector<Entry> heaps(static_cast<size_t>(T * chunk * keff));
  std::vector<float> thr(static_cast<size_t>(T * chunk_pad));
  std::vector<int64_t> ids(static_cast<size_t>(T * (tile_rows + I.NR)));
  std::vector<const float*> ptrs(static_cast<size_t>(T * (tile_rows + I.NR)));
  std::vector<float> tile(p.catalog_dtype == DType::F16 ? static_cast<size_t>(T * tile_rows * dpad) : 0);
  std::vector<float> cbuf(plan.direct || plan.kc == d ? 0
                                                      : static_cast<size_t>(T * (tile_rows + I.NR) * lanes));
  std::vector<float> zero(static_cast<size_t>(dpad), 0.f);
  std::vector<float> qbuf(static_cast<size_t>(plan.direct ? chunk * dpad : chunk_pad * d));
  std::vector<QBlock> blocks;
  const int merge_threads = max_threads(p.num_threads);
  std::vector<Entry> merge(static_cast<size_t>(merge_threads) * T * keff);
  std::vector<Slice> slices(static_cast<size_t>(T));

  Job J;
  J.cat = p.catalog;
  J.cs = p.c_stride;
  J.f16 = p.catalog_dtype == DType::F16;
  J.l2 = l2;
  J.allowed = p.allowed;
  J.d = d;
  J.dpad = dpad;
  J.keff = keff;
  J.direct = plan.direct;
  J.prefetch = plan.prefetch;
  J.tile_rows = tile_rows;
  J.kc = plan.kc;

  for (int64_t qc0 = 0; qc0 < B; qc0 += chunk) {
    const int64_t nq = std::min(chunk, B - qc0);
    J.nq = nq;
    J.small = plan.small && nq >= 2;
    int64_t nq_pad = nq;
    if (plan.direct) {
      for (int64_t i = 0; i < nq; ++i) {
        const float* src = p.queries + (qc0 + i) * p.q_stride;
        float* dst = qbuf.data() + i * dpad;
        std::copy(src, src + d, dst);
        std::fill(dst + d, dst + dpad, 0.f);
      }
      J.qrow = qbuf.data();
    } else {
      // Query vectors spread evenly over the fewest blocks (B = 64 on v4: 2 + 2 vectors, not 3 + 1; the
      // 1-vector micro-tile is the least efficient).
      blocks.clear();
      int64_t off = 0;
      const int64_t nvec = (nq + W - 1) / W, nblk = (nvec + I.NVMAX - 1) / I.NVMAX;
      for (int64_t bi = 0, q0 = 0; bi < nblk; ++bi) {
        const int nv = static_cast<int>(nvec / nblk + (bi < nvec % nblk ? 1 : 0));
        const int64_t nb = std::min<int64_t>(nv * W, nq - q0);
        blocks.push_back({q0, nb, nv, off});
        const int64_t bl = nv * W;
        float* dst = qbuf.data() + off;
        for (int64_t f = 0; f < d; ++f) {
          for (int64_t l = 0; l < bl; ++l)
            dst[f * bl + l] = l < nb ? p.queries[(qc0 + q0 + l) * p.q_stride + f] : 0.f;
        }
        off += bl * d;
        nq_pad = q0 + bl;
        q0 += nb;
      }
      J.qT = qbuf.data();
      J.blocks = blocks.data();
      J.nblocks = static_cast<int>(blocks.size());
    }
    for (int t = 0; t < T; ++t) {
      Slice& S = slices[static_cast<size_t>(t)];
      S.n0 = bounds[static_cast<size_t>(t)];
      S.n1 = bounds[static_cast<size_t>(t) + 1];
      S.heaps = heaps.data() + t * chunk * keff;
      S.thr = thr.data() + t * chunk_pad;
      S.ids = ids.data() + t * (tile_rows + I.NR);
      S.ptrs = ptrs.data() + t * (tile_rows + I.NR);
      S.tile = tile.empty() ? nullptr : tile.data() + t * tile_rows * dpad;
      S.cbuf = cbuf.empty() ? nullptr : cbuf.data() + t * (tile_rows + I.NR) * lanes;
      S.zero = zero.data();
      std::fill(S.heaps, S.heaps + nq * keff, Entry{nan, -1});
      std::fill(S.thr, S.thr + nq, nan);
      std::fill(S.thr + nq, S.thr + std::max(nq, nq_pad) + W, inf);
    }

#if defined(R4T_WITH_OPENMP)
#pragma omp parallel num_threads(T) if (T > 1)
#endif
    {
      const int tid = thread_num();
      const Slice& S = slices[static_cast<size_t>(tid)];
      if (S.n0 < S.n1) I.worker(J, S);
    }

    // Merge the per-thread heaps of each query; write keff sorted results, then the sentinels.
#if defined(R4T_WITH_OPENMP)
#pragma omp parallel for num_threads(merge_threads) schedule(static) if (nq * T * keff > (1 << 16))
#endif
    for (int64_t i = 0; i < nq; ++i) {
      Entry* all = merge.data() + static_cast<size_t>(thread_num()) * T * keff;
      for (int t = 0; t < T; ++t) {
        const Entry* h = slices[static_cast<size_t>(t)].heaps + i * keff;
        std::copy(h, h + keff, all + t * keff);
      }
      std::partial_sort(all, all + keff, all + T * keff, knn_detail::better);
      knn_detail::write_result(all, keff, k, l2, p.out_scores + (qc0 + i) * k, p.out_ids + (qc0 + i) * k);
    }
  }
}

const char* cpu_simd_level() { return active().description; }

std::vector<std::string> cpu_simd_clones() {
  std::vector<std::string> out;
  for (const auto& e : isas())
    out.push_back(std::string(e.info.name) + (e.supported ? "" : " (unsupported here)"));
  return out;
}

void set_cpu_simd(const std::string& name) {
  if (name.empty() || name == "auto") {
    g_isa_override.store(-1);
    return;
  }
  const auto& v = isas();
  std::string valid;
  for (size_t i = 0; i < v.size(); ++i) {
    if (name == v[i].info.name) {
      check(v[i].supported, std::string("simd: this CPU does not support ") + name);
      g_isa_override.store(static_cast<int>(i));
      return;
    }
    valid += std::string(valid.empty() ? "" : ", ") + v[i].info.name;
  }
  throw ValueError("simd: expected 'auto' or one of " + valid + ", got '" + name + "'");
}

namespace {
double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}
}  // namespace

double cpu_peak_flops(int num_threads, double seconds) {
  // Each thread runs 24 independent FMA chains and is timed on its own CPU clock, so the rate is what a
  // core sustains while it runs (time-slicing on a shared machine does not lower it); the machine's
  // peak is the sum over the threads.
  const IsaInfo& I = active().info;
  const int T = max_threads(num_threads);
  volatile double sink = 0.0;
  int64_t iters = 1 << 16;  // calibrate on this thread
  for (;;) {
    const double t0 = thread_cpu_seconds();
    sink = sink + I.fma_loop(iters);
    const double dt = thread_cpu_seconds() - t0;
    if (dt > 0.02 || iters > (int64_t(1) << 40)) {
      iters = std::max<int64_t>(iters, static_cast<int64_t>(static_cast<double>(iters) * seconds / dt));
      break;
    }
    iters *= 4;
  }
  std::vector<double> rate(static_cast<size_t>(T), 0.0);
  const double flops = static_cast<double>(iters) * 24.0 * I.W * 2.0;
#if defined(R4T_WITH_OPENMP)
#pragma omp parallel num_threads(T)
#endif
  {
    const size_t t = static_cast<size_t>(thread_num());
    const double t0 = thread_cpu_seconds();
    const double v = I.fma_loop(iters);
    const double dt = thread_cpu_seconds() - t0;
    rate[t] = dt > 0 ? flops / dt : 0.0;
    sink = sink + v;
  }
  double total = 0.0;
  for (double r : rate) total += r;
  return total;
}

}  // namespace r4t
