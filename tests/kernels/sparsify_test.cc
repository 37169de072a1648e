#include "kernels/sparsify.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

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
  std::vector<float> scratch;
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
  std::vector<float> scratch;
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
  std::vector<float> scratch;
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
  ErrorFeedbackCompressor c(n, Method::kTopK, ErrorFeedbackMode::kEf, 10);
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  std::vector<float> g(n), expected_acc(n, 0.0f);
  SparseVector out;
  for (int step = 0; step < 20; ++step) {
    for (auto& v : g) v = normal(rng);
    const float scale = 0.1f;
    std::vector<float> acc(n);
    for (size_t i = 0; i < n; ++i) acc[i] = c.residual()[i] + scale * g[i];
    ASSERT_TRUE(c.compress(g, scale, out).ok());
    EXPECT_EQ(out.indices, reference_topk(acc, 10));
    std::vector<float> rebuilt(c.residual().begin(), c.residual().end());
    for (size_t i = 0; i < out.size(); ++i) {
      EXPECT_EQ(rebuilt[out.indices[i]], 0.0f);
      rebuilt[out.indices[i]] = out.values[i];
    }
    EXPECT_EQ(rebuilt, acc);  // nothing lost, nothing invented
  }
  EXPECT_GT(c.residual_norm_sq(), 0.0);
}

TEST(ErrorFeedbackTest, NoFeedbackDropsTheRest) {
  ErrorFeedbackCompressor c(4, Method::kTopK, ErrorFeedbackMode::kNone, 1);
  SparseVector out;
  ASSERT_TRUE(c.compress(std::vector<float>{1, -5, 2, 0}, 1.0f, out).ok());
  EXPECT_EQ(out.indices, (std::vector<uint32_t>{1}));
  ASSERT_TRUE(c.compress(std::vector<float>{1, 0, 2, 0}, 1.0f, out).ok());
  EXPECT_EQ(out.indices, (std::vector<uint32_t>{2}));  // entry 0 did not accumulate
  EXPECT_EQ(c.residual_norm_sq(), 0.0);
}

TEST(ErrorFeedbackTest, DenseSendsEverything) {
  ErrorFeedbackCompressor c(3, Method::kDense, ErrorFeedbackMode::kEf, 0);
  SparseVector out;
  ASSERT_TRUE(c.compress(std::vector<float>{1, 2, 3}, 0.5f, out).ok());
  EXPECT_EQ(out.values, (std::vector<float>{0.5f, 1.0f, 1.5f}));
  EXPECT_EQ(c.residual_norm_sq(), 0.0);
}

TEST(ErrorFeedbackTest, NonFiniteInputIsRefusedAndChangesNothing) {
  ErrorFeedbackCompressor c(4, Method::kTopK, ErrorFeedbackMode::kEf, 1);
  SparseVector out;
  ASSERT_TRUE(c.compress(std::vector<float>{1, 2, 3, 4}, 1.0f, out).ok());
  const std::vector<float> before(c.residual().begin(), c.residual().end());
  for (float bad : {NAN, INFINITY, -INFINITY}) {
    Status s = c.compress(std::vector<float>{1, bad, 3, 4}, 1.0f, out);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find("index 1"), std::string::npos) << s.message();
    EXPECT_EQ(std::vector<float>(c.residual().begin(), c.residual().end()), before);
  }
  // Overflow in acc = residual + scale*g is non-finite too.
  EXPECT_FALSE(c.compress(std::vector<float>{3e38f, 0, 0, 0}, 10.0f, out).ok());
  EXPECT_FALSE(c.compress(std::vector<float>{1, 2}, 1.0f, out).ok());  // wrong size
}

}  // namespace
}  // namespace sps::kernels
