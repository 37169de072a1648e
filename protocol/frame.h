// Frame: the bytes of one wire frame in storage that is never zero-filled
// and that ZeroMQ can adopt without a copy (net::send hands the Frame to
// libzmq and a free callback destroys it when libzmq is done with it).
// FramePool recycles frame storage across messages so large frames (a 100 MB
// dense push) do not pay for fresh pages on every send; a Frame taken from a
// pool returns its storage there when destroyed, from whichever thread.
#pragma once

#include <cstddef>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

namespace sps::protocol {

using Bytes = std::vector<std::byte>;
using ByteSpan = std::span<const std::byte>;

class FramePool;

class Frame {
 public:
  Frame() = default;
  // `n` bytes of unspecified content.
  explicit Frame(size_t n);
  // A copy of `bytes` (tests and small frames).
  static Frame copy_of(ByteSpan bytes);
  Frame(Frame&&) noexcept;
  Frame& operator=(Frame&&) noexcept;
  Frame(const Frame&) = delete;
  Frame& operator=(const Frame&) = delete;
  ~Frame();

  std::byte* data() { return data_.get(); }
  const std::byte* data() const { return data_.get(); }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  std::byte& operator[](size_t i) { return data_[i]; }
  // Shrinks the frame (encoders size for the worst case, then trim).
  // REQUIRES: n <= size().
  void shrink(size_t n);
  ByteSpan span() const { return {data_.get(), size_}; }
  operator ByteSpan() const { return span(); }  // NOLINT: frames read as spans everywhere
  Bytes to_bytes() const { return Bytes(data_.get(), data_.get() + size_); }

 private:
  friend class FramePool;
  struct PoolState;
  void release();

  std::unique_ptr<std::byte[]> data_;
  size_t size_ = 0;
  size_t capacity_ = 0;
  std::shared_ptr<PoolState> pool_;  // where the storage goes back, if anywhere
};

class FramePool {
 public:
  // Keeps at most `max_free` idle buffers.
  explicit FramePool(size_t max_free = 8);
  // A frame of `n` bytes (unspecified content), reusing an idle buffer that
  // is large enough when there is one.
  Frame take(size_t n);
  size_t idle() const;

 private:
  std::shared_ptr<Frame::PoolState> state_;
};

}  // namespace sps::protocol
