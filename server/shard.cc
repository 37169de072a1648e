#include "server/shard.h"

#include <fmt/format.h>

namespace sps::server {

Shard::Shard(uint32_t key_begin, uint32_t key_end, uint32_t num_workers, Optimizer optimizer,
             std::unique_ptr<scheduler::ConsistencyPolicy> policy)
    : key_begin_(key_begin),
      key_end_(key_end),
      optimizer_(std::move(optimizer)),
      policy_(std::move(policy)),
      params_(key_end - key_begin, 0.0f),
      stamp_(key_end - key_begin, 0),
      sum_(key_end - key_begin, 0.0f),
      touched_(key_end - key_begin, 0),
      pending_(num_workers),
      pushed_(num_workers) {
  SPS_CHECK(key_end >= key_begin);
}

void Shard::set_params(std::span<const float> values) {
  SPS_CHECK(values.size() == params_.size());
  std::copy(values.begin(), values.end(), params_.begin());
}

Status Shard::restore(std::span<const float> params, std::span<const float> velocity, uint64_t version,
                      uint64_t clock) {
  if (params.size() != params_.size())
    return invalid_argument(fmt::format("the snapshot holds {} parameters, this shard [{}, {}) has {}", params.size(),
                                        key_begin_, key_end_, params_.size()));
  SPS_RETURN_IF_ERROR(optimizer_.set_velocity(velocity));
  std::copy(params.begin(), params.end(), params_.begin());
  std::fill(stamp_.begin(), stamp_.end(), version);
  version_ = version;
  pushed_ = scheduler::ClockTable(pushed_.size());
  for (uint32_t w = 0; w < pushed_.size(); ++w) pushed_.set_clock(w, clock);
  for (auto& p : pending_) p = Pending{};
  applied_.clear();
  return {};
}

Status Shard::check_push(uint32_t w, uint64_t clock, uint64_t base_version) const {
  if (w >= pushed_.size()) return out_of_range(fmt::format("push from worker {} but the job has {}", w, pushed_.size()));
  if (!pushed_.live(w)) return failed_precondition(fmt::format("push from worker {}, which left the job", w));
  if (base_version > version_)
    return out_of_range(fmt::format("push from worker {} claims version {} but the shard is at {}", w, base_version,
                                    version_));
  if (!policy_->accepts_push(w, clock, version_, pushed_))
    return failed_precondition(fmt::format("{} refuses worker {}'s push for clock {} (expected clock {}, version {})",
                                           policy_->name(), w, clock, pushed_.clock(w), version_));
  return {};
}

void Shard::accept(uint32_t w, uint64_t clock) {
  pushed_.set_clock(w, clock + 1);
  if (policy_->apply_on_arrival()) apply_one(w);
}

Status Shard::add_push(uint32_t w, uint64_t clock, uint64_t base_version, const protocol::DataView& data) {
  SPS_RETURN_IF_ERROR(check_push(w, clock, base_version));
  Pending& p = pending_[w];
  p.base_version = base_version;
  p.keys.resize(data.size());
  p.values.resize(data.size());
  for (uint32_t i = 0; i < data.size(); ++i) {
    p.keys[i] = data.key(i) - key_begin_;
    p.values[i] = data.value(i);
  }
  accept(w, clock);
  return {};
}

Status Shard::add_push(uint32_t w, uint64_t clock, uint64_t base_version, std::span<const uint32_t> keys,
                       std::span<const float> values) {
  SPS_RETURN_IF_ERROR(check_push(w, clock, base_version));
  if (keys.size() != values.size()) return invalid_argument("keys and values differ in length");
  int64_t prev = int64_t{key_begin_} - 1;
  for (uint32_t k : keys) {
    if (k < key_begin_ || k >= key_end_ || int64_t{k} <= prev) return out_of_range(fmt::format("bad key {}", k));
    prev = k;
  }
  Pending& p = pending_[w];
  p.base_version = base_version;
  p.keys.resize(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) p.keys[i] = keys[i] - key_begin_;
  p.values.assign(values.begin(), values.end());
  accept(w, clock);
  return {};
}

void Shard::apply_one(uint32_t w) {
  Pending& p = pending_[w];
  const uint64_t next = version_ + 1;
  optimizer_.apply(params_, stamp_, next, p.keys, p.values, pushed_.live_count(),
                   static_cast<int64_t>(pushed_.clock(w) - 1));
  applied_.push_back({w, pushed_.clock(w) - 1, p.base_version, next, version_ - p.base_version,
                      static_cast<uint32_t>(p.keys.size())});
  version_ = next;
  p.keys.clear();
  p.values.clear();
}

void Shard::apply_clock() {
  const uint32_t live = pushed_.live_count();
  const uint64_t next = version_ + 1;
  for (uint32_t w = 0; w < pushed_.size(); ++w) {
    if (!pushed_.live(w)) continue;
    Pending& p = pending_[w];
    for (size_t i = 0; i < p.keys.size(); ++i) {
      const uint32_t j = p.keys[i];
      if (!touched_[j]) {
        touched_[j] = 1;
        touched_list_.push_back(j);
      }
      sum_[j] += p.values[i];
    }
    applied_.push_back({w, version_, p.base_version, next, version_ - p.base_version,
                        static_cast<uint32_t>(p.keys.size())});
    p.keys.clear();
    p.values.clear();
  }
  sum_values_.resize(touched_list_.size());
  for (size_t i = 0; i < touched_list_.size(); ++i) {
    const uint32_t j = touched_list_[i];
    sum_values_[i] = sum_[j];
    sum_[j] = 0.0f;
    touched_[j] = 0;
  }
  optimizer_.apply(params_, stamp_, next, touched_list_, sum_values_, live, static_cast<int64_t>(version_));
  touched_list_.clear();
  version_ = next;
}

int Shard::apply_ready() {
  int applied = 0;
  while (!policy_->apply_on_arrival() && policy_->ready_to_apply(version_, pushed_)) {
    apply_clock();
    ++applied;
  }
  return applied;
}

void Shard::remove_worker(uint32_t w) {
  if (w >= pushed_.size() || !pushed_.live(w)) return;
  pushed_.mark_dead(w);
  pending_[w].keys.clear();
  pending_[w].values.clear();
}

bool Shard::may_answer_pull(uint64_t clock) const { return policy_->may_answer_pull(clock, version_, pushed_); }

bool Shard::changed_since(uint64_t since_version, size_t limit, std::vector<uint32_t>& keys) const {
  keys.clear();
  for (uint32_t j = 0; j < stamp_.size(); ++j) {
    if (stamp_[j] > since_version) {
      if (keys.size() == limit) return false;
      keys.push_back(key_begin_ + j);
    }
  }
  return true;
}

std::vector<AppliedPush> Shard::take_applied() {
  std::vector<AppliedPush> out;
  out.swap(applied_);
  return out;
}

}  // namespace sps::server
