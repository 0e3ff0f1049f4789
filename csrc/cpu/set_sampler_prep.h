// The fused set sampler's per-schedule constants and their cache (included once, by set_sampler.cpp).
// The EDM coefficients, the noise-level modulations (three GEMMs over the sigma-embedding MLP and the ada
// weights, ~2 MB streamed at the CPU preset) and the null condition's keys / values depend only on the
// weights, sigma_data, the schedule and whether guidance is on. A caller that names its packing
// (SampleSetsParams::cache_id != 0: the Python packing's id, unique per packed buffer, whose contents
// never change) gets them computed once per schedule; measured ~70-110 us of a 1.5 ms batch-1 call.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "set_sampler_params.h"

namespace r4t {
namespace ss {

struct Prep {
  int64_t id = 0;
  const float* packed = nullptr;
  double sigma_data = 0.0;
  int G = 1;
  std::vector<double> sigmas;
  std::vector<float> c_in, c_skip, c_out;  // per level
  std::vector<float> mods;                 // (levels, 6 * hidden)
  std::vector<float> null_kv;              // (layers, cond_tokens, 2 * hidden) when G == 2
};

constexpr size_t kPrepCacheSize = 8;  // schedules kept (most recent first)

inline std::mutex& prep_mutex() {
  static std::mutex mu;
  return mu;
}
inline std::vector<std::shared_ptr<const Prep>>& prep_cache() {
  static std::vector<std::shared_ptr<const Prep>> cache;
  return cache;
}

// The constants for p's schedule: cached ones when p.cache_id names a packing seen with this schedule,
// else computed by fill (outside the lock) and, with a cache_id, kept.
inline std::shared_ptr<const Prep> schedule_prep(const SampleSetsParams& p, int G,
                                                 const std::function<void(Prep&)>& fill) {
  const std::vector<double> sig(p.sigmas, p.sigmas + p.n_sigmas);
  auto same = [&](const Prep& e) {
    return e.id == p.cache_id && e.packed == p.packed && e.sigma_data == p.sigma_data && e.G == G &&
           e.sigmas == sig;
  };
  if (p.cache_id != 0) {
    std::lock_guard<std::mutex> lock(prep_mutex());
    for (const auto& e : prep_cache()) {
      if (same(*e)) return e;
    }
  }
  auto fresh = std::make_shared<Prep>();
  fresh->id = p.cache_id;
  fresh->packed = p.packed;
  fresh->sigma_data = p.sigma_data;
  fresh->G = G;
  fresh->sigmas = sig;
  fill(*fresh);
  if (p.cache_id != 0) {
    std::lock_guard<std::mutex> lock(prep_mutex());
    auto& c = prep_cache();
    c.insert(c.begin(), fresh);
    if (c.size() > kPrepCacheSize) c.pop_back();
  }
  return fresh;
}

// precision bf16: the packing's Linear weights once more (per packing, as Prep): as bf16 pairs for the
// AVX512-BF16 tiles (native; Linear l's panel p at l.w + p * Kp * kPanel halves, element (k, j) at
// (k / 2) * 2 * kPanel + 2 * j + k % 2, Kp = K rounded up to even, the pad zero), or the packed buffer
// with every weight rounded to a bf16 value (the emulation). ~4-10 ms per packing at the CPU preset.
struct Bf16Weights {
  int64_t id = 0;
  const float* packed = nullptr;
  bool native = false;
  std::vector<uint16_t> pairs;
  std::vector<float> rounded;
};

inline std::shared_ptr<const Bf16Weights> bf16_weights(const SampleSetsParams& p, bool native,
                                                       const std::function<void(Bf16Weights&)>& fill) {
  static std::mutex mu;
  static std::vector<std::shared_ptr<const Bf16Weights>> cache;  // 2 packings, most recent first
  if (p.cache_id != 0) {
    std::lock_guard<std::mutex> lock(mu);
    for (const auto& e : cache) {
      if (e->id == p.cache_id && e->packed == p.packed && e->native == native) return e;
    }
  }
  auto fresh = std::make_shared<Bf16Weights>();
  fresh->id = p.cache_id;
  fresh->packed = p.packed;
  fresh->native = native;
  fill(*fresh);
  if (p.cache_id != 0) {
    std::lock_guard<std::mutex> lock(mu);
    cache.insert(cache.begin(), fresh);
    if (cache.size() > 2) cache.pop_back();
  }
  return fresh;
}

}  // namespace ss
}  // namespace r4t
