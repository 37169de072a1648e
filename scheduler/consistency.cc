#include "scheduler/consistency.h"

namespace sps::scheduler {

uint32_t ClockTable::live_count() const {
  uint32_t n = 0;
  for (bool l : live_) n += l ? 1 : 0;
  return n;
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

std::unique_ptr<ConsistencyPolicy> make_policy(const config::ConsistencyConfig& c) {
  switch (c.mode) {
    case config::ConsistencyMode::kBsp: return std::make_unique<BspPolicy>();
  }
  return std::make_unique<BspPolicy>();
}

}  // namespace sps::scheduler
