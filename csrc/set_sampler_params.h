// Parameter structs of the fused set sampler (issue 12, item 2): the whole EDM sampling of a batch of
// sets -- every network evaluation of the SetDenoiser, every sampler step and, optionally, the final
// grounding -- in one call. Kernel: csrc/cpu/set_sampler.cpp; Python: python/r4t_fast/kernels/ops.py
// (sample_sets) and kernels/sampler_pack.py (pack_denoiser); the executable spec is the PyTorch model
// (diffusion/model.py: SetDenoiser, EDM) and diffusion/samplers.py, restated in kernels/reference.py.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "params.h"

namespace r4t {

// The architecture of one SetDenoiser (DiffusionConfig): L rows of d features per set, a cond_dim query
// projected to cond_tokens tokens, `layers` blocks of width `hidden` with `heads` heads and an MLP of
// width `mlp`. hidden must be even (Fourier features) and divisible by heads.
struct SetDenoiserDims {
  int64_t L = 0, d = 0, cond_dim = 0, hidden = 0, layers = 0, heads = 0, mlp = 0, cond_tokens = 0;
};

// One parameter the packer reads: its state_dict name and shape, in the order set_denoiser_pack takes
// the source pointers (set_denoiser_param_specs is the one home of that order).
struct SetDenoiserParamSpec {
  std::string name;
  std::vector<int64_t> shape;
};

// ---------------------------------------------------------------------------------------------
// Packing (once per model): set_denoiser_pack(dims, src, n_src, out, out_size) reads the n_src
// contiguous float32 parameters (order and shapes from set_denoiser_param_specs) and writes the packed
// buffer of set_denoiser_packed_size(dims) floats: every nn.Linear(K -> N) as ceil(N/32) column panels
// of K x 32 floats (W^T, zero-padded) followed by its bias padded to a multiple of 32; layer-norm
// affines, null_cond and the Fourier frequencies as they are. The layout does not depend on the SIMD
// level (every clone reads 32-column panels), so one packed buffer serves any CPU.
// ---------------------------------------------------------------------------------------------

enum class SetSampler : int { Euler = 0, EulerMaruyama = 1, Heun = 2, DpmPP2M = 3, Consistency = 4 };

// ---------------------------------------------------------------------------------------------
// sample_sets: S = n_sigmas - 1 sampler steps over B sets, all on the host.
//   packed      the buffer written by set_denoiser_pack for `dims` (packed_size floats)
//   sigma_data, sigma_min, cond_offset   the model's DiffusionConfig values (double, as Python's floats)
//   cond        (B, cond_dim) float32 contiguous: the condition of each set
//   x_init      (B, L, d) float32 contiguous: the initial noisy rows at sigmas[0], in the centred space
//               (generate_sets: randn * sigmas[0])
//   sigmas      (n_sigmas,) float64: the schedule, strictly decreasing, > 0 except the last (>= 0)
//   sampler     euler | euler_maruyama | heun | dpmpp_2m | consistency, each step exactly as
//               diffusion/samplers.py (with guidance the network sees the conditional and the null
//               token per set; D = c_skip x + c_out ((1 + w) F_cond - w F_uncond), w = guidance)
//   noise       (S, B, L, d) float32 or nullptr: slice i is the noise of step i (euler_maruyama: steps
//               with sigma_up > 0; consistency: steps i >= 1); other slices are not read
//   out_rows    (B, L, d) float32: the final rows in data space (x + cond_offset * cond)
//   Grounding (catalog != nullptr): the rows of each `group` consecutive sets form one set of group*L
//   rows that is grounded as ground_sets does (knn_cpu with `candidates` candidates per row, then
//   ground_cpu; `allowed` filters the catalog as in knn): out_ids (B/group, group*L) int64, out_scores
//   (B/group, group*L) float32, with the grounding's sentinels (id -1) where too few items qualify.
//   anchor      optional queries grounded in the same catalog pass (see the anchor fields below)
//   mode        1 = one thread per group of sets (no synchronisation), 2 = all threads on every set
//               (a barrier per GEMM; pays at B < threads on an idle machine), 0 = auto: 2 when B < 2T,
//               T does not divide B and the other runnable tasks leave a core per thread, else 1.
//               Results do not depend on the mode, the thread count or the batch: every output element
//               is accumulated in the same order.
// No exception is thrown inside the parallel region (all checks and allocations come first).
// ---------------------------------------------------------------------------------------------
struct SampleSetsParams {
  SetDenoiserDims dims;
  const float* packed = nullptr;
  int64_t packed_size = 0;
  double sigma_data = 0.5, sigma_min = 0.0, cond_offset = 0.0;
  const float* cond = nullptr;
  const float* x_init = nullptr;
  const double* sigmas = nullptr;
  int64_t n_sigmas = 0;
  SetSampler sampler = SetSampler::Heun;
  double guidance = 0.0;
  const float* noise = nullptr;
  int64_t B = 0;
  float* out_rows = nullptr;
  const void* catalog = nullptr;
  int64_t c_stride = 0;
  DType catalog_dtype = DType::F32;
  int64_t N = 0;
  Metric metric = Metric::IP;
  const uint8_t* allowed = nullptr;  // (N,) 0 = excluded, or nullptr: the query-time filter of knn
  int64_t group = 1, candidates = 0;
  int64_t* out_ids = nullptr;
  float* out_scores = nullptr;
  // The anchor (issue 20): anchor (B/group, d) float32 contiguous, one query per grounded set, or
  // nullptr. Its anchor_k nearest allowed items come from the SAME catalog pass as the rows' candidates
  // (the knn call takes the B*L rows and the B/group anchors together, k = max(candidates, anchor_k)):
  // anchor_ids (B/group, anchor_k) int64, anchor_scores (B/group, anchor_k) float32, exactly as knn
  // returns them (sentinels id -1 past the allowed items). The grounding of the rows is unchanged.
  const float* anchor = nullptr;
  int64_t anchor_k = 0;
  int64_t* anchor_ids = nullptr;
  float* anchor_scores = nullptr;
  // Optional int8 copy of the catalog for the grounding knn call (KnnParams::coarse: an int8 pass with an
  // exact re-score, when that call qualifies).
  const uint8_t* coarse = nullptr;
  int64_t coarse_stride = 0;
  float coarse_scale = 0.f;
  // Non-zero: names the packed buffer's contents (the Python packing's id; the caller promises they never
  // change under this id), so the per-schedule constants are computed once (cpu/set_sampler_prep.h).
  int64_t cache_id = 0;
  int num_threads = 0;
  int mode = 0;
  // 0: float32 GEMMs. 1: bf16 -- the GEMMs of the forward pass (inp, cond_proj, every block's Linears,
  // out; not the noise-level MLP and ada) read their inputs and weights rounded to bfloat16 (RNE) and
  // accumulate in float32: AVX512-BF16 where the CPU has it (and the x86-64-v4 clone runs), else the
  // same rounding on the float32 tiles (sums in another order). 2: bf16, always the float32-tile
  // emulation (for comparisons).
  int precision = 0;
};

}  // namespace r4t
