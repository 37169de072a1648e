#include "kernels/sparsify.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>

#include <fmt/format.h>

namespace sps::kernels {

size_t k_from_ratio(double ratio, size_t n) {
  if (n == 0) return 0;
  const double k = std::floor(ratio * static_cast<double>(n));
  if (!(k >= 1)) return 1;
  return std::min(n, static_cast<size_t>(k));
}

void topk_select(std::span<const float> acc, size_t k, SparseVector& out, std::vector<float>& scratch) {
  const size_t n = acc.size();
  out.clear();
  if (k == 0 || n == 0) return;
  if (k >= n) {
    out.indices.resize(n);
    std::iota(out.indices.begin(), out.indices.end(), 0u);
    out.values.assign(acc.begin(), acc.end());
    return;
  }
  // Find the k-th largest magnitude on a contiguous copy (cache-friendly,
  // unlike comparing through an index array), then collect in index order:
  // everything above it, and of the entries equal to it only the first
  // (k - above) — which is exactly "ties go to the smaller index", with no
  // final sort because the scan is already in index order.
  scratch.resize(n);
  for (size_t i = 0; i < n; ++i) scratch[i] = std::fabs(acc[i]);
  const auto kth = scratch.begin() + static_cast<std::ptrdiff_t>(k - 1);
  std::nth_element(scratch.begin(), kth, scratch.end(), std::greater<float>());
  const float threshold = *kth;
  // Everything strictly above the threshold sits in front of the k-th slot.
  size_t above = 0;
  for (auto it = scratch.begin(); it != kth; ++it) above += (*it > threshold) ? 1 : 0;
  size_t ties_left = k - above;
  out.indices.reserve(k);
  out.values.reserve(k);
  for (size_t i = 0; i < n && out.indices.size() < k; ++i) {
    const float m = std::fabs(acc[i]);
    if (m > threshold || (m == threshold && ties_left > 0)) {
      if (m == threshold) --ties_left;
      out.indices.push_back(static_cast<uint32_t>(i));
      out.values.push_back(acc[i]);
    }
  }
}

ErrorFeedbackCompressor::ErrorFeedbackCompressor(size_t n, Method method, ErrorFeedbackMode mode, size_t k)
    : method_(method), mode_(mode), k_(method == Method::kDense ? n : k), residual_(n, 0.0f), acc_(n, 0.0f) {
  SPS_CHECK(k_ <= n);
}

Status ErrorFeedbackCompressor::compress(std::span<const float> grad, float scale, SparseVector& out) {
  const size_t n = residual_.size();
  if (grad.size() != n)
    return invalid_argument(fmt::format("gradient has {} entries, the model has {}", grad.size(), n));
  // Fused pass: build acc in scratch and check finiteness; the residual is
  // only replaced when the whole step succeeds.
  bool finite = true;
  if (mode_ == ErrorFeedbackMode::kEf) {
    for (size_t i = 0; i < n; ++i) {
      const float a = residual_[i] + scale * grad[i];
      finite &= std::isfinite(a);
      acc_[i] = a;
    }
  } else {
    for (size_t i = 0; i < n; ++i) {
      const float a = scale * grad[i];
      finite &= std::isfinite(a);
      acc_[i] = a;
    }
  }
  if (!finite) {
    size_t bad = 0;
    while (bad < n && std::isfinite(acc_[bad])) ++bad;
    return invalid_argument(fmt::format(
        "non-finite value at index {} (gradient {}, residual {}); refusing to compress it", bad,
        bad < n ? grad[bad] : 0.0f, bad < n ? residual_[bad] : 0.0f));
  }
  topk_select(acc_, k_, out, magnitude_scratch_);
  if (mode_ == ErrorFeedbackMode::kEf) {
    for (uint32_t i : out.indices) acc_[i] = 0.0f;  // residual = acc - sent
    residual_.swap(acc_);
  }
  return {};
}

double ErrorFeedbackCompressor::residual_norm_sq() const {
  if (mode_ == ErrorFeedbackMode::kNone) return 0.0;
  double s = 0;
  for (float r : residual_) s += double{r} * r;
  return s;
}

}  // namespace sps::kernels
