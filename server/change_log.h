// ChangeLog: which keys each recent update of a shard changed, so a pull
// from a worker that holds an older copy can be answered with only those
// keys (a sparse pull).
//
// The keys live in one ring of `capacity` entries, allocated once on huge
// pages and prefaulted a chunk ahead of the write position: a log that
// grows one update at a time would otherwise take a page fault every 1024
// keys for its first capacity keys (on the machines measured, 11-12 us per
// fault: a fresh 250,000-key update cost 3 ms more to log than to apply).
// Once full, the oldest updates make room for new ones; nothing allocates.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <span>
#include <vector>

namespace sps::server {

class ChangeLog {
 public:
  // Holds at most `capacity` keys (counting a key once per update).
  explicit ChangeLog(size_t capacity);

  // Every key changed at `version` (a dense update, a restore): the log
  // restarts empty and complete from `version`.
  void restart(uint64_t version);
  // `keys` (ascending, global) changed at `version`, which is above every
  // logged version. Evicts the oldest updates to make room; an update
  // larger than the whole log restarts it.
  void add(uint64_t version, std::span<const uint32_t> keys);
  // Keys changed after `since_version`, ascending and each once, into
  // `keys`; false (and `keys` unspecified) when they reach past the log's
  // start or add up to more than `limit` (counting a key once per update).
  bool changed_since(uint64_t since_version, size_t limit, std::vector<uint32_t>& keys) const;

  // Every update with a version above this one is in the log.
  uint64_t complete_from() const { return complete_from_; }
  size_t held_keys() const { return held_; }
  size_t capacity() const { return capacity_; }

 private:
  struct Update {
    uint64_t version = 0;
    uint64_t first = 0;  // position of its first key, counted since the start (ring index: first % capacity)
    size_t size = 0;
  };
  struct Free {
    void operator()(uint32_t* p) const noexcept;
  };
  // Copies `count` keys from ring position `first` (wrapping) to `out`.
  void copy_out(uint64_t first, size_t count, uint32_t* out) const;
  void make_writable(size_t ring_end);

  size_t capacity_;
  std::unique_ptr<uint32_t[], Free> ring_;  // allocated at the first add
  size_t prefaulted_ = 0;                   // ring entries [0, prefaulted_) are mapped
  std::deque<Update> updates_;              // oldest first
  uint64_t end_ = 0;                        // position after the newest key
  size_t held_ = 0;
  uint64_t complete_from_ = 0;
};

}  // namespace sps::server
