// A multi-layer perceptron classifier: fully connected layers with ReLU
// between them and softmax cross-entropy on the output, e.g. 784-512-256-10
// on Fashion-MNIST (535,818 parameters).
//
// The matrix products go to OpenBLAS (cblas_sgemm): a tuned, maintained
// GEMM from Debian beats anything we would hand-block, and the rest of a
// step (bias, ReLU, softmax) is a few memory passes over the activations.
// Parameters per layer l: weight (out x in, row-major) then bias (out).
#pragma once

#include <vector>

#include "sps/dataset.h"
#include "sps/model.h"

namespace sps::worker {

// He-normal weights (std sqrt(2 / fan_in), or init_std when set) and zero
// biases in the MLP layout; shared by the CPU and CUDA MLPs so both start
// from the same values.
void mlp_init(const std::vector<size_t>& widths, double init_std, uint64_t seed, std::span<float> params);
size_t mlp_num_params(const std::vector<size_t>& widths);
std::vector<TensorSpec> mlp_tensors(const std::vector<size_t>& widths);

class Mlp final : public sps::Model {
 public:
  // `widths` = {inputs, hidden..., classes}; at least two entries.
  // `blas_threads` > 0 sets OpenBLAS's thread count for the process (one
  // per worker is right when several workers share a machine).
  Mlp(std::vector<size_t> widths, double l2 = 0.0, double init_std = 0.0, int blas_threads = 1);
  std::vector<TensorSpec> tensors() const override;
  // He-normal weights (std sqrt(2 / fan_in), or init_std when set), zero biases.
  void init(std::span<float> params, uint64_t seed) override;
  double loss_and_gradient(std::span<const float> params, const Batch& batch, std::span<float> grad) override;
  Evaluation evaluate(std::span<const float> params, const Dataset& data) override;
  size_t num_params() const { return num_params_; }

 private:
  // Forward pass over `rows` examples in `x`; leaves the softmax
  // probabilities in probs_ and each layer's activations in acts_.
  void forward(std::span<const float> params, const float* x, size_t rows);

  std::vector<size_t> widths_;
  std::vector<size_t> weight_offset_, bias_offset_;
  size_t num_params_ = 0;
  float l2_;
  double init_std_;
  // Scratch, reused across steps: acts_[l] is layer l's output (rows x
  // widths_[l+1]) after ReLU (hidden) or the logits (last).
  std::vector<std::vector<float>> acts_;
  std::vector<float> probs_, delta_, delta_prev_;
};

}  // namespace sps::worker
