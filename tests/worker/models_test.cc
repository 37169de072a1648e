// The built-in models: analytic gradients and Hessian diagonals against
// finite differences, and the synthetic least-squares data's promises.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <random>

#include "worker/least_squares.h"
#include "worker/mlp.h"

namespace sps::worker {
namespace {

Batch random_classification_batch(size_t rows, size_t cols, size_t classes, uint32_t seed) {
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

TEST(MlpTest, TensorsDescribeTheLayers) {
  Mlp m({784, 512, 256, 10});
  const auto t = m.tensors();
  ASSERT_EQ(t.size(), 6u);
  EXPECT_EQ(t[0].name, "fc1.weight");
  EXPECT_EQ(t[0].shape, (std::vector<size_t>{512, 784}));
  EXPECT_EQ(t[5].name, "fc3.bias");
  EXPECT_EQ(num_params(t), 535818u);
  EXPECT_EQ(m.num_params(), 535818u);
}

// Central differences in double precision of the float model: the analytic
// gradient must agree to a few 1e-3 (ReLU kinks are avoided by checking
// only where the difference is consistent at two step sizes).
TEST(MlpTest, GradientMatchesFiniteDifferences) {
  Mlp m({6, 5, 4, 3}, /*l2=*/0.01);
  std::vector<float> p(m.num_params()), g(m.num_params()), scratch(m.num_params());
  m.init(p, 3);
  for (size_t i = 0; i < p.size(); ++i) p[i] += 0.05f * std::sin(static_cast<float>(i));  // non-zero biases
  const Batch b = random_classification_batch(7, 6, 3, 4);
  m.loss_and_gradient(p, b, g);
  size_t checked = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    auto numeric = [&](float h) {
      auto q = p;
      q[i] += h;
      const double up = m.loss_and_gradient(q, b, scratch);
      q[i] -= 2 * h;
      const double down = m.loss_and_gradient(q, b, scratch);
      return (up - down) / (2 * h);
    };
    const double a = numeric(1e-2f), c = numeric(5e-3f);
    if (std::fabs(a - c) > 1e-3 + 1e-2 * std::fabs(a)) continue;  // a kink in range
    ++checked;
    EXPECT_NEAR(g[i], a, 2e-3 + 1e-2 * std::fabs(a)) << "param " << i;
  }
  EXPECT_GT(checked, p.size() * 9 / 10);
}

TEST(MlpTest, SgdFitsABatchAndEvaluateAgreesWithTheLoss) {
  Mlp m({8, 16, 4});
  std::vector<float> p(m.num_params()), g(m.num_params());
  m.init(p, 1);
  const Batch b = random_classification_batch(32, 8, 4, 9);
  const double first = m.loss_and_gradient(p, b, g);
  double last = first;
  for (int it = 0; it < 300; ++it) {
    last = m.loss_and_gradient(p, b, g);
    for (size_t i = 0; i < p.size(); ++i) p[i] -= 0.5f * g[i];
  }
  EXPECT_LT(last, 0.5 * first);
  // Same examples as a dataset: evaluate's mean loss equals the batch loss.
  struct Fixed final : Dataset {
    const Batch* b;
    size_t size() const override { return b->rows; }
    size_t features() const override { return b->cols; }
    size_t classes() const override { return 4; }
    void batch(std::span<const uint32_t> ids, Batch& out) const override {
      out.rows = ids.size();
      out.cols = b->cols;
      out.x.clear();
      out.labels.clear();
      for (uint32_t id : ids) {
        out.x.insert(out.x.end(), b->x.begin() + id * b->cols, b->x.begin() + (id + 1) * b->cols);
        out.labels.push_back(b->labels[id]);
      }
    }
  } data;
  data.b = &b;
  const Evaluation e = m.evaluate(p, data);
  EXPECT_EQ(e.examples, 32u);
  EXPECT_NEAR(e.loss, m.loss_and_gradient(p, b, g), 1e-5);
  EXPECT_GT(e.accuracy, 0.9);
}

TEST(LeastSquaresTest, DataHasTheAskedConditioningAndSharesTheOptimum) {
  const size_t d = 20;
  LeastSquaresData train(20000, d, 1000.0, 0.0, 5, Split::kTrain), test(100, d, 1000.0, 0.0, 5, Split::kTest);
  EXPECT_EQ(train.planted(), test.planted());
  std::vector<uint32_t> ids(train.size());
  std::iota(ids.begin(), ids.end(), 0u);
  Batch b;
  train.batch(ids, b);
  double first = 0, last = 0;
  for (size_t i = 0; i < b.rows; ++i) {
    first += double{b.x[i * d]} * b.x[i * d];
    last += double{b.x[i * d + d - 1]} * b.x[i * d + d - 1];
  }
  EXPECT_NEAR(first / last, 1000.0, 100.0);  // sampling error of 20000 draws
  // Noise 0: the planted weights have zero loss and zero gradient.
  LeastSquares m(d);
  std::vector<float> g(d);
  EXPECT_NEAR(m.loss_and_gradient(train.planted(), b, g), 0.0, 1e-8);
  for (float v : g) EXPECT_NEAR(v, 0.0f, 1e-4f);
}

TEST(LeastSquaresTest, GradientAndHessianDiagonalAreExact) {
  const size_t d = 6;
  LeastSquaresData data(16, d, 10.0, 0.1, 2, Split::kTrain);
  std::vector<uint32_t> ids{0, 3, 5, 7, 9, 15};
  Batch b;
  data.batch(ids, b);
  LeastSquares m(d, /*l2=*/0.05);
  std::vector<float> w = {0.3f, -0.2f, 0.1f, 0.5f, -0.4f, 0.2f}, g(d), h(d), gp(d), gm(d);
  m.loss_and_gradient(w, b, g);
  ASSERT_TRUE(m.provides_hessian_diag());
  ASSERT_TRUE(m.hessian_diag(w, b, h));
  for (size_t j = 0; j < d; ++j) {
    const float step = 1e-2f;
    auto q = w;
    q[j] += step;
    const double up = m.loss_and_gradient(q, b, gp);
    q[j] -= 2 * step;
    const double down = m.loss_and_gradient(q, b, gm);
    EXPECT_NEAR(g[j], (up - down) / (2 * step), 1e-4) << j;
    // The loss is quadratic: the gradient's central difference is exact.
    EXPECT_NEAR(h[j], (gp[j] - gm[j]) / (2 * step), 1e-3 * std::max(1.0f, h[j])) << j;
  }
}

// Rotated features: the same spectrum, but the Hessian is far from diagonal
// (its diagonal no longer spans the condition number).
TEST(LeastSquaresTest, RotationMakesTheHessianDense) {
  const size_t d = 10;
  LeastSquaresData plain(5000, d, 100.0, 0.0, 4, Split::kTrain), rotated(5000, d, 100.0, 0.0, 4, Split::kTrain, true);
  std::vector<uint32_t> ids(5000);
  std::iota(ids.begin(), ids.end(), 0u);
  Batch bp, br;
  plain.batch(ids, bp);
  rotated.batch(ids, br);
  LeastSquares m(d);
  std::vector<float> w(d, 0.0f), hp(d), hr(d), e(d, 0.0f), col(d);
  m.hessian_diag(w, bp, hp);
  m.hessian_diag(w, br, hr);
  const auto spread = [](const std::vector<float>& h) {
    return *std::max_element(h.begin(), h.end()) / *std::min_element(h.begin(), h.end());
  };
  EXPECT_GT(spread(hp), 50.0f);
  EXPECT_LT(spread(hr), 20.0f);
  // Off-diagonal mass: H e_0 has large entries besides the first when rotated.
  e[0] = 1.0f;
  m.hessian_vector(w, br, e, col);
  double off = 0;
  for (size_t j = 1; j < d; ++j) off += std::fabs(col[j]);
  EXPECT_GT(off, 0.1 * std::fabs(col[0]));
  // The optimum is the planted vector in both: zero gradient there (no noise).
  std::vector<float> g(d);
  EXPECT_NEAR(m.loss_and_gradient(rotated.planted(), br, g), 0.0, 1e-8);
}

TEST(LeastSquaresTest, HessianVectorProductIsExact) {
  const size_t d = 8;
  LeastSquaresData data(20, d, 50.0, 0.1, 3, Split::kTrain);
  std::vector<uint32_t> ids{1, 2, 3, 5, 8, 13};
  Batch b;
  data.batch(ids, b);
  LeastSquares m(d, /*l2=*/0.01);
  ASSERT_TRUE(m.provides_hessian_vector());
  std::vector<float> w(d, 0.2f), v(d), hv(d), gp(d), gm(d), diag(d);
  for (size_t j = 0; j < d; ++j) v[j] = std::sin(static_cast<float>(j) + 1.0f);
  ASSERT_TRUE(m.hessian_vector(w, b, v, hv));
  // A quadratic's gradient is linear: (g(w + h v) - g(w - h v)) / 2h = H v exactly.
  const float h = 0.05f;
  std::vector<float> up(w), down(w);
  for (size_t j = 0; j < d; ++j) {
    up[j] += h * v[j];
    down[j] -= h * v[j];
  }
  m.loss_and_gradient(up, b, gp);
  m.loss_and_gradient(down, b, gm);
  for (size_t j = 0; j < d; ++j) EXPECT_NEAR(hv[j], (gp[j] - gm[j]) / (2 * h), 1e-4) << j;
  // With v = e_j, (H e_j)_j is the diagonal.
  ASSERT_TRUE(m.hessian_diag(w, b, diag));
  for (size_t j = 0; j < d; ++j) {
    std::vector<float> e(d, 0.0f), col(d);
    e[j] = 1.0f;
    ASSERT_TRUE(m.hessian_vector(w, b, e, col));
    EXPECT_NEAR(col[j], diag[j], 1e-5) << j;
  }
}

}  // namespace
}  // namespace sps::worker
