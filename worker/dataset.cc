#include "worker/dataset.h"

#include <zlib.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

namespace sps::worker {
namespace {

// A gzip stream read in pieces: a job that trains on the first 2000 images
// inflates 1.6 MB, not the whole 47 MB file, before it can register (every
// worker process pays this at start).
class GzipReader {
 public:
  explicit GzipReader(std::string path) : path_(std::move(path)), f_(gzopen(path_.c_str(), "rb")) {}
  ~GzipReader() {
    if (f_ != nullptr) gzclose(f_);
  }
  GzipReader(const GzipReader&) = delete;
  GzipReader& operator=(const GzipReader&) = delete;

  Status open_status() const {
    if (f_ != nullptr) return Status::ok_status();
    return unavailable(fmt::format("{}: cannot open (is the Debian package dataset-fashion-mnist installed? "
                                   "scripts/setup installs it)", path_));
  }
  // Up to `count` more bytes (fewer at the end of the stream). Grows as it
  // reads: a damaged header's huge count costs nothing until bytes arrive.
  Result<std::vector<uint8_t>> read(size_t count) {
    std::vector<uint8_t> out;
    while (out.size() < count) {
      const size_t at = out.size();
      out.resize(at + std::min<size_t>(count - at, size_t{1} << 24));
      const int n = gzread(f_, out.data() + at, static_cast<unsigned>(out.size() - at));
      if (n < 0) {
        int err = 0;
        return malformed(fmt::format("{}: corrupt gzip data: {}", path_, gzerror(f_, &err)));
      }
      out.resize(at + static_cast<size_t>(n));
      if (n == 0) break;
    }
    return out;
  }
  // Whether the stream has bytes past what was read.
  Result<bool> has_more() {
    SPS_ASSIGN_OR_RETURN(auto extra, read(1));
    return !extra.empty();
  }
 private:
  std::string path_;
  gzFile f_;
};

uint32_t be32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

}  // namespace

Result<ImageSet> load_idx(const std::string& images_path, const std::string& labels_path, size_t limit) {
  GzipReader images(images_path), labels(labels_path);
  SPS_RETURN_IF_ERROR(images.open_status());
  SPS_RETURN_IF_ERROR(labels.open_status());
  SPS_ASSIGN_OR_RETURN(auto image_header, images.read(16));
  SPS_ASSIGN_OR_RETURN(auto label_header, labels.read(8));
  if (image_header.size() < 16 || be32(image_header.data()) != 0x00000803)
    return malformed(fmt::format("{}: not an IDX3 unsigned-byte image file", images_path));
  if (label_header.size() < 8 || be32(label_header.data()) != 0x00000801)
    return malformed(fmt::format("{}: not an IDX1 unsigned-byte label file", labels_path));
  const size_t n = be32(image_header.data() + 4);
  const size_t h = be32(image_header.data() + 8);
  const size_t w = be32(image_header.data() + 12);
  if (be32(label_header.data() + 4) != n)
    return malformed(fmt::format("{}: label count does not match {} images", labels_path, n));
  ImageSet d;
  d.rows = limit > 0 ? std::min(limit, n) : n;
  d.cols = h * w;
  d.num_classes = 10;
  SPS_ASSIGN_OR_RETURN(d.pixels, images.read(d.rows * d.cols));
  SPS_ASSIGN_OR_RETURN(d.labels, labels.read(d.rows));
  // A whole-file load checks the sizes exactly; a limited one, that the
  // rows it uses are there.
  const bool whole = d.rows == n;
  bool images_longer = false, labels_longer = false;
  if (whole) {
    SPS_ASSIGN_OR_RETURN(images_longer, images.has_more());
    SPS_ASSIGN_OR_RETURN(labels_longer, labels.has_more());
  }
  if (d.pixels.size() != d.rows * d.cols || images_longer)
    return malformed(fmt::format("{}: {} for {} images of {}x{}", images_path,
                                 images_longer ? std::string("more bytes than the header says")
                                               : fmt::format("{} bytes", 16 + d.pixels.size()),
                                 n, h, w));
  if (d.labels.size() != d.rows || labels_longer)
    return malformed(fmt::format("{}: label count does not match {} images", labels_path, n));
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
