#include "kernels/cpu_compressor.h"
#include "kernels/sparsify.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "common/status.h"

namespace sps::kernels {
namespace {

// The oracle: sort everything by (|a| desc, index asc), keep k, sort by index.
std::vector<uint32_t> reference_topk(const std::vector<float>& a, size_t k) {
  std::vector<uint32_t> idx(a.size());
  std::iota(idx.begin(), idx.end(), 0u);
  std::stable_sort(idx.begin(), idx.end(), [&](uint32_t x, uint32_t y) { return std::fabs(a[x]) > std::fabs(a[y]); });
  idx.resize(std::min(k, a.size()));
  std::sort(idx.begin(), idx.end());
  return idx;
}

void expect_matches_reference(const std::vector<float>& a, size_t k) {
  SparseVector out;
  TopKScratch scratch;
  topk_select(a, k, out, scratch);
  const auto want = reference_topk(a, k);
  ASSERT_EQ(out.indices, want) << "n=" << a.size() << " k=" << k;
  ASSERT_EQ(out.values.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(std::bit_cast<uint32_t>(out.values[i]), std::bit_cast<uint32_t>(a[want[i]]));
}

TEST(TopKTest, MatchesReferenceOnRandomInput) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  for (size_t n : {1, 2, 17, 1000, 4096}) {
    std::vector<float> a(n);
    for (auto& v : a) v = normal(rng);
    for (size_t k : {size_t{1}, size_t{2}, n / 3, n / 2, n - 1, n}) expect_matches_reference(a, k);
  }
}

TEST(TopKTest, TiesGoToTheSmallerIndex) {
  // Magnitudes with many ties, including +x/-x and +0/-0.
  std::vector<float> a = {1, -1, 2, 1, -2, 0.0f, -0.0f, 1, 2, -1};
  for (size_t k = 0; k <= a.size(); ++k) expect_matches_reference(a, k);
  SparseVector out;
  TopKScratch scratch;
  topk_select(a, 3, out, scratch);
  EXPECT_EQ(out.indices, (std::vector<uint32_t>{2, 4, 8}));  // the three |2| entries
  topk_select(a, 4, out, scratch);
  EXPECT_EQ(out.indices, (std::vector<uint32_t>{0, 2, 4, 8}));  // then the first |1|
  std::vector<float> same(100, 0.5f);
  topk_select(same, 10, out, scratch);
  std::vector<uint32_t> first10(10);
  std::iota(first10.begin(), first10.end(), 0u);
  EXPECT_EQ(out.indices, first10);
}

TEST(TopKTest, KZeroAndKAtLeastN) {
  std::vector<float> a = {3, -1, 2};
  SparseVector out;
  TopKScratch scratch;
  topk_select(a, 0, out, scratch);
  EXPECT_EQ(out.size(), 0u);
  topk_select(a, 3, out, scratch);
  EXPECT_EQ(out.indices, (std::vector<uint32_t>{0, 1, 2}));
  topk_select(a, 99, out, scratch);
  EXPECT_EQ(out.indices, (std::vector<uint32_t>{0, 1, 2}));
  topk_select(std::vector<float>{}, 5, out, scratch);
  EXPECT_EQ(out.size(), 0u);
}

TEST(KFromRatioTest, FloorWithAFloorOfOne) {
  EXPECT_EQ(k_from_ratio(0.01, 7850), 78u);
  EXPECT_EQ(k_from_ratio(0.001, 100), 1u);
  EXPECT_EQ(k_from_ratio(1.0, 10), 10u);
  EXPECT_EQ(k_from_ratio(0.5, 0), 0u);
}

TEST(ErrorFeedbackTest, ResidualPlusSentEqualsAccumulated) {
  const size_t n = 500;
  CpuCompressor c(n, {Method::kTopK, 10}, ErrorFeedbackMode::kEf);
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  std::vector<float> g(n), expected_acc(n, 0.0f);
  SparseVector out;
  for (int step = 0; step < 20; ++step) {
    for (auto& v : g) v = normal(rng);
    const float scale = 0.1f;
    std::vector<float> acc(n);
    for (size_t i = 0; i < n; ++i) acc[i] = c.residual_view()[i] + scale * g[i];
    ASSERT_TRUE(c.compress(g, scale, out, 0).ok());
    EXPECT_EQ(out.indices, reference_topk(acc, 10));
    std::vector<float> rebuilt(c.residual_view().begin(), c.residual_view().end());
    for (size_t i = 0; i < out.size(); ++i) {
      EXPECT_EQ(rebuilt[out.indices[i]], 0.0f);
      rebuilt[out.indices[i]] = out.values[i];
    }
    EXPECT_EQ(rebuilt, acc);  // nothing lost, nothing invented
  }
  EXPECT_GT(c.residual_norm_sq(), 0.0);
}

TEST(ErrorFeedbackTest, NoFeedbackDropsTheRest) {
  CpuCompressor c(4, {Method::kTopK, 1}, ErrorFeedbackMode::kNone);
  SparseVector out;
  ASSERT_TRUE(c.compress(std::vector<float>{1, -5, 2, 0}, 1.0f, out, 0).ok());
  EXPECT_EQ(out.indices, (std::vector<uint32_t>{1}));
  ASSERT_TRUE(c.compress(std::vector<float>{1, 0, 2, 0}, 1.0f, out, 0).ok());
  EXPECT_EQ(out.indices, (std::vector<uint32_t>{2}));  // entry 0 did not accumulate
  EXPECT_EQ(c.residual_norm_sq(), 0.0);
}

TEST(ErrorFeedbackTest, DenseSendsEverything) {
  CpuCompressor c(3, {Method::kDense, 0}, ErrorFeedbackMode::kEf);
  SparseVector out;
  ASSERT_TRUE(c.compress(std::vector<float>{1, 2, 3}, 0.5f, out, 0).ok());
  EXPECT_EQ(out.values, (std::vector<float>{0.5f, 1.0f, 1.5f}));
  EXPECT_EQ(c.residual_norm_sq(), 0.0);
}

TEST(ErrorFeedbackTest, NonFiniteInputIsRefusedAndChangesNothing) {
  CpuCompressor c(4, {Method::kTopK, 1}, ErrorFeedbackMode::kEf);
  SparseVector out;
  ASSERT_TRUE(c.compress(std::vector<float>{1, 2, 3, 4}, 1.0f, out, 0).ok());
  const std::vector<float> before(c.residual_view().begin(), c.residual_view().end());
  for (float bad : {NAN, INFINITY, -INFINITY}) {
    Status s = c.compress(std::vector<float>{1, bad, 3, 4}, 1.0f, out, 0);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find("index 1"), std::string::npos) << s.message();
    EXPECT_EQ(std::vector<float>(c.residual_view().begin(), c.residual_view().end()), before);
  }
  // Overflow in acc = residual + scale*g is non-finite too.
  EXPECT_FALSE(c.compress(std::vector<float>{3e38f, 0, 0, 0}, 10.0f, out, 0).ok());
  EXPECT_FALSE(c.compress(std::vector<float>{1, 2}, 1.0f, out, 0).ok());  // wrong size
}

// ---- every method against a slow obvious reference -------------------------

std::vector<std::vector<float>> adversarial_inputs() {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  std::cauchy_distribution<float> cauchy(0, 1);
  std::vector<std::vector<float>> inputs;
  std::vector<float> v(5000);
  for (auto& x : v) x = normal(rng);
  inputs.push_back(v);                                      // bell-shaped
  for (auto& x : v) x = std::clamp(cauchy(rng), -1e6f, 1e6f);
  inputs.push_back(v);                                      // heavy-tailed
  inputs.push_back(std::vector<float>(3000, -0.25f));       // all equal
  inputs.push_back({0.5f, -2.0f, 1e-3f});                   // tiny (n < k)
  for (auto& x : v) x = static_cast<float>(static_cast<int>(rng() % 7) - 3);
  inputs.push_back(v);                                      // many ties, +0/-0
  for (auto& x : v) x = normal(rng) * 1e-40f;               // denormals
  inputs.push_back(v);
  for (auto& x : v) x = normal(rng) * std::exp2(static_cast<float>(rng() % 60) - 30.0f);  // many scales
  inputs.push_back(v);
  return inputs;
}

TEST(TopKTest, AdversarialInputsMatchTheReference) {
  for (const auto& a : adversarial_inputs())
    for (size_t k : {size_t{1}, size_t{5}, size_t{50}, a.size() / 2, a.size() - 1, a.size(), a.size() + 10})
      expect_matches_reference(a, k);
}

TEST(TopKTest, PropertyNothingUnselectedIsLarger) {
  std::mt19937 rng(2);
  std::normal_distribution<float> normal;
  std::vector<float> a(20000);
  for (auto& x : a) x = normal(rng);
  SparseVector out;
  TopKScratch scratch;
  topk_select(a, 200, out, scratch);
  float smallest = INFINITY;
  std::vector<bool> chosen(a.size(), false);
  for (uint32_t i : out.indices) {
    smallest = std::min(smallest, std::fabs(a[i]));
    chosen[i] = true;
  }
  for (size_t i = 0; i < a.size(); ++i)
    if (!chosen[i]) {
      ASSERT_LE(std::fabs(a[i]), smallest) << i;
    }
  EXPECT_TRUE(std::is_sorted(out.indices.begin(), out.indices.end()));
}

SparseVector run(Method m, const std::vector<float>& g, SelectionParams p, ErrorFeedbackMode mode, uint64_t step,
                 std::vector<float>* residual_out = nullptr) {
  p.method = m;
  CpuCompressor c(g.size(), p, mode);
  SparseVector out;
  EXPECT_TRUE(c.compress(g, 1.0f, out, step).ok());
  if (residual_out) residual_out->assign(c.residual_view().begin(), c.residual_view().end());
  return out;
}

TEST(ThresholdTest, SelectsEveryEntryAtOrAboveLambda) {
  for (const auto& a : adversarial_inputs()) {
    for (float lambda : {1e-30f, 0.25f, 1.0f, 3.0f, 1e9f}) {
      SelectionParams p;
      p.lambda = lambda;
      std::vector<float> residual;
      const auto out = run(Method::kThreshold, a, p, ErrorFeedbackMode::kEf, 0, &residual);
      std::vector<uint32_t> want;
      for (size_t i = 0; i < a.size(); ++i)
        if (std::fabs(a[i]) >= lambda) want.push_back(static_cast<uint32_t>(i));
      ASSERT_EQ(out.indices, want) << "lambda " << lambda;
      for (size_t i = 0; i < out.size(); ++i) EXPECT_EQ(out.values[i], a[out.indices[i]]);
      // residual + sent == acc exactly
      for (size_t i = 0; i < out.size(); ++i) residual[out.indices[i]] = out.values[i];
      EXPECT_EQ(residual, a);
    }
  }
}

TEST(ThresholdTest, CapKeepsTheLargest) {
  std::vector<float> a = {5, -1, 4, 3, -6, 2, 4};
  SelectionParams p;
  p.lambda = 2.0f;
  p.max_nnz = 3;
  const auto out = run(Method::kThreshold, a, p, ErrorFeedbackMode::kEf, 0);
  EXPECT_EQ(out.indices, (std::vector<uint32_t>{0, 2, 4}));  // 5, -6 and the first 4
}

TEST(GaussianKTest, LandsInTheBandOnNormalData) {
  std::mt19937 rng(4);
  std::normal_distribution<float> normal(0.1f, 2.0f);
  std::vector<float> a(200000);
  for (auto& x : a) x = normal(rng);
  for (size_t k : {200, 2000}) {
    SelectionParams p;
    p.k = k;
    p.method = Method::kGaussianK;
    CpuCompressor c(a.size(), p, ErrorFeedbackMode::kEf);
    SparseVector out;
    ASSERT_TRUE(c.compress(a, 1.0f, out, 0).ok());
    EXPECT_GE(out.size(), 2 * k / 3) << k;
    EXPECT_LE(out.size(), (4 * k + 2) / 3) << k;
    EXPECT_EQ(c.last_stats().rounds, 1) << "the first estimate should land on Gaussian data";
    // Everything selected is above the threshold, nothing unselected is.
    const float t = static_cast<float>(c.last_stats().threshold);
    std::vector<bool> chosen(a.size(), false);
    for (uint32_t i : out.indices) {
      EXPECT_GT(std::fabs(a[i]), t);
      chosen[i] = true;
    }
    for (size_t i = 0; i < a.size(); ++i)
      if (!chosen[i]) {
        ASSERT_LE(std::fabs(a[i]), t);
      }
  }
}

TEST(GaussianKTest, HeavyTailsAreCappedAtFourThirdsK) {
  std::mt19937 rng(5);
  std::cauchy_distribution<float> cauchy;
  std::vector<float> a(100000);
  for (auto& x : a) x = std::clamp(cauchy(rng), -1e6f, 1e6f);
  SelectionParams p;
  p.k = 100;
  const auto out = run(Method::kGaussianK, a, p, ErrorFeedbackMode::kEf, 0);
  EXPECT_LE(out.size(), 134u);
  EXPECT_TRUE(std::is_sorted(out.indices.begin(), out.indices.end()));
  // When capped, the kept entries are the largest candidates.
  const auto exact = reference_topk(a, out.size());
  if (out.size() == 134u) {
    EXPECT_EQ(out.indices, exact);
  }
}

TEST(SampledTest, LandsNearKNeverAboveAndKeepsLargeEntries) {
  std::mt19937 rng(6);
  std::normal_distribution<float> normal;
  std::vector<float> a(100000);
  for (auto& x : a) x = normal(rng);
  for (size_t k : {100, 1000}) {
    SelectionParams p;
    p.method = Method::kSampled;
    p.k = k;
    p.seed = 3;
    CpuCompressor c(a.size(), p, ErrorFeedbackMode::kEf);
    SparseVector out;
    ASSERT_TRUE(c.compress(a, 1.0f, out, 7).ok());
    EXPECT_LE(out.size(), k);
    EXPECT_GE(out.size(), 8 * k / 10) << k;
    EXPECT_TRUE(std::is_sorted(out.indices.begin(), out.indices.end()));
    const float t = static_cast<float>(c.last_stats().threshold);
    for (size_t i = 0; i < out.size(); ++i) {
      EXPECT_GE(std::fabs(out.values[i]), t);
      EXPECT_EQ(out.values[i], a[out.indices[i]]);
    }
    // Same seed and step, same selection.
    CpuCompressor again(a.size(), p, ErrorFeedbackMode::kEf);
    SparseVector out2;
    ASSERT_TRUE(again.compress(a, 1.0f, out2, 7).ok());
    EXPECT_EQ(out.indices, out2.indices);
  }
  // All-equal input: everything passes, cut to the first k in index order.
  std::vector<float> same(1000, 0.5f);
  SelectionParams p;
  p.method = Method::kSampled;
  p.k = 10;
  const auto out = run(Method::kSampled, same, p, ErrorFeedbackMode::kEf, 0);
  ASSERT_EQ(out.size(), 10u);
  std::vector<uint32_t> first(10);
  std::iota(first.begin(), first.end(), 0u);
  EXPECT_EQ(out.indices, first);
}

TEST(GaussianKTest, FarFromGaussianFallsBackToExactTopK) {
  // A spike at zero with a few huge entries: sigma is dominated by the tail.
  std::vector<float> a(100000, 0.0f);
  std::mt19937 rng(7);
  for (int i = 0; i < 300; ++i) a[rng() % a.size()] = (i % 2 ? 1.0f : -1.0f) * static_cast<float>(1 + rng() % 1000);
  for (size_t i = 0; i < a.size(); i += 7) a[i] += 1e-3f * static_cast<float>(i % 13);
  SelectionParams p;
  p.method = Method::kGaussianK;
  p.k = 1000;
  CpuCompressor c(a.size(), p, ErrorFeedbackMode::kEf);
  SparseVector out;
  ASSERT_TRUE(c.compress(a, 1.0f, out, 0).ok());
  EXPECT_TRUE(c.last_stats().fallback);
  EXPECT_EQ(out.indices, reference_topk(a, 1000));
}

TEST(NormalQuantileTest, KnownValues) {
  EXPECT_NEAR(normal_two_sided_quantile(0.05), 1.959964, 1e-5);
  EXPECT_NEAR(normal_two_sided_quantile(0.01), 2.575829, 1e-5);
  EXPECT_NEAR(normal_two_sided_quantile(0.001), 3.290527, 1e-5);
}

TEST(RandomKTest, DistinctSortedReproducibleAndUniform) {
  std::vector<float> a(1000);
  std::iota(a.begin(), a.end(), 1.0f);
  SelectionParams p;
  p.k = 50;
  p.seed = 9;
  const auto x = run(Method::kRandomK, a, p, ErrorFeedbackMode::kEf, 3);
  const auto y = run(Method::kRandomK, a, p, ErrorFeedbackMode::kEf, 3);
  const auto z = run(Method::kRandomK, a, p, ErrorFeedbackMode::kEf, 4);
  EXPECT_EQ(x.indices, y.indices);
  EXPECT_NE(x.indices, z.indices);
  ASSERT_EQ(x.size(), 50u);
  EXPECT_TRUE(std::adjacent_find(x.indices.begin(), x.indices.end(), std::greater_equal<uint32_t>()) ==
              x.indices.end());
  for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(x.values[i], a[x.indices[i]]);
  // Uniform: over many steps every index is drawn about k/n of the time.
  std::vector<int> hits(a.size(), 0);
  const int steps = 2000;
  CpuCompressor c(a.size(), {Method::kRandomK, 50, 0, 0, false, 9}, ErrorFeedbackMode::kNone);
  SparseVector out;
  for (int s = 0; s < steps; ++s) {
    ASSERT_TRUE(c.compress(a, 1.0f, out, static_cast<uint64_t>(s)).ok());
    for (uint32_t i : out.indices) ++hits[i];
  }
  const double expected = steps * 50.0 / 1000.0;  // 100 per index
  for (int h : hits) EXPECT_NEAR(h, expected, 45);  // > 4.5 sigma
}

TEST(RandomKTest, UnbiasedScalesByNOverK) {
  std::vector<float> a(100, 2.0f);
  SelectionParams p;
  p.k = 10;
  p.randomk_unbiased = true;
  const auto out = run(Method::kRandomK, a, p, ErrorFeedbackMode::kNone, 0);
  ASSERT_EQ(out.size(), 10u);
  for (float v : out.values) EXPECT_EQ(v, 20.0f);
}

TEST(ErrorFeedbackTest, EveryMethodRefusesNonFiniteInputAndKeepsTheResidual) {
  for (Method m : {Method::kDense, Method::kTopK, Method::kThreshold, Method::kGaussianK, Method::kRandomK,
                   Method::kSampled}) {
    SelectionParams p;
    p.method = m;
    p.k = 2;
    p.lambda = 0.5f;
    CpuCompressor c(6, p, ErrorFeedbackMode::kEf);
    SparseVector out;
    ASSERT_TRUE(c.compress(std::vector<float>{0.1f, 0.2f, 0.3f, 0.4f, 0.05f, 0.6f}, 1.0f, out, 0).ok());
    const std::vector<float> before(c.residual_view().begin(), c.residual_view().end());
    Status s = c.compress(std::vector<float>{1, 1, 1, NAN, 1, 1}, 1.0f, out, 0);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find("index 3"), std::string::npos) << s.message();
    EXPECT_EQ(std::vector<float>(c.residual_view().begin(), c.residual_view().end()), before);
    EXPECT_TRUE(c.compress(std::vector<float>{1, 1, 1, 1, 1, 1}, 1.0f, out, 0).ok()) << "usable after a refusal";
  }
}

}  // namespace
}  // namespace sps::kernels
