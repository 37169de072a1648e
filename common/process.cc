#include "common/process.h"

#include <csignal>
#include <climits>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace sps {
namespace {
volatile std::sig_atomic_t g_stop_signal = 0;
extern "C" void on_stop_signal(int sig) { g_stop_signal = sig; }
}  // namespace

void install_stop_signal_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: blocking polls return EINTR and re-check the flag
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
}

bool stop_requested() { return g_stop_signal != 0; }
int stop_signal() { return g_stop_signal; }

void keep_freed_memory_for_reuse() {
#if defined(__GLIBC__)
  // One arena: a thread arena cannot hold a block above 64 MiB and maps it
  // on its own whatever the settings below (ZeroMQ's I/O thread allocates
  // every received message).
  (void)mallopt(M_ARENA_MAX, 1);
  (void)mallopt(M_MMAP_MAX, 0);
  (void)mallopt(M_TRIM_THRESHOLD, INT_MAX);
#endif
}

}  // namespace sps
