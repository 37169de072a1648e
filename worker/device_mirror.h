// A GPU model's parameters and gradient in device memory. The client pulls
// into a host copy; the mirror then uploads only what the pull rewrote (dense
// shard ranges by copy, sparse answers by a scatter kernel), so a step moves
// the selected pairs, not the model, across PCIe when pulls are sparse.
// Available in CUDA builds; elsewhere create() fails with a clear message.
#pragma once

#include <cstddef>
#include <memory>
#include <span>
#include <vector>

#include "common/status.h"
#include "worker/client.h"

namespace sps::worker {

class DeviceMirror {
 public:
  static Result<std::unique_ptr<DeviceMirror>> create(size_t n, int device = 0);
  virtual ~DeviceMirror() = default;
  // Device memory, n floats each.
  virtual std::span<float> params() = 0;
  virtual std::span<float> grad() = 0;
  // Brings the device parameters up to date with `host` after a pull that
  // made `changes`; returns when the device copy is complete.
  virtual Status update(std::span<const float> host, const PullChanges& changes) = 0;
  virtual Status upload_all(std::span<const float> host) = 0;
  virtual Status download_params(std::span<float> host) = 0;
  // device_dst[0, n) = params (device to device).
  virtual Status copy_params_to(float* device_dst) = 0;
};

// Scratch device memory of n floats (the default Model::evaluate of a GPU
// model); fails without CUDA.
Result<std::unique_ptr<DeviceMirror>> make_device_scratch(size_t n);

}  // namespace sps::worker
