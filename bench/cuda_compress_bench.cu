// Standalone timing of the CUDA error-feedback compressor (no Google
// Benchmark: the GPU machine has only the toolkit). For n in {1M, 25M} and
// ratio in {0.1%, 1%}: ef+topk, ef+threshold, ef+gaussiank, each one full
// compress_device step (grad already on the device; indices and values
// copied back to the host, as the worker needs them), against the floor of
// the step: one device-to-device copy moving 12n bytes (6n read + 6n
// written), which is what the accumulate must move (read r and g, write acc).
//
// compress_device is synchronous (it ends with a stream sync), so its steps
// are timed with the host clock; the copy is timed with cudaEvents. Each
// figure is the median of --repeat runs after --warmup runs. Gradients are
// fresh N(0,1) draws per step from a pool of 4 buffers (so the 1M case does
// not replay one cached input), and the residual evolves as in training.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/cuda/device_compressor.h"

namespace {

using sps::kernels::cuda::DeviceCompressor;
using sps::kernels::cuda::DeviceMethod;
using sps::kernels::cuda::DeviceOptions;
using sps::kernels::cuda::DeviceStats;
using sps::kernels::cuda::StepInputs;

#define CHECK_CUDA(expr)                                                                            \
  do {                                                                                              \
    cudaError_t e_ = (expr);                                                                        \
    if (e_ != cudaSuccess) {                                                                        \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                                 \
    }                                                                                               \
  } while (0)

__device__ unsigned int hash32(unsigned long long x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return static_cast<unsigned int>(x);
}

// N(0, 1) by Box-Muller on hashed uniforms (quality is ample for timing).
__global__ void normal_kernel(float* out, size_t n, unsigned long long seed) {
  const size_t step = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += step) {
    const float u1 = (hash32(seed * 0x9E3779B97F4A7C15ull + 2 * i) + 1.0f) * 2.3283064e-10f;
    const float u2 = hash32(seed * 0x9E3779B97F4A7C15ull + 2 * i + 1) * 2.3283064e-10f;
    out[i] = sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
  }
}

double two_sided_quantile(double p) {
  double lo = 0, hi = 40;
  for (int i = 0; i < 200; ++i) {
    const double mid = 0.5 * (lo + hi);
    if (std::erfc(mid / std::sqrt(2.0)) > p) lo = mid; else hi = mid;
  }
  return 0.5 * (lo + hi);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Row {
  size_t n;
  double ratio;
  std::string method;
  double ms;
  double nnz;
  double copy_ms;
};

double time_copy(size_t n, int warmup, int repeat) {
  const size_t bytes = 6 * n;  // read 6n + write 6n = the 12n floor
  void *src = nullptr, *dst = nullptr;
  CHECK_CUDA(cudaMalloc(&src, bytes));
  CHECK_CUDA(cudaMalloc(&dst, bytes));
  CHECK_CUDA(cudaMemset(src, 1, bytes));
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  std::vector<double> t;
  for (int r = 0; r < warmup + repeat; ++r) {
    CHECK_CUDA(cudaEventRecord(a));
    CHECK_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice));
    CHECK_CUDA(cudaEventRecord(b));
    CHECK_CUDA(cudaEventSynchronize(b));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
    if (r >= warmup) t.push_back(ms);
  }
  CHECK_CUDA(cudaEventDestroy(a));
  CHECK_CUDA(cudaEventDestroy(b));
  CHECK_CUDA(cudaFree(src));
  CHECK_CUDA(cudaFree(dst));
  return median(t);
}

Row time_method(size_t n, double ratio, DeviceMethod method, const char* name, float* const* grads, int pool,
                int warmup, int repeat) {
  DeviceOptions o;
  o.method = method;
  o.k = std::max<size_t>(1, static_cast<size_t>(std::floor(ratio * static_cast<double>(n))));
  // lambda for threshold: the N(0,1) quantile of the ratio (the residual
  // grows over the steps, so nnz drifts upward; it is printed).
  o.lambda = static_cast<float>(two_sided_quantile(ratio));
  auto made = DeviceCompressor::create(n, o);
  if (!made.ok()) {
    std::fprintf(stderr, "create: %s\n", made.status().message().c_str());
    std::exit(1);
  }
  auto& c = *made;
  std::vector<uint32_t> idx;
  std::vector<float> val;
  DeviceStats st;
  std::vector<double> t, nnz;
  for (int r = 0; r < warmup + repeat; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    const auto s = c->compress_device(grads[r % pool], 1.0f, StepInputs{}, idx, val, st);
    const auto t1 = std::chrono::steady_clock::now();
    if (!s.ok()) {
      std::fprintf(stderr, "%s n=%zu: %s\n", name, n, s.message().c_str());
      std::exit(1);
    }
    if (r >= warmup) {
      t.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
      nnz.push_back(static_cast<double>(st.nnz));
    }
  }
  return Row{n, ratio, name, median(t), median(nnz), 0};
}

}  // namespace

int main(int argc, char** argv) {
  int warmup = 5, repeat = 30;
  std::vector<size_t> sizes = {size_t{1} << 20, 25u << 20};
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--help")) {
      std::printf("usage: %s [--warmup N] [--repeat N] [--small]\n"
                  "  times ef+topk/threshold/gaussiank compress steps against a 12n-byte copy\n",
                  argv[0]);
      return 0;
    }
    if (!std::strcmp(argv[i], "--warmup") && i + 1 < argc) warmup = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--repeat") && i + 1 < argc) repeat = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--small")) sizes = {size_t{1} << 16};
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "no CUDA device\n");
    return 2;
  }
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s\n", prop.name);

  constexpr int kPool = 4;
  std::vector<Row> rows;
  for (size_t n : sizes) {
    float* grads[kPool];
    for (int p = 0; p < kPool; ++p) {
      CHECK_CUDA(cudaMalloc(&grads[p], n * sizeof(float)));
      normal_kernel<<<1024, 256>>>(grads[p], n, 1234 + p);
      CHECK_CUDA(cudaGetLastError());
    }
    CHECK_CUDA(cudaDeviceSynchronize());
    const double copy_ms = time_copy(n, warmup, repeat);
    for (double ratio : {0.001, 0.01}) {
      const struct {
        DeviceMethod m;
        const char* name;
      } methods[] = {{DeviceMethod::kTopK, "ef+topk"},
                     {DeviceMethod::kThreshold, "ef+threshold"},
                     {DeviceMethod::kGaussianK, "ef+gaussiank"}};
      for (const auto& m : methods) {
        Row r = time_method(n, ratio, m.m, m.name, grads, kPool, warmup, repeat);
        r.copy_ms = copy_ms;
        rows.push_back(r);
      }
    }
    for (float* g : grads) CHECK_CUDA(cudaFree(g));
  }
  std::printf("\n%10s %7s %-14s %10s %10s %12s %8s\n", "n", "ratio", "method", "median_ms", "nnz", "copy12n_ms",
              "x_copy");
  for (const Row& r : rows)
    std::printf("%10zu %6.1f%% %-14s %10.4f %10.0f %12.4f %8.2f\n", r.n, 100 * r.ratio, r.method.c_str(), r.ms, r.nnz,
                r.copy_ms, r.ms / r.copy_ms);
  return 0;
}
