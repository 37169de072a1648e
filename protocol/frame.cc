#include "protocol/frame.h"

#include <algorithm>
#include <cstring>

namespace sps::protocol {

struct Frame::PoolState {
  std::mutex mu;
  size_t max_free = 8;
  std::vector<std::pair<std::unique_ptr<std::byte[]>, size_t>> free;  // (storage, capacity)
};

Frame::Frame(size_t n) : size_(n), capacity_(n) {
  if (n > 0) data_ = std::make_unique_for_overwrite<std::byte[]>(n);
}

Frame Frame::copy_of(ByteSpan bytes) {
  Frame f(bytes.size());
  if (!bytes.empty()) std::memcpy(f.data(), bytes.data(), bytes.size());
  return f;
}

Frame::Frame(Frame&& o) noexcept
    : data_(std::move(o.data_)), size_(o.size_), capacity_(o.capacity_), pool_(std::move(o.pool_)) {
  o.size_ = o.capacity_ = 0;
}

Frame& Frame::operator=(Frame&& o) noexcept {
  if (this != &o) {
    release();
    data_ = std::move(o.data_);
    size_ = o.size_;
    capacity_ = o.capacity_;
    pool_ = std::move(o.pool_);
    o.size_ = o.capacity_ = 0;
  }
  return *this;
}

Frame::~Frame() { release(); }

void Frame::shrink(size_t n) {
  if (n < size_) size_ = n;
}

void Frame::release() {
  if (pool_ && data_) {
    std::lock_guard lock(pool_->mu);
    if (pool_->free.size() < pool_->max_free) pool_->free.emplace_back(std::move(data_), capacity_);
  }
  data_.reset();
  pool_.reset();
  size_ = capacity_ = 0;
}

FramePool::FramePool(size_t max_free) : state_(std::make_shared<Frame::PoolState>()) { state_->max_free = max_free; }

Frame FramePool::take(size_t n) {
  Frame f;
  f.pool_ = state_;
  f.size_ = n;
  {
    std::lock_guard lock(state_->mu);
    // The smallest idle buffer that fits, so big buffers stay for big frames.
    auto best = state_->free.end();
    for (auto it = state_->free.begin(); it != state_->free.end(); ++it)
      if (it->second >= n && (best == state_->free.end() || it->second < best->second)) best = it;
    if (best != state_->free.end()) {
      f.data_ = std::move(best->first);
      f.capacity_ = best->second;
      state_->free.erase(best);
      return f;
    }
  }
  f.capacity_ = std::max<size_t>(n, 1);
  f.data_ = std::make_unique_for_overwrite<std::byte[]>(f.capacity_);
  return f;
}

size_t FramePool::idle() const {
  std::lock_guard lock(state_->mu);
  return state_->free.size();
}

}  // namespace sps::protocol
