#include "common/histogram.h"

#include <algorithm>
#include <cmath>

namespace sps {

double CountHistogram::mean() const {
  if (n_ == 0) return 0.0;
  double s = 0;
  for (const auto& [v, c] : counts_) s += static_cast<double>(v) * static_cast<double>(c);
  return s / static_cast<double>(n_);
}

uint64_t CountHistogram::quantile(double q) const {
  if (n_ == 0) return 0;
  const double target = q * static_cast<double>(n_);
  uint64_t seen = 0;
  for (const auto& [v, c] : counts_) {
    seen += c;
    if (static_cast<double>(seen) >= target) return v;
  }
  return max();
}

nlohmann::json CountHistogram::summary() const {
  return {{"count", n_}, {"mean", mean()}, {"p50", quantile(0.5)}, {"p99", quantile(0.99)}, {"max", max()}};
}

namespace {
int bucket_of(double seconds) {
  const double us = seconds * 1e6;
  if (!(us > 1.0)) return 0;
  return std::min(LogHistogram::kBuckets - 1, static_cast<int>(std::ceil(4.0 * std::log2(us))));
}
double upper_edge(int b) { return std::exp2(b / 4.0) * 1e-6; }
}  // namespace

void LogHistogram::add(double seconds) {
  ++buckets_[static_cast<size_t>(bucket_of(seconds))];
  ++n_;
  sum_ += seconds;
  max_ = std::max(max_, seconds);
}

void LogHistogram::merge(const LogHistogram& o) {
  for (size_t i = 0; i < buckets_.size(); ++i) buckets_[i] += o.buckets_[i];
  n_ += o.n_;
  sum_ += o.sum_;
  max_ = std::max(max_, o.max_);
}

double LogHistogram::quantile(double q) const {
  if (n_ == 0) return 0.0;
  const double target = q * static_cast<double>(n_);
  uint64_t seen = 0;
  for (int b = 0; b < kBuckets; ++b) {
    seen += buckets_[static_cast<size_t>(b)];
    if (static_cast<double>(seen) >= target) return std::min(upper_edge(b), max_);
  }
  return max_;
}

nlohmann::json LogHistogram::summary() const {
  return {{"count", n_}, {"mean", mean()}, {"p50", quantile(0.5)}, {"p99", quantile(0.99)}, {"max", max_}};
}

LogHistogram LogHistogram::from_raw(std::vector<uint64_t> buckets, double sum, double max) {
  LogHistogram h;
  buckets.resize(kBuckets, 0);
  h.buckets_ = std::move(buckets);
  for (uint64_t c : h.buckets_) h.n_ += c;
  h.sum_ = sum;
  h.max_ = max;
  return h;
}

}  // namespace sps
