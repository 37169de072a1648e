// Process-level helpers: the stop flag set by SIGINT/SIGTERM, the
// allocator's handling of freed memory, and a monotonic stopwatch. Loops poll `stop_requested()` between socket waits, so
// every process exits cleanly on a signal without async-unsafe work in the
// handler.
#pragma once

#include <chrono>

namespace sps {

// Installs SIGINT/SIGTERM handlers that set the stop flag (idempotent).
void install_stop_signal_handlers();
bool stop_requested();
// Which signal asked to stop (0 when none).
int stop_signal();

// Has the C allocator keep the memory the process frees for reuse instead
// of handing it back to the kernel (glibc: one arena, no mmap'd blocks, no
// trimming). Every large message a process receives (a 100 MB dense push
// or pull at 25M parameters) is otherwise a fresh mapping whose pages fault
// one at a time; on the virtual machines measured a fault cost 11-12 us per
// 4 KiB, and bare ZeroMQ moved 100 MB messages 4-6x faster with freed
// memory kept (docs/benchmarks.md, "Freed memory kept for reuse"). The
// process keeps its peak heap. Call before any other thread starts; a no-op
// where the allocator is not glibc's (sanitizer builds included).
// cluster.keep_freed_memory turns it off.
void keep_freed_memory_for_reuse();

class Stopwatch {
 public:
  Stopwatch() : start_(std::chrono::steady_clock::now()) {}
  double seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }
  void reset() { start_ = std::chrono::steady_clock::now(); }

 private:
  std::chrono::steady_clock::time_point start_;
};

}  // namespace sps
