#include "worker/logreg.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "common/status.h"

namespace sps::worker {

LogisticRegression::LogisticRegression(size_t features, size_t classes, double l2, double init_std)
    : features_(features), classes_(classes), l2_(static_cast<float>(l2)), init_std_(init_std) {}

void LogisticRegression::init(std::span<float> params, uint64_t seed) {
  SPS_CHECK(params.size() == num_params());
  std::fill(params.begin(), params.end(), 0.0f);
  if (init_std_ <= 0) return;
  std::mt19937_64 rng(seed);
  // Box-Muller from raw draws: std::normal_distribution is not portable across libraries.
  for (size_t i = 0; i < classes_ * features_; ++i) {
    const double u1 = (static_cast<double>(rng() >> 11) + 1.0) / 9007199254740993.0;
    const double u2 = static_cast<double>(rng() >> 11) / 9007199254740992.0;
    params[i] = static_cast<float>(init_std_ * std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
  }
}

double LogisticRegression::forward_row(std::span<const float> params, const float* x, int32_t y, float* p) const {
  const float* w = params.data();
  const float* b = params.data() + classes_ * features_;
  float max_logit = -INFINITY;
  for (size_t c = 0; c < classes_; ++c) {
    const float* wc = w + c * features_;
    float z = b[c];
    for (size_t j = 0; j < features_; ++j) z += wc[j] * x[j];
    p[c] = z;
    max_logit = std::max(max_logit, z);
  }
  double sum = 0;
  for (size_t c = 0; c < classes_; ++c) {
    p[c] = std::exp(p[c] - max_logit);
    sum += p[c];
  }
  const float inv = static_cast<float>(1.0 / sum);
  for (size_t c = 0; c < classes_; ++c) p[c] *= inv;
  return -std::log(std::max(static_cast<double>(p[y]), 1e-30));
}

double LogisticRegression::loss_and_gradient(std::span<const float> params, const Batch& batch,
                                             std::span<float> grad) {
  SPS_CHECK(params.size() == num_params() && grad.size() == num_params() && batch.cols == features_ &&
            batch.labels.size() == batch.rows);
  std::fill(grad.begin(), grad.end(), 0.0f);
  float* gw = grad.data();
  float* gb = grad.data() + classes_ * features_;
  std::vector<float> p(classes_);
  double loss = 0;
  const float inv_rows = 1.0f / static_cast<float>(batch.rows);
  for (size_t r = 0; r < batch.rows; ++r) {
    const float* x = batch.x.data() + r * features_;
    loss += forward_row(params, x, batch.labels[r], p.data());
    for (size_t c = 0; c < classes_; ++c) {
      const float d = (p[c] - (static_cast<int32_t>(c) == batch.labels[r] ? 1.0f : 0.0f)) * inv_rows;
      gb[c] += d;
      float* gwc = gw + c * features_;
      for (size_t j = 0; j < features_; ++j) gwc[j] += d * x[j];
    }
  }
  loss /= static_cast<double>(batch.rows);
  if (l2_ > 0) {
    double reg = 0;
    for (size_t i = 0; i < classes_ * features_; ++i) {
      reg += double{params[i]} * params[i];
      gw[i] += l2_ * params[i];
    }
    loss += 0.5 * l2_ * reg;
  }
  return loss;
}

std::vector<TensorSpec> LogisticRegression::tensors() const {
  return {{"weights", {classes_, features_}}, {"bias", {classes_}}};
}

bool LogisticRegression::hessian_diag(std::span<const float> params, const Batch& batch, std::span<float> out) {
  SPS_CHECK(params.size() == num_params() && out.size() == num_params() && batch.cols == features_ &&
            batch.labels.size() == batch.rows);
  std::fill(out.begin(), out.end(), 0.0f);
  float* hw = out.data();
  float* hb = out.data() + classes_ * features_;
  std::vector<float> p(classes_);
  const float inv_rows = 1.0f / static_cast<float>(batch.rows);
  for (size_t r = 0; r < batch.rows; ++r) {
    const float* x = batch.x.data() + r * features_;
    (void)forward_row(params, x, batch.labels[r], p.data());
    for (size_t c = 0; c < classes_; ++c) {
      const float curvature = p[c] * (1.0f - p[c]) * inv_rows;
      hb[c] += curvature;
      float* hwc = hw + c * features_;
      for (size_t j = 0; j < features_; ++j) hwc[j] += curvature * x[j] * x[j];
    }
  }
  if (l2_ > 0)
    for (size_t i = 0; i < classes_ * features_; ++i) hw[i] += l2_;
  return true;
}

Evaluation LogisticRegression::evaluate(std::span<const float> params, const Dataset& data) {
  SPS_CHECK(params.size() == num_params() && data.features() == features_);
  Evaluation e;
  std::vector<float> p(classes_);
  std::vector<uint32_t> ids;
  Batch batch;
  double loss = 0;
  size_t correct = 0;
  constexpr size_t kChunk = 1024;
  for (size_t begin = 0; begin < data.size(); begin += kChunk) {
    const size_t end = std::min(data.size(), begin + kChunk);
    ids.resize(end - begin);
    for (size_t i = begin; i < end; ++i) ids[i - begin] = static_cast<uint32_t>(i);
    data.batch(ids, batch);
    for (size_t r = 0; r < batch.rows; ++r) {
      const int32_t y = batch.labels[r];
      loss += forward_row(params, batch.x.data() + r * features_, y, p.data());
      const auto best = std::max_element(p.begin(), p.end()) - p.begin();
      correct += (best == y) ? 1 : 0;
    }
  }
  e.examples = data.size();
  e.loss = e.examples > 0 ? loss / static_cast<double>(e.examples) : 0.0;
  e.accuracy = e.examples > 0 ? static_cast<double>(correct) / static_cast<double>(e.examples) : 0.0;
  return e;
}

}  // namespace sps::worker
