// Per-set kernels (GroundParams, SetStatsParams in params.h) and the CUDA device queries.
//
// ground_kernel, grid (sets in the batch), kGroundThreads threads, one block per set:
//   1. every (row, candidate) pair with a valid id becomes an entry (score, flat index r*C + c) in a
//      scratch array padded to a power of two P with invalid entries;
//   2. a block bitonic sort orders the entries exactly as the sequential greedy visits them: best score
//      first, then lower row, then lower item id (invalid entries last);
//   3. warp 0 walks the sorted entries in order, exactly like the CPU loop: an entry is taken when its row
//      is still open and its item is not yet used (the used check is a warp ballot over the rows' taken
//      ids). Because the order is the same total order and the walk is sequential, the result is
//      bit-identical to a sequential CPU greedy (scores are copied, never recomputed).
//   The scratch lives in shared memory when it fits (P*8 + L*12 bytes), else in the workspace the caller
//   allocates (ground_cuda_workspace_bytes), processed in batches of sets. NaN scores rank after every
//   other score (the knn order), so the sort is a total order.
//
// set_stats_kernel, grid (S), kStatsThreads threads, one block per set:
//   inverse row norms (one warp per row, float64), Gram matrix K (one warp per pair i < j, float64 dot
//   products scaled by the inverse norms; K_ii = 1; zero rows give 0 off the diagonal), the mean
//   off-diagonal cosine, then warp 0 runs cyclic Jacobi (row-by-row pair order) on K in shared memory
//   until the off-diagonal norm is below 1e-13 * ||K||_F (at most kMaxSweeps sweeps). Vendi = exp(H) with
//   H = -sum lam log lam over lam = diag(K)/n > 1e-15 (the CPU kernel's cut-off); an empty set (n = 0)
//   gets Vendi 0 and mean cosine 0, as on the CPU.
//   Limit: L <= kSetStatsMaxL (128): K (L*L float64) must fit in shared memory; checked on the host.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>

#include "common.h"
#include "cuda/cuda_check.h"
#include "kernels.h"

namespace r4t {
namespace {

constexpr int kGroundThreads = 256;
constexpr size_t kGroundWorkspaceBudget = size_t(1) << 28;  // bytes of global scratch per set batch
constexpr int kStatsThreads = 256;
constexpr int kSetStatsMaxL = 128;
constexpr int kMaxSweeps = 60;
constexpr unsigned kFullMask = 0xffffffffu;

// ------------------------------------------------------------------------------------------------
// ground
// ------------------------------------------------------------------------------------------------

// Bytes of scratch for one set: key[P] (float), idx[P] (int32), row_id[L] (int64), row_score[L] (float).
size_t ground_scratch_bytes(int64_t P, int64_t L) {
  const size_t b =
      size_t(P) * (sizeof(float) + sizeof(int32_t)) + size_t(L) * (sizeof(int64_t) + sizeof(float));
  return (b + 15) / 16 * 16;
}

// Entry a is visited before entry b by the greedy. idx < 0 marks an invalid entry (sorted last).
__device__ __forceinline__ bool visits_before(float ka, int32_t ia, float kb, int32_t ib,
                                              const int64_t* __restrict__ ids, int C, bool higher_is_better) {
  if (ia < 0) return false;
  if (ib < 0) return true;
  const bool na = isnan(ka), nb = isnan(kb);
  if (na != nb) return nb;  // a number before NaN
  if (!na) {
    if (higher_is_better ? ka > kb : ka < kb) return true;
    if (higher_is_better ? ka < kb : ka > kb) return false;
  }
  const int ra = ia / C, rb = ib / C;  // equal scores: lower row first
  if (ra != rb) return ra < rb;
  return ids[ia] < ids[ib];  // then lower item id
}

__global__ void __launch_bounds__(kGroundThreads)
    ground_kernel(const float* __restrict__ cand_scores, const int64_t* __restrict__ cand_ids, int L, int C,
                  int P, bool higher_is_better, unsigned char* global_scratch, size_t scratch_bytes,
                  int64_t* __restrict__ out_ids, float* __restrict__ out_scores) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t s = blockIdx.x;
  unsigned char* base = global_scratch != nullptr ? global_scratch + s * scratch_bytes : smem;
  float* key = reinterpret_cast<float*>(base);              // [P]
  int32_t* idx = reinterpret_cast<int32_t*>(key + P);       // [P]
  int64_t* row_id = reinterpret_cast<int64_t*>(idx + P);    // [L] (P*8 bytes before it: 8-aligned)
  float* row_score = reinterpret_cast<float*>(row_id + L);  // [L]

  const int LC = L * C;
  const float* sc = cand_scores + s * LC;
  const int64_t* ids = cand_ids + s * LC;
  const float worst = higher_is_better ? -INFINITY : INFINITY;

  for (int i = threadIdx.x; i < P; i += blockDim.x) {
    const bool valid = i < LC && ids[i] >= 0;
    key[i] = valid ? sc[i] : 0.f;
    idx[i] = valid ? i : -1;
  }
  for (int r = threadIdx.x; r < L; r += blockDim.x) {
    row_id[r] = -1;
    row_score[r] = worst;
  }
  __syncthreads();

  // Bitonic sort into visiting order (see the knn kernel for the direction rule).
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < P; i += blockDim.x) {
        const int j = i ^ stride;
        if (j > i) {
          const float ki = key[i], kj = key[j];
          const int32_t ii = idx[i], ij = idx[j];
          const bool forward = (i & size) == 0;
          const bool swap = forward ? visits_before(kj, ij, ki, ii, ids, C, higher_is_better)
                                    : visits_before(ki, ii, kj, ij, ids, C, higher_is_better);
          if (swap) {
            key[i] = kj;
            key[j] = ki;
            idx[i] = ij;
            idx[j] = ii;
          }
        }
      }
      __syncthreads();
    }
  }

  // Sequential greedy walk by warp 0. Every branch below depends only on values all lanes read after
  // the same __syncwarp, so the warp stays converged.
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int open = L;
    for (int e = 0; e < P && open > 0; ++e) {
      const int32_t pi = idx[e];
      if (pi < 0) break;  // only invalid entries follow
      const int r = pi / C;
      if (row_id[r] != -1) continue;  // row already grounded
      const int64_t item = ids[pi];
      bool used = false;
      for (int t = lane; t < L; t += 32) used |= row_id[t] == item;
      if (!__any_sync(kFullMask, used)) {
        if (lane == 0) {
          row_id[r] = item;
          row_score[r] = key[e];
        }
        --open;
      }
      __syncwarp();
    }
  }
  __syncthreads();
  for (int r = threadIdx.x; r < L; r += blockDim.x) {
    out_ids[s * L + r] = row_id[r];
    out_scores[s * L + r] = row_score[r];
  }
}

// ------------------------------------------------------------------------------------------------
// set_stats
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__global__ void __launch_bounds__(kStatsThreads)
    set_stats_kernel(const float* __restrict__ x, const int64_t* __restrict__ lengths, int L, int d,
                     float* __restrict__ out_vendi, float* __restrict__ out_mean_cos) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t s = blockIdx.x;
  int n = L;
  if (lengths != nullptr) {
    const int64_t len = lengths[s];
    n = len < 0 ? 0 : (len < L ? static_cast<int>(len) : L);
  }
  double* K = reinterpret_cast<double*>(smem);  // [n][n], row stride n
  double* inv_norm = K + L * L;                 // [n]
  const float* xs = x + s * L * d;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;

  for (int i = warp; i < n; i += nwarps) {
    double acc = 0.0;
    for (int f = lane; f < d; f += 32) {
      const double v = xs[int64_t(i) * d + f];
      acc += v * v;
    }
    acc = warp_sum(acc);
    if (lane == 0) inv_norm[i] = acc > 0.0 ? 1.0 / sqrt(acc) : 0.0;  // zero row: similarity 0
  }
  for (int i = threadIdx.x; i < n; i += blockDim.x) K[i * n + i] = 1.0;
  __syncthreads();
  for (int pair = warp; pair < n * n; pair += nwarps) {
    const int i = pair / n, j = pair % n;
    if (j <= i) continue;  // warp-uniform
    double acc = 0.0;
    for (int f = lane; f < d; f += 32) {
      acc += double(xs[int64_t(i) * d + f]) * double(xs[int64_t(j) * d + f]);
    }
    acc = warp_sum(acc);
    if (lane == 0) {
      const double v = acc * inv_norm[i] * inv_norm[j];
      K[i * n + j] = v;
      K[j * n + i] = v;
    }
  }
  __syncthreads();
  if (warp != 0) return;

  // Mean off-diagonal cosine, off-diagonal and total squared Frobenius norms.
  double off_sum = 0.0, off2 = 0.0, tot2 = 0.0;
  for (int e = lane; e < n * n; e += 32) {
    const int i = e / n, j = e % n;
    const double v = K[e];
    tot2 += v * v;
    if (i < j) {
      off_sum += v;
      off2 += v * v;
    }
  }
  off_sum = warp_sum(off_sum);
  off2 = warp_sum(off2);
  tot2 = warp_sum(tot2);
  const double mean_cos = n >= 2 ? 2.0 * off_sum / (double(n) * (n - 1)) : 0.0;

  // Cyclic Jacobi: annihilate K[p][q] for p < q in row order, sweep after sweep. For a rotation,
  // theta = (a_qq - a_pp) / (2 a_pq), t = sign(theta) / (|theta| + sqrt(theta^2 + 1)), c = 1/sqrt(t^2+1),
  // s = t c; a_pp -= t a_pq, a_qq += t a_pq, a_pq = 0, and for k != p, q:
  //   a_kp <- c a_kp - s a_kq,  a_kq <- s a_kp + c a_kq   (and the symmetric entries).
  // Lane l updates rows/columns k = l, l + 32, ...: no two lanes touch the same element, and every lane
  // reads a_pp, a_qq, a_pq before the __syncwarp that precedes the writes.
  const double tol2 = 1e-26 * tot2;  // (1e-13 * ||K||_F)^2
  for (int sweep = 0; sweep < kMaxSweeps && off2 > tol2; ++sweep) {
    for (int p = 0; p < n - 1; ++p) {
      for (int q = p + 1; q < n; ++q) {
        const double apq = K[p * n + q];
        if (apq == 0.0) continue;  // warp-uniform
        const double app = K[p * n + p], aqq = K[q * n + q];
        const double theta = (aqq - app) / (2.0 * apq);
        const double t = fabs(theta) > 1e150  // theta^2 would overflow; t ~ 1 / (2 theta)
                             ? 0.5 / theta
                             : copysign(1.0, theta) / (fabs(theta) + sqrt(theta * theta + 1.0));
        const double c = 1.0 / sqrt(t * t + 1.0);
        const double sn = t * c;
        __syncwarp();
        for (int k = lane; k < n; k += 32) {
          if (k == p || k == q) continue;
          const double akp = K[k * n + p], akq = K[k * n + q];
          const double nkp = c * akp - sn * akq;
          const double nkq = sn * akp + c * akq;
          K[k * n + p] = nkp;
          K[p * n + k] = nkp;
          K[k * n + q] = nkq;
          K[q * n + k] = nkq;
        }
        if (lane == 0) {
          K[p * n + p] = app - t * apq;
          K[q * n + q] = aqq + t * apq;
          K[p * n + q] = 0.0;
          K[q * n + p] = 0.0;
        }
        __syncwarp();
      }
    }
    off2 = 0.0;
    for (int e = lane; e < n * n; e += 32) {
      if (e / n < e % n) off2 += K[e] * K[e];
    }
    off2 = warp_sum(off2);
  }

  // Same cut-off as the CPU kernel: eigenvalues <= 1e-15 (0 log 0, and round-off negatives) count as 0.
  double h = 0.0;
  for (int i = lane; i < n; i += 32) {
    const double lam = K[i * n + i] / n;
    if (lam > 1e-15) h -= lam * log(lam);
  }
  h = warp_sum(h);
  if (lane == 0) {
    out_vendi[s] = n > 0 ? static_cast<float>(exp(h)) : 0.f;  // an empty set has Vendi 0, as on the CPU
    out_mean_cos[s] = static_cast<float>(mean_cos);
  }
}

}  // namespace

namespace {

struct GroundPlan {
  int P = 1;
  size_t scratch = 0, smem = 0;
  bool in_shared = true;
  int64_t batch = 0;
  size_t ws_bytes = 0;
};

void check_ground(const GroundParams& p) {
  const std::string dims =
      " (S=" + std::to_string(p.S) + ", L=" + std::to_string(p.L) + ", C=" + std::to_string(p.C) + ")";
  check(p.S >= 0 && p.L >= 0 && p.C >= 0, "cand_scores: sizes must be non-negative" + dims);
  check(p.L * p.C < (int64_t(1) << 28), "cand_scores: L*C must be < 2^28 on CUDA" + dims);
  check(p.S <= INT32_MAX, "cand_scores: S must fit in int32" + dims);
}

GroundPlan make_ground_plan(const GroundParams& p) {
  GroundPlan g;
  const int L = static_cast<int>(p.L), C = static_cast<int>(p.C);
  while (g.P < L * C) g.P <<= 1;
  g.scratch = ground_scratch_bytes(g.P, L);
  const DeviceProps dev = current_device_props();
  g.in_shared = g.scratch <= size_t(dev.smem_optin);
  g.smem = g.in_shared ? g.scratch : 0;
  // Sets per launch: all of them with shared scratch, else as many as the workspace budget holds.
  g.batch = g.in_shared
                ? p.S
                : std::min<int64_t>(p.S, std::max<int64_t>(1, int64_t(kGroundWorkspaceBudget / g.scratch)));
  g.ws_bytes = g.in_shared ? 0 : Workspace::bytes_for({size_t(g.batch) * g.scratch});
  return g;
}

}  // namespace

size_t ground_cuda_workspace_bytes(const GroundParams& p) {
  check_ground(p);
  if (p.S == 0 || p.L == 0) return 0;
  DeviceGuard guard(p.device);
  return make_ground_plan(p).ws_bytes;
}

void ground_cuda(const GroundParams& p) {
  check_ground(p);
  if (p.S == 0 || p.L == 0) return;
  check(p.out_ids != nullptr && p.out_scores != nullptr, "out_ids/out_scores: null output pointer");
  check(p.C == 0 || (p.cand_scores != nullptr && p.cand_ids != nullptr),
        "cand_scores/cand_ids: null pointer");
  DeviceGuard guard(p.device);
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  const GroundPlan g = make_ground_plan(p);
  const int L = static_cast<int>(p.L), C = static_cast<int>(p.C);
  if (g.in_shared) {
    R4T_CUDA_CHECK(
        cudaFuncSetAttribute(ground_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(g.smem)));
  }
  Workspace ws(p.workspace, p.workspace_bytes);
  unsigned char* scratch = g.in_shared ? nullptr : ws.take<unsigned char>(size_t(g.batch) * g.scratch);
  for (int64_t s0 = 0; s0 < p.S; s0 += g.batch) {
    const int64_t nb = std::min<int64_t>(g.batch, p.S - s0);
    const int64_t off = s0 * p.L * p.C;
    ground_kernel<<<static_cast<unsigned>(nb), kGroundThreads, g.smem, stream>>>(
        p.C == 0 ? nullptr : p.cand_scores + off, p.C == 0 ? nullptr : p.cand_ids + off, L, C, g.P,
        p.higher_is_better, scratch, g.scratch, p.out_ids + s0 * p.L, p.out_scores + s0 * p.L);
    R4T_CUDA_CHECK_LAUNCH(ground_kernel);
  }
}

void set_stats_cuda(const SetStatsParams& p) {
  const std::string dims =
      " (S=" + std::to_string(p.S) + ", L=" + std::to_string(p.L) + ", d=" + std::to_string(p.d) + ")";
  check(p.S >= 0 && p.L >= 0 && p.d >= 0, "x: sizes must be non-negative" + dims);
  check(p.L <= kSetStatsMaxL,
        "x: the CUDA set_stats supports at most " + std::to_string(kSetStatsMaxL) + " rows per set" + dims);
  check(p.S <= INT32_MAX && p.d <= INT32_MAX, "x: S and d must fit in int32" + dims);
  if (p.S == 0) return;
  check(p.out_vendi != nullptr && p.out_mean_cos != nullptr, "out_vendi/out_mean_cos: null output pointer");
  check(p.L * p.d == 0 || p.x != nullptr, "x: null pointer" + dims);

  DeviceGuard guard(p.device);
  const size_t smem = sizeof(double) * size_t(p.L) * size_t(p.L + 1);
  const DeviceProps dev = current_device_props();
  check(smem <= size_t(dev.smem_optin), "x: L=" + std::to_string(p.L) + " needs " + std::to_string(smem) +
                                            " bytes of shared memory, this GPU allows " +
                                            std::to_string(dev.smem_optin));
  R4T_CUDA_CHECK(
      cudaFuncSetAttribute(set_stats_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  set_stats_kernel<<<static_cast<unsigned>(p.S), kStatsThreads, smem, stream>>>(
      p.x, p.lengths, static_cast<int>(p.L), static_cast<int>(p.d), p.out_vendi, p.out_mean_cos);
  R4T_CUDA_CHECK_LAUNCH(set_stats_kernel);
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // no driver / no device: clear the error, report zero
    return 0;
  }
  return n;
}

const char* cuda_runtime_version() {
  // The runtime is linked statically, so the compile-time version is the one that runs.
  static const std::string v =
      std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  return v.c_str();
}

}  // namespace r4t
