// One documented parameter struct per kernel family. All pointers are raw (host or device, as the
// entry point says); Python (python/r4t_fast/ops.py) validates shapes, dtypes, strides and devices
// before filling these, so the kernels only re-check cheap invariants.
//
// Layout conventions: matrices are row-major with a unit stride along the last (feature) dimension and
// an explicit row stride in *elements*, so a row-sliced view needs no copy. Outputs are contiguous.
#pragma once
#include <cstdint>

namespace r4t {

enum class DType : int { F32 = 0, F16 = 1 };
enum class Metric : int { IP = 0, L2 = 1 };

// ---------------------------------------------------------------------------------------------
// knn: exact top-k over a catalog.
//   queries  (B, d) float32, row stride q_stride
//   catalog  (N, d) float32 or float16 (catalog_dtype), row stride c_stride
//   allowed  (N,) uint8 (0 = excluded, else included) or nullptr: a query-time filter. Excluded rows are
//            never returned; they are skipped before any arithmetic (no cost for what is filtered out).
//   metric IP : score = <q, c>, best = largest, results sorted descending
//   metric L2 : score = sum_f (q_f - c_f)^2 (accumulated directly, not as |q|^2 - 2<q,c> + |c|^2, so
//               near-identical vectors keep their precision), best = smallest, results sorted ascending
//   out_scores (B, k) float32, out_ids (B, k) int64, contiguous.
//   Ties: equal scores are ordered by ascending catalog id.
//   Fewer than k candidates (k > N, or > the number of allowed rows): the missing slots hold id -1 and
//   score -inf (IP) / +inf (L2). Scratch memory scales with min(k, allowed rows), never with k.
//   Non-finite scores of finite inputs (float32 overflow): a score of +-inf ranks as such; a NaN score
//   (IP: +inf + -inf) ranks below every other real item but above the sentinel; so whenever at least k
//   rows are allowed, all k ids are real items. Which of +inf / NaN an overflowing dot product gives
//   depends on the summation order (an FMA absorbs a finite product into an infinite sum; separately
//   rounded products can give inf - inf), so the CPU paths and the CUDA kernel may differ there.
//   CUDA: runs on `device` (the tensors' device index) and the caller's `stream`; `workspace` is device
//   memory of at least knn_cuda_workspace_bytes(...) bytes from the caller's allocator.
// ---------------------------------------------------------------------------------------------
struct KnnParams {
  const float* queries = nullptr;
  int64_t q_stride = 0;
  const void* catalog = nullptr;
  int64_t c_stride = 0;
  DType catalog_dtype = DType::F32;
  Metric metric = Metric::IP;
  int64_t B = 0, N = 0, d = 0, k = 0;
  const uint8_t* allowed = nullptr;
  float* out_scores = nullptr;
  int64_t* out_ids = nullptr;
  int num_threads = 0;        // CPU: 0 = OpenMP default
  void* stream = nullptr;     // CUDA: cudaStream_t of the caller (nullptr = legacy default stream)
  int device = -1;            // CUDA: device index of the tensors (-1 = current device)
  void* workspace = nullptr;  // CUDA: caller-allocated device scratch
  size_t workspace_bytes = 0;
  // CPU, optional: an int8 copy of the catalog, codes u8 = round(c / coarse_scale) + 128, (N, coarse_stride
  // bytes), features padded to a multiple of 4 with 128. When given, IP searches of 2 <= B <= 16 queries on
  // a CPU with AVX-512 VNNI take the coarse path (cpu/knn_coarse.cpp): an int8 pass keeps 2k + 32 rows per
  // query, re-scored exactly against `catalog`. Ignored elsewhere (and by CUDA).
  const uint8_t* coarse = nullptr;
  int64_t coarse_stride = 0;
  float coarse_scale = 0.f;
};

// What knn_cpu will do for given params (exposed for tests and benchmarks).
struct KnnPlan {
  const char* isa = "";
  int threads = 1;
  bool direct = false;   // direct (B < vector width) or GEMM path
  bool small = false;    // direct path with 2 <= B: the small-B kernel (R4T_KNN_SMALL=0 turns it off)
  bool prefetch = false;  // direct / small-B path: software prefetch of the rows ahead (R4T_KNN_PREFETCH)
  bool coarse = false;    // the int8 pass + exact re-score (KnnParams::coarse; R4T_KNN_COARSE=0 turns it off)
  int64_t n_allowed = 0;  // rows that pass the filter (N without one)
  int64_t keff = 0;       // min(k, n_allowed): the heap size
  int64_t query_chunk = 0, tile_rows = 0, kc = 0;  // kc < d: K-blocking
};

// ---------------------------------------------------------------------------------------------
// ground (greedy de-duplication): every row of a set takes one catalog item, no item twice per set.
//   cand_scores (S, L, C) float32, cand_ids (S, L, C) int64: each row's C candidates, best first
//   (as knn returns them; higher_is_better says the score direction; id -1 marks "no candidate").
//   Greedy: all (row, candidate) pairs of a set are visited best score first; ties go to the lower
//   row index, then the lower item id. A pair is taken if its row is still open and its item unused.
//   out_ids (S, L) int64, out_scores (S, L) float32. A row left without a candidate gets id -1 and
//   score -inf (higher_is_better) / +inf.
//   NaN scores (from knn on overflowing inputs) rank below every other score, like in knn.
//   CUDA: `workspace` (caller-allocated, >= ground_cuda_workspace_bytes(...)) is used when a set's
//   scratch does not fit in shared memory.
// ---------------------------------------------------------------------------------------------
struct GroundParams {
  const float* cand_scores = nullptr;
  const int64_t* cand_ids = nullptr;
  int64_t S = 0, L = 0, C = 0;
  bool higher_is_better = true;
  int64_t* out_ids = nullptr;
  float* out_scores = nullptr;
  int num_threads = 0;
  void* stream = nullptr;
  int device = -1;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

// ---------------------------------------------------------------------------------------------
// set_stats: per-set diversity statistics of L embedding rows.
//   x (S, L, d) float32 contiguous; lengths (S,) int64 or nullptr: only the first lengths[s] rows count.
//   Rows are L2-normalised inside (a zero row is treated as all-zero: similarity 0 to everything,
//   1 to itself), K = X X^T (cosine kernel, K_ii = 1), n = number of rows counted.
//   out_vendi (S,)    = exp(-sum_i lam_i log lam_i), lam = eigenvalues of K / n (0 log 0 = 0); in [1, n]
//   out_mean_cos (S,) = mean over i != j of K_ij (0 when n < 2)
//   Eigenvalues by cyclic Jacobi rotations in float64.
// ---------------------------------------------------------------------------------------------
struct SetStatsParams {
  const float* x = nullptr;
  const int64_t* lengths = nullptr;
  int64_t S = 0, L = 0, d = 0;
  float* out_vendi = nullptr;
  float* out_mean_cos = nullptr;
  int num_threads = 0;
  void* stream = nullptr;
  int device = -1;
};

// ---------------------------------------------------------------------------------------------
// edm_step: one fused step of an EDM sampler, elementwise over n = numel(x) values.
//   Inputs: the raw network outputs F_cond, F_uncond (F_uncond may be nullptr when guidance == 0) at
//   noise level sigma, and scalars computed once on the host (schedules live on the CPU):
//     c_skip = sd^2/(sigma^2+sd^2), c_out = sigma*sd/sqrt(sigma^2+sd^2)   (EDM preconditioning)
//   Computes
//     D  = c_skip*x + c_out*((1+w)*F_cond - w*F_uncond)    (classifier-free guidance, w = guidance;
//                                                           linear in F, so equal to (1+w)D_c - w D_u)
//     dx = (x - D) / sigma
//     x' = x + h*dx + noise_scale*noise                     (noise may be nullptr when noise_scale == 0)
//   Euler (probability-flow ODE): h = sigma_next - sigma, noise_scale = 0.
//   Euler-Maruyama (ancestral form of the VE reverse SDE): h = sigma_down - sigma, noise_scale = sigma_up.
//   out_x (n,) may be x itself (in place) or any input exactly; out_denoised (n,) receives D (nullptr to
//   skip) and may likewise be an input exactly. Partial overlaps, and out_denoised == out_x, are refused by
//   the Python layer (ops.edm_step): each element is read before it is written, which is only enough when
//   an output and an input coincide element for element.
// ---------------------------------------------------------------------------------------------
struct EdmStepParams {
  const float* x = nullptr;
  const float* f_cond = nullptr;
  const float* f_uncond = nullptr;
  const float* noise = nullptr;
  float* out_x = nullptr;
  float* out_denoised = nullptr;
  int64_t n = 0;
  float sigma = 1.f, c_skip = 0.f, c_out = 0.f, guidance = 0.f, h = 0.f, noise_scale = 0.f;
  int num_threads = 0;
  void* stream = nullptr;
  int device = -1;
};

}  // namespace r4t
