#include "scheduler/consistency.h"

#include <gtest/gtest.h>

namespace sps::scheduler {
namespace {

TEST(BspPolicyTest, AppliesOnlyWhenEveryLiveWorkerPushed) {
  BspPolicy p;
  ClockTable pushed(3);
  EXPECT_FALSE(p.ready_to_apply(0, pushed));
  pushed.set_clock(0, 1);
  pushed.set_clock(2, 1);
  EXPECT_FALSE(p.ready_to_apply(0, pushed));  // worker 1 missing
  pushed.set_clock(1, 1);
  EXPECT_TRUE(p.ready_to_apply(0, pushed));
  EXPECT_FALSE(p.ready_to_apply(1, pushed));
}

TEST(BspPolicyTest, DeadWorkerIsNotWaitedFor) {
  BspPolicy p;
  ClockTable pushed(3);
  pushed.set_clock(0, 1);
  pushed.set_clock(1, 1);
  EXPECT_FALSE(p.ready_to_apply(0, pushed));
  pushed.mark_dead(2);
  EXPECT_EQ(pushed.live_count(), 2u);
  EXPECT_TRUE(p.ready_to_apply(0, pushed));
  pushed.mark_dead(0);
  pushed.mark_dead(1);
  EXPECT_FALSE(p.ready_to_apply(0, pushed));  // nobody left: nothing to apply
}

TEST(BspPolicyTest, PullWaitsForTheVersion) {
  BspPolicy p;
  ClockTable pushed(2);
  EXPECT_TRUE(p.may_answer_pull(0, 0, pushed));
  EXPECT_FALSE(p.may_answer_pull(1, 0, pushed));
  EXPECT_TRUE(p.may_answer_pull(1, 1, pushed));
  EXPECT_TRUE(p.may_answer_pull(1, 5, pushed));
}

TEST(PolicyFactoryTest, BuildsBsp) {
  config::ConsistencyConfig c;
  EXPECT_EQ(make_policy(c)->name(), "bsp");
}

}  // namespace
}  // namespace sps::scheduler
