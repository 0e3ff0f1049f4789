// Error checking and small host helpers shared by the CUDA kernels (csrc/cuda/*.cu only).
//
//   R4T_CUDA_CHECK(cudaFoo(...));          every runtime API call
//   kernel<<<grid, block, smem, stream>>>(...);
//   R4T_CUDA_CHECK_LAUNCH(kernel);         every launch (cudaGetLastError right after it)
//
// A failure throws std::runtime_error naming the CUDA error, its description, the failing call and the
// file:line, e.g. "CUDA error cudaErrorInvalidValue (invalid argument) in `cudaSetDevice(...)` at
// csrc/cuda/knn.cu:412". Errors raised asynchronously by a running kernel surface at the caller's next
// synchronising call (we never synchronise: everything runs on the caller's stream).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "common.h"

namespace r4t {
namespace cuda_detail {

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* what, const char* file, int line) {
  (void)cudaGetLastError();  // clear a non-sticky error so the next CUDA call starts clean
  throw std::runtime_error(std::string("CUDA error ") + cudaGetErrorName(err) + " (" +
                           cudaGetErrorString(err) + ") in `" + what + "` at " + file + ":" +
                           std::to_string(line));
}

}  // namespace cuda_detail
}  // namespace r4t

#define R4T_CUDA_CHECK(call)                                                          \
  do {                                                                                \
    const cudaError_t r4t_cuda_err_ = (call);                                         \
    if (r4t_cuda_err_ != cudaSuccess)                                                 \
      ::r4t::cuda_detail::throw_cuda_error(r4t_cuda_err_, #call, __FILE__, __LINE__); \
  } while (0)

#define R4T_CUDA_CHECK_LAUNCH(kernel)                                                                \
  do {                                                                                               \
    const cudaError_t r4t_cuda_err_ = cudaGetLastError();                                            \
    if (r4t_cuda_err_ != cudaSuccess)                                                                \
      ::r4t::cuda_detail::throw_cuda_error(r4t_cuda_err_, "launch of " #kernel, __FILE__, __LINE__); \
  } while (0)

namespace r4t {

// Makes `device` (the tensors' device index, from the caller) current for the scope of a launch and
// restores the previous device afterwards, so a call with tensors on cuda:1 runs there whatever the
// thread's current device is. device < 0 keeps the current device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (device < 0) return;
    R4T_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) {
      R4T_CUDA_CHECK(cudaSetDevice(device));
      restore_ = true;
    }
  }
  ~DeviceGuard() {
    if (restore_) (void)cudaSetDevice(prev_);  // never throw from a destructor
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool restore_ = false;
};

// Device scratch handed down by the caller (allocated with torch's caching allocator on the caller's
// stream, so it stays valid for everything queued on that stream). Carves aligned sub-buffers.
class Workspace {
 public:
  Workspace(void* ptr, size_t bytes) : base_(static_cast<unsigned char*>(ptr)), bytes_(bytes) {}
  template <typename T>
  T* take(size_t count) {
    const size_t off = (used_ + 255) / 256 * 256;
    const size_t need = off + count * sizeof(T);
    if (need > bytes_ || (count > 0 && base_ == nullptr)) {
      throw ValueError("workspace: " + std::to_string(bytes_) + " bytes given, " + std::to_string(need) +
                       " needed (allocate the size that *_workspace_bytes reports)");
    }
    used_ = need;
    return reinterpret_cast<T*>(base_ + off);
  }
  // Bytes that take() calls for these counts would need (the same alignment rule).
  static size_t bytes_for(std::initializer_list<size_t> sizes) {
    size_t used = 0;
    for (size_t b : sizes) used = (used + 255) / 256 * 256 + b;
    return used;
  }

 private:
  unsigned char* base_;
  size_t bytes_;
  size_t used_ = 0;
};

// Properties of the current device that the launchers size their grids and shared memory with.
struct DeviceProps {
  int device = 0;
  int sm_count = 1;
  int smem_optin = 48 * 1024;  // largest dynamic shared memory one block may opt in to, in bytes
};

inline DeviceProps current_device_props() {
  DeviceProps p;
  R4T_CUDA_CHECK(cudaGetDevice(&p.device));
  R4T_CUDA_CHECK(cudaDeviceGetAttribute(&p.sm_count, cudaDevAttrMultiProcessorCount, p.device));
  R4T_CUDA_CHECK(cudaDeviceGetAttribute(&p.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, p.device));
  return p;
}

}  // namespace r4t
