#include "server/optimizer.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <random>

#include "common/thread_pool.h"

namespace sps::server {
namespace {

config::Config make_config(double lr, double momentum, double wd, config::Scale scale) {
  config::Config c;
  c.training.lr = lr;
  c.training.steps = 100;
  c.optimizer.momentum = momentum;
  c.optimizer.weight_decay = wd;
  c.compression.scale = scale;
  return c;
}

TEST(OptimizerTest, PlainTouchesOnlyPushedKeys) {
  Optimizer o = Optimizer::plain(0.5f);
  std::vector<float> x = {1, 1, 1, 1};
  o.apply(x, 0, std::vector<uint32_t>{1, 3}, std::vector<float>{4, -2}, 2, 0);
  EXPECT_EQ(x, (std::vector<float>{1, 0, 1, 1.5f}));
  EXPECT_FALSE(o.dense());
}

TEST(OptimizerTest, GradientDomainUsesTheScheduledLr) {
  auto cfg = make_config(0.1, 0, 0, config::Scale::kOne);
  cfg.optimizer.lr_schedule = config::LrSchedule::kStep;
  cfg.optimizer.step_every = 10;
  cfg.optimizer.step_gamma = 0.5;
  Optimizer o = Optimizer::from_config(cfg, 2);
  std::vector<float> x = {0, 0};
  o.apply(x, 0, std::vector<uint32_t>{0}, std::vector<float>{1}, 1, 0);   // lr 0.1
  o.apply(x, 0, std::vector<uint32_t>{1}, std::vector<float>{1}, 1, 10);  // lr 0.05
  EXPECT_FLOAT_EQ(x[0], -0.1f);
  EXPECT_FLOAT_EQ(x[1], -0.05f);
}

TEST(OptimizerTest, MomentumOnLrScaledUpdatesAfterAggregation) {
  Optimizer o = Optimizer::from_config(make_config(0.1, 0.9, 0, config::Scale::kLr), 2);
  ASSERT_TRUE(o.dense());
  std::vector<float> x = {0, 0};
  o.apply(x, 0, std::vector<uint32_t>{0}, std::vector<float>{2}, 2, 0);  // u = 1
  EXPECT_FLOAT_EQ(x[0], -1.0f);
  o.apply(x, 0, std::vector<uint32_t>{}, std::vector<float>{}, 2, 1);  // no push: momentum coasts
  EXPECT_FLOAT_EQ(x[0], -1.9f);
  EXPECT_FLOAT_EQ(x[1], 0.0f);
}

TEST(OptimizerTest, WeightDecayIsDenseAndDecoupled) {
  // Gradient domain: x -= lr * (u + wd x).
  Optimizer g = Optimizer::from_config(make_config(0.5, 0, 0.1, config::Scale::kOne), 2);
  std::vector<float> x = {2, 4};
  g.apply(x, 0, std::vector<uint32_t>{0}, std::vector<float>{1}, 1, 0);
  EXPECT_FLOAT_EQ(x[0], 2 - 0.5f * (1 + 0.2f));
  EXPECT_FLOAT_EQ(x[1], 4 - 0.5f * 0.4f);
  // lr-scaled: x -= u + lr * wd * x.
  Optimizer l = Optimizer::from_config(make_config(0.5, 0, 0.1, config::Scale::kLr), 2);
  x = {2, 4};
  l.apply(x, 0, std::vector<uint32_t>{1}, std::vector<float>{1}, 1, 0);
  EXPECT_FLOAT_EQ(x[0], 2 - 0.5f * 0.1f * 2);
  EXPECT_FLOAT_EQ(x[1], 4 - 1 - 0.5f * 0.1f * 4);
}

// ---- adaptive rules -------------------------------------------------------

config::Config adaptive_config(config::OptimizerName name, double lr, double wd, bool lazy) {
  config::Config c = make_config(lr, 0, wd, config::Scale::kOne);
  c.optimizer.name = name;
  c.optimizer.lazy = lazy;
  c.optimizer.beta1 = 0.8;
  c.optimizer.beta2 = 0.95;
  c.optimizer.epsilon = 1e-6;
  return c;
}

// The textbook rules in double precision over a dense averaged gradient u
// (zero where nothing was pushed), written from the formulas, not from
// optimizer.cc: Adagrad (Duchi et al.), Adam with bias correction (Kingma &
// Ba) and decoupled weight decay (AdamW, Loshchilov & Hutter).
struct Reference {
  config::OptimizerName name;
  double lr, wd, b1, b2, eps;
  bool lazy;
  std::vector<double> x, m, v;

  void step(const std::vector<double>& u, int64_t t0) {
    const double t = static_cast<double>(t0 + 1);
    const double c1 = 1 - std::pow(b1, t), c2 = 1 - std::pow(b2, t);
    for (size_t j = 0; j < x.size(); ++j) {
      x[j] *= 1.0 - lr * wd;
      if (name == config::OptimizerName::kAdagrad) {
        v[j] += u[j] * u[j];
        x[j] -= lr * u[j] / (std::sqrt(v[j]) + eps);
        continue;
      }
      if (lazy && u[j] == 0.0) continue;
      m[j] = b1 * m[j] + (1 - b1) * u[j];
      v[j] = b2 * v[j] + (1 - b2) * u[j] * u[j];
      const double mhat = m[j] / c1;
      const double vhat = v[j] / c2;
      x[j] -= lr * mhat / (std::sqrt(vhat) + eps);
    }
  }
};

struct Case {
  config::OptimizerName name;
  double wd;
  bool lazy;
  bool dense;  // expected Optimizer::dense()
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << config::to_string(c.name) << (c.lazy ? " lazy" : "") << " wd " << c.wd;
}

class AdaptiveTest : public ::testing::TestWithParam<Case> {};

// 30 updates of random sparse pushes (2 workers' sums, so the optimizer
// averages), against the double-precision reference; the same run with
// dense sums, and on a thread pool, must give the same bits.
TEST_P(AdaptiveTest, MatchesTheTextbookRuleInDoublePrecision) {
  const Case c = GetParam();
  constexpr uint32_t kBase = 1000;  // keys are global; the shard starts here
  constexpr size_t n = 600000;      // dense passes and pushed keys both split on the pool
  const auto cfg = adaptive_config(c.name, 0.01, c.wd, c.lazy);
  Optimizer sparse = Optimizer::from_config(cfg, n);
  Optimizer dense_sums = Optimizer::from_config(cfg, n);
  Optimizer pooled = Optimizer::from_config(cfg, n);
  EXPECT_EQ(sparse.dense(), c.dense);
  ThreadPool pool(2);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<double> uniform;
  std::vector<float> init(n);
  for (auto& v : init) v = normal(rng);
  std::vector<float> xs = init, xd = init, xp = init;
  Reference ref{c.name, 0.01, c.wd, 0.8, 0.95, 1e-6, c.lazy, {}, std::vector<double>(n), std::vector<double>(n)};
  ref.x.assign(init.begin(), init.end());
  std::vector<float> untouched = init;  // keys never pushed
  for (int64_t t = 0; t < 30; ++t) {
    std::vector<uint32_t> keys;
    std::vector<float> sums;
    std::vector<float> dense(n, 0.0f);
    std::vector<double> u(n, 0.0);
    const double density = t % 10 == 9 ? 0.0 : 0.5;  // every tenth update pushes nothing
    for (size_t j = 0; j < n / 2; ++j) {  // the upper half is never pushed
      if (uniform(rng) >= density) continue;
      const float sum = normal(rng) * (j % 7 == 0 ? 100.0f : 1.0f);
      keys.push_back(static_cast<uint32_t>(kBase + j));
      sums.push_back(sum);
      dense[j] = sum;
      u[j] = static_cast<double>(sum * 0.5f);
    }
    sparse.apply(xs, kBase, keys, sums, 2, t);
    dense_sums.apply(xd, kBase, {}, dense, 2, t);
    pooled.apply(xp, kBase, keys, sums, 2, t, &pool);
    ref.step(u, t);
  }
  size_t moved_unpushed = 0;
  double worst = 0;
  for (size_t j = 0; j < n; ++j) {
    ASSERT_EQ(std::bit_cast<uint32_t>(xs[j]), std::bit_cast<uint32_t>(xp[j])) << "the pool changed key " << j;
    ASSERT_EQ(std::bit_cast<uint32_t>(xs[j]), std::bit_cast<uint32_t>(xd[j])) << "dense sums changed key " << j;
    worst = std::max(worst, std::abs(xs[j] - ref.x[j]) / std::max(1.0, std::abs(ref.x[j])));
    if (j >= n / 2) moved_unpushed += xs[j] != untouched[j];
  }
  // Float rounding over 30 updates of values of order 1 stays within a few
  // ulps; a wrong bias correction or a missing epsilon is off by 1e-4 or more.
  EXPECT_LT(worst, 2e-6) << "largest difference from the double-precision reference";
  if (c.wd > 0)
    EXPECT_GT(moved_unpushed, n / 2 * 99 / 100) << "weight decay changes every key";
  else
    EXPECT_EQ(moved_unpushed, 0u) << "keys that were never pushed moved";
}

INSTANTIATE_TEST_SUITE_P(Rules, AdaptiveTest,
                         ::testing::Values(Case{config::OptimizerName::kAdagrad, 0, false, false},
                                           Case{config::OptimizerName::kAdagrad, 0.1, false, true},
                                           Case{config::OptimizerName::kAdam, 0, false, true},
                                           Case{config::OptimizerName::kAdam, 0, true, false},
                                           Case{config::OptimizerName::kAdam, 0.1, false, true},
                                           Case{config::OptimizerName::kAdam, 0.1, true, true}),
                         [](const auto& param_info) {
                           const Case& c = param_info.param;
                           return std::string(config::to_string(c.name)) + (c.lazy ? "_lazy" : "") +
                                  (c.wd > 0 ? "_weight_decay" : "");
                         });

TEST(OptimizerTest, DenseAdamMovesKeysThatWereNotPushedLazyAdamDoesNot) {
  // After one push to key 0, dense Adam keeps moving it on empty updates
  // (its first moment decays but is not zero); lazy Adam leaves it.
  for (bool lazy : {false, true}) {
    Optimizer o = Optimizer::from_config(adaptive_config(config::OptimizerName::kAdam, 0.1, 0, lazy), 2);
    std::vector<float> x = {0, 0};
    o.apply(x, 0, std::vector<uint32_t>{0}, std::vector<float>{1}, 1, 0);
    // Bias-corrected first step: m^ = u, v^ = u^2, so the step is lr * u / (|u| + eps).
    EXPECT_NEAR(x[0], -0.1, 1e-6);
    const float after_first = x[0];
    o.apply(x, 0, std::vector<uint32_t>{}, std::vector<float>{}, 1, 1);
    if (lazy)
      EXPECT_EQ(x[0], after_first);
    else
      EXPECT_LT(x[0], after_first);
    EXPECT_EQ(x[1], 0.0f);
  }
}

TEST(OptimizerTest, AdaptiveStateRestoresExactly) {
  const auto cfg = adaptive_config(config::OptimizerName::kAdam, 0.05, 0.01, false);
  Optimizer a = Optimizer::from_config(cfg, 4);
  std::vector<float> x = {1, -2, 3, 0.5f};
  for (int64_t t = 0; t < 5; ++t)
    a.apply(x, 0, std::vector<uint32_t>{0, 2}, std::vector<float>{0.3f * static_cast<float>(t), -1}, 1, t);
  Optimizer b = Optimizer::from_config(cfg, 4);
  const std::vector<float> m(a.velocity().begin(), a.velocity().end());
  const std::vector<float> v(a.second_moment().begin(), a.second_moment().end());
  ASSERT_TRUE(b.set_state(m, v).ok());
  std::vector<float> y = x;
  for (int64_t t = 5; t < 9; ++t) {
    a.apply(x, 0, std::vector<uint32_t>{1, 3}, std::vector<float>{2, -0.5f}, 1, t);
    b.apply(y, 0, std::vector<uint32_t>{1, 3}, std::vector<float>{2, -0.5f}, 1, t);
  }
  EXPECT_EQ(x, y);
  // A snapshot of another rule does not fit (sizes name the buffer).
  Optimizer sgd = Optimizer::from_config(make_config(0.1, 0, 0, config::Scale::kOne), 4);
  const Status s = sgd.set_state(m, v);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("first-moment"), std::string::npos) << s.message();
  Optimizer adagrad = Optimizer::from_config(adaptive_config(config::OptimizerName::kAdagrad, 0.1, 0, false), 4);
  EXPECT_NE(adagrad.set_state({}, std::vector<float>(3)).message().find("second-moment"), std::string::npos);
  EXPECT_TRUE(adagrad.set_state({}, std::vector<float>(4)).ok());
}

TEST(LearningRateTest, SchedulesAndWarmup) {
  config::Config c;
  c.training.lr = 1.0;
  c.training.steps = 100;
  EXPECT_DOUBLE_EQ(config::learning_rate(c, 0), 1.0);
  EXPECT_DOUBLE_EQ(config::learning_rate(c, 99), 1.0);
  c.optimizer.lr_schedule = config::LrSchedule::kStep;
  c.optimizer.step_every = 30;
  c.optimizer.step_gamma = 0.1;
  EXPECT_DOUBLE_EQ(config::learning_rate(c, 29), 1.0);
  EXPECT_NEAR(config::learning_rate(c, 30), 0.1, 1e-15);
  EXPECT_NEAR(config::learning_rate(c, 65), 0.01, 1e-15);
  c.optimizer.lr_schedule = config::LrSchedule::kCosine;
  EXPECT_DOUBLE_EQ(config::learning_rate(c, 0), 1.0);
  EXPECT_NEAR(config::learning_rate(c, 50), 0.5, 1e-12);
  EXPECT_NEAR(config::learning_rate(c, 100), 0.0, 1e-12);
  c.optimizer.lr_schedule = config::LrSchedule::kConstant;
  c.optimizer.warmup_steps = 4;
  EXPECT_DOUBLE_EQ(config::learning_rate(c, 0), 0.25);
  EXPECT_DOUBLE_EQ(config::learning_rate(c, 3), 1.0);
  EXPECT_DOUBLE_EQ(config::learning_rate(c, 4), 1.0);
}

}  // namespace
}  // namespace sps::server
