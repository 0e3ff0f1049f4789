// Exact top-k on the GPU (KnnParams contract in params.h), fused: the (B, N) score matrix is never stored.
//
// Algorithm (two kernels on the caller's stream, on the tensors' device):
//
//   1. knn_partial_kernel, grid (ceil(B_batch / TQ), nchunks), kThreads threads.
//      Block (x, y) owns queries [x*TQ, x*TQ + TQ) and catalog chunk y (a run of kTN-item tiles). The query
//      tile TQ = 8 * RM is sized from the batch: RM = 1 (8 queries) for B <= 8, 2 for B <= 16, else 4, so
//      a single query does not pay for 31 idle rows of the GEMM. For every tile it computes the TQ x kTN
//      scores with a shared-memory tiled fp32 GEMM (the fp16 catalog is widened to fp32 on its way into
//      shared memory; each thread keeps an RM x 4 register micro-tile), then filters them against each
//      query's current k-th best and appends the survivors to a per-query candidate buffer in shared
//      memory. Rows excluded by the `allowed` mask are never candidates. When a buffer may not have room
//      for another tile it is merged into that query's running top-k list, which lives in the workspace
//      slot ws[query][chunk][0..k) (sorted best first). The merge sorts the buffer (block bitonic sort)
//      and merges the two sorted lists by rank (binary search), keeping the first k.
//   2. knn_merge_kernel, grid (B_batch), kThreads threads: merges the nchunks sorted partial lists of one
//      query pairwise (by rank again) in shared memory and writes scores (float32) and ids (int64), then
//      the sentinels of the slots keff..k_out-1.
//
// Ordering: internally every score is a key where larger is better (key = <q,c> for IP, -||q-c||^2 for
// L2; negation is exact), compared as the pair (key desc with NaN below -inf, id asc): the same total
// order as the CPU kernel (cpu/knn_detail.h). Empty slots hold the sentinel (key NaN, id INT32_MAX), which
// ranks below every real item, even one whose score overflowed to -inf or NaN; so when N >= k all k ids
// are real. Sentinel slots are written out as id -1 and score -inf (IP) / +inf (L2).
//
// Limits: keff = min(k, N) <= kKnnMaxK (2048): the running list of one query and the merge lists must fit
// in shared memory; larger keff raises r4t::ValueError on the host before anything is launched. Slots past
// keff are sentinels, so k itself may be larger. Catalog ids are int32 internally (tile offsets too), so
// N <= 2^31 - 257. L2 is computed as sum((q - c)^2) (no norm expansion, so no cancellation), as on the CPU.
//
// Memory: the partial lists live in a workspace the caller allocates (torch's caching allocator, on the
// caller's stream) with the size knn_cuda_workspace_bytes() reports; no private allocation per call.
//
// Precision: fp32 FMA for both catalog dtypes (no tensor cores): the fp16 path would need the fp32 queries
// rounded to fp16 (or split hi/lo) to use WMMA/mma, which changes the scores beyond the fp32 reference.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>

#include "common.h"
#include "cuda/cuda_check.h"
#include "kernels.h"

namespace r4t {
namespace {

constexpr int kThreads = 256;  // 8 warps: thread (ty = tid / 32, tx = tid % 32)
constexpr int kTN = 128;       // catalog items per tile; thread cols tx + 32*j, j < 4
constexpr int kTK = 32;        // feature slice staged in shared memory per GEMM step
constexpr int kCap = 192;      // candidate buffer per query; merged when it holds more than kCap - kTN
constexpr int kSortCap = 256;  // power of two >= kCap: the bitonic sort scratch
constexpr int kKnnMaxK = 2048;
constexpr int kMaxChunks = 256;                       // bounds the sequential merge work of kernel 2
constexpr size_t kWorkspaceBudget = size_t(1) << 30;  // bytes of partial lists per query batch
constexpr int32_t kSentinelId = INT32_MAX;

static_assert(kCap >= kTN && kSortCap >= kCap, "a buffer must hold one whole tile of candidates");
static_assert(kTN * kTK % kThreads == 0, "tile loads must divide evenly");
static_assert(kThreads == 256 && kTN == 128, "the RM x 4 micro-tile mapping assumes these");

// Queries per block for RM rows per thread (8 warps, warp ty owns rows ty + 8*i, i < RM).
__host__ __device__ constexpr int tq_of(int rm) { return 8 * rm; }

// Shared-memory layout of knn_partial_kernel (bytes), identical on host and device, for TQ queries:
//   [0, union)            GEMM stage Qs[kTK][TQ+1] + Cs[kTK][kTN+1]   -- or, during a merge --
//                         running list A (key[k], id[k]) + sort scratch (key[kSortCap], id[kSortCap])
//   [union, +buf)         candidate buffers key[TQ][kCap], id[TQ][kCap]
//   [.., +meta)           cnt[TQ], thr_key[TQ], thr_id[TQ]
// The GEMM stage and the merge scratch are never live at the same time (separated by __syncthreads).
__host__ __device__ constexpr size_t align16(size_t x) { return (x + 15) / 16 * 16; }
__host__ __device__ constexpr size_t gemm_stage_bytes(int tq) {
  return sizeof(float) * (size_t(kTK) * (tq + 1) + size_t(kTK) * (kTN + 1));
}
__host__ __device__ constexpr size_t merge_scratch_bytes(int k) {
  return (sizeof(float) + sizeof(int32_t)) * (size_t(k) + kSortCap);
}
__host__ __device__ constexpr size_t union_bytes(int tq, int k) {
  return align16(gemm_stage_bytes(tq) > merge_scratch_bytes(k) ? gemm_stage_bytes(tq)
                                                               : merge_scratch_bytes(k));
}
__host__ __device__ constexpr size_t buffer_bytes(int tq) {
  return align16((sizeof(float) + sizeof(int32_t)) * size_t(tq) * kCap);
}
__host__ __device__ constexpr size_t meta_bytes(int tq) { return align16(3 * sizeof(int32_t) * size_t(tq)); }
__host__ __device__ constexpr size_t partial_smem_bytes(int tq, int k) {
  return union_bytes(tq, k) + buffer_bytes(tq) + meta_bytes(tq);
}
// knn_merge_kernel: three lists (current, incoming, next) of k (key, id) pairs.
__host__ __device__ constexpr size_t merge_smem_bytes(int k) {
  return 3 * (sizeof(float) + sizeof(int32_t)) * size_t(k);
}

// Key a ranks strictly below key b: smaller, or NaN against a number.
__device__ __forceinline__ bool key_below(float a, float b) { return a < b || (isnan(a) && !isnan(b)); }

// (ka, ia) ranks strictly before (kb, ib): larger key first (NaN last), then smaller id.
__device__ __forceinline__ bool better(float ka, int32_t ia, float kb, int32_t ib) {
  if (key_below(kb, ka)) return true;
  if (key_below(ka, kb)) return false;
  return ia < ib;
}

// Number of entries of the sorted (best-first) list (k, id)[0..n) that rank strictly before (key, i).
__device__ __forceinline__ int count_better(const float* k, const int32_t* id, int n, float key, int32_t i) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (better(k[mid], id[mid], key, i)) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Number of entries of the sorted list that do not rank after (key, i) (better or equal).
__device__ __forceinline__ int count_not_worse(const float* k, const int32_t* id, int n, float key,
                                               int32_t i) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (!better(key, i, k[mid], id[mid])) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Block-wide bitonic sort, best first, of (key, id)[0..P), P a power of two. All threads must call it;
// the caller synchronises before (inputs written) and it synchronises after every stage.
__device__ void bitonic_sort_best_first(float* key, int32_t* id, int P) {
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < P; i += blockDim.x) {
        const int j = i ^ stride;
        if (j > i) {
          const float ki = key[i], kj = key[j];
          const int32_t ii = id[i], ij = id[j];
          const bool best_first = (i & size) == 0;  // direction of this bitonic run
          const bool swap = best_first ? better(kj, ij, ki, ii) : better(ki, ii, kj, ij);
          if (swap) {
            key[i] = kj;
            key[j] = ki;
            id[i] = ij;
            id[j] = ii;
          }
        }
      }
      __syncthreads();
    }
  }
}

// Stable merge by rank of two best-first lists A[0..na) and B[0..nb) into out[0..k): an element of A
// lands at i + #(B strictly better), an element of B at j + #(A better or equal). These positions are a
// permutation of [0, na + nb) even when the lists share equal entries (the sentinels), so every slot
// < min(k, na + nb) is written exactly once. out must not alias A or B. No synchronisation inside.
// Returns nothing; when thr_key is non-null the thread that writes slot k-1 also stores it there.
__device__ void merge_by_rank(const float* aK, const int32_t* aI, int na, const float* bK, const int32_t* bI,
                              int nb, float* oK, int32_t* oI, int k, float* thr_key, int32_t* thr_id) {
  for (int i = threadIdx.x; i < na; i += blockDim.x) {
    const float key = aK[i];
    const int32_t id = aI[i];
    const int pos = i + count_better(bK, bI, nb, key, id);
    if (pos < k) {
      oK[pos] = key;
      oI[pos] = id;
      if (thr_key != nullptr && pos == k - 1) {
        *thr_key = key;
        *thr_id = id;
      }
    }
  }
  for (int j = threadIdx.x; j < nb; j += blockDim.x) {
    const float key = bK[j];
    const int32_t id = bI[j];
    const int pos = j + count_not_worse(aK, aI, na, key, id);
    if (pos < k) {
      oK[pos] = key;
      oI[pos] = id;
      if (thr_key != nullptr && pos == k - 1) {
        *thr_key = key;
        *thr_id = id;
      }
    }
  }
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// Kernel 1. See the file comment. ws_key/ws_id: (B_batch, nchunks, k) partial lists.
template <typename CT, bool kL2, int kRM>
__global__ void __launch_bounds__(kThreads)
    knn_partial_kernel(const float* __restrict__ queries, int64_t q_stride, const CT* __restrict__ catalog,
                       int64_t c_stride, const uint8_t* __restrict__ allowed, int B, int N, int d, int k,
                       int tiles_per_chunk, float* __restrict__ ws_key, int32_t* __restrict__ ws_id) {
  constexpr int kTQ = tq_of(kRM);
  static_assert(kTQ * kTK % kThreads == 0, "query tile loads must divide evenly");
  extern __shared__ __align__(16) unsigned char smem[];
  // GEMM stage (union region).
  float* Qs = reinterpret_cast<float*>(smem);  // [kTK][kTQ + 1], transposed: Qs[f][query]
  float* Cs = Qs + kTK * (kTQ + 1);            // [kTK][kTN + 1], transposed: Cs[f][item]
  // Merge scratch (same union region).
  float* aK = reinterpret_cast<float*>(smem);
  int32_t* aI = reinterpret_cast<int32_t*>(aK + k);
  float* sK = reinterpret_cast<float*>(aI + k);
  int32_t* sI = reinterpret_cast<int32_t*>(sK + kSortCap);
  // Candidate buffers and per-query state.
  float* bufK = reinterpret_cast<float*>(smem + union_bytes(kTQ, k));
  int32_t* bufI = reinterpret_cast<int32_t*>(bufK + kTQ * kCap);
  int32_t* cnt = reinterpret_cast<int32_t*>(smem + union_bytes(kTQ, k) + buffer_bytes(kTQ));
  float* thrK = reinterpret_cast<float*>(cnt + kTQ);
  int32_t* thrI = reinterpret_cast<int32_t*>(thrK + kTQ);

  const int tid = threadIdx.x;
  const int tx = tid % 32, ty = tid / 32;
  const int q0 = blockIdx.x * kTQ;
  const int nq = min(kTQ, B - q0);
  const int nchunks = gridDim.y;
  const int ntiles = (N + kTN - 1) / kTN;
  const int tile_begin = blockIdx.y * tiles_per_chunk;
  const int tile_end = min(tile_begin + tiles_per_chunk, ntiles);
  const float sentinel_key = __int_as_float(0x7fc00000);  // quiet NaN: ranks below every real item
  auto slot = [&](int qi) { return (int64_t(q0 + qi) * nchunks + blockIdx.y) * k; };

  // Running lists start as all sentinels; thresholds as the sentinel.
  for (int i = tid; i < nq * k; i += kThreads) {
    const int64_t o = slot(i / k) + i % k;
    ws_key[o] = sentinel_key;
    ws_id[o] = kSentinelId;
  }
  if (tid < kTQ) {
    cnt[tid] = 0;
    thrK[tid] = sentinel_key;
    thrI[tid] = kSentinelId;
  }
  __syncthreads();

  // Merge query qi's buffer into its running list in the workspace. Called by all threads with a
  // block-uniform qi, after a __syncthreads; ends with one.
  auto merge_query = [&](int qi) {
    const int m = cnt[qi];
    int P = 1;
    while (P < m) P <<= 1;
    for (int i = tid; i < P; i += kThreads) {
      sK[i] = i < m ? bufK[qi * kCap + i] : sentinel_key;
      sI[i] = i < m ? bufI[qi * kCap + i] : kSentinelId;
    }
    float* gK = ws_key + slot(qi);
    int32_t* gI = ws_id + slot(qi);
    for (int i = tid; i < k; i += kThreads) {
      aK[i] = gK[i];
      aI[i] = gI[i];
    }
    __syncthreads();
    bitonic_sort_best_first(sK, sI, P);
    merge_by_rank(aK, aI, k, sK, sI, m, gK, gI, k, &thrK[qi], &thrI[qi]);
    __syncthreads();
    if (tid == 0) cnt[qi] = 0;
    __syncthreads();
  };

  for (int t = tile_begin; t < tile_end; ++t) {
    const int n0 = t * kTN;
    float acc[kRM][4];
#pragma unroll
    for (int i = 0; i < kRM; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    }

    for (int f0 = 0; f0 < d; f0 += kTK) {
      // Stage the query slice: element idx -> (row r, feature c), consecutive threads read consecutive
      // features of one row (coalesced); stored transposed with a +1 pad (no bank conflicts).
#pragma unroll
      for (int e = 0; e < kTQ * kTK / kThreads; ++e) {
        const int idx = tid + e * kThreads;
        const int r = idx / kTK, c = idx % kTK;
        const int qi = q0 + r, f = f0 + c;
        Qs[c * (kTQ + 1) + r] = (qi < B && f < d) ? queries[int64_t(qi) * q_stride + f] : 0.f;
      }
#pragma unroll
      for (int e = 0; e < kTN * kTK / kThreads; ++e) {
        const int idx = tid + e * kThreads;
        const int r = idx / kTK, c = idx % kTK;
        const int ni = n0 + r, f = f0 + c;
        Cs[c * (kTN + 1) + r] = (ni < N && f < d) ? to_float(catalog[int64_t(ni) * c_stride + f]) : 0.f;
      }
      __syncthreads();
#pragma unroll 8
      for (int f = 0; f < kTK; ++f) {
        float a[kRM], b[4];
#pragma unroll
        for (int i = 0; i < kRM; ++i) a[i] = Qs[f * (kTQ + 1) + ty + 8 * i];  // broadcast within a warp
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = Cs[f * (kTN + 1) + tx + 32 * j];  // consecutive banks
#pragma unroll
        for (int i = 0; i < kRM; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (kL2) {
              const float diff = a[i] - b[j];
              acc[i][j] = fmaf(diff, diff, acc[i][j]);
            } else {
              acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
            }
          }
        }
      }
      __syncthreads();  // the stage is overwritten next step (or reused as merge scratch)
    }

    // Filter: keep what beats the query's current k-th best (excluded rows never). A buffer has >= kTN
    // free slots here, so the atomicAdd position is always in range.
#pragma unroll
    for (int i = 0; i < kRM; ++i) {
      const int qi = ty + 8 * i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int n = n0 + tx + 32 * j;
        if (qi < nq && n < N && (allowed == nullptr || allowed[n] != 0)) {
          const float key = kL2 ? -acc[i][j] : acc[i][j];
          if (better(key, n, thrK[qi], thrI[qi])) {
            const int pos = atomicAdd(&cnt[qi], 1);
            bufK[qi * kCap + pos] = key;
            bufI[qi * kCap + pos] = n;
          }
        }
      }
    }
    __syncthreads();
    // Make room for the next tile.
    for (int qi = 0; qi < nq; ++qi) {
      if (cnt[qi] > kCap - kTN) merge_query(qi);
    }
  }
  for (int qi = 0; qi < nq; ++qi) {
    if (cnt[qi] > 0) merge_query(qi);
  }
}

// Kernel 2: one block per query merges its nchunks partial lists and writes the final top-k (k entries),
// then the sentinels of slots k..k_out-1 (k_out is the caller's k, the output row length).
template <bool kL2>
__global__ void __launch_bounds__(kThreads)
    knn_merge_kernel(const float* __restrict__ ws_key, const int32_t* __restrict__ ws_id, int nchunks, int k,
                     int64_t k_out, float* __restrict__ out_scores, int64_t* __restrict__ out_ids) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* curK = reinterpret_cast<float*>(smem);
  int32_t* curI = reinterpret_cast<int32_t*>(curK + k);
  float* inK = reinterpret_cast<float*>(curI + k);
  int32_t* inI = reinterpret_cast<int32_t*>(inK + k);
  float* nxtK = reinterpret_cast<float*>(inI + k);
  int32_t* nxtI = reinterpret_cast<int32_t*>(nxtK + k);

  const int64_t q = blockIdx.x;
  const float* gK = ws_key + q * nchunks * k;
  const int32_t* gI = ws_id + q * nchunks * k;
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    curK[i] = gK[i];
    curI[i] = gI[i];
  }
  for (int c = 1; c < nchunks; ++c) {
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
      inK[i] = gK[int64_t(c) * k + i];
      inI[i] = gI[int64_t(c) * k + i];
    }
    __syncthreads();  // cur (previous merge) and in are complete
    merge_by_rank(curK, curI, k, inK, inI, k, nxtK, nxtI, k, nullptr, nullptr);
    __syncthreads();  // nxt complete; cur and in no longer read
    float* tk = curK;
    curK = nxtK;
    nxtK = tk;
    int32_t* ti = curI;
    curI = nxtI;
    nxtI = ti;
  }
  __syncthreads();
  const float sentinel_score = kL2 ? __int_as_float(0x7f800000) : -__int_as_float(0x7f800000);
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    const int32_t id = curI[i];
    const bool sentinel = id == kSentinelId;
    out_scores[q * k_out + i] = sentinel ? sentinel_score : (kL2 ? -curK[i] : curK[i]);
    out_ids[q * k_out + i] = sentinel ? int64_t(-1) : int64_t(id);
  }
  for (int64_t i = k + threadIdx.x; i < k_out; i += blockDim.x) {
    out_scores[q * k_out + i] = sentinel_score;
    out_ids[q * k_out + i] = -1;
  }
}

// Launch geometry of one call; the same function sizes the workspace (knn_cuda_workspace_bytes) and the
// launch, so the two always agree.
struct Plan {
  int keff = 0;
  size_t smem1 = 0, smem2 = 0;
  int64_t nchunks = 1, tiles_per_chunk = 1, batch = 0;
  size_t n_entries = 0;
  size_t ws_bytes = 0;
};

template <typename CT, bool kL2, int kRM>
Plan make_plan(const KnnParams& p) {
  constexpr int kTQ = tq_of(kRM);
  Plan pl;
  pl.keff = static_cast<int>(std::min<int64_t>(p.k, p.N));
  const int k = pl.keff;
  const int B = static_cast<int>(p.B);
  const int N = static_cast<int>(p.N);
  const DeviceProps dev = current_device_props();
  pl.smem1 = partial_smem_bytes(kTQ, k);
  pl.smem2 = merge_smem_bytes(k);
  check(pl.smem1 <= size_t(dev.smem_optin) && pl.smem2 <= size_t(dev.smem_optin),
        "k: " + std::to_string(k) + " needs " + std::to_string(std::max(pl.smem1, pl.smem2)) +
            " bytes of shared memory per block, this GPU allows " + std::to_string(dev.smem_optin));
  auto* partial = knn_partial_kernel<CT, kL2, kRM>;
  auto* merge = knn_merge_kernel<kL2>;
  R4T_CUDA_CHECK(cudaFuncSetAttribute(partial, cudaFuncAttributeMaxDynamicSharedMemorySize, int(pl.smem1)));
  R4T_CUDA_CHECK(cudaFuncSetAttribute(merge, cudaFuncAttributeMaxDynamicSharedMemorySize, int(pl.smem2)));
  int blocks_per_sm = 0;
  R4T_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, partial, kThreads, pl.smem1));
  blocks_per_sm = std::max(blocks_per_sm, 1);

  // Grid: enough catalog chunks that ~2 waves of blocks cover the GPU, but no more chunks than tiles,
  // at most kMaxChunks, and a workspace of at most kWorkspaceBudget bytes per query batch.
  const int64_t ntiles = (int64_t(N) + kTN - 1) / kTN;
  const int64_t qtiles = (int64_t(B) + kTQ - 1) / kTQ;
  const int64_t target_blocks = 2 * int64_t(dev.sm_count) * blocks_per_sm;
  int64_t nchunks = (target_blocks + qtiles - 1) / qtiles;
  nchunks = std::min<int64_t>({nchunks, std::max<int64_t>(ntiles, 1), kMaxChunks});
  const int64_t list_bytes = int64_t(k) * int64_t(sizeof(float) + sizeof(int32_t));
  nchunks = std::max<int64_t>(1, std::min<int64_t>(nchunks, int64_t(kWorkspaceBudget) / (kTQ * list_bytes)));
  pl.tiles_per_chunk = std::max<int64_t>(1, (ntiles + nchunks - 1) / nchunks);
  pl.nchunks =
      std::max<int64_t>(1, (ntiles + pl.tiles_per_chunk - 1) / pl.tiles_per_chunk);  // no empty chunks

  // Query batch: a multiple of TQ whose partial lists fit the budget (whole B when they do).
  int64_t batch = int64_t(kWorkspaceBudget) / (pl.nchunks * list_bytes);
  batch = std::max<int64_t>(kTQ, batch / kTQ * kTQ);
  pl.batch = std::min<int64_t>(batch, B);
  pl.n_entries = size_t(pl.batch) * size_t(pl.nchunks) * size_t(k);
  pl.ws_bytes = Workspace::bytes_for({pl.n_entries * sizeof(float), pl.n_entries * sizeof(int32_t)});
  return pl;
}

template <typename CT, bool kL2, int kRM>
void launch_knn(const KnnParams& p, cudaStream_t stream) {
  constexpr int kTQ = tq_of(kRM);
  const Plan pl = make_plan<CT, kL2, kRM>(p);
  const int k = pl.keff;
  const int N = static_cast<int>(p.N);
  const int d = static_cast<int>(p.d);
  Workspace ws(p.workspace, p.workspace_bytes);
  float* ws_key = ws.take<float>(pl.n_entries);
  int32_t* ws_id = ws.take<int32_t>(pl.n_entries);
  const CT* catalog = static_cast<const CT*>(p.catalog);
  auto* partial = knn_partial_kernel<CT, kL2, kRM>;
  auto* merge = knn_merge_kernel<kL2>;

  for (int64_t b0 = 0; b0 < p.B; b0 += pl.batch) {
    const int nb = static_cast<int>(std::min<int64_t>(pl.batch, p.B - b0));
    const dim3 grid1(static_cast<unsigned>((nb + kTQ - 1) / kTQ), static_cast<unsigned>(pl.nchunks));
    partial<<<grid1, kThreads, pl.smem1, stream>>>(p.queries + b0 * p.q_stride, p.q_stride, catalog,
                                                   p.c_stride, p.allowed, nb, N, d, k,
                                                   static_cast<int>(pl.tiles_per_chunk), ws_key, ws_id);
    R4T_CUDA_CHECK_LAUNCH(knn_partial_kernel);
    merge<<<static_cast<unsigned>(nb), kThreads, pl.smem2, stream>>>(
        ws_key, ws_id, static_cast<int>(pl.nchunks), k, p.k, p.out_scores + b0 * p.k, p.out_ids + b0 * p.k);
    R4T_CUDA_CHECK_LAUNCH(knn_merge_kernel);
  }
}

// Runs F<CT, kL2, kRM>(p) for the call's dtype, metric and query tile.
template <template <typename, bool, int> class F, typename... A>
auto dispatch(const KnnParams& p, A... args) {
  const bool l2 = p.metric == Metric::L2;
  const int rm = p.B <= 8 ? 1 : (p.B <= 16 ? 2 : 4);
#define R4T_KNN_CASE(CT, L2V, RM)                                                                  \
  if ((p.catalog_dtype == DType::F16) == std::is_same<CT, __half>::value && l2 == L2V && rm == RM) \
    return F<CT, L2V, RM>::run(p, args...);
  R4T_KNN_CASE(float, false, 1)
  R4T_KNN_CASE(float, false, 2)
  R4T_KNN_CASE(float, false, 4)
  R4T_KNN_CASE(float, true, 1)
  R4T_KNN_CASE(float, true, 2)
  R4T_KNN_CASE(float, true, 4)
  R4T_KNN_CASE(__half, false, 1)
  R4T_KNN_CASE(__half, false, 2)
  R4T_KNN_CASE(__half, false, 4)
  R4T_KNN_CASE(__half, true, 1)
  R4T_KNN_CASE(__half, true, 2)
#undef R4T_KNN_CASE
  return F<__half, true, 4>::run(p, args...);
}

template <typename CT, bool kL2, int kRM>
struct WorkspaceOp {
  static size_t run(const KnnParams& p) { return make_plan<CT, kL2, kRM>(p).ws_bytes; }
};
template <typename CT, bool kL2, int kRM>
struct LaunchOp {
  static int run(const KnnParams& p, cudaStream_t stream) {
    launch_knn<CT, kL2, kRM>(p, stream);
    return 0;
  }
};

void check_knn(const KnnParams& p) {
  const std::string dims = " (B=" + std::to_string(p.B) + ", N=" + std::to_string(p.N) +
                           ", d=" + std::to_string(p.d) + ", k=" + std::to_string(p.k) + ")";
  check(p.catalog_dtype == DType::F32 || p.catalog_dtype == DType::F16,
        "catalog_dtype: expected F32 or F16, got " + std::to_string(static_cast<int>(p.catalog_dtype)));
  check(p.metric == Metric::IP || p.metric == Metric::L2,
        "metric: expected IP or L2, got " + std::to_string(static_cast<int>(p.metric)));
  check(p.B >= 0 && p.N >= 0 && p.d >= 0 && p.k >= 0, "knn: sizes must be non-negative" + dims);
  check(std::min(p.k, p.N) <= kKnnMaxK, "k: the CUDA knn supports min(k, N) <= " + std::to_string(kKnnMaxK) +
                                            ", got k=" + std::to_string(p.k) +
                                            " with N=" + std::to_string(p.N));
  check(p.N <= INT32_MAX - 2 * kTN, "catalog: the CUDA knn supports at most 2^31 - 257 rows" + dims);
  check(p.B <= INT32_MAX && p.d <= INT32_MAX, "queries: batch and dim must fit in int32" + dims);
}

}  // namespace

size_t knn_cuda_workspace_bytes(const KnnParams& p) {
  check_knn(p);
  if (p.B == 0 || p.k == 0 || p.N == 0) return 0;
  DeviceGuard guard(p.device);
  return dispatch<WorkspaceOp>(p);
}

void knn_cuda(const KnnParams& p) {
  check_knn(p);
  const std::string dims = " (B=" + std::to_string(p.B) + ", N=" + std::to_string(p.N) +
                           ", d=" + std::to_string(p.d) + ", k=" + std::to_string(p.k) + ")";
  if (p.B == 0 || p.k == 0) return;
  check(p.out_scores != nullptr && p.out_ids != nullptr, "out_scores/out_ids: null output pointer");
  check(p.d == 0 || p.queries != nullptr, "queries: null pointer" + dims);
  check(p.d == 0 || p.N == 0 || p.catalog != nullptr, "catalog: null pointer" + dims);
  check(p.B <= 1 || p.q_stride >= p.d, "q_stride: must be >= d, got " + std::to_string(p.q_stride) + dims);
  check(p.N <= 1 || p.c_stride >= p.d, "c_stride: must be >= d, got " + std::to_string(p.c_stride) + dims);
  check(p.N > 0, "catalog: is empty" + dims);
  DeviceGuard guard(p.device);
  dispatch<LaunchOp>(p, static_cast<cudaStream_t>(p.stream));
}

}  // namespace r4t
