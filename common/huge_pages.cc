#include "common/huge_pages.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>

// Linux 5.14; older headers lack the name, older kernels answer EINVAL.
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace sps {

void* allocate_huge(size_t bytes) {
  void* p = nullptr;
  if (bytes >= kHugePageBytes) {
    const size_t rounded = (bytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
    p = std::aligned_alloc(kHugePageBytes, rounded);
    // Before the first touch, so the pages are huge from the start.
    if (p != nullptr) (void)madvise(p, rounded, MADV_HUGEPAGE);
  } else {
    p = std::malloc(bytes > 0 ? bytes : 1);
  }
  if (p == nullptr) throw std::bad_alloc();
  return p;
}

void free_huge(void* p) noexcept { std::free(p); }

void prefault_for_write(void* p, size_t bytes) noexcept {
  if (p == nullptr || bytes == 0) return;
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p) / page * page;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes + page - 1) / page * page;
  // Malloc'd small arrays share pages with other objects; populating those is
  // harmless (it only maps what is not mapped yet).
  (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_WRITE);
}

}  // namespace sps
