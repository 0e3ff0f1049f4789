// Error checking and small host helpers shared by the CUDA kernels (csrc/cuda/*.cu only).
//
//   R4T_CUDA_CHECK(cudaFoo(...));          every runtime API call
//   kernel<<<grid, block, smem, stream>>>(...);
//   R4T_CUDA_CHECK_LAUNCH(kernel);         every launch (cudaGetLastError right after it)
//
// A failure throws std::runtime_error naming the CUDA error, its description, the failing call and the
// file:line, e.g. "CUDA error cudaErrorInvalidValue (invalid argument) in `cudaMallocAsync(...)` at
// csrc/cuda/knn.cu:412". Errors raised asynchronously by a running kernel surface at the caller's next
// synchronising call (we never synchronise: everything runs on the caller's stream).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <stdexcept>
#include <string>

namespace r4t {
namespace cuda_detail {

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* what, const char* file, int line) {
  (void)cudaGetLastError();  // clear a non-sticky error so the next CUDA call starts clean
  throw std::runtime_error(std::string("CUDA error ") + cudaGetErrorName(err) + " (" +
                           cudaGetErrorString(err) + ") in `" + what + "` at " + file + ":" +
                           std::to_string(line));
}

}  // namespace cuda_detail

// Device-memory workspace allocated with cudaMallocAsync on `stream` and released with cudaFreeAsync on
// the same stream when it goes out of scope (also when a later check throws), so kernels queued before
// the release still see valid memory (stream order).
class AsyncBuffer {
 public:
  AsyncBuffer(size_t bytes, cudaStream_t stream);
  ~AsyncBuffer() {
    if (ptr_ != nullptr) (void)cudaFreeAsync(ptr_, stream_);  // never throw from a destructor
  }
  AsyncBuffer(const AsyncBuffer&) = delete;
  AsyncBuffer& operator=(const AsyncBuffer&) = delete;
  template <typename T>
  T* as(size_t byte_offset = 0) const {
    return reinterpret_cast<T*>(static_cast<unsigned char*>(ptr_) + byte_offset);
  }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

}  // namespace r4t

#define R4T_CUDA_CHECK(call)                                                              \
  do {                                                                                    \
    const cudaError_t r4t_cuda_err_ = (call);                                             \
    if (r4t_cuda_err_ != cudaSuccess)                                                     \
      ::r4t::cuda_detail::throw_cuda_error(r4t_cuda_err_, #call, __FILE__, __LINE__);     \
  } while (0)

#define R4T_CUDA_CHECK_LAUNCH(kernel)                                                     \
  do {                                                                                    \
    const cudaError_t r4t_cuda_err_ = cudaGetLastError();                                 \
    if (r4t_cuda_err_ != cudaSuccess)                                                     \
      ::r4t::cuda_detail::throw_cuda_error(r4t_cuda_err_, "launch of " #kernel, __FILE__, \
                                           __LINE__);                                     \
  } while (0)

inline r4t::AsyncBuffer::AsyncBuffer(size_t bytes, cudaStream_t stream) : stream_(stream) {
  if (bytes > 0) R4T_CUDA_CHECK(cudaMallocAsync(&ptr_, bytes, stream));
}

namespace r4t {

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
