// Shard: one contiguous key range of the flat parameter vector, the pushes
// waiting to be applied, the apply rule and per-key change stamps. Pure
// state, no sockets, so the single-process reference run in the tests uses
// exactly this code.
//
// Apply rules (the policy decides which):
// - aggregating (bsp): when every live worker has pushed clock c, the shard
//   sums the pushes in worker-rank order (a fixed order, so reruns agree bit
//   for bit) and hands sum / live to the optimizer; version c -> c+1.
// - on arrival (ssp, asp): each push v goes to the optimizer at once as
//   v / live, one version per push, so W pushes move the model as far as
//   one averaged synchronous step.
// The optimizer (optimizer.h) turns that average into a parameter change:
// plain SGD is x[j] -= a * avg[j], with a = 1 for lr-scaled pushes (the lr
// is inside the values) or lr for gradient pushes.
//
// Staleness of an applied push = shard version when it is applied - the
// version the worker computed it on (base_version).
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
#include "server/optimizer.h"

namespace sps::server {

struct AppliedPush {
  uint32_t worker = 0;
  uint64_t clock = 0;
  uint64_t base_version = 0;
  uint64_t version = 0;    // shard version after the apply
  uint64_t staleness = 0;  // version before the apply - base_version
  uint32_t nnz = 0;
};

class Shard {
 public:
  Shard(uint32_t key_begin, uint32_t key_end, uint32_t num_workers, Optimizer optimizer,
        std::unique_ptr<scheduler::ConsistencyPolicy> policy);

  uint32_t key_begin() const { return key_begin_; }
  uint32_t key_end() const { return key_end_; }
  uint32_t size() const { return key_end_ - key_begin_; }
  uint64_t version() const { return version_; }
  std::span<const float> params() const { return params_; }
  const scheduler::ClockTable& pushed() const { return pushed_; }
  const scheduler::ConsistencyPolicy& policy() const { return *policy_; }

  // Sets the initial parameters (dense over the range). REQUIRES: size matches.
  void set_params(std::span<const float> values);

  // Takes worker `w`'s push for `clock`, computed on `base_version`: applied
  // at once (on-arrival policies) or held for its clock (aggregating).
  // Refuses, with the state unchanged, a push the policy does not accept
  // (unknown or dead worker, clock out of order, base_version from the
  // future) or keys outside the range / not increasing.
  Status add_push(uint32_t w, uint64_t clock, uint64_t base_version, const protocol::DataView& data);
  Status add_push(uint32_t w, uint64_t clock, uint64_t base_version, std::span<const uint32_t> keys,
                  std::span<const float> values);

  // Snapshot state (server.cc writes it; restore() reads it back).
  std::span<const float> velocity() const { return optimizer_.velocity(); }
  // Restarts the shard from a snapshot: parameters, momentum buffer and
  // version; every worker is live at clock `clock` (the step the whole job
  // resumes from) and every key is stamped with the version (a restarted
  // worker pulls densely). Fails, changing nothing, on a size mismatch.
  Status restore(std::span<const float> params, std::span<const float> velocity, uint64_t version, uint64_t clock);

  // Aggregating policies: applies every complete clock; returns how many.
  int apply_ready();
  // Worker `w` left the job: its held push is dropped and nobody waits for it.
  void remove_worker(uint32_t w);
  bool may_answer_pull(uint64_t clock) const;

  // Keys (global) changed after `since_version`, ascending, into `keys`;
  // false (and `keys` unspecified) when there are more than `limit`.
  bool changed_since(uint64_t since_version, size_t limit, std::vector<uint32_t>& keys) const;

  // Pushes applied since the last take_applied() (for logs and statistics).
  std::vector<AppliedPush> take_applied();

 private:
  struct Pending {
    std::vector<uint32_t> keys;  // local offsets
    std::vector<float> values;
    uint64_t base_version = 0;
  };
  Status check_push(uint32_t w, uint64_t clock, uint64_t base_version) const;
  void accept(uint32_t w, uint64_t clock);
  void apply_clock();
  void apply_one(uint32_t w);

  uint32_t key_begin_;
  uint32_t key_end_;
  Optimizer optimizer_;
  std::vector<float> sum_values_;  // scratch: sum_ gathered in touched_list_ order
  std::unique_ptr<scheduler::ConsistencyPolicy> policy_;
  std::vector<float> params_;
  std::vector<uint64_t> stamp_;   // per key: the version that last changed it (0 = initial)
  std::vector<float> sum_;        // aggregation buffer, zero between applies
  std::vector<uint8_t> touched_;  // marks keys in touched_list_
  std::vector<uint32_t> touched_list_;
  std::vector<Pending> pending_;  // per worker: the held (aggregating) or in-flight push
  scheduler::ClockTable pushed_;  // per worker, pushes received
  uint64_t version_ = 0;
  std::vector<AppliedPush> applied_;
};

}  // namespace sps::server
