#include "server/change_log.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <deque>
#include <random>
#include <vector>

namespace sps::server {
namespace {

// The obvious log: every update's keys in its own vector, the same
// eviction rule (oldest first, until the new update fits).
struct ReferenceLog {
  size_t capacity;
  std::deque<std::pair<uint64_t, std::vector<uint32_t>>> updates;
  uint64_t complete_from = 0;
  size_t held = 0;

  void restart(uint64_t v) {
    updates.clear();
    held = 0;
    complete_from = v;
  }
  void add(uint64_t v, const std::vector<uint32_t>& keys) {
    if (keys.size() > capacity) return restart(v);
    while (held + keys.size() > capacity) {
      complete_from = updates.front().first;
      held -= updates.front().second.size();
      updates.pop_front();
    }
    updates.emplace_back(v, keys);
    held += keys.size();
  }
  bool changed_since(uint64_t since, size_t limit, std::vector<uint32_t>& out) const {
    if (since < complete_from) return false;
    out.clear();
    for (const auto& [v, k] : updates)
      if (v > since) out.insert(out.end(), k.begin(), k.end());
    if (out.size() > limit) return false;
    std::sort(out.begin(), out.end());
    out.erase(std::unique(out.begin(), out.end()), out.end());
    return true;
  }
};

// `count` distinct keys below `range`, ascending.
std::vector<uint32_t> random_keys(std::mt19937& rng, size_t count, uint32_t range) {
  std::vector<uint32_t> keys;
  keys.reserve(count);
  // Selection sampling (Knuth's algorithm S): one pass, already ascending.
  for (uint32_t i = 0; i < range && keys.size() < count; ++i)
    if (rng() % (range - i) < count - keys.size()) keys.push_back(i);
  return keys;
}

TEST(ChangeLogTest, AgreesWithASimpleLogThroughWrapsEvictionsAndRestarts) {
  for (const size_t capacity : {size_t{1}, size_t{7}, size_t{100}, size_t{1000}, size_t{600000}}) {
    SCOPED_TRACE(capacity);
    std::mt19937 rng(static_cast<uint32_t>(capacity));
    ChangeLog log(capacity);
    ReferenceLog ref;
    ref.capacity = capacity;
    const uint32_t range = static_cast<uint32_t>(std::max<size_t>(capacity * 3, 16));
    uint64_t version = 0;
    // The largest log crosses a prefault chunk (2 MiB of keys) and wraps in
    // a few dozen updates.
    const int steps = capacity > 10000 ? 40 : 300;
    for (int step = 0; step < steps; ++step) {
      ++version;
      const unsigned what = rng() % 20;
      if (what == 0) {
        log.restart(version);
        ref.restart(version);
      } else {
        // Mostly fitting updates, sometimes empty, sometimes larger than the log.
        size_t count = rng() % (capacity / 3 + 2);
        if (what == 1) count = 0;
        if (what == 2) count = std::min<size_t>(capacity + 1, range);
        const auto keys = random_keys(rng, count, range);
        log.add(version, keys);
        ref.add(version, keys);
      }
      ASSERT_EQ(log.complete_from(), ref.complete_from) << "step " << step;
      ASSERT_EQ(log.held_keys(), ref.held) << "step " << step;
      ASSERT_LE(log.held_keys(), capacity);
      for (int q = 0; q < 4; ++q) {
        const uint64_t since = version - std::min<uint64_t>(version, rng() % 12);
        const size_t limit = q == 0 ? capacity / 4 : capacity * 2;
        std::vector<uint32_t> got, want;
        const bool ok = log.changed_since(since, limit, got);
        ASSERT_EQ(ok, ref.changed_since(since, limit, want)) << "step " << step << " since " << since;
        if (ok) {
          ASSERT_EQ(got, want) << "step " << step << " since " << since;
        }
      }
    }
  }
}

TEST(ChangeLogTest, AnUpdateThatWrapsTheRingComesBackInOrder) {
  ChangeLog log(10);
  log.add(1, std::vector<uint32_t>{1, 2, 3, 4, 5, 6});
  log.add(2, std::vector<uint32_t>{10, 20, 30, 40, 50, 60});  // evicts version 1, wraps after 4 keys
  std::vector<uint32_t> keys;
  EXPECT_FALSE(log.changed_since(0, 100, keys)) << "version 1 was evicted";
  ASSERT_TRUE(log.changed_since(1, 100, keys));
  EXPECT_EQ(keys, (std::vector<uint32_t>{10, 20, 30, 40, 50, 60}));
  log.add(3, std::vector<uint32_t>{15, 20, 70});
  ASSERT_TRUE(log.changed_since(1, 100, keys));
  EXPECT_EQ(keys, (std::vector<uint32_t>{10, 15, 20, 30, 40, 50, 60, 70}));
  ASSERT_TRUE(log.changed_since(2, 100, keys));
  EXPECT_EQ(keys, (std::vector<uint32_t>{15, 20, 70}));
  EXPECT_FALSE(log.changed_since(1, 8, keys)) << "9 entries counted once per update exceed the limit of 8";
}

TEST(ChangeLogTest, EmptyAndTinyUpdatesDoNotPileUpWithoutBound) {
  ChangeLog log(1000);
  for (uint64_t v = 1; v <= 70000; ++v) log.add(v, {});
  std::vector<uint32_t> keys;
  EXPECT_GT(log.complete_from(), 0u) << "the oldest empty updates were dropped";
  EXPECT_FALSE(log.changed_since(0, 1000, keys));
  ASSERT_TRUE(log.changed_since(69990, 1000, keys));
  EXPECT_TRUE(keys.empty());
}

}  // namespace
}  // namespace sps::server
