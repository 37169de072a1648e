#include "worker/logreg.h"

#include "worker/dataset.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

namespace sps::worker {
namespace {

Batch random_batch(size_t rows, size_t cols, size_t classes, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(0, 1);
  Batch b;
  b.rows = rows;
  b.cols = cols;
  b.x.resize(rows * cols);
  for (auto& v : b.x) v = u(rng);
  for (size_t r = 0; r < rows; ++r) b.labels.push_back(static_cast<int32_t>(rng() % classes));
  return b;
}

// Central differences in double-checked float: the analytic gradient must
// match to a few 1e-3 relative.
TEST(LogRegTest, GradientMatchesFiniteDifferences) {
  const size_t cols = 6, classes = 4;
  LogisticRegression m(cols, classes, /*l2=*/0.01);
  std::vector<float> p(m.num_params()), g(m.num_params());
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0, 0.3f);
  for (auto& v : p) v = normal(rng);
  const Batch b = random_batch(8, cols, classes, 2);
  m.loss_and_gradient(p, b, g);
  std::vector<float> scratch(m.num_params());
  for (size_t i = 0; i < p.size(); ++i) {
    const float h = 1e-2f;
    auto q = p;
    q[i] += h;
    const double up = m.loss_and_gradient(q, b, scratch);
    q[i] -= 2 * h;
    const double down = m.loss_and_gradient(q, b, scratch);
    const double numeric = (up - down) / (2 * h);
    EXPECT_NEAR(g[i], numeric, 2e-3 + 1e-2 * std::fabs(numeric)) << "param " << i;
  }
}

TEST(LogRegTest, ZeroInitGivesUniformLossAndSgdLowersIt) {
  const size_t cols = 5, classes = 3;
  LogisticRegression m(cols, classes);
  std::vector<float> p(m.num_params()), g(m.num_params());
  m.init(p, 1);
  const Batch b = random_batch(30, cols, classes, 3);
  const double first = m.loss_and_gradient(p, b, g);
  EXPECT_NEAR(first, std::log(3.0), 1e-6);
  double last = first;
  for (int it = 0; it < 50; ++it) {
    last = m.loss_and_gradient(p, b, g);
    for (size_t i = 0; i < p.size(); ++i) p[i] -= 0.5f * g[i];
  }
  EXPECT_LT(last, first - 0.05);
}

TEST(LogRegTest, EvaluateCountsCorrectPredictions) {
  LogisticRegression m(2, 2);
  // Class 1 iff x1 > x0.
  std::vector<float> p = {1, -1, -1, 1, 0, 0};
  ImageSet d;
  d.rows = 3;
  d.cols = 2;
  d.num_classes = 2;
  d.pixels = {200, 10, 10, 200, 200, 10};
  d.labels = {0, 1, 1};
  const ImageDataset data(d);
  const Evaluation e = m.evaluate(p, data);
  EXPECT_EQ(e.examples, 3u);
  EXPECT_NEAR(e.accuracy, 2.0 / 3.0, 1e-12);
}

}  // namespace
}  // namespace sps::worker
