#include "common/scattered_keys.h"

#include <gtest/gtest.h>

#include <numeric>
#include <vector>

namespace sps {
namespace {

// Every index of [begin, end) once, in order, around the prefetch distance
// (the loop has a prefetching head and a plain tail).
TEST(ScatteredKeysTest, VisitsEveryIndexOnceInOrder) {
  constexpr uint32_t kBase = 1000;
  std::vector<uint32_t> keys(3 * kKeysAhead + 7);
  std::iota(keys.begin(), keys.end(), kBase);
  std::vector<float> values(keys.size() + 5, 0.0f);
  for (size_t begin : {size_t{0}, size_t{1}, kKeysAhead}) {
    for (size_t count : {size_t{0}, size_t{1}, kKeysAhead - 1, kKeysAhead, kKeysAhead + 1, 2 * kKeysAhead + 7}) {
      const size_t end = begin + count;
      std::vector<size_t> seen;
      for_scattered_keys<Access::kWrite>(values.data(), kBase, keys.data(), begin, end,
                                         [&](size_t i) { seen.push_back(i); });
      std::vector<size_t> expected(count);
      std::iota(expected.begin(), expected.end(), begin);
      EXPECT_EQ(seen, expected) << "begin " << begin << ", count " << count;
    }
  }
}

}  // namespace
}  // namespace sps
