// The knn kernel's coarse path: an int8 pass over an int8 copy of the catalog (AVX-512 VNNI, `vpdpbusd`:
// four multiply-adds per 32-bit lane and instruction, four times the fp32 FMA rate, a quarter of the
// bytes, so that the copy stays in the L3 beside the set sampler's weights) keeps each query's `kc` best
// rows, which are then re-scored exactly against the fp32 / fp16 catalog; the k best of those are the
// result. It equals the exact search whenever every exact top-k row is among the int8 pass's kc
// (kc = 2 k + 32; benchmarks/bench_knn_coarse.py measures how often the two differ on real rows). Used by
// knn_cpu for inner-product searches of 2 <= B <= 16 queries (a set's rows and its anchor at batch 1)
// when the caller passes the copy and the CPU has AVX-512 VNNI; otherwise knn_cpu runs the exact paths.
// R4T_KNN_COARSE=0 in the environment turns the path off (read once).
//
// Codes: catalog u8 = round(c / scale) + 128 (one scale per catalog, |code - 128| <= 127, features padded
// to a multiple of 4 with 128 = zero); each query s8 = round(q / s_q) with s_q = max|q| / 127. Then
// sum_f u8 * s8 = sum_f c' q' + 128 * sum_f q', so the per-query constant 128 * sum q' is subtracted and
// the integer scaled by scale * s_q.
// Layout: the queries are the vector operand, as in the GEMM path: lane q of vector p holds query q's
// features 4p .. 4p + 3 (16 lanes: B <= 16; lanes >= B are zero). A catalog row's 4 codes at p are one
// 32-bit word, broadcast. A micro-tile is kRows rows x one vector:
//     for p < d / 4:  qv = qT[p];  for r < kRows: acc[r] += dot4(broadcast(row_r[p]), qv)
// after which acc[r] lane q is row r's score for query q, compared against all thresholds at once.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define R4T_COARSE_X86 1
#include <immintrin.h>
#endif

#include "common.h"
#include "cpu/knn_detail.h"
#include "kernels.h"

namespace r4t {

using knn_detail::Entry;

namespace {

constexpr int kLanes = 16;  // queries per pass (one zmm of fp32 scores)
// Catalog rows per micro-tile (independent accumulator chains). Measured with the bf16 variant of this
// kernel (18,800 x 384, B = 11, 2 threads, alternating processes): 8 / 12 / 16 rows 0.72 / 0.69-0.85 /
// 0.72-0.84 ms, 4 rows 1.0-1.2 ms; software prefetch 1-4 tiles ahead gave nothing, hot or cold.
constexpr int kRows = 8;

#if defined(R4T_COARSE_X86)
// The exact re-score: one fp32 dot product with fused multiply-adds (the exact paths' arithmetic, in
// another order: scores agree to float rounding).
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) float row_dot(const KnnParams& p,
                                                                                   const float* q, int64_t id) {
  __m512 acc = _mm512_setzero_ps();
  const bool f16 = p.catalog_dtype == DType::F16;
  const char* row = static_cast<const char*>(p.catalog) + id * p.c_stride * (f16 ? 2 : 4);
  for (int64_t f = 0; f < p.d; f += kLanes) {
    const int64_t n = std::min<int64_t>(kLanes, p.d - f);
    const __mmask16 m = static_cast<__mmask16>(n == kLanes ? 0xFFFFu : (1u << n) - 1u);
    const __m512 c = f16 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, row + f * 2))
                         : _mm512_maskz_loadu_ps(m, row + f * 4);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + f), c, acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// Offers the lanes of `key` (row `id`'s scores) that pass !(key <= threshold) to their queries' heaps.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void admit(
    __m512 key, float* thr, Entry* heaps, int64_t kc, int nq, int64_t id, const uint8_t* allowed) {
  uint32_t bits = _mm512_cmp_ps_mask(key, _mm512_loadu_ps(thr), _CMP_NLE_UQ);
  if (bits == 0 || (allowed != nullptr && allowed[id] == 0)) return;
  alignas(64) float s[kLanes];
  _mm512_store_ps(s, key);
  while (bits != 0) {
    const int q = __builtin_ctz(bits);
    bits &= bits - 1;
    if (q >= nq) break;
    thr[q] = knn_detail::heap_offer(heaps + q * kc, kc, s[q], id);
  }
}

R4T_INLINE int32_t load_word(const uint8_t* p) {
  int32_t w;
  std::memcpy(&w, p, 4);
  return w;
}

// acc += u8 . s8 in groups of 4 (vpdpbusd), acc updated in place.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) R4T_INLINE void dpbusd(__m512i& acc, __m512i u8,
                                                                                     __m512i s8) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
}

// Rows [n0, n1) of the codes (row stride cs bytes) against the transposed query codes qT ((d4, 16) words);
// corr / scale: per lane, the offset term and the factor back to scores.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void scan(
    const uint8_t* cat, int64_t cs, int64_t n0, int64_t n1, const int32_t* qT, int64_t d4, int nq,
    const uint8_t* allowed, Entry* heaps, int64_t kc, float* thr, const int32_t* corr, const float* scale) {
  const __m512i vc = _mm512_loadu_si512(corr);
  const __m512 vs = _mm512_loadu_ps(scale);
  int64_t r = n0;
  for (; r + kRows <= n1; r += kRows) {
    // Eight named accumulators updated in place (with the intrinsic, GCC 12 copied every accumulator
    // to another register once per step: 16 extra moves per 8 multiplies).
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    const uint8_t* rp = cat + r * cs;
    for (int64_t p = 0; p < d4; ++p, rp += 4) {
      const __m512i qv = _mm512_loadu_si512(qT + p * kLanes);
#define R4T_BC(i) _mm512_set1_epi32(load_word(rp + (i) * cs))
      dpbusd(a0, R4T_BC(0), qv);
      dpbusd(a1, R4T_BC(1), qv);
      dpbusd(a2, R4T_BC(2), qv);
      dpbusd(a3, R4T_BC(3), qv);
      dpbusd(a4, R4T_BC(4), qv);
      dpbusd(a5, R4T_BC(5), qv);
      dpbusd(a6, R4T_BC(6), qv);
      dpbusd(a7, R4T_BC(7), qv);
#undef R4T_BC
    }
    const __m512i acc[kRows] = {a0, a1, a2, a3, a4, a5, a6, a7};
#pragma GCC unroll 8
    for (int i = 0; i < kRows; ++i) {
      const __m512 key = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i], vc)), vs);
      admit(key, thr, heaps, kc, nq, r + i, allowed);
    }
  }
  for (; r < n1; ++r) {
    const uint8_t* rp = cat + r * cs;
    __m512i acc = _mm512_setzero_si512();
    for (int64_t p = 0; p < d4; ++p) dpbusd(acc, _mm512_set1_epi32(load_word(rp + 4 * p)), _mm512_loadu_si512(qT + p * kLanes));
    admit(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc, vc)), vs), thr, heaps, kc, nq, r, allowed);
  }
}
#endif

bool coarse_enabled() {
  static const bool on = []() {
    const char* env = std::getenv("R4T_KNN_COARSE");
    return env == nullptr || std::string(env) != "0";
  }();
  return on;
}

}  // namespace

bool cpu_has_vnni() {
#if defined(R4T_COARSE_X86)
  static const bool has = []() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") != 0 && __builtin_cpu_supports("avx512bw") != 0 &&
           __builtin_cpu_supports("avx512vl") != 0;
  }();
  return has;
#else
  return false;
#endif
}

bool knn_coarse_applies(const KnnParams& p) {
  return p.coarse != nullptr && p.metric == Metric::IP && p.B >= 2 && p.B <= kLanes && cpu_has_vnni() &&
         coarse_enabled();
}

int64_t knn_coarse_list(int64_t keff, int64_t n_allowed) { return std::min(n_allowed, 2 * keff + 32); }

void knn_cpu_coarse(const KnnParams& p, const KnnPlan& plan) {
#if defined(R4T_COARSE_X86)
  const int64_t B = p.B, N = p.N, d = p.d, k = p.k, keff = plan.keff;
  const int64_t d4 = (d + 3) / 4;
  check(p.coarse_stride >= 4 * d4 && p.coarse_scale > 0.f && std::isfinite(p.coarse_scale),
        "coarse: expected a row stride >= d rounded up to a multiple of 4 and a finite scale > 0, got stride " +
            std::to_string(p.coarse_stride) + ", scale " + std::to_string(p.coarse_scale));
  const int64_t kc = knn_coarse_list(keff, plan.n_allowed);
  const int T = plan.threads;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();

  // Query codes, transposed: word (p, q) = features 4p .. 4p + 3 of query q.
  std::vector<uint32_t> qT(static_cast<size_t>(d4 * kLanes), 0u);
  std::vector<int32_t> corr(kLanes, 0);
  std::vector<float> qscale(kLanes, 0.f);
  for (int64_t q = 0; q < B; ++q) {
    const float* src = p.queries + q * p.q_stride;
    float mx = 0.f;
    for (int64_t f = 0; f < d; ++f) mx = std::max(mx, std::fabs(src[f]));
    const float s = (mx > 0.f && std::isfinite(mx)) ? mx / 127.f : 1.f;
    qscale[q] = s * p.coarse_scale;
    int32_t sum = 0;
    for (int64_t f = 0; f < d; ++f) {
      const float x = src[f] / s;  // NaN / inf rows (the caller's to reject) get code 0 / +-127
      const int32_t v = x >= 127.f ? 127 : x <= -127.f ? -127 : x == x ? static_cast<int32_t>(std::nearbyint(x)) : 0;
      sum += v;
      qT[static_cast<size_t>((f / 4) * kLanes + q)] |= (static_cast<uint32_t>(v) & 0xFFu) << (8 * (f % 4));
    }
    corr[q] = 128 * sum;
  }
  std::vector<Entry> heaps(static_cast<size_t>(T * B * kc), Entry{nan, -1});
  std::vector<float> thr(static_cast<size_t>(T * kLanes), inf);
  for (int t = 0; t < T; ++t) std::fill(thr.begin() + t * kLanes, thr.begin() + t * kLanes + B, nan);
  const int64_t per = (N + T - 1) / T;

  std::vector<Entry> all(static_cast<size_t>(T * T * kc));  // per thread: a query's T * kc candidates
  const int64_t row_bytes = d * (p.catalog_dtype == DType::F16 ? 2 : 4);
  const int64_t stride_bytes = p.c_stride * (p.catalog_dtype == DType::F16 ? 2 : 4);
  const char* base = static_cast<const char*>(p.catalog);

  // One region: each thread scans its rows, then (after the barrier) finishes queries t, t + T, ...: the
  // T * kc int8 candidates cut to the kc best by their int8 scores, those rows prefetched together (they
  // are scattered over a catalog the L3 rarely holds: one at a time, each costs a full memory latency),
  // re-scored exactly, the keff best written, then the sentinels.
#if defined(R4T_WITH_OPENMP)
#pragma omp parallel num_threads(T) if (T > 1)
#endif
  {
    const int t = thread_num();
    const int64_t n0 = std::min(N, t * per), n1 = std::min(N, n0 + per);
    if (n0 < n1) {
      scan(p.coarse, p.coarse_stride, n0, n1, reinterpret_cast<const int32_t*>(qT.data()), d4,
           static_cast<int>(B), p.allowed, heaps.data() + t * B * kc, kc, thr.data() + t * kLanes, corr.data(),
           qscale.data());
    }
#if defined(R4T_WITH_OPENMP)
#pragma omp barrier
#endif
    Entry* mine = all.data() + t * T * kc;
    for (int64_t q = t; q < B; q += T) {
      int64_t n = 0;
      for (int u = 0; u < T; ++u) {
        const Entry* h = heaps.data() + (u * B + q) * kc;
        for (int64_t j = 0; j < kc; ++j) {
          if (h[j].id >= 0) mine[n++] = h[j];
        }
      }
      if (n > kc) {
        std::nth_element(mine, mine + kc, mine + n, knn_detail::better);
        n = kc;
      }
      for (int64_t j = 0; j < n; ++j) {
        const char* r = base + mine[j].id * stride_bytes;
        for (int64_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(r + o, 0, 3);
      }
      const float* qv = p.queries + q * p.q_stride;
      for (int64_t j = 0; j < n; ++j) mine[j].key = row_dot(p, qv, mine[j].id);
      const int64_t m = std::min(keff, n);
      std::partial_sort(mine, mine + m, mine + n, knn_detail::better);
      knn_detail::write_result(mine, m, k, false, p.out_scores + q * k, p.out_ids + q * k);
    }
  }
#else
  (void)p;
  (void)plan;
  check(false, "coarse: this build has no AVX-512 VNNI path");
#endif
}

}  // namespace r4t
