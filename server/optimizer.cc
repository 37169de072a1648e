#include "server/optimizer.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

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
  o.kind_ = cfg.optimizer.name;
  o.momentum_ = o.kind_ == config::OptimizerName::kSgd ? static_cast<float>(cfg.optimizer.momentum) : 0.0f;
  o.weight_decay_ = static_cast<float>(cfg.optimizer.weight_decay);
  o.beta1_ = static_cast<float>(cfg.optimizer.beta1);
  o.beta2_ = static_cast<float>(cfg.optimizer.beta2);
  o.epsilon_ = static_cast<float>(cfg.optimizer.epsilon);
  o.lazy_ = cfg.optimizer.lazy;
  const bool sgd = o.kind_ == config::OptimizerName::kSgd;
  if ((sgd && o.dense()) || o.kind_ == config::OptimizerName::kAdam) o.velocity_.assign(shard_size, 0.0f);
  if (!sgd) o.second_.assign(shard_size, 0.0f);
  if (o.dense()) o.update_.assign(shard_size, 0.0f);
  return o;
}

Status Optimizer::set_state(std::span<const float> velocity, std::span<const float> second_moment) {
  if (velocity.size() != velocity_.size())
    return invalid_argument(fmt::format("the snapshot has a first-moment (momentum) buffer of {} entries, this "
                                        "optimizer {} (was optimizer.name or optimizer.momentum changed?)",
                                        velocity.size(), velocity_.size()));
  if (second_moment.size() != second_.size())
    return invalid_argument(fmt::format("the snapshot has a second-moment buffer of {} entries, this optimizer {} "
                                        "(was optimizer.name changed?)",
                                        second_moment.size(), second_.size()));
  std::copy(velocity.begin(), velocity.end(), velocity_.begin());
  std::copy(second_moment.begin(), second_moment.end(), second_.begin());
  return {};
}

float Optimizer::rate(int64_t step) const {
  return static_cast<float>(config::learning_rate(cfg_, step));
}

namespace {

// c ? a : b with bit operations instead of a branch (the compiler keeps a
// conditional store or a ternary on loaded values as control flow).
inline float select(bool c, float a, float b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(c);
  return std::bit_cast<float>((std::bit_cast<uint32_t>(a) & mask) | (std::bit_cast<uint32_t>(b) & ~mask));
}

// One key of an adaptive rule (see optimizer.h), constants of the update
// computed once.
struct AdaptiveStep {
  bool adam = false;
  float lr = 0, eps = 0;
  float step_size = 0, root_c2 = 1, b1 = 0, b2 = 0, c2 = 0;  // adam
  float* x = nullptr;
  float* m = nullptr;
  float* v = nullptr;

  void operator()(size_t j, float u) const {
    if (!adam) {
      v[j] += u * u;
      x[j] -= lr * u / (std::sqrt(v[j]) + eps);
      return;
    }
    m[j] += b1 * (u - m[j]);
    v[j] = b2 * v[j] + c2 * u * u;
    x[j] -= step_size * m[j] / (std::sqrt(v[j]) / root_c2 + eps);
  }
};

}  // namespace

void Optimizer::apply_adaptive(std::span<float> params, uint32_t key_base, std::span<const uint32_t> keys,
                               std::span<const float> sums, uint32_t count, int64_t step, ThreadPool* pool) {
  AdaptiveStep key;
  key.adam = kind_ == config::OptimizerName::kAdam;
  key.lr = rate(step);
  key.eps = epsilon_;
  if (key.adam) {
    const double t = static_cast<double>(step) + 1.0;
    key.step_size = static_cast<float>(key.lr / (1.0 - std::pow(static_cast<double>(beta1_), t)));
    key.root_c2 = static_cast<float>(std::sqrt(1.0 - std::pow(static_cast<double>(beta2_), t)));
    key.b1 = 1.0f - beta1_;
    key.b2 = beta2_;
    key.c2 = 1.0f - beta2_;
  }
  key.x = params.data();
  key.m = velocity_.data();
  key.v = second_.data();
  const float inv = 1.0f / static_cast<float>(count);
  const bool dense_sums = keys.empty() && !sums.empty();
  if (dense()) {
    // Every key changes (weight decay, or adam's decaying moments): the
    // averaged update made dense, then one pass. A key whose update is 0
    // keeps its state where that is the rule (adagrad always; lazy adam).
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
    const float decay = key.lr * weight_decay_;
    float* const x = params.data();
    float* const m = key.m;
    float* const v = key.v;
    // Branch-free loops (a key whose update is 0 is left alone by a select,
    // not a branch), so the compiler vectorises them.
    for_pieces(pool, params.size(), kMinDensePerThread, [&](size_t begin, size_t end) {
      // Locals, not key's fields: a store through m or v could alias those,
      // which would keep the compiler from vectorising.
      const float lr = key.lr, eps = key.eps, b1 = key.b1, b2 = key.b2, c2 = key.c2;
      const float step_size = key.step_size, root_c2 = key.root_c2, wd_step = decay;
      if (!key.adam) {  // u = 0 changes neither G nor x
        for (size_t j = begin; j < end; ++j) {
          const float u = update[j];
          x[j] -= wd_step * x[j];
          v[j] += u * u;
          x[j] -= lr * u / (std::sqrt(v[j]) + eps);
          update[j] = 0.0f;
        }
      } else if (!lazy_) {
        for (size_t j = begin; j < end; ++j) {
          const float u = update[j];
          x[j] -= wd_step * x[j];
          m[j] += b1 * (u - m[j]);
          v[j] = b2 * v[j] + c2 * u * u;
          x[j] -= step_size * m[j] / (std::sqrt(v[j]) / root_c2 + eps);
          update[j] = 0.0f;
        }
      } else {
        for (size_t j = begin; j < end; ++j) {
          const float u = update[j];
          const bool pushed = u != 0.0f;
          const float mj = m[j] + b1 * (u - m[j]);
          const float vj = b2 * v[j] + c2 * u * u;
          const float delta = step_size * mj / (std::sqrt(vj) / root_c2 + eps);
          m[j] = select(pushed, mj, m[j]);
          v[j] = select(pushed, vj, v[j]);
          x[j] = (x[j] - wd_step * x[j]) - select(pushed, delta, 0.0f);
          update[j] = 0.0f;
        }
      }
    });
    return;
  }
  // Only keys with an update change (adagrad, lazy adam; no weight decay).
  if (dense_sums) {
    for_pieces(pool, sums.size(), kMinDensePerThread, [&](size_t begin, size_t end) {
      for (size_t j = begin; j < end; ++j)
        if (sums[j] != 0.0f) key(j, sums[j] * inv);
    });
    return;
  }
  for_pieces(pool, keys.size(), kMinKeysPerThread, [&](size_t begin, size_t end) {
    for_scattered_keys<Access::kWrite>(params.data(), key_base, keys.data(), begin, end, [&](size_t i) {
      if (sums[i] != 0.0f) key(keys[i] - key_base, sums[i] * inv);
    });
  });
}

void Optimizer::apply(std::span<float> params, uint32_t key_base, std::span<const uint32_t> keys,
                      std::span<const float> sums, uint32_t count, int64_t step, ThreadPool* pool) {
  const bool dense_sums = keys.empty() && !sums.empty();
  if (kind_ != config::OptimizerName::kSgd) {
    apply_adaptive(params, key_base, keys, sums, count, step, pool);
    return;
  }
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
