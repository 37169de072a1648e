#include "server/shard.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <random>
#include <set>

namespace sps::server {
namespace {

Shard make_shard(uint32_t workers, float scale = 1.0f) {
  return Shard(100, 110, workers, Optimizer::plain(scale), std::make_unique<scheduler::BspPolicy>());
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

// Two shards of one BSP job, one clock apart (a worker pushes to them in
// turn), take back dead worker 2 the way the scheduler runs it: each holds it
// at its slowest live clock, both move it to the larger answer J. Neither has
// applied clock J by then, and from J on each waits for the new worker.
TEST(ShardTest, AJoiningWorkerStartsAtAClockNoShardHasApplied) {
  Shard a = make_shard(3);
  Shard b = make_shard(3);
  auto push = [](Shard& s, uint32_t w, uint64_t c, float v) {
    return s.add_push(w, c, s.version(), std::vector<uint32_t>{100}, std::vector<float>{v});
  };
  for (uint64_t c = 0; c < 5; ++c) {
    for (uint32_t w = 0; w < 3; ++w) {
      ASSERT_TRUE(push(a, w, c, 1).ok());
      ASSERT_TRUE(push(b, w, c, 1).ok());
    }
    EXPECT_EQ(a.apply_ready() + b.apply_ready(), 2);
  }
  a.remove_worker(2);
  b.remove_worker(2);
  // Clock 5: both workers pushed to shard a (applied), only worker 0 to shard b.
  ASSERT_TRUE(push(a, 0, 5, 1).ok());
  ASSERT_TRUE(push(a, 1, 5, 1).ok());
  EXPECT_EQ(a.apply_ready(), 1);
  ASSERT_TRUE(push(b, 0, 5, 1).ok());
  EXPECT_EQ(b.apply_ready(), 0);
  EXPECT_FALSE(a.add_worker(0)) << "a live worker cannot join";
  EXPECT_FALSE(a.add_worker(3)) << "nor one outside the job";
  const auto held_a = a.add_worker(2);
  const auto held_b = b.add_worker(2);
  ASSERT_TRUE(held_a && held_b);
  EXPECT_EQ(*held_a, 6u);
  EXPECT_EQ(*held_b, 5u);
  // Held: shard b cannot apply clock 5 now, even once worker 1 pushes it.
  ASSERT_TRUE(push(b, 1, 5, 1).ok());
  EXPECT_EQ(b.apply_ready(), 0);
  EXPECT_EQ(b.version(), 5u);
  const uint64_t join = std::max(*held_a, *held_b);
  EXPECT_FALSE(b.set_worker_clock(2, 4).ok()) << "a clock does not go back";
  ASSERT_TRUE(a.set_worker_clock(2, join).ok());
  ASSERT_TRUE(b.set_worker_clock(2, join).ok());
  EXPECT_EQ(b.apply_ready(), 1) << "clock 5 is before the new worker's start";
  EXPECT_EQ(a.version(), join);
  EXPECT_EQ(b.version(), join);
  // Clock 6 needs all three, the new worker included; its clock 5 is refused.
  EXPECT_FALSE(push(a, 2, 5, 1).ok());
  for (Shard* s : {&a, &b}) {
    ASSERT_TRUE(push(*s, 0, 6, 1).ok());
    ASSERT_TRUE(push(*s, 1, 6, 1).ok());
    EXPECT_EQ(s->apply_ready(), 0);
    EXPECT_FALSE(s->may_answer_pull(7));
    ASSERT_TRUE(push(*s, 2, 6, 4).ok());
    EXPECT_EQ(s->apply_ready(), 1);
    EXPECT_EQ(s->version(), 7u);
    // Clocks 0-5 average 1 each (clock 5 over the two workers that pushed
    // it, on both shards: the joined worker does not count before its
    // start), clock 6 (1 + 1 + 4) / 3 = 2.
    EXPECT_FLOAT_EQ(s->params()[0], -8.0f);
  }
}

// A shard restored from a snapshot older than a replaced worker's join: the
// worker is live from its join clock whatever the snapshot held for the
// dead process, and the clocks before it complete without it.
TEST(ShardTest, ARestoredShardRestartsAReplacedWorkerAtItsJoin) {
  for (const uint64_t snapshot_clock_of_worker_1 : {uint64_t{3}, Shard::kWorkerGone}) {
    Shard s = make_shard(2);
    auto push = [&](uint32_t w, uint64_t c) {
      return s.add_push(w, c, s.version(), std::vector<uint32_t>{100}, std::vector<float>{1});
    };
    for (uint64_t c = 0; c < 3; ++c) {
      ASSERT_TRUE(push(0, c).ok());
      ASSERT_TRUE(push(1, c).ok());
      EXPECT_EQ(s.apply_ready(), 1);
    }
    // As restored: worker 0 at clock 3, worker 1 as the snapshot held it.
    const std::vector<uint64_t> clocks = {3, snapshot_clock_of_worker_1};
    const std::vector<uint64_t> joined = {0, 0};
    ASSERT_TRUE(s.restore_workers(clocks, joined).ok());
    EXPECT_FALSE(s.restart_worker(2, 5).ok()) << "no such worker";
    EXPECT_FALSE(s.restart_worker(1, 2).ok()) << "clock 2 is applied";
    ASSERT_TRUE(s.restart_worker(1, 5).ok());
    EXPECT_EQ(s.worker_clocks()[1], 5u);
    // Clocks 3 and 4 complete with worker 0 alone; clock 5 waits for worker 1.
    for (uint64_t c = 3; c < 5; ++c) {
      ASSERT_TRUE(push(0, c).ok());
      EXPECT_EQ(s.apply_ready(), 1);
    }
    ASSERT_TRUE(push(0, 5).ok());
    EXPECT_EQ(s.apply_ready(), 0);
    EXPECT_EQ(s.version(), 5u);
    EXPECT_FALSE(push(1, 4).ok()) << "before its join";
    ASSERT_TRUE(push(1, 5).ok());
    EXPECT_EQ(s.apply_ready(), 1);
    EXPECT_EQ(s.version(), 6u);
  }
}

// The clocks a lagging shard applies below a replacement's start, after
// every worker that pushed them died: no participant, so no average and no
// optimizer step (momentum would otherwise divide by a count of 0); the
// parameters stay as they were and finite, and the version reaches J.
TEST(ShardTest, AClockNobodyPushedMovesTheVersionAndNothingElse) {
  config::Config cfg;
  cfg.training.lr = 0.1;
  cfg.training.steps = 100;
  cfg.optimizer.momentum = 0.9;
  cfg.optimizer.weight_decay = 1e-4;
  cfg.compression.scale = config::Scale::kOne;
  Shard s(100, 110, 2, Optimizer::from_config(cfg, 10), std::make_unique<scheduler::BspPolicy>());
  s.set_params(std::vector<float>(10, 1.0f));
  for (uint64_t c = 0; c < 3; ++c) {
    for (uint32_t w = 0; w < 2; ++w)
      ASSERT_TRUE(s.add_push(w, c, s.version(), std::vector<uint32_t>{100}, std::vector<float>{1}).ok());
    ASSERT_EQ(s.apply_ready(), 1);
  }
  s.remove_worker(1);
  ASSERT_EQ(s.add_worker(1), std::optional<uint64_t>(3));
  ASSERT_TRUE(s.add_push(0, 3, 3, std::vector<uint32_t>{100}, std::vector<float>{1}).ok());
  EXPECT_EQ(s.apply_ready(), 0) << "held for the joining worker";
  s.remove_worker(0);  // its held push goes with it
  const std::vector<float> before(s.params().begin(), s.params().end());
  ASSERT_TRUE(s.set_worker_clock(1, 5).ok());
  EXPECT_EQ(s.apply_ready(), 2);
  EXPECT_EQ(s.version(), 5u);
  for (size_t i = 0; i < before.size(); ++i) EXPECT_EQ(s.params()[i], before[i]) << "key " << i;
  for (float x : s.params()) EXPECT_TRUE(std::isfinite(x));
  for (float v : s.velocity()) EXPECT_TRUE(std::isfinite(v));
  EXPECT_FALSE(s.may_answer_pull(6));
  EXPECT_TRUE(s.may_answer_pull(5));
}

TEST(ShardTest, RestoreContinuesFromTheSnapshotClock) {
  Shard s = make_shard(2);
  s.remove_worker(1);  // a restart brings every worker back
  std::vector<float> params(10);
  for (size_t i = 0; i < params.size(); ++i) params[i] = static_cast<float>(i);
  ASSERT_TRUE(s.restore(params, {}, {}, 40, 40).ok());
  EXPECT_EQ(s.version(), 40u);
  EXPECT_EQ(s.params()[7], 7.0f);
  EXPECT_TRUE(s.may_answer_pull(40));
  EXPECT_FALSE(s.may_answer_pull(41));
  std::vector<uint32_t> changed;
  EXPECT_FALSE(s.changed_since(39, 100, changed)) << "a worker older than the restored version pulls densely";
  ASSERT_TRUE(s.changed_since(40, 100, changed));
  EXPECT_TRUE(changed.empty());
  // The next pushes are clock 40 from both workers; clock 39 is refused.
  EXPECT_FALSE(s.add_push(0, 39, 40, std::vector<uint32_t>{100}, std::vector<float>{1}).ok());
  ASSERT_TRUE(s.add_push(0, 40, 40, std::vector<uint32_t>{100}, std::vector<float>{2}).ok());
  ASSERT_TRUE(s.add_push(1, 40, 40, std::vector<uint32_t>{100}, std::vector<float>{4}).ok());
  EXPECT_EQ(s.apply_ready(), 1);
  EXPECT_EQ(s.version(), 41u);
  EXPECT_FLOAT_EQ(s.params()[0], -3.0f);  // 0 - (2 + 4) / 2
  // A snapshot of another size is refused and changes nothing.
  EXPECT_FALSE(s.restore(std::vector<float>(9), {}, {}, 5, 5).ok());
  EXPECT_EQ(s.version(), 41u);
  EXPECT_FALSE(s.restore(params, std::vector<float>(10), {}, 5, 5).ok()) << "a momentum buffer plain SGD does not have";
  EXPECT_EQ(s.version(), 41u);
}

}  // namespace
}  // namespace sps::server

namespace sps::server {
namespace {

Shard async_shard(uint32_t workers, uint64_t s) {
  return Shard(0, 8, workers, Optimizer::plain(1.0f), std::make_unique<scheduler::SspPolicy>(s));
}

TEST(ShardAsyncTest, AppliesOnArrivalScaledByLiveWorkersAndRecordsStaleness) {
  Shard s = async_shard(2, 1);
  ASSERT_TRUE(s.add_push(0, 0, 0, std::vector<uint32_t>{1}, std::vector<float>{4.0f}).ok());
  EXPECT_EQ(s.version(), 1u);
  EXPECT_FLOAT_EQ(s.params()[1], -2.0f);  // 4 / 2 workers
  ASSERT_TRUE(s.add_push(0, 1, 1, std::vector<uint32_t>{2}, std::vector<float>{2.0f}).ok());
  // Worker 1 computed on version 0, applied at version 2: staleness 2.
  ASSERT_TRUE(s.add_push(1, 0, 0, std::vector<uint32_t>{1}, std::vector<float>{2.0f}).ok());
  EXPECT_FLOAT_EQ(s.params()[1], -3.0f);
  const auto applied = s.take_handled();
  ASSERT_EQ(applied.size(), 3u);
  EXPECT_EQ(applied[0].staleness, 0u);
  EXPECT_EQ(applied[1].staleness, 0u);
  EXPECT_EQ(applied[2].staleness, 2u);
  EXPECT_EQ(applied[2].worker, 1u);
  EXPECT_EQ(applied[2].version, 3u);
  EXPECT_TRUE(s.take_handled().empty());
  EXPECT_EQ(s.apply_ready(), 0);  // nothing is ever held
}

TEST(ShardAsyncTest, StrictStalenessRefusesTooStalePushesAndRemembersThemForThePull) {
  auto policy = std::make_unique<scheduler::AspPolicy>();
  policy->set_max_push_staleness(1);
  Shard s(0, 8, 2, Optimizer::plain(1.0f), std::move(policy));
  ASSERT_TRUE(s.add_push(0, 0, 0, std::vector<uint32_t>{1}, std::vector<float>{4.0f}).ok());  // staleness 0
  ASSERT_TRUE(s.add_push(0, 1, 1, std::vector<uint32_t>{2}, std::vector<float>{2.0f}).ok());  // staleness 0
  EXPECT_EQ(s.version(), 2u);
  const std::vector<float> before(s.params().begin(), s.params().end());
  // Worker 1 computed on version 0; two versions landed since: refused.
  ASSERT_TRUE(s.add_push(1, 0, 0, std::vector<uint32_t>{1, 5}, std::vector<float>{8.0f, 8.0f}).ok());
  EXPECT_EQ(s.version(), 2u) << "a refused push is not a version";
  EXPECT_EQ(std::vector<float>(s.params().begin(), s.params().end()), before);
  EXPECT_EQ(s.pushed().clock(1), 1u) << "its clock still counts";
  std::vector<uint32_t> changed;
  ASSERT_TRUE(s.changed_since(2, 8, changed));
  EXPECT_TRUE(changed.empty());
  EXPECT_TRUE(s.push_refused_before(1, 1)) << "its next pull (clock 1) says so";
  EXPECT_FALSE(s.push_refused_before(1, 2));
  EXPECT_FALSE(s.push_refused_before(0, 2));
  // Staleness 1 is within the limit: applied.
  ASSERT_TRUE(s.add_push(1, 1, 1, std::vector<uint32_t>{5}, std::vector<float>{2.0f}).ok());
  EXPECT_EQ(s.version(), 3u);
  EXPECT_FLOAT_EQ(s.params()[5], -1.0f);
  EXPECT_FALSE(s.push_refused_before(1, 2)) << "the latest push was applied";
  const auto handled = s.take_handled();
  ASSERT_EQ(handled.size(), 4u);
  EXPECT_FALSE(handled[1].refused);
  EXPECT_TRUE(handled[2].refused);
  EXPECT_EQ(handled[2].worker, 1u);
  EXPECT_EQ(handled[2].clock, 0u);
  EXPECT_EQ(handled[2].staleness, 2u);
  EXPECT_EQ(handled[2].version, 2u);
  EXPECT_EQ(handled[2].nnz, 2u);
  EXPECT_FALSE(handled[3].refused);
  EXPECT_EQ(handled[3].staleness, 1u);
}

TEST(ShardAsyncTest, RefusesVersionsFromTheFuture) {
  Shard s = async_shard(1, 0);
  EXPECT_EQ(s.add_push(0, 0, 5, std::vector<uint32_t>{1}, std::vector<float>{1}).code(), StatusCode::kOutOfRange);
  EXPECT_EQ(s.version(), 0u);
}

TEST(ShardTest, AggregatesThreeWorkersInRankOrderIncludingEmptyPushes) {
  Shard s(0, 10, 3, Optimizer::plain(1.0f), std::make_unique<scheduler::BspPolicy>());
  // Clock 0: every worker sends nothing for this shard; the clock still completes.
  for (uint32_t w = 0; w < 3; ++w) ASSERT_TRUE(s.add_push(w, 0, 0, std::vector<uint32_t>{}, std::vector<float>{}).ok());
  EXPECT_EQ(s.apply_ready(), 1);
  EXPECT_EQ(s.version(), 1u);
  // Clock 1: overlapping keys, one worker empty; sums added in rank order.
  ASSERT_TRUE(s.add_push(0, 1, 1, std::vector<uint32_t>{1, 4, 9}, std::vector<float>{0.1f, 3.0f, -0.0f}).ok());
  ASSERT_TRUE(s.add_push(1, 1, 1, std::vector<uint32_t>{}, std::vector<float>{}).ok());
  ASSERT_TRUE(s.add_push(2, 1, 1, std::vector<uint32_t>{0, 4, 9}, std::vector<float>{6.0f, 0.2f, -0.0f}).ok());
  EXPECT_EQ(s.apply_ready(), 1);
  const auto x = s.params();
  EXPECT_EQ(x[0], -(0.0f + 6.0f) / 3.0f);
  EXPECT_EQ(x[1], -(0.0f + 0.1f) / 3.0f);
  EXPECT_EQ(x[4], -((0.0f + 3.0f) + 0.2f) / 3.0f);
  EXPECT_EQ(x[9], 0.0f);  // (0 + -0) + -0 = +0: nothing moves
  std::vector<uint32_t> keys;
  ASSERT_TRUE(s.changed_since(1, 10, keys));
  EXPECT_EQ(keys, (std::vector<uint32_t>{0, 1, 4, 9}));
}

// Aggregated sparse pushes are summed in rank order, ((0 + v0) + v1) + ...,
// bit for bit (signed zeros, denormals, keys held by some workers only), at
// several shard sizes and fills, and the changed keys are their union,
// whatever the shard's thread count.
TEST(ShardTest, AggregatedSumsAreRankOrderSumsBitForBit) {
  struct Case {
    uint32_t size;
    size_t keys_per_worker;
    bool nested = true;  // worker w picks keys from the first size / (w + 1); else from all
  };
  // Dense lists are summed through per-block buffers, sparse ones by merging
  // (shard.cc), so the cases cover both, and lists spanning many blocks; the
  // last two have enough pairs (over Optimizer::kMinKeysPerThread per
  // thread) to be cut into key ranges on several threads, one per path.
  for (const Case& c : {Case{5000, 900}, Case{200000, 40}, Case{(1u << 21) + 7, 3000}, Case{300000, 60000},
                        Case{1u << 20, 6000}, Case{1u << 22, 100000}, Case{1u << 24, 40000, false}}) {
    const uint32_t workers = 4, base = 1000;
    std::mt19937 rng(c.size);
    std::vector<float> x0(c.size);
    for (auto& v : x0) v = std::uniform_real_distribution<float>(-1.0f, 1.0f)(rng);
    std::vector<float> sum(c.size, 0.0f);
    std::vector<bool> touched(c.size, false);
    const float values[] = {0.1f, -0.0f, 0.0f, 1e-3f, -7.5f, 3.0e-39f, 0.3f};
    std::vector<std::vector<uint32_t>> keys(workers);
    std::vector<std::vector<float>> vals(workers);
    for (uint32_t w = 0; w < workers; ++w) {
      std::set<uint32_t> picked;
      const uint32_t range = c.nested ? c.size / (w + 1) : c.size;
      while (picked.size() < c.keys_per_worker) picked.insert(static_cast<uint32_t>(rng() % range));
      for (uint32_t j : picked) {
        keys[w].push_back(base + j);
        vals[w].push_back(values[rng() % 7] * static_cast<float>(1 + rng() % 5));
        sum[j] += vals[w].back();  // rank order, from +0.0f
        touched[j] = true;
      }
    }
    std::vector<float> x = x0;
    std::vector<uint32_t> want_keys;
    for (uint32_t j = 0; j < c.size; ++j) {
      if (!touched[j]) continue;
      want_keys.push_back(base + j);
      x[j] -= (1.0f / 4.0f) * sum[j];
    }
    for (int threads : {1, 2, 3}) {
      Shard s(base, base + c.size, workers, Optimizer::plain(1.0f), std::make_unique<scheduler::BspPolicy>(),
              threads);
      s.set_params(x0);
      for (uint32_t w = 0; w < workers; ++w) ASSERT_TRUE(s.add_push(w, 0, 0, keys[w], vals[w]).ok());
      ASSERT_EQ(s.apply_ready(), 1);
      const auto got = s.params();
      for (uint32_t j = 0; j < c.size; ++j)
        ASSERT_EQ(std::bit_cast<uint32_t>(got[j]), std::bit_cast<uint32_t>(x[j]))
            << "size " << c.size << " threads " << threads << " key " << j;
      std::vector<uint32_t> changed;
      ASSERT_TRUE(s.changed_since(0, c.size, changed));
      EXPECT_EQ(changed, want_keys) << "size " << c.size << " threads " << threads;
    }
  }
}

// A momentum optimizer sees every clock's whole aggregated sum: the same
// rank-order sums, in the same key order, reach it from both summing paths
// (dense lists go through per-block buffers, sparse ones are merged) and
// from a sum cut into key ranges on several threads, over several clocks,
// bit for bit against a stand-alone optimizer fed the reference sums.
TEST(ShardTest, AMomentumOptimizerGetsTheRankOrderSums) {
  config::Config cfg;
  cfg.training.lr = 0.1;
  cfg.training.steps = 100;
  cfg.optimizer.momentum = 0.9;
  cfg.optimizer.weight_decay = 1e-4;
  cfg.compression.scale = config::Scale::kOne;
  struct Case {
    uint32_t size;
    size_t keys_per_worker;
    int threads;
  };
  for (const Case& c : {Case{70000, 20000, 1}, Case{70000, 50, 1}, Case{600000, 100000, 3}, Case{600000, 50, 2}}) {
    const uint32_t workers = 3, base = 5;
    Shard s(base, base + c.size, workers, Optimizer::from_config(cfg, c.size), std::make_unique<scheduler::BspPolicy>(),
            c.threads);
    Optimizer reference = Optimizer::from_config(cfg, c.size);
    std::vector<float> x(c.size, 0.5f);
    s.set_params(x);
    std::mt19937 rng(c.keys_per_worker);
    for (uint64_t clock = 0; clock < 3; ++clock) {
      std::vector<float> sum(c.size, 0.0f);
      std::vector<bool> touched(c.size, false);
      for (uint32_t w = 0; w < workers; ++w) {
        std::set<uint32_t> picked;
        while (picked.size() < c.keys_per_worker) picked.insert(static_cast<uint32_t>(rng() % c.size));
        std::vector<uint32_t> keys;
        std::vector<float> vals;
        for (uint32_t j : picked) {
          keys.push_back(base + j);
          vals.push_back(std::normal_distribution<float>(0.0f, 1.0f)(rng));
          sum[j] += vals.back();
          touched[j] = true;
        }
        ASSERT_TRUE(s.add_push(w, clock, clock, keys, vals).ok());
      }
      ASSERT_EQ(s.apply_ready(), 1);
      std::vector<uint32_t> want_keys;
      std::vector<float> want_sums;
      for (uint32_t j = 0; j < c.size; ++j) {
        if (!touched[j]) continue;
        want_keys.push_back(base + j);
        want_sums.push_back(sum[j]);
      }
      reference.apply(x, base, want_keys, want_sums, workers, static_cast<int64_t>(clock));
      const auto got = s.params();
      for (uint32_t j = 0; j < c.size; ++j)
        ASSERT_EQ(std::bit_cast<uint32_t>(got[j]), std::bit_cast<uint32_t>(x[j]))
            << "size " << c.size << " fill " << c.keys_per_worker << " clock " << clock << " key " << j;
      std::vector<uint32_t> keys;
      EXPECT_FALSE(s.changed_since(clock, c.size, keys)) << "momentum changes every key";
    }
  }
}

// Large on-arrival pushes and dense pushes are split over the shard's
// threads; every parameter comes out bit for bit as on one thread, for
// plain SGD and for momentum with weight decay (dense passes over the shard).
TEST(ShardTest, ThreadsChangeNoBitOfOnArrivalOrDenseApplies) {
  const uint32_t size = (1u << 21) + 3, base = 7;
  std::mt19937 rng(11);
  std::vector<float> x0(size);
  for (auto& v : x0) v = std::normal_distribution<float>(0.0f, 1.0f)(rng);
  std::vector<uint32_t> keys;
  std::vector<float> sparse;
  for (uint32_t j = 0; j < size; ++j)
    if (rng() % 8 == 0) {  // about 262k keys: 4 pieces of the key list
      keys.push_back(base + j);
      sparse.push_back(std::normal_distribution<float>(0.0f, 0.01f)(rng));
    }
  std::vector<float> dense(size);
  for (auto& v : dense) v = std::normal_distribution<float>(0.0f, 0.01f)(rng);
  protocol::Header dense_header;
  dense_header.index_encoding = protocol::IndexEncoding::kNone;
  dense_header.key_begin = base;
  dense_header.key_end = base + size;
  dense_header.nnz = size;
  config::Config momentum;
  momentum.training.lr = 0.1;
  momentum.optimizer.momentum = 0.9;
  momentum.optimizer.weight_decay = 1e-3;
  for (bool with_momentum : {false, true}) {
    for (bool on_arrival : {true, false}) {
      std::vector<float> want;
      for (int threads : {1, 2, 4}) {
        Shard s(base, base + size, 2,
                with_momentum ? Optimizer::from_config(momentum, size) : Optimizer::plain(1.0f),
                on_arrival ? std::unique_ptr<scheduler::ConsistencyPolicy>(std::make_unique<scheduler::AspPolicy>())
                           : std::make_unique<scheduler::BspPolicy>(),
                threads);
        s.set_params(x0);
        // Clock 0: sparse from both workers; clock 1: dense from both.
        ASSERT_TRUE(s.add_push(0, 0, 0, keys, sparse).ok());
        ASSERT_TRUE(s.add_push(1, 0, 0, keys, sparse).ok());
        s.apply_ready();
        ASSERT_TRUE(s.add_push(0, 1, s.version(), protocol::DataView(dense_header, {}, dense), nullptr).ok());
        ASSERT_TRUE(s.add_push(1, 1, s.version(), protocol::DataView(dense_header, {}, dense), nullptr).ok());
        s.apply_ready();
        ASSERT_EQ(s.version(), on_arrival ? 4u : 2u);
        const auto got = s.params();
        if (threads == 1) {
          want.assign(got.begin(), got.end());
          EXPECT_NE(std::bit_cast<uint32_t>(want[0]), std::bit_cast<uint32_t>(x0[0])) << "the dense pushes moved key 0";
          continue;
        }
        for (uint32_t j = 0; j < size; ++j)
          ASSERT_EQ(std::bit_cast<uint32_t>(got[j]), std::bit_cast<uint32_t>(want[j]))
              << "momentum " << with_momentum << " on arrival " << on_arrival << " threads " << threads << " key "
              << j;
      }
    }
  }
}

TEST(ShardChangeTest, ChangeLogMergesRunsAndForgetsWhatItCannotHold) {
  // A 100-key shard logs at most 50 changed entries.
  Shard s(0, 100, 1, Optimizer::plain(1.0f), std::make_unique<scheduler::AspPolicy>());
  const std::vector<std::vector<uint32_t>> pushes = {{3, 40, 90}, {1, 40}, {2, 3, 99}, {0, 50}, {40}};
  for (uint64_t c = 0; c < pushes.size(); ++c)
    ASSERT_TRUE(s.add_push(0, c, c, pushes[c], std::vector<float>(pushes[c].size(), 1.0f)).ok());
  std::vector<uint32_t> keys;
  ASSERT_TRUE(s.changed_since(0, 50, keys));
  EXPECT_EQ(keys, (std::vector<uint32_t>{0, 1, 2, 3, 40, 50, 90, 99}));
  ASSERT_TRUE(s.changed_since(2, 50, keys));
  EXPECT_EQ(keys, (std::vector<uint32_t>{0, 2, 3, 40, 50, 99}));
  // 11 entries logged; a limit of 10 answers dense.
  EXPECT_FALSE(s.changed_since(0, 10, keys));
  // A 45-key update pushes the oldest ones out: versions before it are no
  // longer answerable sparsely, later ones still are.
  std::vector<uint32_t> many(45);
  for (uint32_t i = 0; i < 45; ++i) many[i] = 2 * i;
  ASSERT_TRUE(s.add_push(0, 5, 5, many, std::vector<float>(45, 1.0f)).ok());
  EXPECT_FALSE(s.changed_since(0, 100, keys));
  ASSERT_TRUE(s.changed_since(5, 100, keys));
  EXPECT_EQ(keys, many);
  // More than the log holds in one update: everything older is dense.
  std::vector<uint32_t> most(60);
  for (uint32_t i = 0; i < 60; ++i) most[i] = i;
  ASSERT_TRUE(s.add_push(0, 6, 6, most, std::vector<float>(60, 1.0f)).ok());
  EXPECT_FALSE(s.changed_since(6, 100, keys));
  ASSERT_TRUE(s.changed_since(7, 100, keys));
  EXPECT_TRUE(keys.empty());
}

TEST(ShardChangeTest, ChangedSinceListsKeysStampedAfterAVersion) {
  Shard s = async_shard(1, 0);
  std::vector<uint32_t> keys;
  ASSERT_TRUE(s.changed_since(0, 8, keys));
  EXPECT_TRUE(keys.empty());
  ASSERT_TRUE(s.add_push(0, 0, 0, std::vector<uint32_t>{1, 5}, std::vector<float>{1, 1}).ok());
  ASSERT_TRUE(s.add_push(0, 1, 1, std::vector<uint32_t>{5, 6}, std::vector<float>{1, 1}).ok());
  ASSERT_TRUE(s.changed_since(0, 8, keys));
  EXPECT_EQ(keys, (std::vector<uint32_t>{1, 5, 6}));
  ASSERT_TRUE(s.changed_since(1, 8, keys));
  EXPECT_EQ(keys, (std::vector<uint32_t>{5, 6}));
  ASSERT_TRUE(s.changed_since(2, 8, keys));
  EXPECT_TRUE(keys.empty());
  EXPECT_FALSE(s.changed_since(0, 2, keys));  // more than the limit: answer dense
}

TEST(ShardChangeTest, GatherReadsTheParametersAtTheKeys) {
  // 200,000 keys split into pieces on two threads (at least 32,768 keys each).
  constexpr uint32_t kBegin = 1000, kSize = 200000;
  std::vector<float> init(kSize);
  for (uint32_t i = 0; i < kSize; ++i) init[i] = static_cast<float>(i) * 0.25f - 7.0f;
  for (int threads : {1, 2}) {
    Shard s(kBegin, kBegin + kSize, 1, Optimizer::plain(1.0f), std::make_unique<scheduler::BspPolicy>(), threads);
    s.set_params(init);
    std::mt19937 rng(5);
    std::vector<float> values = {1.0f};
    s.gather({}, values);
    EXPECT_TRUE(values.empty());
    for (double density : {0.001, 0.05, 0.5, 1.0}) {
      std::vector<uint32_t> keys;
      for (uint32_t i = 0; i < kSize; ++i)
        if (std::uniform_real_distribution<double>(0, 1)(rng) < density) keys.push_back(kBegin + i);
      s.gather(keys, values);
      ASSERT_EQ(values.size(), keys.size());
      for (size_t i = 0; i < keys.size(); ++i)
        ASSERT_EQ(values[i], init[keys[i] - kBegin])
            << threads << " threads, density " << density << ", entry " << i;
    }
  }
}

// Compressed pulls: a publish sends the k largest |x - x_hat| and leaves the
// rest owed; the next publish (a new version) sends what is owed.
TEST(ShardDownlinkTest, PublishSendsTheLargestOwedEntriesAndKeepsTheRestOwed) {
  Shard s = make_shard(1);
  kernels::SelectionParams top2;
  top2.method = kernels::Method::kTopK;
  top2.k = 2;
  ASSERT_TRUE(s.enable_downlink(top2).ok());
  s.set_params(std::vector<float>(10, 0.0f));
  EXPECT_FALSE(s.publish().ran) << "x_hat starts as x";
  ASSERT_TRUE(s.add_push(0, 0, 0, std::vector<uint32_t>{100, 103, 105, 109},
                         std::vector<float>{1.0f, -5.0f, 3.0f, 0.5f})
                  .ok());
  ASSERT_EQ(s.apply_ready(), 1);
  // x = -push; nothing is published before a pull asks.
  EXPECT_EQ(s.params()[3], 5.0f);
  EXPECT_EQ(s.pulled_params()[3], 0.0f);

  const Shard::Published first = s.publish();
  EXPECT_TRUE(first.ran);
  EXPECT_FALSE(first.dense);
  EXPECT_EQ(first.version, 1u);
  EXPECT_EQ(first.nnz, 2u);
  EXPECT_DOUBLE_EQ(first.owed_norm, std::sqrt(1.0 + 0.25));
  const std::vector<float> after_first(s.pulled_params().begin(), s.pulled_params().end());
  EXPECT_EQ(after_first, (std::vector<float>{0, 0, 0, 5.0f, 0, -3.0f, 0, 0, 0, 0}));
  EXPECT_FALSE(s.publish().ran) << "one publish per version";
  std::vector<uint32_t> changed;
  ASSERT_TRUE(s.changed_since(0, 10, changed));
  EXPECT_EQ(changed, (std::vector<uint32_t>{103, 105}));
  std::vector<float> values;
  s.gather(changed, values);
  EXPECT_EQ(values, (std::vector<float>{5.0f, -3.0f}));

  // An empty push makes a new version: the owed entries go out.
  ASSERT_TRUE(s.add_push(0, 1, 1, std::vector<uint32_t>{}, std::vector<float>{}).ok());
  ASSERT_EQ(s.apply_ready(), 1);
  const Shard::Published second = s.publish();
  EXPECT_EQ(second.nnz, 2u);
  EXPECT_EQ(second.owed_norm, 0.0);
  for (size_t j = 0; j < 10; ++j) EXPECT_EQ(s.pulled_params()[j], s.params()[j]) << j;
  ASSERT_TRUE(s.changed_since(1, 10, changed));
  EXPECT_EQ(changed, (std::vector<uint32_t>{100, 109}));
  ASSERT_TRUE(s.changed_since(0, 10, changed));
  EXPECT_EQ(changed, (std::vector<uint32_t>{100, 103, 105, 109}));
}

// Keys that owe nothing are never published, even when the budget is
// larger than what is owed (a selection would fill it with zeros, and the
// pulls would carry them).
TEST(ShardDownlinkTest, KeysThatOweNothingAreNotPublished) {
  for (const kernels::Method method : {kernels::Method::kTopK, kernels::Method::kRandomK, kernels::Method::kGaussianK}) {
    SCOPED_TRACE(static_cast<int>(method));
    Shard s(100, 140, 1, Optimizer::plain(1.0f), std::make_unique<scheduler::BspPolicy>());
    kernels::SelectionParams budget;
    budget.method = method;
    budget.k = 4;
    ASSERT_TRUE(s.enable_downlink(budget).ok());
    ASSERT_TRUE(s.add_push(0, 0, 0, std::vector<uint32_t>{102, 107}, std::vector<float>{1.0f, -2.0f}).ok());
    ASSERT_EQ(s.apply_ready(), 1);
    const Shard::Published p = s.publish();
    EXPECT_EQ(p.nnz, 2u);
    EXPECT_EQ(p.owed_norm, 0.0);
    std::vector<uint32_t> changed;
    ASSERT_TRUE(s.changed_since(0, 40, changed));
    EXPECT_EQ(changed, (std::vector<uint32_t>{102, 107}));
    // More owed keys than the budget: a selection, still without zeros.
    std::vector<uint32_t> keys{100, 101, 103, 104, 105, 106, 108, 120, 130};
    std::vector<float> values;
    for (size_t i = 0; i < keys.size(); ++i) values.push_back(0.5f + 0.1f * static_cast<float>(i));
    ASSERT_TRUE(s.add_push(0, 1, 1, keys, values).ok());
    ASSERT_EQ(s.apply_ready(), 1);
    const Shard::Published q = s.publish();
    // topk sends k of them; gaussiank lands in a band around k (kernels.md);
    // randomk draws k of all 40 keys and sends those that owe something.
    if (method == kernels::Method::kTopK) {
      EXPECT_EQ(q.nnz, 4u);
    }
    EXPECT_LT(q.nnz, keys.size());
    ASSERT_TRUE(s.changed_since(1, 40, changed));
    for (const uint32_t k : changed) EXPECT_NE(std::find(keys.begin(), keys.end(), k), keys.end()) << k;
  }
}

// A worker that patches its copy with every sparse pull (changed_since +
// gather) holds exactly x_hat, under every policy and with an optimizer that
// changes every key each update (Adam): the pulls stay sparse, k keys per
// publish, and nothing owed is ever lost (x - x_hat is what was not sent).
TEST(ShardDownlinkTest, SparsePullsRebuildThePublishedCopyExactly) {
  config::Config adam;
  adam.training.lr = 0.01;
  adam.training.steps = 100;
  adam.compression.scale = config::Scale::kOne;
  adam.optimizer.name = config::OptimizerName::kAdam;
  const uint32_t size = 5000, base = 7, workers = 3;
  for (const bool on_arrival : {false, true}) {
    for (const bool dense_optimizer : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "asp " << on_arrival << " adam " << dense_optimizer);
      std::unique_ptr<scheduler::ConsistencyPolicy> policy;
      if (on_arrival)
        policy = std::make_unique<scheduler::AspPolicy>();
      else
        policy = std::make_unique<scheduler::BspPolicy>();
      Shard s(base, base + size, workers, dense_optimizer ? Optimizer::from_config(adam, size) : Optimizer::plain(1.0f),
              std::move(policy), 2);
      kernels::SelectionParams top;
      top.method = kernels::Method::kTopK;
      top.k = 50;
      ASSERT_TRUE(s.enable_downlink(top).ok());
      std::mt19937 rng(17);
      std::normal_distribution<float> normal;
      std::vector<float> x(size);
      for (float& v : x) v = normal(rng);
      s.set_params(x);
      std::vector<float> copy = x;  // the worker's copy after a dense first pull
      uint64_t copy_version = 0;
      std::vector<uint32_t> keys, changed;
      std::vector<float> values, gathered;
      for (uint64_t clock = 0; clock < 20; ++clock) {
        for (uint32_t w = 0; w < workers; ++w) {
          keys.clear();
          values.clear();
          for (uint32_t j = 0; j < size; j += 1 + rng() % 40) {
            keys.push_back(base + j);
            values.push_back(0.1f * normal(rng));
          }
          ASSERT_TRUE(s.add_push(w, clock, s.version(), keys, values).ok());
        }
        s.apply_ready();
        const Shard::Published p = s.publish();
        ASSERT_TRUE(p.ran);
        EXPECT_EQ(p.nnz, 50u);
        ASSERT_TRUE(s.changed_since(copy_version, size / 2, changed));
        EXPECT_LE(changed.size(), 50u);
        s.gather(changed, gathered);
        for (size_t i = 0; i < changed.size(); ++i) copy[changed[i] - base] = gathered[i];
        copy_version = s.version();
        double owed_sq = 0;
        for (uint32_t j = 0; j < size; ++j) {
          ASSERT_EQ(copy[j], s.pulled_params()[j]) << "key " << base + j << " clock " << clock;
          const double d = double{s.params()[j]} - double{s.pulled_params()[j]};
          owed_sq += d * d;
        }
        EXPECT_NEAR(p.owed_norm, std::sqrt(owed_sq), 1e-6 * (1 + std::sqrt(owed_sq)));
      }
    }
  }
}

// downlink.values f16/bf16: x_hat holds exactly what the wire carries (the
// rounded values, so encoding them loses nothing), the rounding error stays
// owed, and a key that owes only rounding is never sent again (sending it
// would not change the copy).
TEST(ShardDownlinkTest, HalfValuesArePublishedRoundedAndTheRoundingStaysOwed) {
  for (const ValueFormat format : {ValueFormat::kF16, ValueFormat::kBF16}) {
    SCOPED_TRACE(static_cast<int>(format));
    Shard s = make_shard(1);
    kernels::SelectionParams top2;
    top2.method = kernels::Method::kTopK;
    top2.k = 2;
    ASSERT_TRUE(s.enable_downlink(top2, format).ok());
    EXPECT_EQ(s.downlink_values(), format);
    s.set_params(std::vector<float>(10, 0.0f));
    ASSERT_TRUE(s.add_push(0, 0, 0, std::vector<uint32_t>{100, 103, 105, 109},
                           std::vector<float>{0.1f, -1.0f / 3.0f, 0.2f, 0.05f})
                    .ok());
    ASSERT_EQ(s.apply_ready(), 1);
    const std::vector<float> x(s.params().begin(), s.params().end());
    auto owed_norm = [&] {
      double sq = 0;
      for (size_t j = 0; j < 10; ++j) {
        const double d = double{s.params()[j]} - double{s.pulled_params()[j]};
        sq += d * d;
      }
      return std::sqrt(sq);
    };

    const Shard::Published first = s.publish();
    EXPECT_EQ(first.nnz, 2u);
    EXPECT_EQ(s.pulled_params()[3], quantise(x[3], format));
    EXPECT_EQ(s.pulled_params()[5], quantise(x[5], format));
    EXPECT_NE(s.pulled_params()[3], x[3]) << "1/3 is not representable: the test must round something";
    EXPECT_EQ(s.pulled_params()[0], 0.0f);
    EXPECT_NEAR(first.owed_norm, owed_norm(), 1e-12);
    EXPECT_GT(std::abs(first.owed_norm - std::sqrt(0.1 * 0.1 + 0.05 * 0.05)), 1e-9)
        << "the rounding error must count as owed";

    // Keys 100 and 109 owe more than 103 and 105's rounding: they go next.
    ASSERT_TRUE(s.add_push(0, 1, 1, std::vector<uint32_t>{}, std::vector<float>{}).ok());
    ASSERT_EQ(s.apply_ready(), 1);
    const Shard::Published second = s.publish();
    EXPECT_EQ(second.nnz, 2u);
    std::vector<uint32_t> changed;
    ASSERT_TRUE(s.changed_since(1, 10, changed));
    EXPECT_EQ(changed, (std::vector<uint32_t>{100, 109}));
    std::vector<float> values;
    s.gather(changed, values);
    for (size_t i = 0; i < values.size(); ++i) {
      EXPECT_EQ(values[i], quantise(x[changed[i] - 100], format));
      EXPECT_EQ(values[i], quantise(values[i], format)) << "what a pull gathers survives the wire format";
    }
    EXPECT_NEAR(second.owed_norm, owed_norm(), 1e-12);
    EXPECT_GT(second.owed_norm, 0.0);

    // Only rounding is owed now: a publish runs and sends nothing.
    ASSERT_TRUE(s.add_push(0, 2, 2, std::vector<uint32_t>{}, std::vector<float>{}).ok());
    ASSERT_EQ(s.apply_ready(), 1);
    const Shard::Published third = s.publish();
    EXPECT_TRUE(third.ran);
    EXPECT_EQ(third.nnz, 0u);
    EXPECT_EQ(third.owed_norm, second.owed_norm);
    ASSERT_TRUE(s.changed_since(2, 10, changed));
    EXPECT_TRUE(changed.empty());
  }
  Shard s = make_shard(1);
  EXPECT_FALSE(s.enable_downlink(kernels::SelectionParams{}, ValueFormat::kInt8).ok());
  EXPECT_FALSE(s.downlink());
}

// A publish that reads only the keys that may owe (top-k, threshold, f32)
// selects what the pass over the whole shard selects: two shards fed the
// same pushes, one forced to pass over every key, publish the same keys and
// hold the same x_hat bit for bit, through budgets smaller than what is owed
// (keys left owing carry over), a dense push (the tracking starts again from
// a pass), plain and momentum SGD, and bsp and asp.
TEST(ShardDownlinkTest, PublishFromTheOwedKeysSelectsWhatThePassSelects) {
  const uint32_t size = 4000, base = 11, workers = 3;
  config::Config momentum;
  momentum.training.lr = 0.1;
  momentum.training.steps = 100;
  momentum.optimizer.momentum = 0.9;
  struct Case {
    kernels::Method method;
    size_t k;
    float lambda;
    bool on_arrival;
    bool dense_optimizer;
    ValueFormat format;
    uint32_t gap;      // pushes hold a key every 1..gap keys
    bool tracks;       // whether the owed keys stay few enough (< size / 8) to be tracked
  };
  constexpr auto kF32 = ValueFormat::kF32;
  // With many keys per push and a small budget (k = 30 of ~270 changed per
  // clock), or a threshold above most changes (each push moves x by v / 3),
  // the owed keys outgrow size / 8 and the pass takes over: both regimes
  // are compared.
  for (const Case c : {Case{kernels::Method::kTopK, 20, 0, false, false, kF32, 1000, true},
                       Case{kernels::Method::kTopK, 30, 0, false, false, kF32, 90, false},
                       Case{kernels::Method::kTopK, 400, 0, true, false, kF32, 90, true},
                       Case{kernels::Method::kThreshold, 0, 0.02f, false, false, kF32, 1000, true},
                       Case{kernels::Method::kThreshold, 0, 0.12f, false, false, kF32, 90, false},
                       Case{kernels::Method::kThreshold, 0, 0.05f, true, false, kF32, 90, false},
                       Case{kernels::Method::kTopK, 30, 0, false, true, kF32, 90, false},
                       Case{kernels::Method::kTopK, 20, 0, false, false, ValueFormat::kF16, 1000, true},
                       Case{kernels::Method::kTopK, 400, 0, true, false, ValueFormat::kBF16, 90, true},
                       Case{kernels::Method::kThreshold, 0, 0.05f, false, true, ValueFormat::kF16, 90, false}}) {
    SCOPED_TRACE(::testing::Message() << "method " << static_cast<int>(c.method) << " k " << c.k << " lambda "
                                      << c.lambda << " asp " << c.on_arrival << " momentum " << c.dense_optimizer
                                      << " format " << static_cast<int>(c.format) << " gap " << c.gap);
    auto make = [&] {
      std::unique_ptr<scheduler::ConsistencyPolicy> policy;
      if (c.on_arrival)
        policy = std::make_unique<scheduler::AspPolicy>();
      else
        policy = std::make_unique<scheduler::BspPolicy>();
      return Shard(base, base + size, workers,
                   c.dense_optimizer ? Optimizer::from_config(momentum, size) : Optimizer::plain(1.0f),
                   std::move(policy), c.on_arrival ? 1 : 2);  // 2: the sums in pieces
    };
    Shard tracked = make(), full = make();
    full.set_publish_incremental(false);
    kernels::SelectionParams sel;
    sel.method = c.method;
    sel.k = c.k;
    sel.lambda = c.lambda;
    ASSERT_TRUE(tracked.enable_downlink(sel, c.format).ok());
    ASSERT_TRUE(full.enable_downlink(sel, c.format).ok());
    std::mt19937 rng(23);
    std::normal_distribution<float> normal;
    std::vector<float> x(size);
    for (float& v : x) v = normal(rng);
    tracked.set_params(x);
    full.set_params(x);
    std::vector<uint32_t> keys, changed_tracked, changed_full;
    std::vector<float> values;
    size_t left_owing = 0, from_owed_keys = 0;
    for (uint64_t clock = 0; clock < 40; ++clock) {
      for (uint32_t w = 0; w < workers; ++w) {
        keys.clear();
        values.clear();
        const bool dense_push = clock == 30 && w == 1;
        // Few keys, some pushed again and again (ties in |x - x_hat| too:
        // equal values on several keys).
        for (uint32_t j = 0; j < size; j += dense_push ? 1 : 1 + rng() % c.gap) {
          keys.push_back(base + j);
          values.push_back(j % 7 == 0 ? 0.0625f : 0.1f * normal(rng));
        }
        const uint64_t base_version = tracked.version();
        ASSERT_TRUE(tracked.add_push(w, clock, base_version, keys, values).ok());
        ASSERT_TRUE(full.add_push(w, clock, base_version, keys, values).ok());
        if (c.on_arrival && w == 1) {  // asp: a pull between pushes
          const Shard::Published a = tracked.publish(), b = full.publish();
          ASSERT_EQ(a.nnz, b.nnz);
        }
      }
      tracked.apply_ready();
      full.apply_ready();
      const Shard::Published a = tracked.publish(), b = full.publish();
      ASSERT_EQ(a.ran, b.ran);
      ASSERT_EQ(a.nnz, b.nnz) << "clock " << clock;
      ASSERT_EQ(a.dense, b.dense);
      EXPECT_EQ(b.keys_read, size);
      EXPECT_LE(a.keys_read, size);
      from_owed_keys += a.keys_read < size ? 1 : 0;
      // (the pass subtracts what was paid from a sum: a little cancellation;
      // with 16-bit values it counts every key's rounding, the tracked shard
      // keeps that sum by additions and subtractions)
      EXPECT_NEAR(a.owed_norm, b.owed_norm, 1e-6 * (1 + b.owed_norm));
      double owed_sq = 0;  // and both are ||x - x_hat||
      for (uint32_t j = 0; j < size; ++j) {
        const double d = double{tracked.params()[j]} - double{tracked.pulled_params()[j]};
        owed_sq += d * d;
      }
      EXPECT_NEAR(a.owed_norm, std::sqrt(owed_sq), 1e-6 * (1 + std::sqrt(owed_sq)));
      left_owing += a.owed_norm > 0 ? 1 : 0;
      for (uint32_t j = 0; j < size; ++j)
        ASSERT_EQ(std::bit_cast<uint32_t>(tracked.pulled_params()[j]), std::bit_cast<uint32_t>(full.pulled_params()[j]))
            << "key " << base + j << " clock " << clock;
      const bool sparse_a = tracked.changed_since(tracked.version() - 1, size / 2, changed_tracked);
      const bool sparse_b = full.changed_since(full.version() - 1, size / 2, changed_full);
      ASSERT_EQ(sparse_a, sparse_b);
      if (sparse_a) {
        EXPECT_EQ(changed_tracked, changed_full);
      }
    }
    // Momentum changes every key each update: always the pass. Where the
    // owed keys stay few, the tracked shard reads only them until the dense
    // push at clock 30 (after it, a small budget leaves most keys owing and
    // the pass takes over until they drain).
    if (c.dense_optimizer) {
      EXPECT_EQ(from_owed_keys, 0u);
    } else if (c.tracks) {
      EXPECT_GE(from_owed_keys, 30u);
    }
    if (c.method == kernels::Method::kTopK && c.k < 100) {
      EXPECT_GT(left_owing, 30u) << "a small budget must leave keys owing, or the carry-over is not tested";
    }
  }
}

// restore_published() takes the snapshot's copy only when it fits the shard.
TEST(ShardDownlinkTest, RestorePublishedRefusesACopyThatDoesNotFit) {
  Shard s = make_shard(1);
  const std::vector<float> copy(10, 2.0f);
  EXPECT_FALSE(s.restore_published(copy, 0).ok()) << "no downlink";
  kernels::SelectionParams top1;
  top1.method = kernels::Method::kTopK;
  top1.k = 1;
  ASSERT_TRUE(s.enable_downlink(top1).ok());
  ASSERT_TRUE(s.restore(std::vector<float>(10, 1.0f), {}, {}, 5, 5).ok());
  EXPECT_FALSE(s.restore_published(std::vector<float>(9, 2.0f), 5).ok());
  EXPECT_FALSE(s.restore_published(copy, 6).ok()) << "a copy newer than the parameters";
  EXPECT_EQ(s.pulled_params()[0], 1.0f) << "a refused copy changes nothing";
  ASSERT_TRUE(s.restore_published(copy, 4).ok());
  EXPECT_EQ(s.published_version(), 4u);
  EXPECT_EQ(s.pulled_params()[9], 2.0f);
  // Version 5 is newer than the copy: the next publish sends x - x_hat.
  const Shard::Published p = s.publish();
  EXPECT_TRUE(p.ran);
  EXPECT_EQ(p.nnz, 1u);
}

// A non-finite parameter (a diverged model) is published whole, so the
// workers see it (f16 would saturate it), whether the owing keys need a
// selection (k = 1) or all fit in the budget (k = 4); restore() starts
// x_hat at the restored x.
TEST(ShardDownlinkTest, NonFiniteParametersArePublishedDenselyAndRestoreResetsTheCopy) {
  for (const ValueFormat format : {ValueFormat::kF32, ValueFormat::kF16})
    for (const size_t k : {size_t{1}, size_t{4}}) {
      SCOPED_TRACE(::testing::Message() << "format " << static_cast<int>(format) << " k " << k);
      Shard s = make_shard(1);
      kernels::SelectionParams top;
      top.method = kernels::Method::kTopK;
      top.k = k;
      ASSERT_TRUE(s.enable_downlink(top, format).ok());
      ASSERT_TRUE(s.add_push(0, 0, 0, std::vector<uint32_t>{101, 102}, std::vector<float>{3e38f, 1.0f}).ok());
      ASSERT_EQ(s.apply_ready(), 1);
      ASSERT_TRUE(s.add_push(0, 1, 1, std::vector<uint32_t>{101}, std::vector<float>{3e38f}).ok());
      ASSERT_EQ(s.apply_ready(), 1);
      ASSERT_TRUE(std::isinf(s.params()[1]));
      const Shard::Published p = s.publish();
      EXPECT_TRUE(p.dense);
      EXPECT_EQ(p.nnz, 10u);
      EXPECT_TRUE(std::isinf(s.pulled_params()[1]));
      EXPECT_EQ(s.pulled_params()[2], -1.0f);
      std::vector<uint32_t> changed;
      EXPECT_FALSE(s.changed_since(0, 100, changed)) << "older copies must pull densely";

      std::vector<float> snapshot(10);
      for (size_t i = 0; i < snapshot.size(); ++i) snapshot[i] = static_cast<float>(i);
      ASSERT_TRUE(s.restore(snapshot, {}, {}, 9, 9).ok());
      EXPECT_EQ(std::vector<float>(s.pulled_params().begin(), s.pulled_params().end()), snapshot);
      EXPECT_FALSE(s.publish().ran);
    }
}

}  // namespace
}  // namespace sps::server
