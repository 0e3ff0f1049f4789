// Entry points of the kernel families (see params.h). *_cpu take host pointers; *_cuda take device
// pointers and run on params.stream (declared only in CUDA builds).
#pragma once
#include "params.h"

namespace r4t {

void knn_cpu(const KnnParams& p);
void ground_cpu(const GroundParams& p);
void set_stats_cpu(const SetStatsParams& p);
void edm_step_cpu(const EdmStepParams& p);
const char* cpu_simd_level();  // the SIMD clone the knn kernel dispatches to on this CPU

#if defined(R4T_WITH_CUDA)
void knn_cuda(const KnnParams& p);
void ground_cuda(const GroundParams& p);
void set_stats_cuda(const SetStatsParams& p);
void edm_step_cuda(const EdmStepParams& p);
int cuda_device_count();  // 0 when no driver / no GPU (never throws)
const char* cuda_runtime_version();
#endif

}  // namespace r4t
