// Shard: one contiguous key range of the flat parameter vector, the pushes
// waiting to be applied, and the apply rule. Pure state, no sockets, so the
// single-process reference run in the tests uses exactly this code.
//
// BSP apply: when every live worker has pushed clock c, the shard sums the
// pushes in worker-rank order (a fixed order, so reruns agree bit for bit),
// then for each touched key j: x[j] -= (apply_scale / live_workers) * sum[j],
// and the version goes c -> c+1. apply_scale is 1 for lr-scaled error
// feedback (the lr is inside the pushed values) or lr for gradient-domain.
// Not thread-safe: owned by the server's loop thread.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"
#include "protocol/message.h"
#include "scheduler/consistency.h"

namespace sps::server {

class Shard {
 public:
  Shard(uint32_t key_begin, uint32_t key_end, uint32_t num_workers, float apply_scale,
        std::unique_ptr<scheduler::ConsistencyPolicy> policy);

  uint32_t key_begin() const { return key_begin_; }
  uint32_t key_end() const { return key_end_; }
  uint64_t version() const { return version_; }
  std::span<const float> params() const { return params_; }
  const scheduler::ClockTable& pushed() const { return pushed_; }

  // Sets the initial parameters (dense over the range). REQUIRES: size matches.
  void set_params(std::span<const float> values);

  // Queues worker `w`'s push for `clock`. Refuses (state unchanged) a worker
  // that is unknown or dead, a clock other than the one the policy expects
  // next from that worker, or keys outside the range / not increasing.
  Status add_push(uint32_t w, uint64_t clock, const protocol::DataView& data);
  Status add_push(uint32_t w, uint64_t clock, std::span<const uint32_t> keys, std::span<const float> values);

  // Applies every clock that is complete; returns how many were applied.
  int apply_ready();
  // Worker `w` left the job: its pending push is dropped and nobody waits for it.
  void remove_worker(uint32_t w);
  bool may_answer_pull(uint64_t clock) const;

 private:
  struct Pending {
    std::vector<uint32_t> keys;  // local offsets
    std::vector<float> values;
    bool dense = false;
  };
  Status check_push(uint32_t w, uint64_t clock) const;
  void apply_clock();

  uint32_t key_begin_;
  uint32_t key_end_;
  float apply_scale_;
  std::unique_ptr<scheduler::ConsistencyPolicy> policy_;
  std::vector<float> params_;
  std::vector<float> sum_;        // aggregation buffer, zero between applies
  std::vector<uint8_t> touched_;  // marks keys in touched_list_
  std::vector<uint32_t> touched_list_;
  std::vector<Pending> pending_;  // per worker, the push for clock version_
  scheduler::ClockTable pushed_;  // per worker, pushes received
  uint64_t version_ = 0;
};

}  // namespace sps::server
