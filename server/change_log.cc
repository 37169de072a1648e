#include "server/change_log.h"

#include <algorithm>
#include <cstring>

#include "common/huge_pages.h"

namespace sps::server {

namespace {
// Prefault this many keys' worth of ring at a time (one huge page).
constexpr size_t kPrefaultKeys = kHugePageBytes / sizeof(uint32_t);
// Bounds the list of updates when they are empty or tiny (a worker that
// pushes nothing to this shard still makes versions); a pull that far
// behind is answered densely.
constexpr size_t kMaxUpdates = size_t{1} << 16;
}  // namespace

void ChangeLog::Free::operator()(uint32_t* p) const noexcept { free_huge(p); }

ChangeLog::ChangeLog(size_t capacity) : capacity_(capacity) {}

void ChangeLog::restart(uint64_t version) {
  updates_.clear();
  held_ = 0;
  complete_from_ = version;
}

void ChangeLog::make_writable(size_t ring_end) {
  if (!ring_) ring_.reset(static_cast<uint32_t*>(allocate_huge(std::max<size_t>(capacity_, 1) * sizeof(uint32_t))));
  if (ring_end <= prefaulted_) return;
  const size_t to = std::min(capacity_, (ring_end + kPrefaultKeys - 1) / kPrefaultKeys * kPrefaultKeys);
  prefault_for_write(ring_.get() + prefaulted_, (to - prefaulted_) * sizeof(uint32_t));
  prefaulted_ = to;
}

void ChangeLog::add(uint64_t version, std::span<const uint32_t> keys) {
  if (keys.size() > capacity_) return restart(version);
  while (held_ + keys.size() > capacity_ || updates_.size() >= kMaxUpdates) {
    complete_from_ = updates_.front().version;
    held_ -= updates_.front().size;
    updates_.pop_front();
  }
  if (keys.empty()) {
    updates_.push_back({version, end_, 0});
    return;
  }
  const size_t at = static_cast<size_t>(end_ % capacity_);
  const size_t head = std::min(keys.size(), capacity_ - at);  // before the ring wraps
  make_writable(head == keys.size() ? at + head : capacity_);
  std::memcpy(ring_.get() + at, keys.data(), head * sizeof(uint32_t));
  std::memcpy(ring_.get(), keys.data() + head, (keys.size() - head) * sizeof(uint32_t));
  updates_.push_back({version, end_, keys.size()});
  end_ += keys.size();
  held_ += keys.size();
}

void ChangeLog::copy_out(uint64_t first, size_t count, uint32_t* out) const {
  if (count == 0) return;  // the ring may not exist yet, and memcpy takes no null pointer
  const size_t at = static_cast<size_t>(first % capacity_);
  const size_t head = std::min(count, capacity_ - at);
  std::memcpy(out, ring_.get() + at, head * sizeof(uint32_t));
  std::memcpy(out + head, ring_.get(), (count - head) * sizeof(uint32_t));
}

bool ChangeLog::changed_since(uint64_t since_version, size_t limit, std::vector<uint32_t>& keys) const {
  keys.clear();
  if (since_version < complete_from_) return false;
  // The updates after since_version are a suffix of the log.
  size_t first = updates_.size();
  size_t total = 0;
  while (first > 0 && updates_[first - 1].version > since_version) {
    --first;
    total += updates_[first].size;
    if (total > limit) return false;
  }
  // Concatenate the sorted runs (a run that wraps the ring is copied back
  // in one piece), merge them pairwise (log2(runs) passes), and drop keys
  // that several updates changed.
  keys.resize(total);
  std::vector<size_t> bounds = {0};
  for (size_t i = first; i < updates_.size(); ++i) {
    copy_out(updates_[i].first, updates_[i].size, keys.data() + bounds.back());
    bounds.push_back(bounds.back() + updates_[i].size);
  }
  while (bounds.size() > 2) {
    std::vector<size_t> next = {0};
    for (size_t i = 0; i + 2 < bounds.size(); i += 2) {
      std::inplace_merge(keys.begin() + static_cast<ptrdiff_t>(bounds[i]),
                         keys.begin() + static_cast<ptrdiff_t>(bounds[i + 1]),
                         keys.begin() + static_cast<ptrdiff_t>(bounds[i + 2]));
      next.push_back(bounds[i + 2]);
    }
    if (bounds.size() % 2 == 0) next.push_back(bounds.back());  // an odd run out waits for the next pass
    bounds = std::move(next);
  }
  keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
  return true;
}

}  // namespace sps::server
