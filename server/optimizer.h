// Optimizer: how a shard turns the average of what workers pushed into a
// parameter change — server-side, after aggregation, so momentum and weight
// decay never pass through the sparsifier or the residual (ALGORITHMS.md §1).
//
// With lr-scaled pushes (compression.scale: lr) the average u is already an
// update in parameter units:     m = mu*m + u;            x -= m + lr(t)*wd*x
// With gradient pushes (scale: 1) u is a gradient:
//                                m = mu*m + (u + wd*x);  x -= lr(t)*m
// Plain SGD (mu = 0, wd = 0) touches only the pushed keys:
//                                x[j] -= a * u[j],  a = 1 or lr(t)
// and is bit-identical to the plain rule the reference tests replay.
// Momentum or weight decay change every key each update (dense, O(shard)).
//
// Adaptive rules (gradient pushes only; config refuses scale: lr), with
// decoupled weight decay x -= lr(t)*wd*x on every key when wd > 0:
//   adagrad: G += u^2;  x -= lr(t) * u / (sqrt(G) + eps)
//            (a key with u = 0 does not change, so pushes stay sparse)
//   adam:    m = b1*m + (1-b1)*u;  v = b2*v + (1-b2)*u^2;  t = step + 1
//            x -= lr(t)/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
//            (PyTorch's Adam/AdamW arithmetic). Every key every update,
//            unless lazy: then keys with u = 0 keep their m, v and value.
// Not thread-safe: owned by its shard (apply may use the shard's pool).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "common/status.h"
#include "common/thread_pool.h"
#include "config/config.h"

namespace sps::server {

class Optimizer {
 public:
  // Plain SGD that scales the averaged update by `apply_scale` (1 for
  // lr-scaled pushes, lr for gradient pushes); no schedule.
  static Optimizer plain(float apply_scale);
  // The optimizer a job config asks for, for a shard of `shard_size` keys.
  static Optimizer from_config(const config::Config& cfg, uint32_t shard_size);

  // Applies sum/count to the keys `keys` (global; `params[0]` is key
  // `key_base`) of `params`, as update number `step` (the worker step the
  // update belongs to). Empty `keys` with a non-empty `sums`: the sums are
  // dense over the shard. Changes exactly `keys` unless dense() (then every
  // key) or the sums are dense. With a pool, large applies are split into
  // contiguous key ranges, one per thread; every entry gets the same
  // arithmetic, so the result does not depend on the pool.
  void apply(std::span<float> params, uint32_t key_base, std::span<const uint32_t> keys, std::span<const float> sums,
             uint32_t count, int64_t step, ThreadPool* pool = nullptr);

  // Smallest piece of an apply worth a thread: pushed entries (each a
  // likely cache miss), and parameters of a dense pass.
  static constexpr size_t kMinKeysPerThread = 32768;
  static constexpr size_t kMinDensePerThread = 262144;

  // Whether an update changes every key of the shard (not only the pushed ones).
  bool dense() const {
    return weight_decay_ != 0.0f || (kind_ == config::OptimizerName::kSgd && momentum_ != 0.0f) ||
           (kind_ == config::OptimizerName::kAdam && !lazy_);
  }

  // State for snapshots: the first moment (sgd's momentum buffer, adam's m)
  // and the second (adagrad's sum of squares, adam's v); empty when the
  // rule keeps none.
  std::span<const float> velocity() const { return velocity_; }
  std::span<const float> second_moment() const { return second_; }
  // Restores a snapshot's state; fails, changing nothing, on a size mismatch.
  Status set_state(std::span<const float> velocity, std::span<const float> second_moment);

 private:
  Optimizer() = default;
  float rate(int64_t step) const;
  // apply() for adagrad and adam.
  void apply_adaptive(std::span<float> params, uint32_t key_base, std::span<const uint32_t> keys,
                      std::span<const float> sums, uint32_t count, int64_t step, ThreadPool* pool);

  config::OptimizerName kind_ = config::OptimizerName::kSgd;
  float beta1_ = 0.9f;
  float beta2_ = 0.999f;
  float epsilon_ = 1e-8f;
  bool lazy_ = false;
  std::vector<float> second_;  // adagrad: sum of squares; adam: v

  bool lr_in_values_ = true;
  float fixed_scale_ = 1.0f;    // plain(): the scale; from_config(): unused
  bool scheduled_ = false;      // from_config(): take the lr from the schedule
  config::Config cfg_;          // for config::learning_rate
  float momentum_ = 0.0f;
  float weight_decay_ = 0.0f;
  std::vector<float> velocity_;  // sgd: momentum buffer (dense sgd); adam: m
  std::vector<float> update_;    // scratch: the averaged update, dense
};

}  // namespace sps::server
