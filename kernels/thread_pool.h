// A fixed set of threads that run one task each per call, for the passes
// over n in the CPU compressor. Built for a few large tasks per step (one
// per core), not for fine-grained work.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace sps::kernels {

class ThreadPool {
 public:
  // `threads` >= 1 tasks run per call; the caller runs task 0 itself.
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }
  // Runs task(0) .. task(size() - 1) concurrently and returns when all are done.
  void run(const std::function<void(int)>& task);

 private:
  void loop(int index);

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  const std::function<void(int)>* task_ = nullptr;
  unsigned long generation_ = 0;
  int pending_ = 0;
  bool stopping_ = false;
};

}  // namespace sps::kernels
