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
constexpr int kBucketShift = kTopKBucketShift;
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
  // Two interleaved histograms break the increment dependency chain.
  scratch.histogram.assign(2 * kBuckets, 0);
  uint32_t* h0 = scratch.histogram.data();
  uint32_t* h1 = h0 + kBuckets;
  const size_t n = acc.size();
  size_t i = 0;
  for (; i + 1 < n; i += 2) {
    ++h0[magnitude_bits(acc[i]) >> kBucketShift];
    ++h1[magnitude_bits(acc[i + 1]) >> kBucketShift];
  }
  if (i < n) ++h0[magnitude_bits(acc[i]) >> kBucketShift];
  for (size_t b = 0; b < kBuckets; ++b) h0[b] += h1[b];
  scratch.histogram.resize(kBuckets);
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

void randomk_indices(size_t n, size_t k, uint64_t seed, uint64_t step, std::vector<uint32_t>& out,
                     std::vector<uint32_t>& bitmap) {
  out.clear();
  if (k >= n) {
    out.resize(n);
    std::iota(out.begin(), out.end(), 0u);
    return;
  }
  // Floyd's algorithm: k distinct indices with one draw each.
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), static_cast<uint32_t>(step),
                    static_cast<uint32_t>(step >> 32)};
  std::mt19937_64 rng(seq);
  // Membership bitmap, n bits; only the words touched are cleared after, so
  // a step costs O(k), not O(n).
  bitmap.resize((n + 31) / 32, 0);
  for (size_t j = n - k; j < n; ++j) {
    const auto t = static_cast<uint32_t>(rng() % (j + 1));
    const bool taken = (bitmap[t >> 5] >> (t & 31)) & 1u;
    const uint32_t pick = taken ? static_cast<uint32_t>(j) : t;
    bitmap[pick >> 5] |= 1u << (pick & 31);
    out.push_back(pick);
  }
  for (uint32_t i : out) bitmap[i >> 5] = 0;
  std::sort(out.begin(), out.end());
}

SampleLayout sampled_layout(size_t n, size_t k, uint64_t seed, uint64_t step) {
  SampleLayout layout;
  if (n == 0 || k == 0 || k >= n) return layout;
  // num_samples >= max(ceil(0.01 n), ceil(2 / rho)), all of n when that is more.
  const double rho = static_cast<double>(k) / static_cast<double>(n);
  const auto min_samples = static_cast<size_t>(std::ceil(2.0 / rho));
  const size_t samples =
      std::min(n, std::max(static_cast<size_t>(std::ceil(0.01 * static_cast<double>(n))), min_samples));
  layout.stride = std::max<size_t>(1, n / samples);
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(step), 0x5A3Du};
  std::mt19937_64 rng(seq);
  layout.start = layout.stride > 1 ? static_cast<size_t>(rng() % layout.stride) : 0;
  return layout;
}

}  // namespace sps::kernels
