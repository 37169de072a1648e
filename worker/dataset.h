// Built-in datasets and the worker's batch sampling.
//
// Fashion-MNIST comes from Debian's dataset-fashion-mnist package as gzipped
// IDX files; images stay as bytes in memory (47 MB for the training set) and
// are scaled to [0, 1] floats only when a batch is built.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"
#include "sps/dataset.h"

namespace sps::worker {

// Labelled images as bytes, as an IDX file pair holds them.
struct ImageSet {
  size_t rows = 0;
  size_t cols = 0;              // features per example (784 for 28x28)
  size_t num_classes = 0;
  std::vector<uint8_t> pixels;  // rows x cols, row-major
  std::vector<uint8_t> labels;  // rows
};

// Reads a gzipped IDX image file and its label file; keeps the first `limit`
// examples when limit > 0. Errors name the file and what is wrong with it.
Result<ImageSet> load_idx(const std::string& images_path, const std::string& labels_path, size_t limit = 0);
// Loads <folder>/train-* (train = true) or <folder>/t10k-* .
Result<ImageSet> load_fashion_mnist(const std::string& folder, bool train, size_t limit = 0);

// An ImageSet as an sps::Dataset: pixels scaled to [0, 1], integer labels.
class ImageDataset final : public sps::Dataset {
 public:
  explicit ImageDataset(ImageSet images) : images_(std::move(images)) {}
  size_t size() const override { return images_.rows; }
  size_t features() const override { return images_.cols; }
  size_t classes() const override { return images_.num_classes; }
  void batch(std::span<const uint32_t> ids, sps::Batch& out) const override;

 private:
  ImageSet images_;
};

// Worker `rank` of `world` draws from its own partition (examples i with
// i % world == rank), reshuffled every epoch with a seed derived from
// (seed, rank, epoch), so a run is reproducible and partitions are disjoint.
class BatchSampler {
 public:
  BatchSampler(size_t rows, uint32_t rank, uint32_t world, uint64_t seed);
  // The next `batch_size` example ids (wrapping into a new epoch).
  void next(size_t batch_size, std::vector<uint32_t>& ids);
  uint64_t epoch() const { return epoch_; }

 private:
  void reshuffle();
  std::vector<uint32_t> order_;
  size_t pos_ = 0;
  uint32_t rank_;
  uint64_t seed_;
  uint64_t epoch_ = 0;
};

}  // namespace sps::worker
