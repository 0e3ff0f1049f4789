// Internal interface between the CPU knn driver (knn.cpp) and its per-instruction-set bodies
// (knn_impl.h, compiled once per ISA inside `#pragma GCC target` regions of knn.cpp). Nothing here uses
// vector types, so it is compiled for the baseline ISA and shared by all of them.
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>

#include "common.h"

namespace r4t {
namespace knn_detail {

// A heap / result entry. `key` is "larger is better" (IP: <q, c>; L2: -||q - c||^2, negation is exact).
// The ranking is a total order: keys descending with NaN below -inf, then ids ascending, with id -1 (the
// sentinel, key NaN) below every real item. So a real item whose score overflowed to -inf (or became NaN)
// still ranks above the sentinel, and k <= N always returns k real ids.
struct Entry {
  float key;
  int64_t id;
};

R4T_INLINE bool key_below(float a, float b) { return a < b || (a != a && b == b); }

// a ranks strictly below b.
R4T_INLINE bool worse(const Entry& a, const Entry& b) {
  if (key_below(a.key, b.key)) return true;
  if (key_below(b.key, a.key)) return false;
  return static_cast<uint64_t>(a.id) > static_cast<uint64_t>(b.id);
}
R4T_INLINE bool better(const Entry& a, const Entry& b) { return worse(b, a); }

// Bounded heap of k entries whose root h[0] is the worst kept so far. Replaces the root by e when e ranks
// above it; returns the new root key (the query's admission threshold).
R4T_INLINE float heap_offer(Entry* h, int64_t k, float key, int64_t id) {
  const Entry e{key, id};
  if (!worse(h[0], e)) return h[0].key;
  int64_t i = 0;
  for (;;) {
    const int64_t l = 2 * i + 1;
    if (l >= k) break;
    const int64_t r = l + 1;
    const int64_t w = (r < k && worse(h[r], h[l])) ? r : l;  // the worse child
    if (!worse(h[w], e)) break;
    h[i] = h[w];
    i = w;
  }
  h[i] = e;
  return h[0].key;
}

// One query's result row: entries e[0..m) best first (an id -1 entry is a sentinel; L2 keys are negated
// distances and are written back as distances), then sentinels up to k (id -1, score -inf IP / +inf L2).
R4T_INLINE void write_result(const Entry* e, int64_t m, int64_t k, bool l2, float* os, int64_t* oi) {
  const float sentinel = l2 ? std::numeric_limits<float>::infinity() : -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < m; ++j) {
    oi[j] = e[j].id;
    os[j] = e[j].id < 0 ? sentinel : (l2 ? -e[j].key : e[j].key);
  }
  for (int64_t j = m; j < k; ++j) {
    oi[j] = -1;
    os[j] = sentinel;
  }
}

// Up to `want` allowed row ids from [cur, end) into ids (ascending; ids may be nullptr to only skip
// them); advances cur; returns the count.
R4T_INLINE int64_t collect_rows(const uint8_t* allowed, int64_t& cur, int64_t end, int64_t want,
                                int64_t* ids) {
  int64_t c = 0;
  if (allowed == nullptr) {
    const int64_t n = want < end - cur ? want : end - cur;
    if (ids != nullptr) {
      for (int64_t i = 0; i < n; ++i) ids[i] = cur + i;
    }
    cur += n;
    return n;
  }
  while (cur < end && c < want) {
    if (cur + 8 <= end && (cur & 7) == 0) {  // 8 rows at a time: all excluded, or all allowed (bool 1s)
      uint64_t w;
      std::memcpy(&w, allowed + cur, sizeof w);
      if (w == 0) {
        cur += 8;
        continue;
      }
      if (w == 0x0101010101010101ull && want - c >= 8) {
        if (ids != nullptr) {
          for (int64_t i = 0; i < 8; ++i) ids[c + i] = cur + i;
        }
        c += 8;
        cur += 8;
        continue;
      }
    }
    if (allowed[cur]) {
      if (ids != nullptr) ids[c] = cur;
      ++c;
    }
    ++cur;
  }
  return c;
}

// A block of queries in the GEMM path: queries [q0, q0 + nq) of the chunk, transposed into
// qT[off .. off + d * nv * W) as [feature][lane] with nv * W lanes (zero past nq).
struct QBlock {
  int64_t q0;
  int64_t nq;
  int nv;
  int64_t off;
};

// Shared, read-only description of one query chunk.
struct Job {
  const void* cat = nullptr;
  int64_t cs = 0;
  bool f16 = false;
  bool l2 = false;
  const uint8_t* allowed = nullptr;
  int64_t d = 0, dpad = 0, keff = 0, nq = 0;
  bool direct = false;
  bool small = false;           // direct path, 2 <= nq < W: the small-B kernel (every query per catalog row)
  bool prefetch = false;        // direct path: software-prefetch rows ahead (catalogs beyond the L3)
  const float* qrow = nullptr;  // direct path: (nq, dpad) queries, zero-padded rows
  const float* qT = nullptr;    // GEMM path: transposed query blocks
  const QBlock* blocks = nullptr;
  int nblocks = 0;
  int64_t tile_rows = 0;  // GEMM path: catalog rows per tile (multiple of NR)
  int64_t kc = 0;         // GEMM path: feature block (K-blocking); == d when unblocked
};

// One thread's catalog rows and scratch (allocated by the driver, outside the parallel region).
struct Slice {
  int64_t n0 = 0, n1 = 0;
  Entry* heaps = nullptr;        // (nq, keff)
  float* thr = nullptr;          // (nq_pad,) admission thresholds: the heap roots; +inf for padding lanes
  int64_t* ids = nullptr;        // (tile_rows + pad,)
  const float** ptrs = nullptr;  // (tile_rows + pad,)
  float* tile = nullptr;         // fp16 catalogs: converted rows, (tile_rows, dpad)
  float* cbuf = nullptr;         // K-blocking: partial scores, (tile_rows, NVMAX * W)
  const float* zero = nullptr;   // dpad zeros (padding rows)
};

// What one ISA body provides.
struct IsaInfo {
  const char* name;
  int W;      // floats per vector
  int NR;     // catalog rows per GEMM micro-tile
  int NVMAX;  // query vectors per GEMM micro-tile (NVMAX * W queries)
  int DR;     // catalog rows per direct-path group
  void (*worker)(const Job&, const Slice&);
  double (*fma_loop)(int64_t iters);  // runs iters * 24 * W FMAs, returns a value to keep them alive
};

}  // namespace knn_detail
}  // namespace r4t
