// A float array in GPU memory with the transfers a GPU worker needs:
// uploads of whole ranges (dense pulls), a scatter of (key, value) pairs by
// a kernel (sparse pulls), and downloads. Plain C++ (no CUDA types), so host
// code includes it without nvcc; it exists only in CUDA builds.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "common/status.h"

namespace sps::kernels::cuda {

class DeviceArray {
 public:
  // `n` floats on `device`, zeroed; pinned host staging for scatters.
  static Result<std::unique_ptr<DeviceArray>> create(size_t n, int device = 0);
  ~DeviceArray();
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  float* data();
  size_t size() const;
  // data[begin, begin + count) = host[0, count).
  Status upload(size_t begin, const float* host, size_t count);
  // data[keys[i]] = values[i] for i < count: keys and values go through
  // pinned memory, one kernel writes them.
  Status scatter(const uint32_t* keys, const float* values, size_t count);
  // device_dst[0, count) = data[0, count) (device to device).
  Status copy_to_device(float* device_dst, size_t count) const;
  // host[0, count) = data[begin, begin + count).
  Status download(size_t begin, float* host, size_t count) const;
  // Waits for every transfer and kernel queued on this array's stream.
  Status synchronize() const;

 private:
  struct State;
  explicit DeviceArray(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
};

}  // namespace sps::kernels::cuda
