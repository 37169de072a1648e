#include "server/optimizer.h"

#include <algorithm>

#include <fmt/format.h>

#include "common/scattered_keys.h"

namespace sps::server {

Optimizer Optimizer::plain(float apply_scale) {
  Optimizer o;
  o.fixed_scale_ = apply_scale;
  return o;
}

Optimizer Optimizer::from_config(const config::Config& cfg, uint32_t shard_size) {
  Optimizer o;
  o.lr_in_values_ = cfg.compression.scale == config::Scale::kLr;
  o.scheduled_ = true;
  o.cfg_ = cfg;
  o.momentum_ = static_cast<float>(cfg.optimizer.momentum);
  o.weight_decay_ = static_cast<float>(cfg.optimizer.weight_decay);
  if (o.dense()) {
    o.velocity_.assign(shard_size, 0.0f);
    o.update_.assign(shard_size, 0.0f);
  }
  return o;
}

Status Optimizer::set_velocity(std::span<const float> v) {
  if (v.size() != velocity_.size())
    return invalid_argument(fmt::format("the snapshot has a momentum buffer of {} entries, this optimizer {}", v.size(),
                                        velocity_.size()));
  std::copy(v.begin(), v.end(), velocity_.begin());
  return {};
}

float Optimizer::rate(int64_t step) const {
  return static_cast<float>(config::learning_rate(cfg_, step));
}

void Optimizer::apply(std::span<float> params, uint32_t key_base, std::span<const uint32_t> keys,
                      std::span<const float> sums, uint32_t count, int64_t step, ThreadPool* pool) {
  const bool dense_sums = keys.empty() && !sums.empty();
  if (!dense()) {
    const float scale = !scheduled_ ? fixed_scale_ : (lr_in_values_ ? 1.0f : rate(step));
    const float factor = scale / static_cast<float>(count);
    float* const x = params.data();
    if (dense_sums) {
      const float* const u = sums.data();
      for_pieces(pool, sums.size(), kMinDensePerThread, [&](size_t begin, size_t end) {
        for (size_t j = begin; j < end; ++j) x[j] -= factor * u[j];
      });
      return;
    }
    // Keys are ascending, so pieces of the key list touch disjoint parameters.
    for_pieces(pool, keys.size(), kMinKeysPerThread, [&](size_t begin, size_t end) {
      for_scattered_keys<Access::kWrite>(x, key_base, keys.data(), begin, end,
                                         [&](size_t i) { x[keys[i] - key_base] -= factor * sums[i]; });
    });
    return;
  }
  const float inv = 1.0f / static_cast<float>(count);
  float* const update = update_.data();
  if (dense_sums) {
    for_pieces(pool, sums.size(), kMinDensePerThread, [&](size_t begin, size_t end) {
      for (size_t j = begin; j < end; ++j) update[j] = sums[j] * inv;
    });
  } else {
    for_pieces(pool, keys.size(), kMinKeysPerThread, [&](size_t begin, size_t end) {
      for_scattered_keys<Access::kWrite>(update, key_base, keys.data(), begin, end,
                                         [&](size_t i) { update[keys[i] - key_base] = sums[i] * inv; });
    });
  }
  const float lr = rate(step);
  const float mu = momentum_;
  const float wd = weight_decay_;
  float* const x = params.data();
  float* const v = velocity_.data();
  for_pieces(pool, params.size(), kMinDensePerThread, [&](size_t begin, size_t end) {
    for (size_t j = begin; j < end; ++j) {
      if (lr_in_values_) {
        v[j] = mu * v[j] + update[j];
        x[j] -= v[j] + lr * wd * x[j];
      } else {
        v[j] = mu * v[j] + (update[j] + wd * x[j]);
        x[j] -= lr * v[j];
      }
      update[j] = 0.0f;
    }
  });
}

}  // namespace sps::server
