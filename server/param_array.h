// ParamArray: a shard's parameter floats, on transparent huge pages where the
// kernel offers them (madvise mode included). Pushes scatter over the whole
// shard; with 4 KiB pages nearly every pushed key of a large shard also
// misses the TLB, which made sparse apply of a 25M shard latency-bound.
#pragma once

#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <span>

namespace sps::server {

class ParamArray {
 public:
  // n zeros.
  explicit ParamArray(size_t n) : size_(n) {
    constexpr size_t kHuge = size_t{2} << 20;
    const size_t bytes = n * sizeof(float);
    void* p = nullptr;
    if (bytes >= kHuge) {
      const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
      p = std::aligned_alloc(kHuge, rounded);
      // Before the first touch, so the pages are huge from the start; a
      // kernel without THP refuses and the array simply uses small pages.
      if (p != nullptr) (void)madvise(p, rounded, MADV_HUGEPAGE);
    } else {
      p = std::malloc(bytes > 0 ? bytes : 1);
    }
    if (p == nullptr) throw std::bad_alloc();
    std::memset(p, 0, bytes);
    data_.reset(static_cast<float*>(p));
  }

  float* data() { return data_.get(); }
  const float* data() const { return data_.get(); }
  size_t size() const { return size_; }
  std::span<float> span() { return {data_.get(), size_}; }
  std::span<const float> span() const { return {data_.get(), size_}; }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> data_;
  size_t size_ = 0;
};

}  // namespace sps::server
