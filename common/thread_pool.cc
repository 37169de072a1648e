#include "common/thread_pool.h"

#include <algorithm>

namespace sps {

ThreadPool::ThreadPool(int threads) {
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { loop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::run(const std::function<void(int)>& task) {
  if (workers_.empty()) {
    task(0);
    return;
  }
  {
    std::lock_guard lock(mutex_);
    task_ = &task;
    pending_ = static_cast<int>(workers_.size());
    ++generation_;
  }
  wake_.notify_all();
  task(0);
  std::unique_lock lock(mutex_);
  done_.wait(lock, [this] { return pending_ == 0; });
  task_ = nullptr;
}

void ThreadPool::loop(int index) {
  unsigned long seen = 0;
  while (true) {
    const std::function<void(int)>* task = nullptr;
    {
      std::unique_lock lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
      if (stopping_) return;
      seen = generation_;
      task = task_;
    }
    (*task)(index);
    std::lock_guard lock(mutex_);
    if (--pending_ == 0) done_.notify_one();
  }
}

void for_pieces(ThreadPool* pool, size_t n, size_t min_piece, const std::function<void(size_t, size_t)>& piece) {
  const size_t most = pool != nullptr ? static_cast<size_t>(pool->size()) : 1;
  const size_t pieces = std::clamp<size_t>(n / std::max<size_t>(min_piece, 1), 1, most);
  if (pieces == 1) {
    piece(0, n);
    return;
  }
  pool->run([&](int t) {
    const auto i = static_cast<size_t>(t);
    if (i >= pieces) return;
    piece(n * i / pieces, n * (i + 1) / pieces);
  });
}

}  // namespace sps
