// The consistency controller: which pulls a shard may answer and when a
// shard may apply what it received. Used by every server for its own shard;
// pure logic over a clock table, no sockets, so tests can script it.
//
// BSP (this file's only policy so far): the server averages all live
// workers' clock-c pushes, applies them at once (version c -> c+1), and
// answers a pull for clock c only once its version is >= c.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "config/config.h"

namespace sps::scheduler {

// Per-worker push clocks (pushes received) and liveness for one shard.
class ClockTable {
 public:
  explicit ClockTable(uint32_t num_workers) : clocks_(num_workers, 0), live_(num_workers, true) {}
  uint32_t size() const { return static_cast<uint32_t>(clocks_.size()); }
  uint64_t clock(uint32_t w) const { return clocks_[w]; }
  void set_clock(uint32_t w, uint64_t c) { clocks_[w] = c; }
  bool live(uint32_t w) const { return live_[w]; }
  void mark_dead(uint32_t w) { live_[w] = false; }
  uint32_t live_count() const;

 private:
  std::vector<uint64_t> clocks_;
  std::vector<bool> live_;
};

class ConsistencyPolicy {
 public:
  virtual ~ConsistencyPolicy() = default;
  // May a pull asking for the parameters of clock `pull_clock` be answered
  // now, with the shard at `version`?
  virtual bool may_answer_pull(uint64_t pull_clock, uint64_t version, const ClockTable& pushed) const = 0;
  // May the shard apply the aggregate of its pending clock-`clock` pushes?
  // `pushed` holds, per worker, how many pushes the shard has received.
  virtual bool ready_to_apply(uint64_t clock, const ClockTable& pushed) const = 0;
  virtual std::string name() const = 0;
};

class BspPolicy final : public ConsistencyPolicy {
 public:
  bool may_answer_pull(uint64_t pull_clock, uint64_t version, const ClockTable& pushed) const override;
  bool ready_to_apply(uint64_t clock, const ClockTable& pushed) const override;
  std::string name() const override { return "bsp"; }
};

std::unique_ptr<ConsistencyPolicy> make_policy(const config::ConsistencyConfig& c);

}  // namespace sps::scheduler
