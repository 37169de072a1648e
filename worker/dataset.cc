#include "worker/dataset.h"

#include <zlib.h>

#include <algorithm>

#include <fmt/format.h>

namespace sps::worker {
namespace {

Result<std::vector<uint8_t>> read_gzip(const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");
  if (f == nullptr)
    return unavailable(fmt::format("{}: cannot open (is the Debian package dataset-fashion-mnist installed? "
                                   "scripts/setup installs it)", path));
  std::vector<uint8_t> out;
  std::vector<uint8_t> buf(1 << 20);
  while (true) {
    const int n = gzread(f, buf.data(), static_cast<unsigned>(buf.size()));
    if (n < 0) {
      int err = 0;
      std::string msg = gzerror(f, &err);
      gzclose(f);
      return malformed(fmt::format("{}: corrupt gzip data: {}", path, msg));
    }
    if (n == 0) break;
    out.insert(out.end(), buf.begin(), buf.begin() + n);
  }
  gzclose(f);
  return out;
}

uint32_t be32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

}  // namespace

Result<ImageSet> load_idx(const std::string& images_path, const std::string& labels_path, size_t limit) {
  SPS_ASSIGN_OR_RETURN(auto images, read_gzip(images_path));
  SPS_ASSIGN_OR_RETURN(auto labels, read_gzip(labels_path));
  if (images.size() < 16 || be32(images.data()) != 0x00000803)
    return malformed(fmt::format("{}: not an IDX3 unsigned-byte image file", images_path));
  if (labels.size() < 8 || be32(labels.data()) != 0x00000801)
    return malformed(fmt::format("{}: not an IDX1 unsigned-byte label file", labels_path));
  const size_t n = be32(images.data() + 4);
  const size_t h = be32(images.data() + 8);
  const size_t w = be32(images.data() + 12);
  if (images.size() != 16 + n * h * w)
    return malformed(fmt::format("{}: {} bytes for {} images of {}x{}", images_path, images.size(), n, h, w));
  if (be32(labels.data() + 4) != n || labels.size() != 8 + n)
    return malformed(fmt::format("{}: label count does not match {} images", labels_path, n));
  ImageSet d;
  d.rows = limit > 0 ? std::min(limit, n) : n;
  d.cols = h * w;
  d.num_classes = 10;
  d.pixels.assign(images.begin() + 16, images.begin() + 16 + static_cast<std::ptrdiff_t>(d.rows * d.cols));
  d.labels.assign(labels.begin() + 8, labels.begin() + 8 + static_cast<std::ptrdiff_t>(d.rows));
  for (uint8_t y : d.labels)
    if (y >= d.num_classes) return malformed(fmt::format("{}: label {} out of range", labels_path, y));
  return d;
}

Result<ImageSet> load_fashion_mnist(const std::string& folder, bool train, size_t limit) {
  const std::string prefix = train ? "train" : "t10k";
  return load_idx(fmt::format("{}/{}-images-idx3-ubyte.gz", folder, prefix),
                  fmt::format("{}/{}-labels-idx1-ubyte.gz", folder, prefix), limit);
}

void ImageDataset::batch(std::span<const uint32_t> ids, sps::Batch& out) const {
  const ImageSet& data = images_;
  out.rows = ids.size();
  out.cols = data.cols;
  out.x.resize(out.rows * out.cols);
  out.labels.resize(out.rows);
  out.targets.clear();
  constexpr float kScale = 1.0f / 255.0f;
  for (size_t r = 0; r < ids.size(); ++r) {
    SPS_CHECK(ids[r] < data.rows);
    const uint8_t* src = data.pixels.data() + size_t{ids[r]} * data.cols;
    float* dst = out.x.data() + r * out.cols;
    for (size_t c = 0; c < data.cols; ++c) dst[c] = static_cast<float>(src[c]) * kScale;
    out.labels[r] = data.labels[ids[r]];
  }
}

BatchSampler::BatchSampler(size_t rows, uint32_t rank, uint32_t world, uint64_t seed) : rank_(rank), seed_(seed) {
  for (size_t i = rank; i < rows; i += world) order_.push_back(static_cast<uint32_t>(i));
  reshuffle();
}

void BatchSampler::reshuffle() {
  std::seed_seq seq{static_cast<uint32_t>(seed_), static_cast<uint32_t>(seed_ >> 32), rank_,
                    static_cast<uint32_t>(epoch_)};
  std::mt19937_64 rng(seq);
  // Fisher-Yates with our own index draw: std::shuffle's output may differ
  // between standard libraries, this does not.
  for (size_t i = order_.size(); i > 1; --i) {
    const size_t j = static_cast<size_t>(rng() % i);
    std::swap(order_[i - 1], order_[j]);
  }
}

void BatchSampler::next(size_t batch_size, std::vector<uint32_t>& ids) {
  ids.clear();
  if (order_.empty()) return;
  while (ids.size() < batch_size) {
    if (pos_ == order_.size()) {
      ++epoch_;
      pos_ = 0;
      reshuffle();
    }
    ids.push_back(order_[pos_++]);
  }
}

}  // namespace sps::worker
