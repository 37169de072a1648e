#include "kernels/sparsify.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <functional>
#include <numeric>
#include <random>
#include <type_traits>

#include <fmt/format.h>

namespace sps::kernels {
namespace {

// |x| as its IEEE-754 bit pattern: for finite values, ordering these
// integers orders the magnitudes, and +0/-0 both map to 0.
inline uint32_t magnitude_bits(float x) { return std::bit_cast<uint32_t>(x) & 0x7FFFFFFFu; }
// 1 when the exponent is all ones (Inf or NaN), else 0; branch-free.
inline uint32_t non_finite(uint32_t m) { return ((m & 0x7F800000u) + 0x00800000u) >> 31; }

// 2048 buckets: the 8 exponent bits and the top 3 mantissa bits, so each
// bucket spans 1/8 of an octave of magnitude.
constexpr int kBucketShift = 20;
constexpr size_t kBuckets = size_t{1} << (31 - kBucketShift);

// From `candidates` (ascending indices), keeps the `keep` of largest |acc|,
// ties to the smaller index, into `kept` (ascending). Returns the smallest
// kept magnitude (as bits). REQUIRES: 0 < keep <= candidates.size().
uint32_t keep_largest(std::span<const float> acc, const std::vector<uint32_t>& candidates, size_t keep,
                      std::vector<uint32_t>& kept, std::vector<uint32_t>& magnitudes) {
  kept.clear();
  if (keep == candidates.size()) {
    kept = candidates;
    uint32_t low = UINT32_MAX;
    for (uint32_t i : candidates) low = std::min(low, magnitude_bits(acc[i]));
    return low;
  }
  magnitudes.resize(candidates.size());
  for (size_t i = 0; i < candidates.size(); ++i) magnitudes[i] = magnitude_bits(acc[candidates[i]]);
  const auto kth = magnitudes.begin() + static_cast<std::ptrdiff_t>(keep - 1);
  std::nth_element(magnitudes.begin(), kth, magnitudes.end(), std::greater<uint32_t>());
  const uint32_t t = *kth;
  size_t greater = 0;
  for (auto it = magnitudes.begin(); it != kth; ++it) greater += (*it > t) ? 1 : 0;
  size_t ties_left = keep - greater;
  for (uint32_t i : candidates) {
    const uint32_t m = magnitude_bits(acc[i]);
    if (m > t || (m == t && ties_left > 0)) {
      if (m == t) --ties_left;
      kept.push_back(i);
    }
  }
  return t;
}

void gather(std::span<const float> acc, SparseVector& out) {
  out.values.resize(out.indices.size());
  for (size_t i = 0; i < out.indices.size(); ++i) out.values[i] = acc[out.indices[i]];
}

void select_all(std::span<const float> acc, SparseVector& out) {
  out.indices.resize(acc.size());
  std::iota(out.indices.begin(), out.indices.end(), 0u);
  out.values.assign(acc.begin(), acc.end());
}

// Top-k given the magnitude histogram of acc.
void select_from_histogram(std::span<const float> acc, const uint32_t* hist, size_t k, SparseVector& out,
                           TopKScratch& s) {
  const size_t n = acc.size();
  out.clear();
  if (k == 0 || n == 0) return;
  if (k >= n) return select_all(acc, out);
  size_t above = 0;
  size_t b = kBuckets - 1;
  while (above + hist[b] < k) above += hist[b--];  // terminates: the counts sum to n > k
  const size_t need = k - above;  // taken from bucket b
  s.above.clear();
  s.boundary.clear();
  const auto bucket = static_cast<uint32_t>(b);
  for (size_t i = 0; i < n; ++i) {
    const uint32_t key = magnitude_bits(acc[i]) >> kBucketShift;
    if (key > bucket) {
      s.above.push_back(static_cast<uint32_t>(i));
    } else if (key == bucket) {
      s.boundary.push_back(static_cast<uint32_t>(i));
    }
  }
  keep_largest(acc, s.boundary, need, s.kept, s.magnitudes);
  out.indices.resize(k);
  std::merge(s.above.begin(), s.above.end(), s.kept.begin(), s.kept.end(), out.indices.begin());
  gather(acc, out);
}

}  // namespace

size_t k_from_ratio(double ratio, size_t n) {
  if (n == 0) return 0;
  const double k = std::floor(ratio * static_cast<double>(n));
  if (!(k >= 1)) return 1;
  return std::min(n, static_cast<size_t>(k));
}

void topk_select(std::span<const float> acc, size_t k, SparseVector& out, TopKScratch& scratch) {
  scratch.histogram.assign(kBuckets, 0);
  for (float a : acc) ++scratch.histogram[magnitude_bits(a) >> kBucketShift];
  select_from_histogram(acc, scratch.histogram.data(), k, out, scratch);
}

double normal_two_sided_quantile(double p) {
  if (p >= 1) return 0;
  if (p <= 0) return INFINITY;
  // Solve erfc(z / sqrt 2) = p by bisection: erfc is monotone, and 200
  // halvings of [0, 40] are far below double precision.
  double lo = 0, hi = 40;
  for (int i = 0; i < 200; ++i) {
    const double mid = 0.5 * (lo + hi);
    if (std::erfc(mid / std::sqrt(2.0)) > p) lo = mid; else hi = mid;
  }
  return 0.5 * (lo + hi);
}

ErrorFeedbackCompressor::ErrorFeedbackCompressor(size_t n, SelectionParams params, ErrorFeedbackMode mode)
    : params_(params), mode_(mode), residual_(n, 0.0f), acc_(n, 0.0f) {
  if (params_.method == Method::kDense) params_.k = n;
  params_.k = std::min(params_.k, n);
}

Status ErrorFeedbackCompressor::compress(std::span<const float> grad, float scale, SparseVector& out, uint64_t step) {
  const size_t n = residual_.size();
  if (grad.size() != n)
    return invalid_argument(fmt::format("gradient has {} entries, the model has {}", grad.size(), n));
  const bool ef = mode_ == ErrorFeedbackMode::kEf;
  const Method method = params_.method;
  out.clear();
  stats_ = {};
  topk_.above.clear();

  // Pass 1, fused: acc = residual + scale * g into scratch (the residual is
  // only replaced when the whole step succeeds), a finiteness check, and
  // what the method needs from the data on the way.
  uint32_t all_bits = 0;  // OR of non-finite flags
  double sum = 0, sum_sq = 0;
  // The EF branch is hoisted out of the loops (two instantiations) and the
  // finiteness test is branch-free, so the simple passes vectorise.
  auto first_pass = [&](auto ef_tag) {
  constexpr bool kEf = decltype(ef_tag)::value;
  const float* r = residual_.data();
  const float* gp = grad.data();
  auto load = [&](size_t i) -> float {
    if constexpr (kEf) {
      return r[i] + scale * gp[i];
    } else {
      return scale * gp[i];
    }
  };
  if (method == Method::kTopK) {
    // Two interleaved histograms break the increment dependency chain.
    topk_.histogram.assign(2 * kBuckets, 0);
    uint32_t* h0 = topk_.histogram.data();
    uint32_t* h1 = h0 + kBuckets;
    size_t i = 0;
    for (; i + 1 < n; i += 2) {
      const float a0 = load(i);
      const float a1 = load(i + 1);
      acc_[i] = a0;
      acc_[i + 1] = a1;
      const uint32_t m0 = magnitude_bits(a0), m1 = magnitude_bits(a1);
      all_bits |= non_finite(m0) | non_finite(m1);
      ++h0[m0 >> kBucketShift];
      ++h1[m1 >> kBucketShift];
    }
    for (; i < n; ++i) {
      const float a = load(i);
      acc_[i] = a;
      const uint32_t m = magnitude_bits(a);
      all_bits |= non_finite(m);
      ++h0[m >> kBucketShift];
    }
    for (size_t b = 0; b < kBuckets; ++b) h0[b] += h1[b];
  } else if (method == Method::kThreshold) {
    // Select in the same pass; discarded below if the input is not finite.
    const uint32_t lambda_bits = magnitude_bits(params_.lambda);
    for (size_t i = 0; i < n; ++i) {
      const float a = load(i);
      acc_[i] = a;
      const uint32_t m = magnitude_bits(a);
      all_bits |= non_finite(m);
      if (m >= lambda_bits) topk_.above.push_back(static_cast<uint32_t>(i));
    }
  } else if (method == Method::kGaussianK) {
    // Moments in float blocks folded into doubles: accurate and vectorisable.
    constexpr size_t kBlock = 256;
    for (size_t start = 0; start < n; start += kBlock) {
      const size_t end = std::min(n, start + kBlock);
      float s = 0, sq = 0;
      for (size_t i = start; i < end; ++i) {
        const float a = load(i);
        acc_[i] = a;
        all_bits |= non_finite(magnitude_bits(a));
        s += a;
        sq += a * a;
      }
      sum += s;
      sum_sq += sq;
    }
  } else {
    for (size_t i = 0; i < n; ++i) {
      const float a = load(i);
      acc_[i] = a;
      all_bits |= non_finite(magnitude_bits(a));
    }
  }
  };
  if (ef) {
    first_pass(std::true_type{});
  } else {
    first_pass(std::false_type{});
  }
  if (all_bits != 0) {
    topk_.above.clear();
    size_t bad = 0;
    while (bad < n && std::isfinite(acc_[bad])) ++bad;
    return invalid_argument(fmt::format(
        "non-finite value at index {} (gradient {}, residual {}); refusing to compress it", bad,
        bad < n ? grad[bad] : 0.0f, bad < n ? residual_[bad] : 0.0f));
  }

  switch (method) {
    case Method::kDense: select_all(acc_, out); break;
    case Method::kTopK: {
      select_from_histogram(acc_, topk_.histogram.data(), params_.k, out, topk_);
      uint32_t low = UINT32_MAX;
      for (float v : out.values) low = std::min(low, magnitude_bits(v));
      stats_.threshold = out.size() > 0 ? std::bit_cast<float>(low) : 0.0;
      break;
    }
    case Method::kThreshold: select_threshold(out); break;
    case Method::kGaussianK: {
      const double mean = n > 0 ? sum / static_cast<double>(n) : 0.0;
      const double var = n > 1 ? std::max(0.0, (sum_sq - sum * mean) / static_cast<double>(n - 1)) : 0.0;
      select_gaussiank(mean, std::sqrt(var), out);
      break;
    }
    case Method::kRandomK: select_randomk(step, out); break;
    case Method::kSampled: select_sampled(step, out); break;
  }
  stats_.nnz = out.size();

  if (ef) {
    // residual = acc - sent: zero what was selected (random-k's unbiased
    // scaling is refused with EF by the config, so sent == acc there).
    for (uint32_t i : out.indices) acc_[i] = 0.0f;
    residual_.swap(acc_);
  }
  if (method == Method::kRandomK && params_.randomk_unbiased && params_.k > 0) {
    const float factor = static_cast<float>(static_cast<double>(n) / static_cast<double>(params_.k));
    for (float& v : out.values) v *= factor;
  }
  return {};
}

void ErrorFeedbackCompressor::select_threshold(SparseVector& out) {
  stats_.threshold = params_.lambda;
  if (params_.max_nnz > 0 && topk_.above.size() > params_.max_nnz) {
    // Safety cap: fall back to the max_nnz largest of what passed.
    const uint32_t t = keep_largest(acc_, topk_.above, params_.max_nnz, topk_.kept, topk_.magnitudes);
    out.indices = topk_.kept;
    stats_.threshold = std::bit_cast<float>(t);
  } else {
    out.indices = topk_.above;
  }
  topk_.above.clear();
  gather(acc_, out);
}

void ErrorFeedbackCompressor::select_gaussiank(double mean, double stddev, SparseVector& out) {
  // Shi et al.'s estimate, then the sps correction (docs/kernels.md): up to
  // 4 rounds, recounting after every adjustment; too many -> the exact top
  // ceil(4k/3) of the candidates; too few after 4 rounds -> exact top-k.
  const size_t n = acc_.size();
  const double k = static_cast<double>(params_.k);
  const double ratio = k / static_cast<double>(std::max<size_t>(n, 1));
  double thr = mean + stddev * normal_two_sided_quantile(ratio);
  auto count_above = [&](double t) {
    const auto tf = static_cast<float>(t);
    size_t c = 0;
    for (float a : acc_) c += (std::fabs(a) > tf) ? 1 : 0;
    return c;
  };
  size_t c = count_above(thr);
  int rounds = 1;
  while (rounds < 4) {
    if (static_cast<double>(c) < 2.0 * k / 3.0) {
      thr *= 0.5;
    } else if (static_cast<double>(c) > 4.0 * k / 3.0) {
      thr *= 1.5;
    } else {
      break;
    }
    c = count_above(thr);
    ++rounds;
  }
  stats_.rounds = rounds;
  stats_.threshold = thr;
  if (static_cast<double>(c) < 2.0 * k / 3.0) {
    // Far from Gaussian (e.g. a spike at zero with a heavy tail: sigma is
    // dominated by the tail and the estimate stays far too high). Accepting
    // would send almost nothing while the residual grows, so fall back to
    // the exact top-k: the band [2k/3, 4k/3] always holds.
    stats_.fallback = true;
    topk_select(acc_, params_.k, out, topk_);
    uint32_t low = UINT32_MAX;
    for (float v : out.values) low = std::min(low, magnitude_bits(v));
    stats_.threshold = out.size() > 0 ? std::bit_cast<float>(low) : 0.0;
    return;
  }
  const auto tf = static_cast<float>(thr);
  topk_.above.clear();
  for (size_t i = 0; i < n; ++i)
    if (std::fabs(acc_[i]) > tf) topk_.above.push_back(static_cast<uint32_t>(i));
  const auto cap = static_cast<size_t>(std::ceil(4.0 * k / 3.0));
  if (topk_.above.size() > cap) {
    keep_largest(acc_, topk_.above, cap, topk_.kept, topk_.magnitudes);
    out.indices = topk_.kept;
  } else {
    out.indices = topk_.above;
  }
  topk_.above.clear();
  gather(acc_, out);
}

void ErrorFeedbackCompressor::select_randomk(uint64_t step, SparseVector& out) {
  const size_t n = acc_.size();
  const size_t k = params_.k;
  if (k >= n) return select_all(acc_, out);
  // Floyd's algorithm: k distinct indices with one draw each. The generator
  // depends only on (seed, step), so every backend and rerun agrees.
  std::seed_seq seq{static_cast<uint32_t>(params_.seed), static_cast<uint32_t>(params_.seed >> 32),
                    static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32)};
  std::mt19937_64 rng(seq);
  topk_.kept.clear();
  // Membership bitmap, n bits; only the bits set are cleared afterwards, so
  // a step costs O(k), not O(n).
  auto& bits = topk_.magnitudes;
  bits.resize((n + 31) / 32, 0);
  for (size_t j = n - k; j < n; ++j) {
    const auto t = static_cast<uint32_t>(rng() % (j + 1));
    const bool taken = (bits[t >> 5] >> (t & 31)) & 1u;
    const uint32_t pick = taken ? static_cast<uint32_t>(j) : t;
    bits[pick >> 5] |= 1u << (pick & 31);
    topk_.kept.push_back(pick);
  }
  for (uint32_t i : topk_.kept) bits[i >> 5] = 0;
  std::sort(topk_.kept.begin(), topk_.kept.end());
  out.indices = topk_.kept;
  gather(acc_, out);
}

Status ErrorFeedbackCompressor::set_residual(std::span<const float> residual) {
  if (residual.size() != residual_.size())
    return invalid_argument(fmt::format("residual has {} entries, expected {}", residual.size(), residual_.size()));
  std::copy(residual.begin(), residual.end(), residual_.begin());
  return {};
}

void ErrorFeedbackCompressor::select_sampled(uint64_t step, SparseVector& out) {
  // DGC's sampled threshold (ALGORITHMS.md 2.5): estimate the k-th largest
  // |acc| from a strided sample with a random start, lower it by 0.8x while
  // too few pass (at most 10 rounds), cut too many to the exact top-k
  // (> 1.3k) or to the first k in index order (k < c <= 1.3k).
  const size_t n = acc_.size();
  const size_t k = params_.k;
  if (k == 0 || n == 0) return;
  if (k >= n) return select_all(acc_, out);
  const double rho = static_cast<double>(k) / static_cast<double>(n);
  const auto min_samples = static_cast<size_t>(std::ceil(2.0 / rho));
  const size_t samples = std::min(n, std::max(static_cast<size_t>(std::ceil(0.01 * static_cast<double>(n))), min_samples));
  const size_t stride = std::max<size_t>(1, n / samples);
  std::seed_seq seq{static_cast<uint32_t>(params_.seed), static_cast<uint32_t>(step), 0x5A3Du};
  std::mt19937_64 rng(seq);
  const size_t start = stride > 1 ? static_cast<size_t>(rng() % stride) : 0;
  auto& sample = topk_.magnitudes;
  sample.clear();
  for (size_t i = start; i < n; i += stride) sample.push_back(magnitude_bits(acc_[i]));
  const size_t top = std::max<size_t>(1, static_cast<size_t>(std::ceil(rho * static_cast<double>(sample.size()))));
  std::nth_element(sample.begin(), sample.begin() + static_cast<std::ptrdiff_t>(top - 1), sample.end(),
                   std::greater<uint32_t>());
  float thr = std::bit_cast<float>(sample[top - 1]);
  int rounds = 0;
  auto& cand = topk_.above;
  while (true) {
    ++rounds;
    cand.clear();
    for (size_t i = 0; i < n; ++i)
      if (std::fabs(acc_[i]) >= thr) cand.push_back(static_cast<uint32_t>(i));
    if (static_cast<double>(cand.size()) < 0.8 * static_cast<double>(k) && rounds < 10 && thr > 0) {
      thr *= 0.8f;
      continue;
    }
    break;
  }
  stats_.rounds = rounds;
  stats_.threshold = thr;
  if (static_cast<double>(cand.size()) > 1.3 * static_cast<double>(k)) {
    keep_largest(acc_, cand, k, topk_.kept, topk_.magnitudes);
    out.indices = topk_.kept;
  } else {
    out.indices.assign(cand.begin(), cand.begin() + static_cast<std::ptrdiff_t>(std::min(k, cand.size())));
  }
  cand.clear();
  gather(acc_, out);
}

double ErrorFeedbackCompressor::residual_norm_sq() const {
  if (mode_ == ErrorFeedbackMode::kNone) return 0.0;
  double s = 0;
  for (float r : residual_) s += double{r} * r;
  return s;
}

}  // namespace sps::kernels
