#include "server/optimizer.h"

#include <gtest/gtest.h>

#include <cmath>

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
