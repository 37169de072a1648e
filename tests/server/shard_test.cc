#include "server/shard.h"

#include <gtest/gtest.h>

namespace sps::server {
namespace {

Shard make_shard(uint32_t workers, float scale = 1.0f) {
  return Shard(100, 110, workers, scale, std::make_unique<scheduler::BspPolicy>());
}

TEST(ShardTest, AppliesTheAverageOnceEveryWorkerPushed) {
  Shard s = make_shard(2);
  std::vector<float> init(10, 1.0f);
  s.set_params(init);
  ASSERT_TRUE(s.add_push(0, 0, 0, std::vector<uint32_t>{100, 105}, std::vector<float>{2.0f, 4.0f}).ok());
  EXPECT_EQ(s.apply_ready(), 0);
  EXPECT_FALSE(s.may_answer_pull(1));
  ASSERT_TRUE(s.add_push(1, 0, 0, std::vector<uint32_t>{105, 109}, std::vector<float>{2.0f, 8.0f}).ok());
  EXPECT_EQ(s.apply_ready(), 1);
  EXPECT_EQ(s.version(), 1u);
  EXPECT_TRUE(s.may_answer_pull(1));
  EXPECT_FLOAT_EQ(s.params()[0], 1.0f - 1.0f);   // key 100: (2 + 0) / 2
  EXPECT_FLOAT_EQ(s.params()[5], 1.0f - 3.0f);   // key 105: (4 + 2) / 2
  EXPECT_FLOAT_EQ(s.params()[9], 1.0f - 4.0f);   // key 109: (0 + 8) / 2
  EXPECT_FLOAT_EQ(s.params()[1], 1.0f);
}

TEST(ShardTest, ApplyScaleMultipliesTheAverage) {
  Shard s = make_shard(1, 0.5f);
  ASSERT_TRUE(s.add_push(0, 0, 0, std::vector<uint32_t>{101}, std::vector<float>{4.0f}).ok());
  EXPECT_EQ(s.apply_ready(), 1);
  EXPECT_FLOAT_EQ(s.params()[1], -2.0f);
}

TEST(ShardTest, RefusesBadPushesWithoutChangingState) {
  Shard s = make_shard(2);
  EXPECT_FALSE(s.add_push(2, 0, 0, std::vector<uint32_t>{100}, std::vector<float>{1}).ok());   // unknown worker
  EXPECT_FALSE(s.add_push(0, 1, 1, std::vector<uint32_t>{100}, std::vector<float>{1}).ok());   // future clock
  EXPECT_FALSE(s.add_push(0, 0, 0, std::vector<uint32_t>{99}, std::vector<float>{1}).ok());    // out of range
  EXPECT_FALSE(s.add_push(0, 0, 0, std::vector<uint32_t>{104, 103}, std::vector<float>{1, 1}).ok());
  ASSERT_TRUE(s.add_push(0, 0, 0, std::vector<uint32_t>{100}, std::vector<float>{1}).ok());
  EXPECT_FALSE(s.add_push(0, 0, 0, std::vector<uint32_t>{100}, std::vector<float>{1}).ok());   // duplicate clock
  EXPECT_EQ(s.pushed().clock(0), 1u);
  EXPECT_EQ(s.pushed().clock(1), 0u);
  EXPECT_EQ(s.version(), 0u);
  for (float p : s.params()) EXPECT_EQ(p, 0.0f);
}

TEST(ShardTest, DeadWorkerReleasesTheClockAndItsPushIsDropped) {
  Shard s = make_shard(3);
  ASSERT_TRUE(s.add_push(0, 0, 0, std::vector<uint32_t>{100}, std::vector<float>{3}).ok());
  ASSERT_TRUE(s.add_push(2, 0, 0, std::vector<uint32_t>{100}, std::vector<float>{100}).ok());
  EXPECT_EQ(s.apply_ready(), 0);
  s.remove_worker(2);  // its pending push must not be applied
  EXPECT_EQ(s.apply_ready(), 0);
  ASSERT_TRUE(s.add_push(1, 0, 0, std::vector<uint32_t>{100}, std::vector<float>{1}).ok());
  EXPECT_EQ(s.apply_ready(), 1);
  EXPECT_FLOAT_EQ(s.params()[0], -2.0f);  // (3 + 1) / 2 live workers
  EXPECT_FALSE(s.add_push(2, 1, 1, std::vector<uint32_t>{100}, std::vector<float>{1}).ok());
}

}  // namespace
}  // namespace sps::server
