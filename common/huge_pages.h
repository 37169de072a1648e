// Memory for large arrays that are written soon after they are allocated
// and then read at scattered places (parameters, the server's change log).
//
// - Arrays of 2 MiB or more go on transparent huge pages where the kernel
//   offers them (its "madvise" mode included): a scatter over a 100 MB
//   array then misses the TLB far less often.
// - prefault_for_write() maps pages in one system call before they are
//   first written. Taking the same pages one fault at a time cost 11-12 us
//   per 4 KiB page on the virtual machines this project is measured on
//   (about 50x the cost of writing the page); one call cost 0.9 us per page
//   on small pages and 0.2 us on huge ones (docs/benchmarks.md, "Page
//   faults").
// Kernels without these features refuse the requests and the memory simply
// behaves like any other.
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace sps {

inline constexpr size_t kHugePageBytes = size_t{2} << 20;

// `bytes` of uninitialised memory (never null; throws std::bad_alloc), on
// huge pages when bytes >= kHugePageBytes. Release with free_huge().
void* allocate_huge(size_t bytes);
void free_huge(void* p) noexcept;

// Maps the pages of [p, p + bytes) now so that the first writes do not
// fault one page at a time. The range is rounded out to whole pages; a
// kernel that cannot do it leaves the pages to fault on first use.
void prefault_for_write(void* p, size_t bytes) noexcept;

// A std::allocator for vectors that hold parameters: allocate_huge()
// storage, prefaulted when it is huge-page sized, since a vector writes
// what it allocates right away.
template <class T>
struct HugePageAllocator {
  using value_type = T;
  HugePageAllocator() = default;
  template <class U>
  HugePageAllocator(const HugePageAllocator<U>&) noexcept {}  // NOLINT(google-explicit-constructor)
  T* allocate(size_t n) {
    if (n > static_cast<size_t>(-1) / sizeof(T)) throw std::bad_array_new_length();
    void* p = allocate_huge(n * sizeof(T));
    if (n * sizeof(T) >= kHugePageBytes) prefault_for_write(p, n * sizeof(T));
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) noexcept { free_huge(p); }
  template <class U>
  bool operator==(const HugePageAllocator<U>&) const noexcept {
    return true;
  }
};

template <class T>
using HugePageVector = std::vector<T, HugePageAllocator<T>>;

}  // namespace sps
