// The only translation unit that includes pybind11. Every entry point takes raw data pointers (as
// Python ints) plus sizes and strides, filled in by python/r4t_fast/kernels/ops.py after validation; no
// libtorch linkage, so one wheel serves any torch version. The GIL is released around every call into a
// kernel (R4T_NOGIL), so calls from several Python threads run concurrently; the kernels keep no global
// mutable state (the SIMD override is an atomic read once per call).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common.h"
#include "kernels.h"

#ifndef R4T_VERSION
#define R4T_VERSION "0.0.0"
#endif
#ifndef R4T_COMPILER
#define R4T_COMPILER "unknown"
#endif

namespace py = pybind11;
using namespace r4t;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

KnnParams make_knn(uintptr_t q, int64_t qs, uintptr_t c, int64_t cs, int dtype, int metric, int64_t B,
                   int64_t N, int64_t d, int64_t k, uintptr_t allowed, uintptr_t os, uintptr_t oi, int threads,
                   uintptr_t stream) {
  KnnParams p;
  p.allowed = ptr<const uint8_t>(allowed);
  p.queries = ptr<const float>(q);
  p.q_stride = qs;
  p.catalog = ptr<const void>(c);
  p.c_stride = cs;
  p.catalog_dtype = static_cast<DType>(dtype);
  p.metric = static_cast<Metric>(metric);
  p.B = B;
  p.N = N;
  p.d = d;
  p.k = k;
  p.out_scores = ptr<float>(os);
  p.out_ids = ptr<int64_t>(oi);
  p.num_threads = threads;
  p.stream = ptr<void>(stream);
  return p;
}

GroundParams make_ground(uintptr_t sc, uintptr_t ids, int64_t S, int64_t L, int64_t C, bool hib,
                         uintptr_t oi, uintptr_t os, int threads, uintptr_t stream) {
  GroundParams p;
  p.cand_scores = ptr<const float>(sc);
  p.cand_ids = ptr<const int64_t>(ids);
  p.S = S;
  p.L = L;
  p.C = C;
  p.higher_is_better = hib;
  p.out_ids = ptr<int64_t>(oi);
  p.out_scores = ptr<float>(os);
  p.num_threads = threads;
  p.stream = ptr<void>(stream);
  return p;
}

SetStatsParams make_stats(uintptr_t x, uintptr_t lengths, int64_t S, int64_t L, int64_t d, uintptr_t ov,
                          uintptr_t oc, int threads, uintptr_t stream) {
  SetStatsParams p;
  p.x = ptr<const float>(x);
  p.lengths = ptr<const int64_t>(lengths);
  p.S = S;
  p.L = L;
  p.d = d;
  p.out_vendi = ptr<float>(ov);
  p.out_mean_cos = ptr<float>(oc);
  p.num_threads = threads;
  p.stream = ptr<void>(stream);
  return p;
}

EdmStepParams make_step(uintptr_t x, uintptr_t fc, uintptr_t fu, uintptr_t z, uintptr_t ox, uintptr_t od,
                        int64_t n, float sigma, float c_skip, float c_out, float w, float h, float ns,
                        int threads, uintptr_t stream) {
  EdmStepParams p;
  p.x = ptr<const float>(x);
  p.f_cond = ptr<const float>(fc);
  p.f_uncond = ptr<const float>(fu);
  p.noise = ptr<const float>(z);
  p.out_x = ptr<float>(ox);
  p.out_denoised = ptr<float>(od);
  p.n = n;
  p.sigma = sigma;
  p.c_skip = c_skip;
  p.c_out = c_out;
  p.guidance = w;
  p.h = h;
  p.noise_scale = ns;
  p.num_threads = threads;
  p.stream = ptr<void>(stream);
  return p;
}

#define R4T_NOGIL(call)                  \
  do {                                   \
    py::gil_scoped_release release_gil;  \
    call;                                \
  } while (0)

py::dict plan_dict(const KnnPlan& pl) {
  py::dict d;
  d["isa"] = std::string(pl.isa);
  d["threads"] = pl.threads;
  d["path"] = std::string(pl.coarse ? "coarse" : pl.small ? "small" : pl.direct ? "direct" : "gemm");
  d["prefetch"] = pl.prefetch;
  d["n_allowed"] = pl.n_allowed;
  d["keff"] = pl.keff;
  d["query_chunk"] = pl.query_chunk;
  d["tile_rows"] = pl.tile_rows;
  d["k_block"] = pl.kc;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "r4t_fast private compiled kernels (use r4t_fast.ops, not this module)";
  py::register_exception<r4t::ValueError>(m, "KernelValueError", PyExc_ValueError);

  m.def("build_info", []() {
    py::dict d;
    d["version"] = R4T_VERSION;
#if defined(R4T_WITH_CUDA)
    d["cuda"] = true;
    d["cuda_archs"] = std::string(R4T_CUDA_ARCHS);
    d["cuda_runtime"] = std::string(cuda_runtime_version());
#else
    d["cuda"] = false;
    d["cuda_archs"] = std::string("");
    d["cuda_runtime"] = py::none();
#endif
#if defined(R4T_WITH_OPENMP)
    d["openmp"] = true;
    d["openmp_threads"] = omp_get_max_threads();
#else
    d["openmp"] = false;
    d["openmp_threads"] = 1;
#endif
    d["simd"] = std::string(cpu_simd_level());
    d["knn_int8"] = cpu_has_vnni();
    d["sampler_bf16"] = std::string(sampler_bf16_native() ? "avx512_bf16" : "emulated");
    py::list clones;
    for (const auto& c : cpu_simd_clones()) clones.append(c);
    d["simd_clones"] = clones;
    d["compiler"] = R4T_COMPILER;
    return d;
  });

  m.def(
      "knn_cpu",
      [](uintptr_t q, int64_t qs, uintptr_t c, int64_t cs, int dtype, int metric, int64_t B, int64_t N, int64_t d,
         int64_t k, uintptr_t allowed, uintptr_t os, uintptr_t oi, int threads, uintptr_t coarse,
         int64_t coarse_stride, float coarse_scale) {
        auto p = make_knn(q, qs, c, cs, dtype, metric, B, N, d, k, allowed, os, oi, threads, 0);
        p.coarse = ptr<const uint8_t>(coarse);
        p.coarse_stride = coarse_stride;
        p.coarse_scale = coarse_scale;
        R4T_NOGIL(knn_cpu(p));
      },
      py::arg("q"), py::arg("qs"), py::arg("c"), py::arg("cs"), py::arg("dtype"), py::arg("metric"), py::arg("B"),
      py::arg("N"), py::arg("d"), py::arg("k"), py::arg("allowed"), py::arg("os"), py::arg("oi"), py::arg("threads"),
      py::arg("coarse") = 0, py::arg("coarse_stride") = 0, py::arg("coarse_scale") = 0.f);
  m.def("knn_cpu_plan", [](int64_t B, int64_t N, int64_t d, int64_t k, uintptr_t allowed, int threads,
                           bool coarse) {
    auto p = make_knn(0, d, 0, d, 0, 0, B, N, d, k, allowed, 0, 0, threads, 0);
    // any non-null pointer: the plan only asks whether a copy is given
    if (coarse) p.coarse = reinterpret_cast<const uint8_t*>(&p);
    KnnPlan pl;
    R4T_NOGIL(pl = knn_cpu_plan(p));
    return plan_dict(pl);
  });
  m.def("set_cpu_simd", [](const std::string& name) { set_cpu_simd(name); });
  m.def("cpu_peak_flops", [](int threads, double seconds) {
    double r = 0.0;
    R4T_NOGIL(r = cpu_peak_flops(threads, seconds));
    return r;
  });
  m.def("ground_cpu", [](uintptr_t sc, uintptr_t ids, int64_t S, int64_t L, int64_t C, bool hib, uintptr_t oi,
                         uintptr_t os, int threads) {
    auto p = make_ground(sc, ids, S, L, C, hib, oi, os, threads, 0);
    R4T_NOGIL(ground_cpu(p));
  });
  m.def("set_stats_cpu", [](uintptr_t x, uintptr_t lengths, int64_t S, int64_t L, int64_t d, uintptr_t ov,
                            uintptr_t oc, int threads) {
    auto p = make_stats(x, lengths, S, L, d, ov, oc, threads, 0);
    R4T_NOGIL(set_stats_cpu(p));
  });
  m.def("edm_step_cpu", [](uintptr_t x, uintptr_t fc, uintptr_t fu, uintptr_t z, uintptr_t ox, uintptr_t od,
                           int64_t n, float sigma, float c_skip, float c_out, float w, float h, float ns,
                           int threads) {
    auto p = make_step(x, fc, fu, z, ox, od, n, sigma, c_skip, c_out, w, h, ns, threads, 0);
    R4T_NOGIL(edm_step_cpu(p));
  });

  {  // fused set sampler (set_sampler_params.h): dims = (L, d, cond_dim, hidden, layers, heads, mlp, cond_tokens)
    auto dims_of = [](const py::sequence& s) {
      check(py::len(s) == 8, "dims: expected 8 ints (L, d, cond_dim, hidden, layers, heads, mlp, cond_tokens)");
      SetDenoiserDims d;
      int64_t* f[] = {&d.L, &d.d, &d.cond_dim, &d.hidden, &d.layers, &d.heads, &d.mlp, &d.cond_tokens};
      for (size_t i = 0; i < 8; ++i) *f[i] = s[i].cast<int64_t>();
      return d;
    };
    m.def("set_denoiser_param_specs", [dims_of](const py::sequence& dims) {
      py::list out;
      for (const auto& sp : set_denoiser_param_specs(dims_of(dims))) {
        py::tuple shape(sp.shape.size());
        for (size_t i = 0; i < sp.shape.size(); ++i) shape[i] = sp.shape[i];
        out.append(py::make_tuple(sp.name, shape));
      }
      return out;
    });
    m.def("set_denoiser_packed_size", [dims_of](const py::sequence& dims) { return set_denoiser_packed_size(dims_of(dims)); });
    m.def("set_denoiser_pack", [dims_of](const py::sequence& dims, const py::sequence& src, uintptr_t out,
                                         int64_t out_size) {
      const SetDenoiserDims d = dims_of(dims);
      std::vector<const float*> ptrs;
      for (const auto& s : src) ptrs.push_back(ptr<const float>(s.cast<uintptr_t>()));
      R4T_NOGIL(set_denoiser_pack(d, ptrs.data(), static_cast<int64_t>(ptrs.size()), ptr<float>(out), out_size));
    });
    m.def("sampler_linear_cpu", [](uintptr_t x, int64_t M, int64_t K, uintptr_t w, int64_t N, uintptr_t b,
                                   uintptr_t y, int precision) {
      R4T_NOGIL(sampler_linear_cpu(ptr<const float>(x), M, K, ptr<const float>(w), N, ptr<const float>(b),
                                   ptr<float>(y), precision));
    });
    m.def("sample_sets_cpu", [dims_of](const py::sequence& dims, uintptr_t packed, int64_t packed_size,
                                       double sigma_data, double sigma_min, double cond_offset, uintptr_t cond,
                                       uintptr_t x_init, uintptr_t sigmas, int64_t n_sigmas, int sampler,
                                       double guidance, uintptr_t noise, int64_t B, uintptr_t out_rows,
                                       uintptr_t catalog, int64_t c_stride, int catalog_dtype, int64_t N, int metric,
                                       uintptr_t allowed, int64_t group, int64_t candidates, uintptr_t out_ids,
                                       uintptr_t out_scores, int threads, int mode, uintptr_t anchor,
                                       int64_t anchor_k, uintptr_t anchor_ids, uintptr_t anchor_scores,
                                       uintptr_t coarse, int64_t coarse_stride, float coarse_scale,
                                       int64_t cache_id, int precision) {
      SampleSetsParams p;
      p.dims = dims_of(dims);
      p.packed = ptr<const float>(packed);
      p.packed_size = packed_size;
      p.sigma_data = sigma_data;
      p.sigma_min = sigma_min;
      p.cond_offset = cond_offset;
      p.cond = ptr<const float>(cond);
      p.x_init = ptr<const float>(x_init);
      p.sigmas = ptr<const double>(sigmas);
      p.n_sigmas = n_sigmas;
      p.sampler = static_cast<SetSampler>(sampler);
      p.guidance = guidance;
      p.noise = ptr<const float>(noise);
      p.B = B;
      p.out_rows = ptr<float>(out_rows);
      p.catalog = ptr<const void>(catalog);
      p.c_stride = c_stride;
      p.catalog_dtype = static_cast<DType>(catalog_dtype);
      p.N = N;
      p.metric = static_cast<Metric>(metric);
      p.allowed = ptr<const uint8_t>(allowed);
      p.group = group;
      p.candidates = candidates;
      p.out_ids = ptr<int64_t>(out_ids);
      p.out_scores = ptr<float>(out_scores);
      p.num_threads = threads;
      p.mode = mode;
      p.anchor = ptr<const float>(anchor);
      p.anchor_k = anchor_k;
      p.anchor_ids = ptr<int64_t>(anchor_ids);
      p.anchor_scores = ptr<float>(anchor_scores);
      p.coarse = ptr<const uint8_t>(coarse);
      p.coarse_stride = coarse_stride;
      p.coarse_scale = coarse_scale;
      p.cache_id = cache_id;
      p.precision = precision;
      const char* isa = nullptr;
      R4T_NOGIL(isa = sample_sets_cpu(p));
      return std::string(isa);
    });
  }

#if defined(R4T_WITH_CUDA)
  m.def("cuda_device_count", []() { return cuda_device_count(); });
  m.def("knn_cuda_workspace_bytes", [](int dtype, int metric, int64_t B, int64_t N, int64_t d, int64_t k,
                                       int device) {
    auto p = make_knn(0, d, 0, d, dtype, metric, B, N, d, k, 0, 0, 0, 0, 0);
    p.device = device;
    size_t r = 0;
    R4T_NOGIL(r = knn_cuda_workspace_bytes(p));
    return r;
  });
  m.def("knn_cuda", [](uintptr_t q, int64_t qs, uintptr_t c, int64_t cs, int dtype, int metric, int64_t B,
                       int64_t N, int64_t d, int64_t k, uintptr_t allowed, uintptr_t os, uintptr_t oi,
                       uintptr_t ws, size_t ws_bytes, int device, uintptr_t stream) {
    auto p = make_knn(q, qs, c, cs, dtype, metric, B, N, d, k, allowed, os, oi, 0, stream);
    p.workspace = ptr<void>(ws);
    p.workspace_bytes = ws_bytes;
    p.device = device;
    R4T_NOGIL(knn_cuda(p));
  });
  m.def("ground_cuda_workspace_bytes", [](int64_t S, int64_t L, int64_t C, int device) {
    auto p = make_ground(0, 0, S, L, C, true, 0, 0, 0, 0);
    p.device = device;
    size_t r = 0;
    R4T_NOGIL(r = ground_cuda_workspace_bytes(p));
    return r;
  });
  m.def("ground_cuda", [](uintptr_t sc, uintptr_t ids, int64_t S, int64_t L, int64_t C, bool hib,
                          uintptr_t oi, uintptr_t os, uintptr_t ws, size_t ws_bytes, int device, uintptr_t stream) {
    auto p = make_ground(sc, ids, S, L, C, hib, oi, os, 0, stream);
    p.workspace = ptr<void>(ws);
    p.workspace_bytes = ws_bytes;
    p.device = device;
    R4T_NOGIL(ground_cuda(p));
  });
  m.def("set_stats_cuda", [](uintptr_t x, uintptr_t lengths, int64_t S, int64_t L, int64_t d, uintptr_t ov,
                             uintptr_t oc, int device, uintptr_t stream) {
    auto p = make_stats(x, lengths, S, L, d, ov, oc, 0, stream);
    p.device = device;
    R4T_NOGIL(set_stats_cuda(p));
  });
  m.def("edm_step_cuda", [](uintptr_t x, uintptr_t fc, uintptr_t fu, uintptr_t z, uintptr_t ox, uintptr_t od,
                            int64_t n, float sigma, float c_skip, float c_out, float w, float h, float ns,
                            int device, uintptr_t stream) {
    auto p = make_step(x, fc, fu, z, ox, od, n, sigma, c_skip, c_out, w, h, ns, 0, stream);
    p.device = device;
    R4T_NOGIL(edm_step_cuda(p));
  });
#else
  m.def("cuda_device_count", []() { return 0; });
#endif
}
