#include "scheduler/consistency.h"

#include <algorithm>

#include <fmt/format.h>

namespace sps::scheduler {

uint32_t ClockTable::live_count() const {
  uint32_t n = 0;
  for (bool l : live_) n += l ? 1 : 0;
  return n;
}

uint64_t ClockTable::min_live_clock() const {
  uint64_t m = UINT64_MAX;
  for (uint32_t w = 0; w < size(); ++w)
    if (live_[w] && clocks_[w] < m) m = clocks_[w];
  return m;
}

uint64_t ConsistencyPolicy::staleness_bound(uint32_t workers) const {
  return std::min(mode_staleness_bound(workers), max_push_staleness_);
}

bool ConsistencyPolicy::accepts_push(uint32_t w, uint64_t clock, uint64_t, const ClockTable& pushed) const {
  return w < pushed.size() && pushed.live(w) && clock == pushed.clock(w);
}

bool ConsistencyPolicy::ready_to_apply(uint64_t, const ClockTable&) const { return false; }

bool BspPolicy::accepts_push(uint32_t w, uint64_t clock, uint64_t version, const ClockTable& pushed) const {
  // Only the clock being aggregated: a worker cannot be a clock ahead,
  // because its pull for that clock has not been answered.
  return ConsistencyPolicy::accepts_push(w, clock, version, pushed) && clock == version;
}

bool BspPolicy::may_answer_pull(uint64_t pull_clock, uint64_t version, const ClockTable&) const {
  return version >= pull_clock;
}

bool BspPolicy::ready_to_apply(uint64_t clock, const ClockTable& pushed) const {
  if (pushed.live_count() == 0) return false;
  for (uint32_t w = 0; w < pushed.size(); ++w)
    if (pushed.live(w) && pushed.clock(w) < clock + 1) return false;
  return true;
}

std::string SspPolicy::name() const { return fmt::format("ssp({})", s_); }

bool SspPolicy::may_answer_pull(uint64_t pull_clock, uint64_t, const ClockTable& pushed) const {
  if (pull_clock <= s_) return true;
  const uint64_t min_clock = pushed.min_live_clock();
  return min_clock == UINT64_MAX || min_clock >= pull_clock - s_;
}

uint64_t SspPolicy::mode_staleness_bound(uint32_t workers) const {
  if (workers == 0) return 0;
  return uint64_t{workers - 1} * (2 * s_ + 1);
}

std::unique_ptr<ConsistencyPolicy> make_policy(const config::ConsistencyConfig& c) {
  std::unique_ptr<ConsistencyPolicy> p;
  switch (c.mode) {
    case config::ConsistencyMode::kBsp: p = std::make_unique<BspPolicy>(); break;
    case config::ConsistencyMode::kSsp: p = std::make_unique<SspPolicy>(static_cast<uint64_t>(c.staleness)); break;
    case config::ConsistencyMode::kAsp: p = std::make_unique<AspPolicy>(); break;
  }
  if (c.max_push_staleness >= 0) p->set_max_push_staleness(static_cast<uint64_t>(c.max_push_staleness));
  return p;
}

}  // namespace sps::scheduler
