// One instruction set's body of the CPU knn kernel. NOT a normal header: knn.cpp includes it once per
// ISA, inside `#pragma GCC target(...)` regions, with these macros defined:
//   R4T_ISA_NS    namespace for this copy          R4T_ISA_NAME  name reported by build_info()
//   R4T_W         floats per vector (4, 8, 16)     R4T_NR        catalog rows per GEMM micro-tile
//   R4T_NVMAX     query vectors per micro-tile     R4T_DR        catalog rows per direct-path group
//   R4T_F16       fp16 conversion: 0 scalar, 1 F16C (8 lanes), 2 AVX-512 (16 lanes)
// Everything here is static to this ISA's namespace; the driver (knn.cpp) only sees info().
//
// Two paths (the driver picks one per call; see knn.cpp for the plan):
//
//  * GEMM path (B >= W). Queries are the vector operand: each block of NV * W queries is transposed
//    once per call into qT[feature][lane]. Catalog rows are the broadcast operand, read in place (fp32;
//    fp16 rows are converted into a per-thread tile first), so the catalog is never repacked. A micro-tile
//    is NR rows x NV vectors of accumulators (v4: 8 x 3 zmm = 24 rows x 48 queries):
//        for f in feature block: q = qT[f][0..NV*W);  for r < NR: acc[r] += row_r[f] * q
//    Loop order per thread: catalog tile (tile_rows rows, ~1 MiB, stays in L2) -> query block -> feature
//    block (K-blocking: a query block's slice kc x NV*W floats stays in L1; partial sums of the tile are
//    kept in cbuf between feature blocks) -> micro-tiles of the tile.
//  * Direct path (B < W): vectors along the feature axis; a group of DR rows is read once for all
//    queries (two queries at a time), and DR dot products are reduced together by a shuffle tree.
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
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));

R4T_INLINE vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
R4T_INLINE void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
R4T_INLINE vf vload_partial(const float* p, int64_t n) {
  vf v = {};
  std::memcpy(&v, p, static_cast<size_t>(n) * sizeof(float));
  return v;
}
R4T_INLINE vf vsplat(float x) { return vf{} + x; }
R4T_INLINE bool vany(vi m) {
  int32_t a = 0;
#pragma GCC unroll 16
  for (int i = 0; i < W; ++i) a |= m[i];
  return a != 0;
}

// fp16 row -> fp32, zero-padded to `pad` floats.
R4T_INLINE void convert_row(const uint16_t* src, int64_t d, float* dst, int64_t pad) {
  int64_t i = 0;
#if R4T_F16 == 2
  for (; i + 16 <= d; i += 16) {
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  }
#elif R4T_F16 == 1
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

template <int NV, bool L2>
R4T_INLINE void filter_tile(const Job& J, const Slice& S, const QBlock& b, const vf (&acc)[NR][NV], int64_t g0,
                            int valid) {
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const int64_t lane0 = b.q0 + int64_t(v) * W;
    const vf th = vload(S.thr + lane0);
    vi m = {};
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      if (j < valid) {
        const vf key = L2 ? -acc[j][v] : acc[j][v];
        m |= ~(key <= th);
      }
    }
    if (!vany(m)) continue;
    for (int lane = 0; lane < W; ++lane) {
      const int64_t q = lane0 + lane;
      if (q >= J.nq) break;
      float t = S.thr[q];
      Entry* h = S.heaps + q * J.keff;
      for (int j = 0; j < valid; ++j) {
        const float key = L2 ? -acc[j][v][lane] : acc[j][v][lane];
        if (!(key <= t)) {
          t = heap_offer(h, J.keff, key, S.ids[g0 + j]);
          S.thr[q] = t;
        }
      }
    }
  }
}

template <int NV, bool L2>
R4T_INLINE void gemm_block(const Job& J, const Slice& S, const QBlock& b, int64_t cnt) {
  const float* qT = J.qT + b.off;
  const int64_t groups = (cnt + NR - 1) / NR;
  for (int64_t k0 = 0; k0 < J.d; k0 += J.kc) {
    const int64_t kc = std::min(J.kc, J.d - k0);
    const bool first = k0 == 0, last = k0 + kc >= J.d;
    for (int64_t g = 0; g < groups; ++g) {
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
      if (NVMAX >= 3 && b.nv == 3) {
        gemm_block<(NVMAX >= 3 ? 3 : 1), L2>(J, S, b, cnt);
      } else if (NVMAX >= 2 && b.nv == 2) {
        gemm_block<(NVMAX >= 2 ? 2 : 1), L2>(J, S, b, cnt);
      } else {
        gemm_block<1, L2>(J, S, b, cnt);
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
  vi lane;
#pragma GCC unroll 16
  for (int i = 0; i < W; ++i) lane[i] = i;
  const vi m = ~(key <= vsplat(t)) & (lane < cnt);
  if (!vany(m)) return;
  Entry* h = S.heaps + q * J.keff;
  for (int j = 0; j < cnt; ++j) {
    if (!(key[j] <= t)) t = heap_offer(h, J.keff, key[j], ids[j]);
  }
  S.thr[q] = t;
}

template <bool L2>
void direct(const Job& J, const Slice& S) {
  int64_t cur = S.n0;
  int64_t ids[DR];
  const float* rows[DR];
  const int64_t dd = J.f16 ? J.dpad : J.d;  // converted rows are zero-padded: whole vectors only
  for (;;) {
    const int cnt = static_cast<int>(collect_rows(J.allowed, cur, S.n1, DR, ids));
    if (cnt == 0) break;
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

void worker(const Job& J, const Slice& S) {
  if (J.direct) {
    J.l2 ? direct<true>(J, S) : direct<false>(J, S);
  } else {
    J.l2 ? gemm<true>(J, S) : gemm<false>(J, S);
  }
}

// 24 independent FMA chains of W lanes (enough to cover the FMA latency on two ports).
double fma_loop(int64_t iters) {
  vf acc[24];
  for (int i = 0; i < 24; ++i) acc[i] = vsplat(1.f + 1e-3f * static_cast<float>(i));
  const vf a = vsplat(0.999999f), b = vsplat(1e-7f);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) acc[i] = acc[i] * a + b;
    __asm__ volatile("" : : : "memory");
  }
  vf s = {};
  for (int i = 0; i < 24; ++i) s += acc[i];
  double r = 0.0;
  for (int i = 0; i < W; ++i) r += s[i];
  return r;
}

IsaInfo info() { return IsaInfo{R4T_ISA_NAME, W, NR, NVMAX, DR, &worker, &fma_loop}; }

}  // namespace R4T_ISA_NS
