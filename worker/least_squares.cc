#include "worker/least_squares.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "common/status.h"

namespace sps::worker {

double portable_normal(uint64_t a, uint64_t b) {
  const double u1 = (static_cast<double>(a >> 11) + 1.0) / 9007199254740993.0;
  const double u2 = static_cast<double>(b >> 11) / 9007199254740992.0;
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

double normal_draw(std::mt19937_64& rng) {
  const uint64_t b = rng();
  const uint64_t a = rng();
  return portable_normal(a, b);
}

LeastSquaresData::LeastSquaresData(size_t rows, size_t features, double condition, double noise, uint64_t seed,
                                   Split split, bool rotate)
    : rows_(rows), features_(features), x_(rows * features), y_(rows), planted_(features) {
  std::mt19937_64 planted_rng(seed ^ 0x5eed5eedULL);
  for (auto& w : planted_) w = static_cast<float>(normal_draw(planted_rng));
  std::vector<float> scale(features);
  for (size_t j = 0; j < features; ++j) {
    const double t = features > 1 ? static_cast<double>(j) / static_cast<double>(features - 1) : 0.0;
    scale[j] = static_cast<float>(std::pow(condition, -0.5 * t));  // variance 1 .. 1/condition
  }
  // The rotation: Gram-Schmidt on a normal matrix (rows q_0 .. q_{d-1}), the
  // same for both splits.
  std::vector<double> q;
  if (rotate) {
    q.resize(features * features);
    std::mt19937_64 qrng(seed ^ 0x0a7a7e5ULL);
    for (auto& v : q) v = normal_draw(qrng);
    for (size_t a = 0; a < features; ++a) {
      double* qa = q.data() + a * features;
      for (size_t b = 0; b < a; ++b) {
        const double* qb = q.data() + b * features;
        double dot = 0;
        for (size_t j = 0; j < features; ++j) dot += qa[j] * qb[j];
        for (size_t j = 0; j < features; ++j) qa[j] -= dot * qb[j];
      }
      double norm = 0;
      for (size_t j = 0; j < features; ++j) norm += qa[j] * qa[j];
      norm = std::sqrt(norm);
      for (size_t j = 0; j < features; ++j) qa[j] /= norm;
    }
  }
  std::vector<double> z(features);
  std::mt19937_64 rng(seed * 2 + (split == Split::kTrain ? 1 : 2));
  for (size_t i = 0; i < rows; ++i) {
    float* x = x_.data() + i * features;
    double dot = 0;
    for (size_t j = 0; j < features; ++j) z[j] = normal_draw(rng) * scale[j];
    for (size_t j = 0; j < features; ++j) {
      double v = z[j];
      if (rotate) {  // x = Q^T z
        v = 0;
        for (size_t a = 0; a < features; ++a) v += q[a * features + j] * z[a];
      }
      x[j] = static_cast<float>(v);
      dot += double{x[j]} * planted_[j];
    }
    y_[i] = static_cast<float>(dot + (noise > 0 ? noise * normal_draw(rng) : 0.0));
  }
}

void LeastSquaresData::batch(std::span<const uint32_t> ids, sps::Batch& out) const {
  out.rows = ids.size();
  out.cols = features_;
  out.x.resize(out.rows * features_);
  out.targets.resize(out.rows);
  out.labels.clear();
  for (size_t r = 0; r < ids.size(); ++r) {
    SPS_CHECK(ids[r] < rows_);
    std::copy_n(x_.data() + size_t{ids[r]} * features_, features_, out.x.data() + r * features_);
    out.targets[r] = y_[ids[r]];
  }
}

void LeastSquares::init(std::span<float> params, uint64_t /*seed*/) { std::fill(params.begin(), params.end(), 0.0f); }

double LeastSquares::loss_and_gradient(std::span<const float> params, const Batch& batch, std::span<float> grad) {
  SPS_CHECK(params.size() == features_ && grad.size() == features_ && batch.cols == features_ &&
            batch.targets.size() == batch.rows);
  residual_.resize(batch.rows);
  double loss = 0;
  for (size_t i = 0; i < batch.rows; ++i) {
    const float* x = batch.x.data() + i * features_;
    double r = -double{batch.targets[i]};
    for (size_t j = 0; j < features_; ++j) r += double{x[j]} * params[j];
    residual_[i] = static_cast<float>(r);
    loss += 0.5 * r * r;
  }
  const float inv_rows = 1.0f / static_cast<float>(batch.rows);
  std::fill(grad.begin(), grad.end(), 0.0f);
  for (size_t i = 0; i < batch.rows; ++i) {
    const float* x = batch.x.data() + i * features_;
    const float r = residual_[i] * inv_rows;
    for (size_t j = 0; j < features_; ++j) grad[j] += r * x[j];
  }
  loss /= static_cast<double>(batch.rows);
  if (l2_ > 0) {
    double reg = 0;
    for (size_t j = 0; j < features_; ++j) {
      reg += double{params[j]} * params[j];
      grad[j] += l2_ * params[j];
    }
    loss += 0.5 * l2_ * reg;
  }
  return loss;
}

bool LeastSquares::hessian_diag(std::span<const float> params, const Batch& batch, std::span<float> out) {
  SPS_CHECK(params.size() == features_ && out.size() == features_ && batch.cols == features_);
  std::fill(out.begin(), out.end(), 0.0f);
  const float inv_rows = 1.0f / static_cast<float>(batch.rows);
  for (size_t i = 0; i < batch.rows; ++i) {
    const float* x = batch.x.data() + i * features_;
    for (size_t j = 0; j < features_; ++j) out[j] += x[j] * x[j] * inv_rows;
  }
  if (l2_ > 0)
    for (auto& h : out) h += l2_;
  return true;
}

bool LeastSquares::hessian_vector(std::span<const float> params, const Batch& batch, std::span<const float> v,
                                  std::span<float> out) {
  SPS_CHECK(params.size() == features_ && v.size() == features_ && out.size() == features_ &&
            batch.cols == features_);
  std::fill(out.begin(), out.end(), 0.0f);
  const double inv_rows = 1.0 / static_cast<double>(batch.rows);
  for (size_t i = 0; i < batch.rows; ++i) {
    const float* x = batch.x.data() + i * features_;
    double xv = 0;
    for (size_t j = 0; j < features_; ++j) xv += double{x[j]} * v[j];
    const auto c = static_cast<float>(xv * inv_rows);
    for (size_t j = 0; j < features_; ++j) out[j] += c * x[j];
  }
  if (l2_ > 0)
    for (size_t j = 0; j < features_; ++j) out[j] += l2_ * v[j];
  return true;
}

}  // namespace sps::worker
