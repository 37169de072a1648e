#include "server/optimizer.h"

#include <algorithm>

#include <fmt/format.h>

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
                      std::span<const float> sums, uint32_t count, int64_t step) {
  const bool dense_sums = keys.empty() && !sums.empty();
  if (!dense()) {
    const float scale = !scheduled_ ? fixed_scale_ : (lr_in_values_ ? 1.0f : rate(step));
    const float factor = scale / static_cast<float>(count);
    if (dense_sums) {
      for (size_t j = 0; j < sums.size(); ++j) params[j] -= factor * sums[j];
      return;
    }
    float* const x = params.data();
    // Pushed keys of a large shard are a cache miss each; asking for the
    // line a few keys ahead overlaps the misses.
    constexpr size_t kAhead = 16;
    const size_t n = keys.size();
    const size_t head = n > kAhead ? n - kAhead : 0;
    for (size_t i = 0; i < head; ++i) {
      __builtin_prefetch(&x[keys[i + kAhead] - key_base], 1);
      x[keys[i] - key_base] -= factor * sums[i];
    }
    for (size_t i = head; i < n; ++i) x[keys[i] - key_base] -= factor * sums[i];
    return;
  }
  const float inv = 1.0f / static_cast<float>(count);
  if (dense_sums) {
    for (size_t j = 0; j < sums.size(); ++j) update_[j] = sums[j] * inv;
  } else {
    for (size_t i = 0; i < keys.size(); ++i) update_[keys[i] - key_base] = sums[i] * inv;
  }
  const float lr = rate(step);
  const float mu = momentum_;
  const float wd = weight_decay_;
  for (size_t j = 0; j < params.size(); ++j) {
    if (lr_in_values_) {
      velocity_[j] = mu * velocity_[j] + update_[j];
      params[j] -= velocity_[j] + lr * wd * params[j];
    } else {
      velocity_[j] = mu * velocity_[j] + (update_[j] + wd * params[j]);
      params[j] -= lr * velocity_[j];
    }
    update_[j] = 0.0f;
  }
}

}  // namespace sps::server
