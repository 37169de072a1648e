#include "kernels/cuda/device_array.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <string>

namespace sps::kernels::cuda {
namespace {

Status check(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return {};
  return unavailable(std::string("CUDA: ") + what + ": " + cudaGetErrorString(e));
}

__global__ void scatter_kernel(float* data, const uint32_t* keys, const float* values, size_t count) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) data[keys[i]] = values[i];
}

}  // namespace

struct DeviceArray::State {
  size_t n = 0;
  int device = 0;
  float* data = nullptr;
  cudaStream_t stream = nullptr;
  // Scatter staging: pinned host and device buffers, grown on demand.
  size_t capacity = 0;
  uint32_t* host_keys = nullptr;
  float* host_values = nullptr;
  uint32_t* device_keys = nullptr;
  float* device_values = nullptr;

  ~State() {
    if (data) cudaFree(data);
    if (device_keys) cudaFree(device_keys);
    if (device_values) cudaFree(device_values);
    if (host_keys) cudaFreeHost(host_keys);
    if (host_values) cudaFreeHost(host_values);
    if (stream) cudaStreamDestroy(stream);
  }
  Status reserve(size_t count) {
    if (count <= capacity) return {};
    SPS_RETURN_IF_ERROR(check(cudaStreamSynchronize(stream), "synchronize before growing the staging buffers"));
    const size_t grown = std::max(count, capacity * 2);
    if (device_keys) cudaFree(device_keys);
    if (device_values) cudaFree(device_values);
    if (host_keys) cudaFreeHost(host_keys);
    if (host_values) cudaFreeHost(host_values);
    device_keys = nullptr;
    device_values = nullptr;
    host_keys = nullptr;
    host_values = nullptr;
    capacity = 0;
    SPS_RETURN_IF_ERROR(check(cudaMalloc(&device_keys, grown * sizeof(uint32_t)), "allocate scatter keys"));
    SPS_RETURN_IF_ERROR(check(cudaMalloc(&device_values, grown * sizeof(float)), "allocate scatter values"));
    SPS_RETURN_IF_ERROR(check(cudaMallocHost(&host_keys, grown * sizeof(uint32_t)), "allocate pinned keys"));
    SPS_RETURN_IF_ERROR(check(cudaMallocHost(&host_values, grown * sizeof(float)), "allocate pinned values"));
    capacity = grown;
    return {};
  }
};

DeviceArray::DeviceArray(std::unique_ptr<State> state) : state_(std::move(state)) {}
DeviceArray::~DeviceArray() = default;

Result<std::unique_ptr<DeviceArray>> DeviceArray::create(size_t n, int device) {
  auto s = std::make_unique<State>();
  s->n = n;
  s->device = device;
  SPS_RETURN_IF_ERROR(check(cudaSetDevice(device), "select the device"));
  SPS_RETURN_IF_ERROR(check(cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking), "create a stream"));
  if (n > 0) {
    SPS_RETURN_IF_ERROR(check(cudaMalloc(&s->data, n * sizeof(float)), "allocate the array"));
    SPS_RETURN_IF_ERROR(check(cudaMemsetAsync(s->data, 0, n * sizeof(float), s->stream), "zero the array"));
    SPS_RETURN_IF_ERROR(check(cudaStreamSynchronize(s->stream), "zero the array"));
  }
  return std::unique_ptr<DeviceArray>(new DeviceArray(std::move(s)));
}

float* DeviceArray::data() { return state_->data; }
size_t DeviceArray::size() const { return state_->n; }

Status DeviceArray::upload(size_t begin, const float* host, size_t count) {
  State& s = *state_;
  if (begin > s.n || count > s.n - begin) return out_of_range("DeviceArray::upload past the end");
  if (count == 0) return {};
  SPS_RETURN_IF_ERROR(check(cudaSetDevice(s.device), "select the device"));
  return check(cudaMemcpyAsync(s.data + begin, host, count * sizeof(float), cudaMemcpyHostToDevice, s.stream),
               "upload");
}

Status DeviceArray::scatter(const uint32_t* keys, const float* values, size_t count) {
  State& s = *state_;
  if (count == 0) return {};
  for (size_t i = 0; i < count; ++i)
    if (keys[i] >= s.n) return out_of_range("DeviceArray::scatter: key " + std::to_string(keys[i]) + " past the end");
  SPS_RETURN_IF_ERROR(check(cudaSetDevice(s.device), "select the device"));
  SPS_RETURN_IF_ERROR(s.reserve(count));
  // The previous scatter may still read the pinned buffers.
  SPS_RETURN_IF_ERROR(check(cudaStreamSynchronize(s.stream), "wait for the previous scatter"));
  std::memcpy(s.host_keys, keys, count * sizeof(uint32_t));
  std::memcpy(s.host_values, values, count * sizeof(float));
  SPS_RETURN_IF_ERROR(check(
      cudaMemcpyAsync(s.device_keys, s.host_keys, count * sizeof(uint32_t), cudaMemcpyHostToDevice, s.stream),
      "copy scatter keys"));
  SPS_RETURN_IF_ERROR(check(
      cudaMemcpyAsync(s.device_values, s.host_values, count * sizeof(float), cudaMemcpyHostToDevice, s.stream),
      "copy scatter values"));
  constexpr unsigned kThreads = 256;
  const auto blocks = static_cast<unsigned>((count + kThreads - 1) / kThreads);
  scatter_kernel<<<blocks, kThreads, 0, s.stream>>>(s.data, s.device_keys, s.device_values, count);
  return check(cudaGetLastError(), "launch the scatter kernel");
}

Status DeviceArray::download(size_t begin, float* host, size_t count) const {
  const State& s = *state_;
  if (begin > s.n || count > s.n - begin) return out_of_range("DeviceArray::download past the end");
  if (count == 0) return {};
  SPS_RETURN_IF_ERROR(check(cudaSetDevice(s.device), "select the device"));
  SPS_RETURN_IF_ERROR(check(
      cudaMemcpyAsync(host, s.data + begin, count * sizeof(float), cudaMemcpyDeviceToHost, s.stream), "download"));
  return check(cudaStreamSynchronize(s.stream), "download");
}

Status DeviceArray::copy_to_device(float* device_dst, size_t count) const {
  const State& s = *state_;
  if (count > s.n) return out_of_range("DeviceArray::copy_to_device past the end");
  if (count == 0) return {};
  SPS_RETURN_IF_ERROR(check(cudaSetDevice(s.device), "select the device"));
  SPS_RETURN_IF_ERROR(check(
      cudaMemcpyAsync(device_dst, s.data, count * sizeof(float), cudaMemcpyDeviceToDevice, s.stream), "copy"));
  return check(cudaStreamSynchronize(s.stream), "copy");
}

Status DeviceArray::synchronize() const { return check(cudaStreamSynchronize(state_->stream), "synchronize"); }

}  // namespace sps::kernels::cuda
