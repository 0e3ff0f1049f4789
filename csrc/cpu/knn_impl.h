// One instruction set's body of the CPU knn kernel. NOT a normal header: knn.cpp includes it once per
// ISA, inside `#pragma GCC target(...)` regions, with these macros defined:
//   R4T_ISA_NS    namespace for this copy          R4T_ISA_NAME  name reported by build_info()
//   R4T_W         floats per vector (4, 8, 16)     R4T_NR        catalog rows per GEMM micro-tile
//   R4T_NVMAX     query vectors per micro-tile     R4T_DR        catalog rows per direct-path group
//   R4T_ISA_LEVEL 4 (AVX-512 intrinsics: fp16 conversion, mask moves), 3 (AVX2/F16C), 0 (portable)
// Everything here is static to this ISA's namespace; the driver (knn.cpp) only sees info().
//
// Three paths (the driver picks one per call; see knn.cpp for the plan):
//
//  * GEMM path (B >= W). Queries are the vector operand: each block of NV * W queries is transposed
//    once per call into qT[feature][lane]. Catalog rows are the broadcast operand, read in place (fp32;
//    fp16 rows are converted into a per-thread tile first), so the catalog is never repacked. A micro-tile
//    is NR rows x NV vectors of accumulators (v4: 8 rows x 3 zmm = 48 queries, 24 accumulators):
//        for f in feature block: q = qT[f][0..NV*W);  for r < NR: acc[r] += row_r[f] * q
//    Loop order per thread: catalog tile (tile_rows rows, ~1 MiB, stays in L2) -> query block -> feature
//    block (K-blocking: a query block's slice kc x NV*W floats stays in L1; partial sums of the tile are
//    kept in cbuf between feature blocks) -> micro-tiles of the tile.
//  * Direct path (B = 1): vectors along the feature axis; a group of DR rows is read once for all
//    queries (two queries at a time), and DR dot products are reduced together by a shuffle tree.
//  * Small-B path (2 <= B < W, e.g. a set's 10 rows + its anchor at batch 1): each catalog row is read
//    once, in order, and meets every query; the row's B accumulators are reduced across the queries into
//    one vector of B scores, admitted against all B thresholds at once (see "small-B path" below).
//
// After a micro-tile's last feature block the scores are compared, as vectors, against each query's
// admission threshold (its heap root); only lanes that pass visit the heap. The comparison is
// !(score <= threshold), true for NaN on either side: a NaN threshold (the sentinel root of a heap that is
// not full yet) admits everything, and a NaN score is re-checked exactly by heap_offer.

namespace R4T_ISA_NS {

using namespace ::r4t::knn_detail;

constexpr int W = R4T_W;
constexpr int NR = R4T_NR;
constexpr int NVMAX = R4T_NVMAX;
constexpr int DR = R4T_DR;
#include "cpu/simd_vec.h"  // vf, vi, vload, vstore, vload_partial, vsplat, vmax, vmin, hsum
// Lanes of m (all-ones / zero per lane) as a bit mask.
R4T_INLINE uint32_t vbits(vi m) {
#if R4T_ISA_LEVEL == 4
  __m512i x;
  std::memcpy(&x, &m, sizeof x);
  return static_cast<uint32_t>(_mm512_movepi32_mask(x));
#elif R4T_ISA_LEVEL == 3
  __m256 x;
  std::memcpy(&x, &m, sizeof x);
  return static_cast<uint32_t>(_mm256_movemask_ps(x));
#elif defined(R4T_X86_DISPATCH)  // the SSE2 baseline on x86-64 (immintrin.h included)
  __m128 x;
  std::memcpy(&x, &m, sizeof x);
  return static_cast<uint32_t>(_mm_movemask_ps(x));
#else
  uint32_t b = 0;
  for (int i = 0; i < W; ++i) b |= (m[i] != 0 ? 1u : 0u) << i;
  return b;
#endif
}
// Lanes where key passes the admission test !(key <= th) (true for a NaN on either side).
R4T_INLINE uint32_t admit(vf key, vf th) { return vbits(~(key <= th)); }

// Prefetch one catalog row (bytes) into L2 (prefetcht1): the L1 prefetchers take it from there, and the
// L1 stays free for the query block and the rows in use.
R4T_INLINE void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 2);
}

// fp16 row -> fp32, zero-padded to `pad` floats.
R4T_INLINE void convert_row(const uint16_t* src, int64_t d, float* dst, int64_t pad) {
  int64_t i = 0;
#if R4T_ISA_LEVEL == 4
  for (; i + 16 <= d; i += 16) {
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  }
#elif R4T_ISA_LEVEL == 3
  for (; i + 8 <= d; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
#endif
  for (; i < d; ++i) dst[i] = ::r4t::half_to_float(src[i]);
  for (; i < pad; ++i) dst[i] = 0.f;
}

// ------------------------------------------------------------------------------------------ GEMM path
template <int NV, bool L2>
R4T_INLINE void micro(const float* const* rp, int64_t k0, int64_t kc, const float* q, vf (&acc)[NR][NV]) {
  const float* r[NR];
#pragma GCC unroll 16
  for (int j = 0; j < NR; ++j) r[j] = rp[j] + k0;
  for (int64_t f = 0; f < kc; ++f) {
    vf qv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) qv[v] = vload(q + f * (NV * W) + v * W);
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      const float c = r[j][f];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        if (L2) {
          const vf t = c - qv[v];
          acc[j][v] += t * t;
        } else {
          acc[j][v] += c * qv[v];
        }
      }
    }
  }
}

// Rows in ascending id order, then the passing lanes of each (a query's heap sees ascending ids). Kept
// out of line (noinline): only here are the accumulators needed in memory, so the fast path keeps them
// in registers.
template <bool L2>
__attribute__((noinline)) void filter_slow(const Job& J, const Slice& S, const vf* col, int64_t lane0,
                                           const float* thr_lanes, int64_t g0, int valid) {
  const vf th = vload(thr_lanes);
  for (int j = 0; j < valid; ++j) {
    float key[W];
    const vf kv = L2 ? -col[j] : col[j];
    vstore(key, kv);
    uint32_t bits = admit(kv, th);
    while (bits != 0) {
      const int lane = __builtin_ctz(bits);
      bits &= bits - 1;
      const int64_t q = lane0 + lane;
      if (q >= J.nq) break;  // padding lanes are the highest bits
      if (!(key[lane] <= S.thr[q]))
        S.thr[q] = heap_offer(S.heaps + q * J.keff, J.keff, key[lane], S.ids[g0 + j]);
    }
  }
}

template <int NV, bool L2>
R4T_INLINE void filter_tile(const Job& J, const Slice& S, const QBlock& b, const vf (&acc)[NR][NV],
                            int64_t g0, int valid) {
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const int64_t lane0 = b.q0 + int64_t(v) * W;
    const vf th = vload(S.thr + lane0);
    // Quick reject on the best key of the micro-tile (padding rows included: a false alarm is harmless).
    vf best = acc[0][v];
    if (L2) {
#pragma GCC unroll 16
      for (int j = 1; j < NR; ++j) best = vmin(best, acc[j][v]);
      best = -best;
    } else {
#pragma GCC unroll 16
      for (int j = 1; j < NR; ++j) best = vmax(best, acc[j][v]);
    }
    if (admit(best, th) == 0) continue;
    vf col[NR];  // a copy: the accumulators' own address never escapes, so they stay in registers
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) col[j] = acc[j][v];
    filter_slow<L2>(J, S, col, lane0, S.thr + lane0, g0, valid);
  }
}

template <int NV, bool L2>
R4T_INLINE void gemm_block(const Job& J, const Slice& S, const QBlock& b, int64_t cnt, bool prefetch) {
  constexpr int64_t kAhead = 2;  // micro-tiles of rows prefetched ahead on a tile's first pass
  const float* qT = J.qT + b.off;
  const int64_t groups = (cnt + NR - 1) / NR;
  for (int64_t k0 = 0; k0 < J.d; k0 += J.kc) {
    const int64_t kc = std::min(J.kc, J.d - k0);
    const bool first = k0 == 0, last = k0 + kc >= J.d;
    for (int64_t g = 0; g < groups; ++g) {
      if (prefetch && first && g + kAhead < groups) {
        for (int j = 0; j < NR; ++j) prefetch_row(S.ptrs[(g + kAhead) * NR + j], J.d * 4);
      }
      vf acc[NR][NV];
      float* cb = S.cbuf + g * NR * (NV * W);
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) {
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[j][v] = first ? vf{} : vload(cb + (j * NV + v) * W);
      }
      micro<NV, L2>(S.ptrs + g * NR, k0, kc, qT + k0 * (NV * W), acc);
      if (last) {
        filter_tile<NV, L2>(J, S, b, acc, g * NR, static_cast<int>(std::min<int64_t>(NR, cnt - g * NR)));
      } else {
#pragma GCC unroll 16
        for (int j = 0; j < NR; ++j) {
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) vstore(cb + (j * NV + v) * W, acc[j][v]);
        }
      }
    }
  }
}

template <bool L2>
void gemm(const Job& J, const Slice& S) {
  int64_t cur = S.n0;
  for (;;) {
    const int64_t cnt = collect_rows(J.allowed, cur, S.n1, J.tile_rows, S.ids);
    if (cnt == 0) break;
    for (int64_t j = 0; j < cnt; ++j) {
      if (J.f16) {
        float* dst = S.tile + j * J.dpad;
        convert_row(static_cast<const uint16_t*>(J.cat) + S.ids[j] * J.cs, J.d, dst, J.dpad);
        S.ptrs[j] = dst;
      } else {
        S.ptrs[j] = static_cast<const float*>(J.cat) + S.ids[j] * J.cs;
      }
    }
    for (int64_t j = cnt; j < cnt + NR; ++j) S.ptrs[j] = S.zero;
    for (int bi = 0; bi < J.nblocks; ++bi) {
      const QBlock& b = J.blocks[bi];
      const bool pf = bi == 0 && !J.f16;  // first pass over the tile reads from memory (fp16: converted)
      if (NVMAX >= 3 && b.nv == 3) {
        gemm_block<(NVMAX >= 3 ? 3 : 1), L2>(J, S, b, cnt, pf);
      } else if (NVMAX >= 2 && b.nv == 2) {
        gemm_block<(NVMAX >= 2 ? 2 : 1), L2>(J, S, b, cnt, pf);
      } else {
        gemm_block<1, L2>(J, S, b, cnt, pf);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------- direct path
// Shuffle tree: pairs (x, y) whose lanes hold 2^L rows x (W >> L) partial sums each become one vector of
// 2^(L+1) rows x (W >> (L+1)) partial sums (first half of each segment + second half).
template <int L, bool Second>
constexpr int tree_lane(int j) {
  const int seg = W >> L, half = seg / 2, rows = 1 << L;
  const int row = j / half;
  return (row < rows ? 0 : W) + (row % rows) * seg + (Second ? half : 0) + (j % half);
}
template <int L, bool Second, int... J>
constexpr vi tree_mask(std::integer_sequence<int, J...>) {
  return vi{tree_lane<L, Second>(J)...};
}
template <int L>
R4T_INLINE vf tree_step(vf x, vf y) {
  constexpr vi a = tree_mask<L, false>(std::make_integer_sequence<int, W>{});
  constexpr vi b = tree_mask<L, true>(std::make_integer_sequence<int, W>{});
  return __builtin_shuffle(x, y, a) + __builtin_shuffle(x, y, b);
}
// Row sums of acc[0..n) (n a power of two <= W, level L = log2(W / n) already applied) into lanes 0..n-1.
template <int L, int N>
R4T_INLINE vf tree_reduce(vf* acc) {
  if constexpr (N > 1) {
#pragma GCC unroll 16
    for (int m = 0; m < N / 2; ++m) acc[m] = tree_step<L>(acc[2 * m], acc[2 * m + 1]);
    return tree_reduce<L + 1, N / 2>(acc);
  } else if constexpr ((W >> L) > 1) {
    acc[0] = tree_step<L>(acc[0], acc[0]);  // fold the remaining partial sums (the upper lanes duplicate)
    return tree_reduce<L + 1, 1>(acc);
  } else {
    return acc[0];
  }
}

// Scores of QD queries (rows of q, stride qs, zero-padded) against DR rows of d features.
template <int QD, bool L2>
R4T_INLINE void direct_dots(const float* q, int64_t qs, const float* const* rows, int64_t d, vf (&out)[QD]) {
  vf acc[QD][DR];
#pragma GCC unroll 4
  for (int i = 0; i < QD; ++i) {
#pragma GCC unroll 16
    for (int r = 0; r < DR; ++r) acc[i][r] = vf{};
  }
  const int64_t full = d / W * W;
  auto step = [&](int64_t f, bool partial) __attribute__((always_inline)) {
    vf qv[QD];
#pragma GCC unroll 4
    for (int i = 0; i < QD; ++i) qv[i] = vload(q + i * qs + f);
#pragma GCC unroll 16
    for (int r = 0; r < DR; ++r) {
      const vf c = partial ? vload_partial(rows[r] + f, d - f) : vload(rows[r] + f);
#pragma GCC unroll 4
      for (int i = 0; i < QD; ++i) {
        if (L2) {
          const vf t = qv[i] - c;
          acc[i][r] += t * t;
        } else {
          acc[i][r] += qv[i] * c;
        }
      }
    }
  };
  for (int64_t f = 0; f < full; f += W) step(f, false);
  if (full < d) step(full, true);
#pragma GCC unroll 4
  for (int i = 0; i < QD; ++i) out[i] = tree_reduce<0, DR>(acc[i]);
}

template <bool L2>
R4T_INLINE void direct_filter(const Job& J, const Slice& S, int64_t q, vf s, const int64_t* ids, int cnt) {
  const vf key = L2 ? -s : s;
  float t = S.thr[q];
  uint32_t bits = admit(key, vsplat(t)) & ((cnt >= 32 ? 0u : (1u << cnt)) - 1u);
  if (bits == 0) return;
  Entry* h = S.heaps + q * J.keff;
  while (bits != 0) {
    const int j = __builtin_ctz(bits);
    bits &= bits - 1;
    if (!(key[j] <= t)) t = heap_offer(h, J.keff, key[j], ids[j]);
  }
  S.thr[q] = t;
}

template <bool L2>
void direct(const Job& J, const Slice& S) {
  int64_t cur = S.n0, pf_cur = S.n0;
  int64_t ids[DR], pf_ids[DR];
  const float* rows[DR];
  const int64_t dd = J.f16 ? J.dpad : J.d;  // converted rows are zero-padded: whole vectors only
  const int64_t row_bytes = J.d * (J.f16 ? 2 : 4);
  // Rows prefetched ahead (~32 KiB, into L2): a group reads DR rows side by side (512 B apart for
  // d = 128), a pattern the hardware prefetchers follow poorly across pages. Only for catalogs over
  // knn.cpp's kPrefetchBytes (J.prefetch): measured, 1M x 128 went from 31.5 to 23 ms at B = 1, while
  // small catalogs ran 5-12 % slower with it. 16-32 KiB ahead beat 8 and 64 KiB; streaming each row start to end
  // instead of DR rows side by side was slower.
  const int64_t kAhead = std::max<int64_t>(DR, (32768 / row_bytes) / DR * DR);
  const char* cat = static_cast<const char*>(J.cat);
  const int64_t stride_bytes = J.cs * (J.f16 ? 2 : 4);
  collect_rows(J.allowed, pf_cur, S.n1, kAhead, nullptr);  // the prefetch cursor starts kAhead rows ahead
  for (;;) {
    const int cnt = static_cast<int>(collect_rows(J.allowed, cur, S.n1, DR, ids));
    if (cnt == 0) break;
    const int64_t npf = collect_rows(J.allowed, pf_cur, S.n1, DR, pf_ids);
    if (J.prefetch) {
      for (int64_t j = 0; j < npf; ++j) prefetch_row(cat + pf_ids[j] * stride_bytes, row_bytes);
    }
    for (int j = 0; j < DR; ++j) {
      if (j >= cnt) {
        rows[j] = S.zero;
      } else if (J.f16) {
        float* dst = S.tile + j * J.dpad;
        convert_row(static_cast<const uint16_t*>(J.cat) + ids[j] * J.cs, J.d, dst, J.dpad);
        rows[j] = dst;
      } else {
        rows[j] = static_cast<const float*>(J.cat) + ids[j] * J.cs;
      }
    }
    int64_t i = 0;
    for (; i + 2 <= J.nq; i += 2) {
      vf s[2];
      direct_dots<2, L2>(J.qrow + i * J.dpad, J.dpad, rows, dd, s);
      direct_filter<L2>(J, S, i, s[0], ids, cnt);
      direct_filter<L2>(J, S, i + 1, s[1], ids, cnt);
    }
    if (i < J.nq) {
      vf s[1];
      direct_dots<1, L2>(J.qrow + i * J.dpad, J.dpad, rows, dd, s);
      direct_filter<L2>(J, S, i, s[0], ids, cnt);
    }
  }
}

// ----------------------------------------------------------------------------------- small-B path
// 2 <= B < W queries (a set's rows and its anchor, at batch 1). Vectors along the feature axis as in the
// direct path, but the roles swap: each catalog row (read from memory once) meets every query in the same
// pass, one accumulator per query (Q + 2 vector registers; the queries, Q * d floats, are re-read from
// L1); after the last feature the row's Q accumulators are reduced by the shuffle tree into ONE vector
// whose lane q is the row's score for query q, admitted against the thresholds of all queries at once
// (lanes >= Q hold +inf). Per row: Q * d / W multiply-adds, Q - 1 + log2(W / Q') shuffle steps, one
// compare, and a heap visit only for the queries the row enters.
constexpr int pow2_at_least(int n) { return n <= 1 ? 1 : 2 * pow2_at_least((n + 1) / 2); }

template <int Q, bool L2>
R4T_INLINE vf small_dots(const float* q, int64_t qs, const float* row, int64_t d) {
  constexpr int QP = pow2_at_least(Q);
  vf acc[QP];
#pragma GCC unroll 16
  for (int i = 0; i < QP; ++i) acc[i] = vf{};
  const int64_t full = d / W * W;
  auto step = [&](int64_t f, bool partial) __attribute__((always_inline)) {
    const vf c = partial ? vload_partial(row + f, d - f) : vload(row + f);
#pragma GCC unroll 16
    for (int i = 0; i < Q; ++i) {
      const vf qv = vload(q + i * qs + f);  // zero-padded query rows: whole vectors only
      if (L2) {
        const vf t = qv - c;
        acc[i] += t * t;
      } else {
        acc[i] += qv * c;
      }
    }
  };
  for (int64_t f = 0; f < full; f += W) step(f, false);
  if (full < d) step(full, true);
  return tree_reduce<0, QP>(acc);
}

template <bool L2>
R4T_INLINE void small_filter(const Job& J, const Slice& S, vf s, int64_t id) {
  const vf key = L2 ? -s : s;
  uint32_t bits = admit(key, vload(S.thr));  // S.thr: nq thresholds, then +inf (padding lanes)
  while (bits != 0) {
    const int q = __builtin_ctz(bits);
    bits &= bits - 1;
    if (q >= J.nq) break;
    if (!(key[q] <= S.thr[q])) S.thr[q] = heap_offer(S.heaps + q * J.keff, J.keff, key[q], id);
  }
}

template <int Q, bool L2>
void small(const Job& J, const Slice& S) {
  int64_t cur = S.n0, pf_cur = S.n0;
  int64_t ids[DR], pf_ids[DR];
  const int64_t dd = J.f16 ? J.dpad : J.d;
  const int64_t row_bytes = J.d * (J.f16 ? 2 : 4);
  const int64_t kAhead = std::max<int64_t>(DR, (32768 / row_bytes) / DR * DR);  // as the direct path
  const char* cat = static_cast<const char*>(J.cat);
  const int64_t stride_bytes = J.cs * (J.f16 ? 2 : 4);
  collect_rows(J.allowed, pf_cur, S.n1, kAhead, nullptr);
  for (;;) {
    const int cnt = static_cast<int>(collect_rows(J.allowed, cur, S.n1, DR, ids));
    if (cnt == 0) break;
    const int64_t npf = collect_rows(J.allowed, pf_cur, S.n1, DR, pf_ids);
    if (J.prefetch) {
      for (int64_t j = 0; j < npf; ++j) prefetch_row(cat + pf_ids[j] * stride_bytes, row_bytes);
    }
    for (int j = 0; j < cnt; ++j) {
      const float* row;
      if (J.f16) {
        float* dst = S.tile;
        convert_row(static_cast<const uint16_t*>(J.cat) + ids[j] * J.cs, J.d, dst, J.dpad);
        row = dst;
      } else {
        row = static_cast<const float*>(J.cat) + ids[j] * J.cs;
      }
      small_filter<L2>(J, S, small_dots<Q, L2>(J.qrow, J.dpad, row, dd), ids[j]);
    }
  }
}

template <int Q, bool L2>
void small_for(const Job& J, const Slice& S) {  // the instantiation for J.nq (2 <= nq < W)
  if constexpr (Q < W) {
    if (J.nq == Q) {
      small<Q, L2>(J, S);
    } else {
      small_for<Q + 1, L2>(J, S);
    }
  }
}

void worker(const Job& J, const Slice& S) {
  if (J.direct && J.small) {
    J.l2 ? small_for<2, true>(J, S) : small_for<2, false>(J, S);
  } else if (J.direct) {
    J.l2 ? direct<true>(J, S) : direct<false>(J, S);
  } else {
    J.l2 ? gemm<true>(J, S) : gemm<false>(J, S);
  }
}

// 24 independent FMA chains of W lanes (enough to cover the FMA latency on two ports), all in registers.
double fma_loop(int64_t iters) {
  vf acc[24];
#pragma GCC unroll 24
  for (int i = 0; i < 24; ++i) acc[i] = vsplat(1.f + 1e-3f * static_cast<float>(i));
  const vf a = vsplat(0.999999f), b = vsplat(1e-7f);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) acc[i] = acc[i] * a + b;
  }
  vf s = {};
#pragma GCC unroll 24
  for (int i = 0; i < 24; ++i) s += acc[i];
  double r = 0.0;
  for (int i = 0; i < W; ++i) r += s[i];
  return r;
}

IsaInfo info() { return IsaInfo{R4T_ISA_NAME, W, NR, NVMAX, DR, &worker, &fma_loop}; }

}  // namespace R4T_ISA_NS
