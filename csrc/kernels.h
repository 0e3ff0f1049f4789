// Entry points of the kernel families (see params.h). *_cpu take host pointers; *_cuda take device
// pointers and run on params.stream (declared only in CUDA builds).
#pragma once
#include <cstddef>
#include <string>
#include <vector>

#include "params.h"
#include "set_sampler_params.h"

namespace r4t {

void knn_cpu(const KnnParams& p);
void ground_cpu(const GroundParams& p);
void set_stats_cpu(const SetStatsParams& p);
void edm_step_cpu(const EdmStepParams& p);
KnnPlan knn_cpu_plan(const KnnParams& p);
bool cpu_has_vnni();  // AVX-512 VNNI (the knn coarse path's instructions) on this CPU, in this build
// knn's coarse path (cpu/knn_coarse.cpp), called by knn_cpu: whether it applies, and the search itself.
bool knn_coarse_applies(const KnnParams& p);
void knn_cpu_coarse(const KnnParams& p, const KnnPlan& plan);
const char* cpu_simd_level();                 // the SIMD clone the knn kernel dispatches to on this CPU
std::vector<std::string> cpu_simd_clones();   // every clone compiled in (best first)
void set_cpu_simd(const std::string& name);   // "auto" or a clone name (tests, benchmarks)
double cpu_peak_flops(int num_threads, double seconds);  // measured FMA peak of the active clone, FLOP/s
// Fused set sampler (set_sampler_params.h, cpu/set_sampler.cpp); sample_sets_cpu returns the clone it ran.
std::vector<SetDenoiserParamSpec> set_denoiser_param_specs(const SetDenoiserDims& d);
int64_t set_denoiser_packed_size(const SetDenoiserDims& d);
void set_denoiser_pack(const SetDenoiserDims& d, const float* const* src, int64_t n_src, float* out, int64_t out_size);
const char* sample_sets_cpu(const SampleSetsParams& p);
bool sampler_bf16_native();  // precision bf16 runs on AVX512-BF16 here (else the float32-tile emulation)
// One nn.Linear (x (M, K) row-major, w (N, K), b (N)) through the fused sampler's GEMM at `precision`
// (SampleSetsParams::precision): y (M, N). The GEMM's test hook (ops.sampler_linear).
void sampler_linear_cpu(const float* x, int64_t M, int64_t K, const float* w, int64_t N, const float* b, float* y,
                        int precision);

#if defined(R4T_WITH_CUDA)
void knn_cuda(const KnnParams& p);
size_t knn_cuda_workspace_bytes(const KnnParams& p);  // device scratch knn_cuda needs (0 if none)
void ground_cuda(const GroundParams& p);
size_t ground_cuda_workspace_bytes(const GroundParams& p);
void set_stats_cuda(const SetStatsParams& p);
void edm_step_cuda(const EdmStepParams& p);
int cuda_device_count();  // 0 when no driver / no GPU (never throws)
const char* cuda_runtime_version();
#endif

}  // namespace r4t
