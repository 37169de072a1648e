// Least squares on a synthetic, ill-conditioned linear problem: the model
// for studying compression error on a quadratic, where the optimum and the
// Hessian are known exactly.
//
// Data: x_i has independent normal features with variances spread
// geometrically from 1 down to 1/condition (so the Hessian's condition
// number is about `condition`), and y_i = x_i . w* + noise, with w* drawn
// from the seed. Train and test share w* and draw their own rows.
// Model: f(w) = 1/(2m) sum_i (x_i . w - y_i)^2 (+ l2/2 |w|^2), whose Hessian
// diagonal is mean_i x_ij^2 (+ l2), exactly.
#pragma once

#include <random>
#include <vector>

#include "sps/dataset.h"
#include "sps/model.h"

namespace sps::worker {

class LeastSquaresData final : public sps::Dataset {
 public:
  // `rotate`: features multiplied by one random orthogonal matrix (dense Hessian).
  LeastSquaresData(size_t rows, size_t features, double condition, double noise, uint64_t seed, Split split,
                   bool rotate = false);
  size_t size() const override { return rows_; }
  size_t features() const override { return features_; }
  void batch(std::span<const uint32_t> ids, sps::Batch& out) const override;
  // The planted weights w* (the optimum when noise is 0).
  const std::vector<float>& planted() const { return planted_; }

 private:
  size_t rows_;
  size_t features_;
  std::vector<float> x_;  // rows x features
  std::vector<float> y_;
  std::vector<float> planted_;
};

class LeastSquares final : public sps::Model {
 public:
  explicit LeastSquares(size_t features, double l2 = 0.0) : features_(features), l2_(static_cast<float>(l2)) {}
  std::vector<TensorSpec> tensors() const override { return {{"weights", {features_}}}; }
  // Starts at w = 0.
  void init(std::span<float> params, uint64_t seed) override;
  double loss_and_gradient(std::span<const float> params, const Batch& batch, std::span<float> grad) override;
  bool provides_hessian_diag() const override { return true; }
  bool hessian_diag(std::span<const float> params, const Batch& batch, std::span<float> out) override;
  // H v = (1/m) X^T (X v) (+ l2 v): two passes over the batch, no n x n matrix.
  bool provides_hessian_vector() const override { return true; }
  bool hessian_vector(std::span<const float> params, const Batch& batch, std::span<const float> v,
                      std::span<float> out) override;

 private:
  size_t features_;
  float l2_;
  std::vector<float> residual_;
};

// A standard normal draw from raw 64-bit draws (std::normal_distribution is
// not the same across standard libraries; this is).
double portable_normal(uint64_t a, uint64_t b);
// One standard normal from `rng`: two draws in a fixed order (the second
// argument's first, as the generated data has always had them), never
// `portable_normal(rng(), rng())`, whose order is up to the compiler.
double normal_draw(std::mt19937_64& rng);

}  // namespace sps::worker
