// A fixed set of threads that run one task each per call, for passes over
// large flat arrays (the CPU compressor's passes over n, a server shard's
// apply). Built for a few large tasks per call (one per core), not for
// fine-grained work.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace sps {

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

// Calls piece(begin, end) over consecutive pieces that cover [0, n), one per
// thread of `pool` but none shorter than `min_piece` (so small work stays on
// the calling thread and pays no wake-up). A null pool or one piece runs
// piece(0, n) inline. Pieces are disjoint, so writes through them never race.
void for_pieces(ThreadPool* pool, size_t n, size_t min_piece, const std::function<void(size_t, size_t)>& piece);

}  // namespace sps
