#include "worker/dataset.h"

#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <filesystem>
#include <set>
#include <string>
#include <vector>

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

// A limited load reads only the rows it keeps: they are the first rows of
// the whole file, byte for byte.
TEST(DatasetTest, ALimitedLoadIsThePrefixOfTheWholeFile) {
  auto whole = load_fashion_mnist(kFashion, false);
  auto first = load_fashion_mnist(kFashion, false, 1234);
  ASSERT_TRUE(whole.ok() && first.ok());
  ASSERT_EQ(first->rows, 1234u);
  ASSERT_EQ(first->pixels.size(), 1234u * 784);
  EXPECT_TRUE(std::equal(first->pixels.begin(), first->pixels.end(), whole->pixels.begin()));
  EXPECT_TRUE(std::equal(first->labels.begin(), first->labels.end(), whole->labels.begin()));
  // A limit past the end is the whole file.
  auto all = load_fashion_mnist(kFashion, false, 20000);
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(all->rows, 10000u);
}

void write_gzip(const std::string& path, const std::vector<uint8_t>& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  ASSERT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())), static_cast<int>(bytes.size()));
  gzclose(f);
}

// 3 images of 2x2 and their labels, with `cut` bytes cut off the image file
// (or, negative, that many bytes added).
std::pair<std::string, std::string> tiny_idx(const std::string& name, int cut) {
  const auto dir = std::filesystem::path(::testing::TempDir()) / ("sps-dataset-" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  std::vector<uint8_t> images = {0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 2};
  for (int i = 0; i < 12; ++i) images.push_back(static_cast<uint8_t>(i * 20));
  if (cut > 0) images.resize(images.size() - static_cast<size_t>(cut));
  for (int i = 0; i < -cut; ++i) images.push_back(7);
  const std::vector<uint8_t> labels = {0, 0, 8, 1, 0, 0, 0, 3, 4, 5, 6};
  const std::string ip = (dir / (name + "-images.gz")).string(), lp = (dir / (name + "-labels.gz")).string();
  write_gzip(ip, images);
  write_gzip(lp, labels);
  return {ip, lp};
}

TEST(DatasetTest, TruncatedOrOverlongImageFilesAreRefused) {
  const auto [ip, lp] = tiny_idx("good", 0);
  auto good = load_idx(ip, lp);
  ASSERT_TRUE(good.ok()) << good.status().to_string();
  EXPECT_EQ(good->rows, 3u);
  EXPECT_EQ(good->pixels.back(), 220);
  EXPECT_EQ(good->labels, (std::vector<uint8_t>{4, 5, 6}));
  // Truncated: refused whole, and limited to rows that are not all there;
  // the rows that are there still load.
  const auto [tp, tl] = tiny_idx("truncated", 3);
  auto truncated = load_idx(tp, tl);
  ASSERT_FALSE(truncated.ok());
  EXPECT_EQ(truncated.status().code(), StatusCode::kMalformed);
  EXPECT_NE(truncated.status().message().find("25 bytes for 3 images of 2x2"), std::string::npos)
      << truncated.status().message();
  EXPECT_FALSE(load_idx(tp, tl, 3).ok());
  auto first_two = load_idx(tp, tl, 2);
  ASSERT_TRUE(first_two.ok()) << first_two.status().to_string();
  EXPECT_EQ(first_two->pixels.size(), 8u);
  // Longer than its header says: refused when the whole file is loaded.
  const auto [op, ol] = tiny_idx("overlong", -2);
  auto overlong = load_idx(op, ol);
  ASSERT_FALSE(overlong.ok());
  EXPECT_NE(overlong.status().message().find("more bytes than the header says"), std::string::npos)
      << overlong.status().message();
  std::filesystem::remove_all(std::filesystem::path(ip).parent_path());
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
