#include "worker/dataset.h"

#include <gtest/gtest.h>

#include <set>

namespace sps::worker {
namespace {

const char* kFashion = "/usr/share/datasets/fashion-mnist";

TEST(DatasetTest, LoadsFashionMnist) {
  auto train = load_fashion_mnist(kFashion, true, 1000);
  ASSERT_TRUE(train.ok()) << train.status().to_string();
  EXPECT_EQ(train->rows, 1000u);
  EXPECT_EQ(train->cols, 784u);
  auto test = load_fashion_mnist(kFashion, false);
  ASSERT_TRUE(test.ok()) << test.status().to_string();
  EXPECT_EQ(test->rows, 10000u);
  std::set<int> labels(test->labels.begin(), test->labels.end());
  EXPECT_EQ(labels.size(), 10u);
}

TEST(DatasetTest, MissingOrCorruptFilesAreClearErrors) {
  auto missing = load_fashion_mnist("/nonexistent", true);
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("/nonexistent/train-images-idx3-ubyte.gz"), std::string::npos);
  // Labels given as images: wrong magic.
  auto swapped = load_idx(std::string(kFashion) + "/t10k-labels-idx1-ubyte.gz",
                          std::string(kFashion) + "/t10k-labels-idx1-ubyte.gz");
  ASSERT_FALSE(swapped.ok());
  EXPECT_EQ(swapped.status().code(), StatusCode::kMalformed);
}

TEST(BatchSamplerTest, PartitionsAreDisjointAndCoverEverything) {
  const size_t rows = 103;
  std::set<uint32_t> seen;
  for (uint32_t rank = 0; rank < 4; ++rank) {
    BatchSampler s(rows, rank, 4, 9);
    std::vector<uint32_t> ids;
    const size_t part = (rows - rank + 3) / 4;
    s.next(part, ids);
    for (uint32_t id : ids) {
      EXPECT_EQ(id % 4, rank);
      EXPECT_TRUE(seen.insert(id).second) << id;
    }
    EXPECT_EQ(s.epoch(), 0u);
    s.next(1, ids);
    EXPECT_EQ(s.epoch(), 1u);
  }
  EXPECT_EQ(seen.size(), rows);
}

TEST(BatchSamplerTest, SameSeedSameOrder) {
  BatchSampler a(1000, 1, 3, 42), b(1000, 1, 3, 42), c(1000, 1, 3, 43);
  std::vector<uint32_t> x, y, z;
  a.next(50, x);
  b.next(50, y);
  c.next(50, z);
  EXPECT_EQ(x, y);
  EXPECT_NE(x, z);
}

}  // namespace
}  // namespace sps::worker
