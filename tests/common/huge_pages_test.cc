#include "common/huge_pages.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

namespace sps {
namespace {

TEST(HugePagesTest, LargeAllocationsAreHugePageAlignedAndHoldWhatIsWritten) {
  const size_t n = 3 * kHugePageBytes / sizeof(float) + 17;
  HugePageVector<float> v(n, 1.5f);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(v.data()) % kHugePageBytes, 0u);
  for (size_t i = 0; i < n; i += 4099) ASSERT_EQ(v[i], 1.5f);
  std::iota(v.begin(), v.end(), 0.0f);
  HugePageVector<float> copy = v;
  EXPECT_EQ(copy, v);
  EXPECT_EQ(copy.back(), static_cast<float>(n - 1));
}

TEST(HugePagesTest, PrefaultingKeepsTheContents) {
  // Prefaulting maps pages that are not mapped yet; it must never change
  // what is already written, on huge pages or inside a malloc'd block.
  for (const size_t bytes : {size_t{100}, size_t{5000}, 2 * kHugePageBytes + 123}) {
    SCOPED_TRACE(bytes);
    auto* p = static_cast<unsigned char*>(allocate_huge(bytes));
    for (size_t i = 0; i < bytes / 2; ++i) p[i] = static_cast<unsigned char>(i * 7 + 3);
    prefault_for_write(p, bytes);
    for (size_t i = 0; i < bytes / 2; ++i) ASSERT_EQ(p[i], static_cast<unsigned char>(i * 7 + 3)) << i;
    std::memset(p + bytes / 2, 0xab, bytes - bytes / 2);
    EXPECT_EQ(p[bytes - 1], 0xab);
    free_huge(p);
  }
  prefault_for_write(nullptr, 100);  // nothing to do
}

}  // namespace
}  // namespace sps
