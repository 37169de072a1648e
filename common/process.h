// Process-level helpers: the stop flag set by SIGINT/SIGTERM, and a
// monotonic stopwatch. Loops poll `stop_requested()` between socket waits, so
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
