// Key-range balance: every shard layout covers [0, n) exactly, contiguously,
// with sizes differing by at most one, including the awkward sizes older
// parameter servers got wrong (n not divisible by S, n = S, n = 2^32 - 1).
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "scheduler/coordinator.h"

namespace sps::scheduler {
namespace {

void check_layout(uint64_t n, uint32_t servers) {
  uint64_t expected_begin = 0;
  uint64_t smallest = UINT64_MAX, largest = 0;
  for (uint32_t s = 0; s < servers; ++s) {
    const auto [b, e] = shard_range(n, servers, s);
    ASSERT_EQ(b, expected_begin) << "gap or overlap before shard " << s << " (n=" << n << ", S=" << servers << ")";
    ASSERT_LE(b, e);
    smallest = std::min<uint64_t>(smallest, e - b);
    largest = std::max<uint64_t>(largest, e - b);
    expected_begin = e;
  }
  EXPECT_EQ(expected_begin, n) << "keys lost at the top (n=" << n << ", S=" << servers << ")";
  EXPECT_LE(largest - smallest, 1u) << "unbalanced (n=" << n << ", S=" << servers << ")";
}

TEST(ShardRangeTest, CoversEveryKeyOnceAndBalances) {
  const std::vector<uint64_t> sizes = {1, 2, 3, 7, 10, 1000, 7850, 1000003, (uint64_t{1} << 31) + 1,
                                       (uint64_t{1} << 32) - 2, (uint64_t{1} << 32) - 1};
  const std::vector<uint32_t> servers = {1, 2, 3, 7, 64, 1000, 1024};
  for (uint64_t n : sizes)
    for (uint32_t s : servers)
      if (n >= s) check_layout(n, s);
}

TEST(ShardRangeTest, TopKeyOfTheLargestModelBelongsToTheLastShard) {
  const uint64_t n = UINT32_MAX;  // keys 0 .. 2^32 - 2
  const auto [b, e] = shard_range(n, 3, 2);
  EXPECT_EQ(e, UINT32_MAX);
  EXPECT_EQ(e - b, n / 3);
  EXPECT_EQ(shard_range(10, 3, 0), std::make_pair(0u, 3u));
  EXPECT_EQ(shard_range(10, 3, 1), std::make_pair(3u, 6u));
  EXPECT_EQ(shard_range(10, 3, 2), std::make_pair(6u, 10u));
}

}  // namespace
}  // namespace sps::scheduler
