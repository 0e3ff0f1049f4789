// Shared helpers for the C++ kernels: error type, OpenMP shims, fp16 conversion.
#pragma once
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>

#if defined(R4T_WITH_OPENMP)
#include <omp.h>
#endif

#if defined(__GNUC__)
#define R4T_INLINE inline __attribute__((always_inline))
#else
#define R4T_INLINE inline
#endif

namespace r4t {

// Thrown for invalid arguments that reach C++ (Python validates first); pybind11 maps it to ValueError.
struct ValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

inline void check(bool ok, const std::string& msg) {
  if (!ok) throw ValueError(msg);
}

inline int max_threads(int requested) {
#if defined(R4T_WITH_OPENMP)
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

// This thread's number in the current OpenMP team, and the team's size (0 and 1 outside a region, or
// without OpenMP).
inline int thread_num() {
#if defined(R4T_WITH_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}
inline int team_size() {
#if defined(R4T_WITH_OPENMP)
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// Keeps exceptions inside OpenMP regions (an exception escaping a parallel region terminates the
// process): run(f) calls f and stores the first exception thrown by any thread; rethrow() re-raises it on
// the calling thread after the region.
class ParallelErrors {
 public:
  template <typename F>
  void run(F&& f) noexcept {
    try {
      f();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!first_) first_ = std::current_exception();
    }
  }
  void rethrow() {
    if (first_) std::rethrow_exception(first_);
  }

 private:
  std::mutex mu_;
  std::exception_ptr first_;
};

// IEEE binary16 -> binary32 (portable; the hot knn path converts with vector instructions instead).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal
      exp = 127 - 15 + 1;
      while ((man & 0x400u) == 0) {
        man <<= 1;
        --exp;
      }
      man &= 0x3FFu;
      bits = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace r4t
