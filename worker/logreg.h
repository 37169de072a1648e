// Multinomial logistic (softmax) regression: logits = W x + b, cross-entropy
// loss, optional L2 on W. Parameters are W (classes x features, row-major)
// followed by b (classes).
#pragma once

#include "sps/dataset.h"
#include "sps/model.h"

namespace sps::worker {

class LogisticRegression final : public sps::Model {
 public:
  LogisticRegression(size_t features, size_t classes, double l2 = 0.0, double init_std = 0.0);
  size_t num_params() const { return classes_ * features_ + classes_; }
  std::vector<TensorSpec> tensors() const override;
  void init(std::span<float> params, uint64_t seed) override;
  double loss_and_gradient(std::span<const float> params, const Batch& batch, std::span<float> grad) override;
  Evaluation evaluate(std::span<const float> params, const Dataset& data) override;
  // The exact diagonal of the softmax cross-entropy Hessian on the batch:
  // d2L/dw_cj^2 = mean_i p_ic (1 - p_ic) x_ij^2 + l2, and for b_c the same
  // without x (and without l2, which is not applied to biases).
  bool provides_hessian_diag() const override { return true; }
  bool hessian_diag(std::span<const float> params, const Batch& batch, std::span<float> out) override;

 private:
  // Softmax probabilities of one example into `p`; returns the example's loss.
  double forward_row(std::span<const float> params, const float* x, int32_t y, float* p) const;

  size_t features_;
  size_t classes_;
  float l2_;
  double init_std_;
};

}  // namespace sps::worker
