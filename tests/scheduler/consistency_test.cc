// The consistency controller driven by scripted clock sequences: every
// decision of every policy, including the edge cases (a late worker, a
// worker dying while others wait, s = 0, s larger than the run).
#include "scheduler/consistency.h"

#include <gtest/gtest.h>

namespace sps::scheduler {
namespace {

ClockTable clocks(std::vector<uint64_t> c) {
  ClockTable t(static_cast<uint32_t>(c.size()));
  for (uint32_t w = 0; w < c.size(); ++w) t.set_clock(w, c[w]);
  return t;
}

TEST(ClockTableTest, MinLiveClockIgnoresTheDead) {
  ClockTable t = clocks({5, 2, 9});
  EXPECT_EQ(t.min_live_clock(), 2u);
  t.mark_dead(1);
  EXPECT_EQ(t.min_live_clock(), 5u);
  EXPECT_EQ(t.live_count(), 2u);
  t.mark_dead(0);
  t.mark_dead(2);
  EXPECT_EQ(t.min_live_clock(), UINT64_MAX);
}

TEST(BspPolicyTest, AppliesOnlyWhenEveryLiveWorkerPushed) {
  BspPolicy p;
  EXPECT_FALSE(p.apply_on_arrival());
  ClockTable pushed(3);
  EXPECT_FALSE(p.ready_to_apply(0, pushed));
  pushed.set_clock(0, 1);
  pushed.set_clock(2, 1);
  EXPECT_FALSE(p.ready_to_apply(0, pushed));  // worker 1 missing
  pushed.set_clock(1, 1);
  EXPECT_TRUE(p.ready_to_apply(0, pushed));
  EXPECT_FALSE(p.ready_to_apply(1, pushed));
}

TEST(BspPolicyTest, AcceptsOnlyTheClockBeingAggregated) {
  BspPolicy p;
  ClockTable pushed(2);
  EXPECT_TRUE(p.accepts_push(0, 0, 0, pushed));
  EXPECT_FALSE(p.accepts_push(0, 1, 0, pushed));  // ahead of the version
  pushed.set_clock(0, 1);
  EXPECT_FALSE(p.accepts_push(0, 0, 0, pushed));  // repeat
  EXPECT_FALSE(p.accepts_push(0, 1, 0, pushed));  // clock 1 before version 1
  EXPECT_TRUE(p.accepts_push(0, 1, 1, pushed));
  EXPECT_FALSE(p.accepts_push(2, 0, 0, pushed));  // unknown worker
  pushed.mark_dead(1);
  EXPECT_FALSE(p.accepts_push(1, 0, 0, pushed));  // dead worker
}

TEST(BspPolicyTest, DeadWorkerIsNotWaitedFor) {
  BspPolicy p;
  ClockTable pushed(3);
  pushed.set_clock(0, 1);
  pushed.set_clock(1, 1);
  EXPECT_FALSE(p.ready_to_apply(0, pushed));
  pushed.mark_dead(2);  // dies while the others wait
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
  EXPECT_EQ(p.staleness_bound(4), 0u);
}

TEST(SspPolicyTest, PullAtClockCWaitsForEveryoneAtCMinusS) {
  SspPolicy p(2);
  EXPECT_EQ(p.name(), "ssp(2)");
  EXPECT_TRUE(p.apply_on_arrival());
  // Scripted: worker 0 races ahead, worker 1 is slow.
  ClockTable t = clocks({0, 0});
  for (uint64_t c = 0; c <= 2; ++c) EXPECT_TRUE(p.may_answer_pull(c, 0, t)) << c;
  t.set_clock(0, 3);                         // worker 0 pushed 3 times and pulls for clock 3
  EXPECT_FALSE(p.may_answer_pull(3, 0, t));  // 3 - 2 = 1 > worker 1's clock 0
  t.set_clock(1, 1);
  EXPECT_TRUE(p.may_answer_pull(3, 0, t));
  EXPECT_FALSE(p.may_answer_pull(4, 0, t));
  t.set_clock(0, 10);
  t.set_clock(1, 8);
  EXPECT_TRUE(p.may_answer_pull(10, 0, t));
  EXPECT_FALSE(p.may_answer_pull(11, 0, t));
  // The version is irrelevant to SSP.
  EXPECT_TRUE(p.may_answer_pull(10, 999, t));
}

TEST(SspPolicyTest, PushesComeInClockOrderAndAnyVersion) {
  SspPolicy p(1);
  ClockTable t = clocks({3, 0});
  EXPECT_TRUE(p.accepts_push(0, 3, 7, t));
  EXPECT_FALSE(p.accepts_push(0, 4, 7, t));  // gap
  EXPECT_FALSE(p.accepts_push(0, 2, 7, t));  // repeat
  EXPECT_TRUE(p.accepts_push(1, 0, 7, t));
  EXPECT_FALSE(p.ready_to_apply(0, t));      // never aggregates
}

TEST(SspPolicyTest, ZeroStalenessIsLockStepButDistinctFromBsp) {
  SspPolicy p(0);
  EXPECT_EQ(p.name(), "ssp(0)");
  EXPECT_NE(p.name(), BspPolicy().name());
  EXPECT_TRUE(p.apply_on_arrival());  // bsp aggregates; ssp(0) applies each push as it comes
  ClockTable t = clocks({1, 0, 1});
  EXPECT_TRUE(p.may_answer_pull(0, 0, t));
  EXPECT_FALSE(p.may_answer_pull(1, 0, t));  // worker 1 has not pushed clock 0
  t.set_clock(1, 1);
  EXPECT_TRUE(p.may_answer_pull(1, 0, t));
  EXPECT_EQ(p.staleness_bound(4), 3u);  // (W-1)(2s+1)
}

TEST(SspPolicyTest, LateWorkerHoldsEveryoneBackUntilItJoins) {
  SspPolicy p(3);
  ClockTable t = clocks({5, 5, 0});  // worker 2 joined late and has pushed nothing
  EXPECT_TRUE(p.may_answer_pull(3, 0, t));
  EXPECT_FALSE(p.may_answer_pull(4, 0, t));
  t.set_clock(2, 2);
  EXPECT_TRUE(p.may_answer_pull(5, 0, t));
}

TEST(SspPolicyTest, DeadWorkerReleasesWaitingPulls) {
  SspPolicy p(1);
  ClockTable t = clocks({6, 6, 2});
  EXPECT_FALSE(p.may_answer_pull(6, 0, t));
  t.mark_dead(2);
  EXPECT_TRUE(p.may_answer_pull(6, 0, t));
  EXPECT_TRUE(p.may_answer_pull(7, 0, t));
  EXPECT_FALSE(p.may_answer_pull(8, 0, t));
  t.mark_dead(0);
  t.mark_dead(1);
  EXPECT_TRUE(p.may_answer_pull(100, 0, t));  // nobody to wait for
}

TEST(SspPolicyTest, StalenessLargerThanTheRunNeverWaits) {
  SspPolicy p(1000000);
  ClockTable t = clocks({0, 0});
  for (uint64_t c : {0, 1, 500, 999999, 1000000}) EXPECT_TRUE(p.may_answer_pull(c, 0, t)) << c;
  EXPECT_FALSE(p.may_answer_pull(1000001, 0, t));
  EXPECT_EQ(p.staleness_bound(2), 2000001u);
}

TEST(AspPolicyTest, NeverWaits) {
  AspPolicy p;
  EXPECT_EQ(p.name(), "asp");
  EXPECT_TRUE(p.apply_on_arrival());
  ClockTable t = clocks({100, 0});
  EXPECT_TRUE(p.may_answer_pull(1000, 0, t));
  EXPECT_TRUE(p.accepts_push(0, 100, 0, t));
  EXPECT_EQ(p.staleness_bound(4), UINT64_MAX);
}

TEST(PolicyFactoryTest, BuildsEachMode) {
  config::ConsistencyConfig c;
  EXPECT_EQ(make_policy(c)->name(), "bsp");
  c.mode = config::ConsistencyMode::kSsp;
  c.staleness = 4;
  EXPECT_EQ(make_policy(c)->name(), "ssp(4)");
  c.staleness = 0;
  EXPECT_EQ(make_policy(c)->name(), "ssp(0)");
  c.mode = config::ConsistencyMode::kAsp;
  EXPECT_EQ(make_policy(c)->name(), "asp");
  EXPECT_EQ(config::consistency_name(c), "asp");
}

TEST(StrictStalenessTest, CapsTheBoundOfEveryModeAndRefusesOnlyAboveTheLimit) {
  config::ConsistencyConfig c;
  c.mode = config::ConsistencyMode::kAsp;
  EXPECT_EQ(make_policy(c)->max_push_staleness(), UINT64_MAX);  // off by default
  EXPECT_FALSE(make_policy(c)->refuses_staleness(1000000));
  c.max_push_staleness = 3;
  auto asp = make_policy(c);
  EXPECT_EQ(asp->staleness_bound(4), 3u) << "asp has no bound of its own";
  EXPECT_FALSE(asp->refuses_staleness(3));
  EXPECT_TRUE(asp->refuses_staleness(4));
  c.mode = config::ConsistencyMode::kSsp;
  c.staleness = 2;
  EXPECT_EQ(make_policy(c)->staleness_bound(4), 3u);  // min((4-1)(2*2+1), 3)
  c.max_push_staleness = 100;
  EXPECT_EQ(make_policy(c)->staleness_bound(4), 15u) << "a limit above the mode's bound never bites";
  c.max_push_staleness = 0;
  auto ssp = make_policy(c);
  EXPECT_EQ(ssp->staleness_bound(4), 0u);
  EXPECT_TRUE(ssp->refuses_staleness(1));
  c.mode = config::ConsistencyMode::kBsp;
  EXPECT_EQ(make_policy(c)->staleness_bound(4), 0u);
}

}  // namespace
}  // namespace sps::scheduler
