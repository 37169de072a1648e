// Distributions for run statistics, mergeable across processes.
//
// CountHistogram: exact counts of small non-negative integers (staleness in
// versions). LogHistogram: durations in log-spaced buckets (4 per octave of
// microseconds), with exact count, sum and max; quantiles are the upper edge
// of their bucket, i.e. within 19 % above the true value.
#pragma once

#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace sps {

class CountHistogram {
 public:
  void add(uint64_t value, uint64_t times = 1) {
    counts_[value] += times;
    n_ += times;
  }
  void merge(const CountHistogram& o) {
    for (const auto& [v, c] : o.counts_) add(v, c);
  }
  uint64_t count() const { return n_; }
  double mean() const;
  uint64_t max() const { return counts_.empty() ? 0 : counts_.rbegin()->first; }
  // Smallest value v with at least q of the samples <= v (0 when empty).
  uint64_t quantile(double q) const;
  std::vector<std::pair<uint64_t, uint64_t>> pairs() const { return {counts_.begin(), counts_.end()}; }
  // {"count", "mean", "p50", "p99", "max"}
  nlohmann::json summary() const;

 private:
  std::map<uint64_t, uint64_t> counts_;
  uint64_t n_ = 0;
};

class LogHistogram {
 public:
  static constexpr int kBuckets = 128;  // 1 us * 2^(127/4) ~ 3.7e9 us: ample
  LogHistogram() : buckets_(kBuckets, 0) {}
  void add(double seconds);
  void merge(const LogHistogram& o);
  uint64_t count() const { return n_; }
  double mean() const { return n_ == 0 ? 0.0 : sum_ / static_cast<double>(n_); }
  double max() const { return max_; }
  double quantile(double q) const;
  nlohmann::json summary() const;  // seconds: {"count", "mean", "p50", "p99", "max"}

  // For the wire: raw state.
  const std::vector<uint64_t>& buckets() const { return buckets_; }
  double sum() const { return sum_; }
  static LogHistogram from_raw(std::vector<uint64_t> buckets, double sum, double max);

 private:
  std::vector<uint64_t> buckets_;
  uint64_t n_ = 0;
  double sum_ = 0;
  double max_ = 0;
};

}  // namespace sps
