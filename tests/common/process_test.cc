#include "common/process.h"

#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>

namespace sps {
namespace {

[[maybe_unused]] long minor_faults() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_minflt;
}

// Page faults taken by allocating, writing and freeing a 64 MiB block, the
// second time round, in a child process (the allocator setting is
// process-wide and permanent). Exit code: faults / 64, capped at 250.
[[maybe_unused]] int faults_of_a_second_large_block(bool keep) {
  const pid_t pid = fork();
  if (pid == 0) {
    if (keep) keep_freed_memory_for_reuse();
    constexpr size_t kBytes = size_t{64} << 20;
    for (int round = 0; round < 2; ++round) {
      const long before = minor_faults();
      void* block = std::malloc(kBytes);
      if (block == nullptr) _exit(255);
      // Through a volatile pointer: the compiler may not drop writes to a
      // block that is freed right after.
      volatile char* p = static_cast<char*>(block);
      for (size_t i = 0; i < kBytes; i += 4096) p[i] = static_cast<char>(round + 1);
      std::free(block);
      if (round == 1) _exit(static_cast<int>(std::min<long>((minor_faults() - before) / 64, 250)));
    }
    _exit(254);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// Sanitizers bring their own allocator, which ignores glibc's settings.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define SPS_OWN_ALLOCATOR 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer)
#define SPS_OWN_ALLOCATOR 1
#endif
#endif

TEST(ProcessTest, KeptFreedMemoryIsReusedWithoutPageFaults) {
#if defined(SPS_OWN_ALLOCATOR) || !defined(__GLIBC__)
  GTEST_SKIP() << "the allocator is not glibc's here; the setting does nothing";
#else
  // 64 MiB is 16,384 small pages: without the setting glibc maps the block
  // afresh each time (faults / 64 = 256, capped at 250; fewer if the
  // kernel hands out huge pages); with it the second block reuses the
  // first's pages.
  const int kept = faults_of_a_second_large_block(true);
  const int fresh = faults_of_a_second_large_block(false);
  EXPECT_LE(kept, 1) << "about " << kept * 64 << " faults with freed memory kept";
  EXPECT_GT(fresh, kept) << "the control (allocator defaults) should fault the block in again";
#endif
}

}  // namespace
}  // namespace sps
