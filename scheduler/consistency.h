// The consistency controller: which pushes a shard accepts, when it applies
// them, and which pulls it may answer. Every server runs one policy for its
// own shard; it is pure logic over a clock table (no sockets, no time), so
// tests can drive it with scripted clock sequences.
//
// Clocks: a worker's clock at a shard = the number of its pushes the shard
// has received. A worker at clock c pulls "the parameters for clock c".
//
//   bsp     the shard aggregates: when every live worker has pushed clock c
//           it applies their average at once (version c -> c+1); a pull for
//           clock c waits until the version is >= c. Staleness is always 0.
//   ssp(s)  pushes are applied on arrival (one version per push); a pull for
//           clock c waits until every live worker has clock >= c - s.
//           ssp(0) is a distinct algorithm from bsp: nobody runs ahead, but
//           updates are applied one by one as they arrive.
//   asp     pushes applied on arrival; pulls never wait.
//
// Strict staleness (ssp, asp; max_push_staleness): a push whose staleness
// would exceed the limit is refused instead of applied. Its clock still
// counts (the worker moves on; nobody waits for it), the version does not
// move, and the worker is told on its next pull so it can put the values
// back into its residual. The analysed bound then holds by construction.
//
// Dead workers leave the table (mark_dead) and are never waited for. A
// worker that replaces a dead one comes back (mark_live) at a clock no
// aggregated clock has passed yet (see server::Shard::add_worker).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "config/config.h"

namespace sps::scheduler {

// Per-worker push clocks and liveness for one shard.
class ClockTable {
 public:
  explicit ClockTable(uint32_t num_workers) : clocks_(num_workers, 0), live_(num_workers, true) {}
  uint32_t size() const { return static_cast<uint32_t>(clocks_.size()); }
  uint64_t clock(uint32_t w) const { return clocks_[w]; }
  void set_clock(uint32_t w, uint64_t c) { clocks_[w] = c; }
  bool live(uint32_t w) const { return live_[w]; }
  void mark_dead(uint32_t w) { live_[w] = false; }
  void mark_live(uint32_t w) { live_[w] = true; }
  uint32_t live_count() const;
  // Smallest clock among live workers (UINT64_MAX when none is live).
  uint64_t min_live_clock() const;

 private:
  std::vector<uint64_t> clocks_;
  std::vector<bool> live_;
};

class ConsistencyPolicy {
 public:
  virtual ~ConsistencyPolicy() = default;
  // "bsp", "ssp(4)", "ssp(0)", "asp".
  virtual std::string name() const = 0;
  // True: each push is applied when it arrives. False: pushes are held and
  // applied per clock as an average (ready_to_apply).
  virtual bool apply_on_arrival() const = 0;
  // Whether a push from live worker w for `clock` is acceptable now, given
  // the shard's `version`. In every mode pushes come in clock order with no
  // gaps or repeats (clock == pushed.clock(w)).
  virtual bool accepts_push(uint32_t w, uint64_t clock, uint64_t version, const ClockTable& pushed) const;
  // May a pull for the parameters of `pull_clock` be answered now?
  virtual bool may_answer_pull(uint64_t pull_clock, uint64_t version, const ClockTable& pushed) const = 0;
  // Aggregating policies: may the pending clock-`clock` pushes be applied?
  virtual bool ready_to_apply(uint64_t clock, const ClockTable& pushed) const;
  // Largest staleness (shard versions) an applied push can have with
  // `workers` workers, or UINT64_MAX when unbounded (asp without a limit).
  uint64_t staleness_bound(uint32_t workers) const;
  // Strict staleness: pushes staler than `limit` are refused (UINT64_MAX:
  // none are). Aggregating policies never see a stale push.
  void set_max_push_staleness(uint64_t limit) { max_push_staleness_ = limit; }
  uint64_t max_push_staleness() const { return max_push_staleness_; }
  // Whether an on-arrival push with this staleness is refused.
  bool refuses_staleness(uint64_t staleness) const { return staleness > max_push_staleness_; }

 protected:
  // The bound the mode itself guarantees.
  virtual uint64_t mode_staleness_bound(uint32_t workers) const = 0;

 private:
  uint64_t max_push_staleness_ = UINT64_MAX;
};

class BspPolicy final : public ConsistencyPolicy {
 public:
  std::string name() const override { return "bsp"; }
  bool apply_on_arrival() const override { return false; }
  bool accepts_push(uint32_t w, uint64_t clock, uint64_t version, const ClockTable& pushed) const override;
  bool may_answer_pull(uint64_t pull_clock, uint64_t version, const ClockTable& pushed) const override;
  bool ready_to_apply(uint64_t clock, const ClockTable& pushed) const override;

 protected:
  uint64_t mode_staleness_bound(uint32_t) const override { return 0; }
};

class SspPolicy final : public ConsistencyPolicy {
 public:
  explicit SspPolicy(uint64_t staleness) : s_(staleness) {}
  std::string name() const override;
  bool apply_on_arrival() const override { return true; }
  bool may_answer_pull(uint64_t pull_clock, uint64_t version, const ClockTable& pushed) const override;
  uint64_t staleness() const { return s_; }

 protected:
  // While one worker computes, every other worker can push at most 2s + 1
  // times (docs/consistency.md): (W - 1)(2s + 1).
  uint64_t mode_staleness_bound(uint32_t workers) const override;

 private:
  uint64_t s_;
};

class AspPolicy final : public ConsistencyPolicy {
 public:
  std::string name() const override { return "asp"; }
  bool apply_on_arrival() const override { return true; }
  bool may_answer_pull(uint64_t, uint64_t, const ClockTable&) const override { return true; }

 protected:
  uint64_t mode_staleness_bound(uint32_t) const override { return UINT64_MAX; }
};

// The policy of the config, strict staleness included.
std::unique_ptr<ConsistencyPolicy> make_policy(const config::ConsistencyConfig& c);

}  // namespace sps::scheduler
