#include "kernels/cuda/ef_accumulate.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <string>

namespace sps::kernels::cuda {
namespace {

// Owns one device allocation; a failing free is ignored, never thrown.
template <class T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t n) {
    if (n > 0 && cudaMalloc(&ptr_, n * sizeof(T)) != cudaSuccess) ptr_ = nullptr;
  }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) (void)cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() const { return ptr_; }

 private:
  T* ptr_ = nullptr;
};

__global__ void ef_accumulate_kernel(const float* residual, const float* grad, float scale, float* acc, size_t n,
                                     unsigned long long* non_finite) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    // __fmul_rn/__fadd_rn forbid FMA contraction so the result matches the CPU.
    const float a = __fadd_rn(residual[i], __fmul_rn(scale, grad[i]));
    acc[i] = a;
    if (!isfinite(a)) atomicAdd(non_finite, 1ull);
  }
}

Status cuda_status(cudaError_t e, const char* what) {
  return unavailable(std::string(what) + ": " + cudaGetErrorString(e));
}

}  // namespace

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

std::string probe_error() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  return n == 0 ? "no CUDA device" : "";
}

Result<size_t> ef_accumulate(const float* residual, const float* grad, float scale, float* acc, size_t n) {
  if (n == 0) return size_t{0};
  DeviceBuffer<float> d_res(n), d_grad(n), d_acc(n);
  DeviceBuffer<unsigned long long> d_bad(1);
  if (!d_res.get() || !d_grad.get() || !d_acc.get() || !d_bad.get()) return resource_exhausted("cudaMalloc failed");
  cudaError_t e = cudaMemcpy(d_res.get(), residual, n * sizeof(float), cudaMemcpyHostToDevice);
  if (e == cudaSuccess) e = cudaMemcpy(d_grad.get(), grad, n * sizeof(float), cudaMemcpyHostToDevice);
  if (e == cudaSuccess) e = cudaMemset(d_bad.get(), 0, sizeof(unsigned long long));
  if (e != cudaSuccess) return cuda_status(e, "copy to device");
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<size_t>((n + threads - 1) / threads, 4096));
  ef_accumulate_kernel<<<blocks, threads>>>(d_res.get(), d_grad.get(), scale, d_acc.get(), n, d_bad.get());
  e = cudaGetLastError();
  if (e != cudaSuccess) return cuda_status(e, "kernel launch");
  unsigned long long bad = 0;
  e = cudaMemcpy(acc, d_acc.get(), n * sizeof(float), cudaMemcpyDeviceToHost);
  if (e == cudaSuccess) e = cudaMemcpy(&bad, d_bad.get(), sizeof(bad), cudaMemcpyDeviceToHost);
  if (e != cudaSuccess) return cuda_status(e, "copy from device");
  return static_cast<size_t>(bad);
}

}  // namespace sps::kernels::cuda
