// Fused elementwise EDM sampler step on the CPU (see EdmStepParams in params.h).
#include <cmath>
#include <string>

#include "common.h"
#include "kernels.h"

namespace r4t {

void edm_step_cpu(const EdmStepParams& p) {
  check(p.n >= 0, "edm_step: numel must be >= 0, got " + std::to_string(p.n));
  check(p.sigma > 0.f && std::isfinite(p.sigma),
        "sigma: expected a finite number > 0, got " + std::to_string(p.sigma));
  check(std::isfinite(p.c_skip) && std::isfinite(p.c_out) && std::isfinite(p.guidance) &&
            std::isfinite(p.h) && std::isfinite(p.noise_scale),
        "edm_step: c_skip, c_out, guidance, h and noise_scale must be finite");
  check(p.guidance == 0.f || p.f_uncond != nullptr, "edm_step: f_uncond is required when guidance != 0");
  check(p.noise_scale == 0.f || p.noise != nullptr, "edm_step: noise is required when noise_scale != 0");
  const float w = p.guidance, cs = p.c_skip, co = p.c_out, inv_sigma = 1.f / p.sigma, h = p.h,
              ns = p.noise_scale;
  const float* x = p.x;
  const float* fc = p.f_cond;
  const float* fu = p.f_uncond;
  const float* z = p.noise;
  float* ox = p.out_x;
  float* od = p.out_denoised;
  const int64_t n = p.n;
#if defined(R4T_WITH_OPENMP)
#pragma omp parallel for simd num_threads(max_threads(p.num_threads)) schedule(static) if (n > (1 << 16))
#endif
  for (int64_t i = 0; i < n; ++i) {
    const float f = fu != nullptr ? (1.f + w) * fc[i] - w * fu[i] : fc[i];
    const float xi = x[i];
    const float D = cs * xi + co * f;
    const float dx = (xi - D) * inv_sigma;
    float xn = xi + h * dx;
    if (z != nullptr) xn += ns * z[i];
    if (od != nullptr) od[i] = D;
    ox[i] = xn;
  }
}

}  // namespace r4t
