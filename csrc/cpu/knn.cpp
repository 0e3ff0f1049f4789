// Exact fused top-k (inner product or L2) on the CPU.
//
// Algorithm: the catalog is split into one contiguous chunk per thread. Each thread walks its chunk in
// tiles of `tile_rows` catalog rows; a tile is packed (transposed into 16-row panels, fp16 converted to
// fp32, squared norms computed for L2) so that a 6x16 register-blocked micro-kernel computes query x
// catalog dot products from L1/L2. Each 6x16 score block is folded into per-query running top-k heaps
// with a vector max quick-reject against the heap threshold; the B x N score matrix never exists.
// Finally the per-thread heaps are merged. Queries are processed in chunks of at most kQueryChunk so
// the per-thread heaps stay O(kQueryChunk * k). Batches of fewer than 6 queries use a direct
// dot-product path (no packing). Peak extra memory: threads * (tile + kQueryChunk * k) + queries copy.
//
// SIMD: the hot loops use GCC vector extensions inside functions compiled twice with target_clones
// (x86-64-v3 = AVX2+FMA+F16C, and the baseline); the loader picks the clone for this CPU at runtime.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define R4T_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define R4T_CLONES
#endif
#define R4T_INLINE inline __attribute__((always_inline))

namespace r4t {
namespace {

constexpr int MR = 6;                     // queries per micro-tile
constexpr int NR = 16;                    // catalog rows per packed panel
constexpr int64_t kQueryChunk = 4096;     // queries per outer chunk (bounds heap memory)
constexpr int64_t kTileBytes = 192 * 1024;  // packed tile size target (fits L2)

typedef float v8sf __attribute__((vector_size(32)));

struct Entry {
  float key;
  int64_t id;
};

// a ranks strictly below b: smaller key, or equal key and larger id (id -1 = sentinel, ranks last).
R4T_INLINE bool worse(const Entry& a, const Entry& b) {
  if (a.key != b.key) return a.key < b.key;
  return static_cast<uint64_t>(a.id) > static_cast<uint64_t>(b.id);
}
R4T_INLINE bool better(const Entry& a, const Entry& b) { return worse(b, a); }

// Heap of k entries whose root is the worst entry kept so far.
R4T_INLINE void heap_push(Entry* h, int64_t k, float key, int64_t id) {
  Entry e{key, id};
  if (!worse(h[0], e)) return;
  std::pop_heap(h, h + k, better);
  h[k - 1] = e;
  std::push_heap(h, h + k, better);
}

template <typename T>
R4T_INLINE float load_elem(const T* p, int64_t i);
template <>
R4T_INLINE float load_elem<float>(const float* p, int64_t i) {
  return p[i];
}
template <>
R4T_INLINE float load_elem<uint16_t>(const uint16_t* p, int64_t i) {
#if defined(__FLT16_MANT_DIG__)
  _Float16 h;
  std::memcpy(&h, p + i, sizeof h);
  return static_cast<float>(h);
#else
  return half_to_float(p[i]);
#endif
}

R4T_INLINE float hmax(v8sf v) {
  float m = v[0];
  for (int i = 1; i < 8; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// Sum of squares of n floats with independent vector accumulators (no serial dependency chain).
R4T_INLINE float sum_squares(const float* x, int64_t n) {
  v8sf a0 = {}, a1 = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    v8sf x0, x1;
    std::memcpy(&x0, x + i, sizeof x0);
    std::memcpy(&x1, x + i + 8, sizeof x1);
    a0 += x0 * x0;
    a1 += x1 * x1;
  }
  a0 += a1;
  float s = 0.f;
  for (int j = 0; j < 8; ++j) s += a0[j];
  for (; i < n; ++i) s += x[i] * x[i];
  return s;
}

// Pack catalog rows [0, nt) of `cat` (row stride cs) into panels of NR rows: out[p][kk][j]. Rows past nt
// are zero. For L2, half_norm[r] = 0.5 * ||c_r||^2 (0 for IP). `row` is d floats of scratch.
template <typename T>
R4T_INLINE void pack_tile(const T* cat, int64_t cs, int64_t nt, int64_t d, bool l2, float* out,
                          float* half_norm, float* row) {
  const int64_t panels = (nt + NR - 1) / NR;
  for (int64_t p = 0; p < panels; ++p) {
    float* dst = out + p * NR * d;
    for (int j = 0; j < NR; ++j) {
      const int64_t r = p * NR + j;
      if (r < nt) {
        const T* src = cat + r * cs;
        for (int64_t kk = 0; kk < d; ++kk) row[kk] = load_elem<T>(src, kk);
        for (int64_t kk = 0; kk < d; ++kk) dst[kk * NR + j] = row[kk];
        half_norm[r] = l2 ? 0.5f * sum_squares(row, d) : 0.f;
      } else {
        for (int64_t kk = 0; kk < d; ++kk) dst[kk * NR + j] = 0.f;
        half_norm[r] = 0.f;
      }
    }
  }
}

// 6 x 16 block of dot products: q (MR rows, contiguous, row stride d) against one packed panel.
R4T_INLINE void micro_kernel(const float* q, const float* panel, int64_t d, v8sf acc[MR][2]) {
  v8sf c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {};
  v8sf c30 = {}, c31 = {}, c40 = {}, c41 = {}, c50 = {}, c51 = {};
  const float* q0 = q;
  const float* q1 = q + d;
  const float* q2 = q + 2 * d;
  const float* q3 = q + 3 * d;
  const float* q4 = q + 4 * d;
  const float* q5 = q + 5 * d;
  for (int64_t kk = 0; kk < d; ++kk) {
    v8sf b0, b1;
    std::memcpy(&b0, panel + kk * NR, sizeof b0);
    std::memcpy(&b1, panel + kk * NR + 8, sizeof b1);
    float a;
    a = q0[kk];
    c00 += a * b0;
    c01 += a * b1;
    a = q1[kk];
    c10 += a * b0;
    c11 += a * b1;
    a = q2[kk];
    c20 += a * b0;
    c21 += a * b1;
    a = q3[kk];
    c30 += a * b0;
    c31 += a * b1;
    a = q4[kk];
    c40 += a * b0;
    c41 += a * b1;
    a = q5[kk];
    c50 += a * b0;
    c51 += a * b1;
  }
  acc[0][0] = c00;
  acc[0][1] = c01;
  acc[1][0] = c10;
  acc[1][1] = c11;
  acc[2][0] = c20;
  acc[2][1] = c21;
  acc[3][0] = c30;
  acc[3][1] = c31;
  acc[4][0] = c40;
  acc[4][1] = c41;
  acc[5][0] = c50;
  acc[5][1] = c51;
}

struct ChunkArgs {
  const float* q;  // contiguous padded queries, (nq_pad, d)
  int64_t nq;      // real queries in this chunk
  const void* cat; // catalog base (row 0)
  int64_t cs;
  int64_t n0, n1;  // catalog rows [n0, n1) for this thread
  int64_t d, k;
  bool l2;
  Entry* heaps;         // (nq, k)
  float* packed;        // tile_rows_pad * d
  float* half_norm;     // tile_rows_pad
  int64_t tile_rows;
  float* row;           // d floats of scratch
};

template <typename T>
R4T_INLINE void process_chunk_impl(const ChunkArgs& a) {
  const T* cat = static_cast<const T*>(a.cat);
  const int64_t d = a.d, k = a.k;
  for (int64_t t0 = a.n0; t0 < a.n1; t0 += a.tile_rows) {
    const int64_t nt = std::min(a.tile_rows, a.n1 - t0);
    pack_tile<T>(cat + t0 * a.cs, a.cs, nt, d, a.l2, a.packed, a.half_norm, a.row);
    const int64_t panels = (nt + NR - 1) / NR;
    for (int64_t qb = 0; qb < a.nq; qb += MR) {
      const int mq = static_cast<int>(std::min<int64_t>(MR, a.nq - qb));
      const float* qp = a.q + qb * d;
      for (int64_t p = 0; p < panels; ++p) {
        v8sf acc[MR][2];
        micro_kernel(qp, a.packed + p * NR * d, d, acc);
        const int64_t base = p * NR;
        const int valid = static_cast<int>(std::min<int64_t>(NR, nt - base));
        if (a.l2) {
          v8sf h0, h1;
          std::memcpy(&h0, a.half_norm + base, sizeof h0);
          std::memcpy(&h1, a.half_norm + base + 8, sizeof h1);
          for (int i = 0; i < MR; ++i) {
            acc[i][0] -= h0;
            acc[i][1] -= h1;
          }
        }
        for (int i = 0; i < mq; ++i) {
          Entry* h = a.heaps + (qb + i) * k;
          const float thr = h[0].key;
          v8sf m = acc[i][0] > acc[i][1] ? acc[i][0] : acc[i][1];
          if (!(hmax(m) > thr) && valid == NR) continue;
          for (int j = 0; j < valid; ++j) {
            const float s = acc[i][j >> 3][j & 7];
            if (s > h[0].key) heap_push(h, k, s, t0 + base + j);
          }
        }
      }
    }
  }
}

// Direct path for tiny batches: one pass over the catalog rows, no packing.
template <typename T>
R4T_INLINE void process_direct_impl(const ChunkArgs& a) {
  const T* cat = static_cast<const T*>(a.cat);
  const int64_t d = a.d, k = a.k;
  float* row = a.row;
  for (int64_t n = a.n0; n < a.n1; ++n) {
    const T* src = cat + n * a.cs;
    const float* rp;
    if constexpr (std::is_same<T, float>::value) {
      rp = src;
    } else {
      for (int64_t kk = 0; kk < d; ++kk) row[kk] = load_elem<T>(src, kk);
      rp = row;
    }
    const float hn = a.l2 ? 0.5f * sum_squares(rp, d) : 0.f;
    for (int64_t i = 0; i < a.nq; ++i) {
      const float* q = a.q + i * d;
      v8sf s0 = {}, s1 = {};
      int64_t kk = 0;
      for (; kk + 16 <= d; kk += 16) {
        v8sf x0, x1, y0, y1;
        std::memcpy(&x0, q + kk, sizeof x0);
        std::memcpy(&x1, q + kk + 8, sizeof x1);
        std::memcpy(&y0, rp + kk, sizeof y0);
        std::memcpy(&y1, rp + kk + 8, sizeof y1);
        s0 += x0 * y0;
        s1 += x1 * y1;
      }
      v8sf s = s0 + s1;
      float dot = 0.f;
      for (int j = 0; j < 8; ++j) dot += s[j];
      for (; kk < d; ++kk) dot += q[kk] * rp[kk];
      const float key = dot - hn;
      Entry* h = a.heaps + i * k;
      if (key > h[0].key) heap_push(h, k, key, n);
    }
  }
}

R4T_CLONES void process_chunk_f32(const ChunkArgs& a) { process_chunk_impl<float>(a); }
R4T_CLONES void process_chunk_f16(const ChunkArgs& a) { process_chunk_impl<uint16_t>(a); }
R4T_CLONES void process_direct_f32(const ChunkArgs& a) { process_direct_impl<float>(a); }
R4T_CLONES void process_direct_f16(const ChunkArgs& a) { process_direct_impl<uint16_t>(a); }

}  // namespace

const char* cpu_simd_level() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3 (AVX2, FMA, F16C)";
  return "x86-64 (SSE2 baseline)";
#else
  return "portable (compiler auto-vectorisation)";
#endif
}

void knn_cpu(const KnnParams& p) {
  check(p.B >= 0 && p.N >= 0 && p.d > 0 && p.k > 0, "knn: invalid sizes");
  check(p.queries != nullptr || p.B == 0, "knn: queries is null");
  const int64_t B = p.B, N = p.N, d = p.d, k = p.k;
  const bool l2 = p.metric == Metric::L2;
  const bool f16 = p.catalog_dtype == DType::F16;
  if (B == 0) return;

  // Threads: at most one per ~4M multiply-adds (and per 256 catalog rows), so small searches stay on
  // the calling thread: waking a team costs more than the work, and far more on a loaded machine.
  const int64_t work = B * N * d;
  const int64_t by_work = std::max<int64_t>(1, work / (int64_t{1} << 22));
  const int T = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>({max_threads(p.num_threads), (N + 255) / 256, by_work})));
  const int64_t tile_rows = std::max<int64_t>(NR, (kTileBytes / (4 * d)) / NR * NR);
  const bool direct = B < MR;
  const Entry sentinel{-std::numeric_limits<float>::infinity(), -1};

  for (int64_t qc0 = 0; qc0 < B; qc0 += kQueryChunk) {
    const int64_t nq = std::min(kQueryChunk, B - qc0);
    const int64_t nq_pad = (nq + MR - 1) / MR * MR;
    std::vector<float> qbuf(static_cast<size_t>(nq_pad * d), 0.f);
    std::vector<float> qnorm(static_cast<size_t>(nq), 0.f);
    for (int64_t i = 0; i < nq; ++i) {
      const float* src = p.queries + (qc0 + i) * p.q_stride;
      for (int64_t kk = 0; kk < d; ++kk) qbuf[i * d + kk] = src[kk];
      qnorm[i] = l2 ? sum_squares(src, d) : 0.f;
    }
    std::vector<Entry> heaps(static_cast<size_t>(T) * nq * k, sentinel);

#if defined(R4T_WITH_OPENMP)
#pragma omp parallel num_threads(T) if (T > 1)
#endif
    {
#if defined(R4T_WITH_OPENMP)
      const int tid = omp_get_thread_num();
#else
      const int tid = 0;
#endif
      // Contiguous catalog chunk per thread, aligned to panels.
      const int64_t per = ((N + T - 1) / T + NR - 1) / NR * NR;
      const int64_t n0 = std::min(N, tid * per), n1 = std::min(N, n0 + per);
      std::vector<float> packed(static_cast<size_t>(direct ? 0 : tile_rows * d));
      std::vector<float> row(static_cast<size_t>(d));
      std::vector<float> half_norm(static_cast<size_t>(tile_rows + NR), 0.f);
      ChunkArgs a{qbuf.data(), nq,     p.catalog, p.c_stride,       n0,        n1,       d, k, l2,
                  heaps.data() + static_cast<size_t>(tid) * nq * k, packed.data(), half_norm.data(), tile_rows,
                  row.data()};
      if (n0 < n1) {
        if (direct) {
          f16 ? process_direct_f16(a) : process_direct_f32(a);
        } else {
          f16 ? process_chunk_f16(a) : process_chunk_f32(a);
        }
      }
    }

    // Merge the per-thread heaps of each query and write sorted results.
#if defined(R4T_WITH_OPENMP)
#pragma omp parallel for num_threads(max_threads(p.num_threads)) schedule(static) if (nq * T * k > (1 << 16))
#endif
    for (int64_t i = 0; i < nq; ++i) {
      std::vector<Entry> all;
      all.reserve(static_cast<size_t>(T * k));
      for (int t = 0; t < T; ++t) {
        const Entry* h = heaps.data() + (static_cast<size_t>(t) * nq + i) * k;
        all.insert(all.end(), h, h + k);
      }
      std::partial_sort(all.begin(), all.begin() + k, all.end(), better);
      float* os = p.out_scores + (qc0 + i) * k;
      int64_t* oi = p.out_ids + (qc0 + i) * k;
      for (int64_t j = 0; j < k; ++j) {
        const Entry& e = all[static_cast<size_t>(j)];
        oi[j] = e.id;
        if (e.id < 0) {
          os[j] = l2 ? std::numeric_limits<float>::infinity() : -std::numeric_limits<float>::infinity();
        } else if (l2) {
          os[j] = std::max(0.f, qnorm[i] - 2.f * e.key);
        } else {
          os[j] = e.key;
        }
      }
    }
  }
}

}  // namespace r4t
