// CUDA backend of the error-feedback compressor (kernels/compressor.h has
// the step's arithmetic). Plain C++17, no CUDA types: host code and tests
// include it without nvcc. kernels/cuda_compressor.cc adapts it to the
// Compressor interface and supplies the host-side random draws, so the
// random choices are the CPU backend's, bit for bit.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "common/status.h"
#include "common/value_format.h"

namespace sps::kernels::cuda {

enum class DeviceMethod : int { kDense = 0, kTopK, kThreshold, kGaussianK, kRandomK, kSampled };
enum class DeviceErrorFeedback : int { kNone = 0, kEf, kHessianDiag };

struct DeviceOptions {
  DeviceMethod method = DeviceMethod::kTopK;
  size_t k = 1;
  float lambda = 0.0f;
  size_t max_nnz = 0;
  bool randomk_unbiased = false;
  DeviceErrorFeedback error_feedback = DeviceErrorFeedback::kEf;
  float momentum = 0.0f;
  float clip_norm = 0.0f;
  ValueFormat values = ValueFormat::kF32;
  int qsgd_levels = 64;  // values: qsgd
  size_t quant_bucket = 512;  // scaled values: selected values per scale (0 = all)
  uint64_t seed = 0;     // values: qsgd draws from (seed, step, index)
  int device = 0;
};

// Host-side choices for one step (random-k and sampled draw on the host with
// the CPU backend's generator).
struct StepInputs {
  const uint32_t* random_indices = nullptr;  // randomk: k distinct indices, ascending
  size_t sample_start = 0;                   // sampled: first sampled index
  size_t sample_stride = 1;                  // sampled: stride between samples
  uint64_t step = 0;                         // the step number (qsgd's draws)
};

struct DeviceStats {
  size_t nnz = 0;
  double threshold = 0;
  int rounds = 0;
  bool fallback = false;
  float value_scale = 0;            // scaled value formats: the first bucket's scale
  std::vector<float> value_scales;  // scaled value formats: every bucket's scale, in order
  float value_negative_scale = 0;            // onebit: the first bucket's negative scale
  std::vector<float> value_negative_scales;  // onebit: every bucket's negative scale
};

class DeviceCompressor {
 public:
  // Allocates every buffer (residual, momentum, acc, selection scratch, CUB
  // temporary storage) once on `options.device` and creates its own stream.
  static Result<std::unique_ptr<DeviceCompressor>> create(size_t n, const DeviceOptions& options);
  ~DeviceCompressor();
  DeviceCompressor(const DeviceCompressor&) = delete;
  DeviceCompressor& operator=(const DeviceCompressor&) = delete;

  // One step on a host gradient (copied in on the compressor's stream);
  // indices (ascending) and values (after quantisation, as floats) come back
  // to the host vectors. Same contract as Compressor::compress: a non-finite
  // acc entry fails with kInvalidArgument naming the first bad index, and
  // the residual and momentum are then unchanged.
  Status compress_host(const float* grad, float scale, const StepInputs& inputs, std::vector<uint32_t>& indices,
                       std::vector<float>& values, DeviceStats& stats);
  // The same with `grad` in device memory (the GPU worker's path).
  Status compress_device(const float* grad, float scale, const StepInputs& inputs, std::vector<uint32_t>& indices,
                         std::vector<float>& values, DeviceStats& stats);

  Status set_hessian_diag(const float* h, float gamma, size_t& clamped);
  void set_k(size_t k);
  size_t size() const;
  Status copy_residual(float* host) const;
  Status set_residual(const float* host);
  // residual[indices[j]] += values[j] for j < m (host arrays; indices
  // distinct and < n, checked by the caller). Fails with kInvalidArgument,
  // changing nothing, when a sum is not finite.
  Status undo_send(const uint32_t* indices, const float* values, size_t m);
  // residual *= factor in place (factor checked by the caller). Fails with
  // kInvalidArgument, changing nothing, when a product is not finite.
  Status scale_residual(float factor);
  Status copy_momentum(float* host) const;  // kInvalidArgument when momentum is off
  Status set_momentum(const float* host);    // n entries, checked by the caller

 private:
  struct State;
  explicit DeviceCompressor(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
};

}  // namespace sps::kernels::cuda
