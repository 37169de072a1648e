#include "server/shard.h"

#include <algorithm>
#include <bit>

#include <fmt/format.h>

namespace sps::server {

Shard::Shard(uint32_t key_begin, uint32_t key_end, uint32_t num_workers, Optimizer optimizer,
             std::unique_ptr<scheduler::ConsistencyPolicy> policy)
    : key_begin_(key_begin),
      key_end_(key_end),
      optimizer_(std::move(optimizer)),
      policy_(std::move(policy)),
      params_(key_end - key_begin),
      pending_(num_workers),
      pushed_(num_workers) {
  SPS_CHECK(key_end >= key_begin);
}

void Shard::set_params(std::span<const float> values) {
  SPS_CHECK(values.size() == params_.size());
  std::copy(values.begin(), values.end(), params_.data());
}

Status Shard::restore(std::span<const float> params, std::span<const float> velocity, uint64_t version,
                      uint64_t clock) {
  if (params.size() != params_.size())
    return invalid_argument(fmt::format("the snapshot holds {} parameters, this shard [{}, {}) has {}", params.size(),
                                        key_begin_, key_end_, params_.size()));
  SPS_RETURN_IF_ERROR(optimizer_.set_velocity(velocity));
  std::copy(params.begin(), params.end(), params_.data());
  change_log_.clear();
  change_log_entries_ = 0;
  log_from_ = version;
  version_ = version;
  pushed_ = scheduler::ClockTable(pushed_.size());
  for (uint32_t w = 0; w < pushed_.size(); ++w) pushed_.set_clock(w, clock);
  for (auto& p : pending_) p.clear();
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

Status Shard::add_push(uint32_t w, uint64_t clock, uint64_t base_version, const protocol::DataView& data,
                       std::shared_ptr<const void> owner) {
  SPS_RETURN_IF_ERROR(check_push(w, clock, base_version));
  if (data.header().key_begin != key_begin_ || data.header().key_end != key_end_)
    return out_of_range("push for another key range");
  Pending& p = pending_[w];
  p.base_version = base_version;
  p.owner = std::move(owner);
  p.data = data;
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
  p.own_keys.assign(keys.begin(), keys.end());
  p.own_values.assign(values.begin(), values.end());
  protocol::Header h;
  h.index_encoding = protocol::IndexEncoding::kRawU32;
  h.key_begin = key_begin_;
  h.key_end = key_end_;
  h.nnz = static_cast<uint32_t>(keys.size());
  p.owner.reset();
  p.data = protocol::DataView(h, p.own_keys, p.own_values);
  accept(w, clock);
  return {};
}

void Shard::apply_one(uint32_t w) {
  Pending& p = pending_[w];
  const uint64_t next = version_ + 1;
  optimizer_.apply(params_.span(), key_begin_, p.data.keys(), p.data.values(), pushed_.live_count(),
                   static_cast<int64_t>(pushed_.clock(w) - 1));
  log_change(next, p.data.keys(), p.data.dense() || optimizer_.dense());
  applied_.push_back({w, pushed_.clock(w) - 1, p.base_version, next, version_ - p.base_version, p.data.size()});
  version_ = next;
  p.clear();
}


// k-way merge of the workers' sorted key lists into merged_keys_ /
// merged_sums_; each key's values are added in rank order starting from
// 0.0f, exactly as a zeroed sum buffer would. Sparse lists take a branch-free
// path (which worker holds the next key is random, so branches would
// mispredict on most keys): adding +0.0f for a worker without the key leaves
// the sum's bits unchanged, as the sum starts at +0.0f and so is never -0.0.
void Shard::merge_sorted(std::vector<Cursor>& cursors) {
  if (cursors.empty()) return;  // every live worker pushed nothing for this shard
  bool any_dense = false;
  for (const Cursor& c : cursors) any_dense = any_dense || c.keys == nullptr;
  if (any_dense) {
    while (true) {
      uint32_t min_key = UINT32_MAX;
      bool any = false;
      for (const Cursor& c : cursors) {
        if (c.done()) continue;
        const uint32_t k = c.key();
        if (!any || k < min_key) min_key = k;
        any = true;
      }
      if (!any) break;
      float sum = 0.0f;
      for (Cursor& c : cursors) {
        if (!c.done() && c.key() == min_key) {
          sum += c.values[c.pos];
          ++c.pos;
        }
      }
      merged_keys_.push_back(min_key);
      merged_sums_.push_back(sum);
    }
    return;
  }
  // Fold the lists left to right with branch-free two-way merges: merge
  // (0 + w0) with w1, the result with w2, ... so every key's sum is
  // ((0 + v0) + v1) + v2 ..., the rank order.
  merged_keys_.assign(cursors[0].keys, cursors[0].keys + cursors[0].size);
  merged_sums_.resize(cursors[0].size);
  for (size_t i = 0; i < cursors[0].size; ++i) merged_sums_[i] = 0.0f + cursors[0].values[i];
  for (size_t w = 1; w < cursors.size(); ++w) {
    const Cursor& b = cursors[w];
    const size_t na = merged_keys_.size();
    fold_keys_.resize(na + b.size);
    fold_sums_.resize(na + b.size);
    const uint32_t* ak = merged_keys_.data();
    const float* av = merged_sums_.data();
    uint32_t* ok = fold_keys_.data();
    float* ov = fold_sums_.data();
    size_t i = 0, j = 0, o = 0;
    // A float masked to +0.0f when `keep` is false, without a branch.
    auto masked = [](float x, bool keep) {
      return std::bit_cast<float>(std::bit_cast<uint32_t>(x) & (0u - static_cast<uint32_t>(keep)));
    };
    while (i < na && j < b.size) {
      const uint32_t ka = ak[i];
      const uint32_t kb = b.keys[j];
      const bool take_a = ka <= kb;
      const bool take_b = kb <= ka;
      ok[o] = take_a ? ka : kb;
      // Sums in the fold are never -0.0f (they start from +0.0f), so adding
      // a masked +0.0f leaves them bit for bit as they were.
      ov[o] = masked(av[i], take_a) + masked(b.values[j], take_b);
      i += take_a;
      j += take_b;
      ++o;
    }
    for (; i < na; ++i, ++o) {
      ok[o] = ak[i];
      ov[o] = av[i];
    }
    for (; j < b.size; ++j, ++o) {
      ok[o] = b.keys[j];
      ov[o] = 0.0f + b.values[j];
    }
    fold_keys_.resize(o);
    fold_sums_.resize(o);
    merged_keys_.swap(fold_keys_);
    merged_sums_.swap(fold_sums_);
  }
}

void Shard::apply_clock() {
  const uint32_t live = pushed_.live_count();
  const uint64_t next = version_ + 1;
  std::vector<Cursor>& cursors = cursors_;  // live workers in rank order (the summation order)
  cursors.clear();
  bool all_dense = true;
  for (uint32_t w = 0; w < pushed_.size(); ++w) {
    if (!pushed_.live(w)) continue;
    Pending& p = pending_[w];
    const bool dense = p.data.dense() && p.data.size() > 0;
    all_dense = all_dense && dense;
    if (p.data.size() > 0)
      cursors.push_back({dense ? nullptr : p.data.keys().data(), p.data.values().data(), 0, p.data.size(), key_begin_});
    applied_.push_back({w, version_, p.base_version, next, version_ - p.base_version, p.data.size()});
  }
  merged_keys_.clear();
  merged_sums_.clear();
  if (all_dense && !cursors.empty()) {
    // Dense pushes (method: dense): an elementwise sum, same order and bits.
    merged_sums_.assign(size(), 0.0f);
    for (const Cursor& c : cursors)
      for (size_t j = 0; j < c.size; ++j) merged_sums_[j] += c.values[j];
  } else {
    merge_sorted(cursors);
  }
  for (uint32_t w = 0; w < pushed_.size(); ++w) pending_[w].clear();
  optimizer_.apply(params_.span(), key_begin_, merged_keys_, merged_sums_, live, static_cast<int64_t>(version_));
  log_change(next, merged_keys_, (merged_keys_.empty() && !merged_sums_.empty()) || optimizer_.dense());
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
  pending_[w].clear();
}

bool Shard::may_answer_pull(uint64_t clock) const { return policy_->may_answer_pull(clock, version_, pushed_); }

void Shard::log_change(uint64_t version, std::span<const uint32_t> keys, bool every_key) {
  if (every_key) {
    change_log_.clear();
    change_log_entries_ = 0;
    log_from_ = version;
    return;
  }
  LoggedUpdate u;
  // Reuse the storage of the update about to fall out of the log.
  if (!change_log_.empty() && change_log_entries_ + keys.size() > size() / 2) {
    u.keys = std::move(change_log_.front().keys);
    log_from_ = change_log_.front().version;
    change_log_entries_ -= u.keys.size();
    change_log_.pop_front();
  }
  u.version = version;
  u.keys.assign(keys.begin(), keys.end());
  change_log_entries_ += u.keys.size();
  change_log_.push_back(std::move(u));
  while (change_log_entries_ > size() / 2) {
    log_from_ = change_log_.front().version;
    change_log_entries_ -= change_log_.front().keys.size();
    change_log_.pop_front();
  }
}

bool Shard::changed_since(uint64_t since_version, size_t limit, std::vector<uint32_t>& keys) const {
  keys.clear();
  if (since_version < log_from_) return false;
  // The updates after since_version are a suffix of the log.
  size_t first = change_log_.size();
  size_t total = 0;
  while (first > 0 && change_log_[first - 1].version > since_version) {
    --first;
    total += change_log_[first].keys.size();
    if (total > limit) return false;
  }
  // Concatenate the sorted runs, merge them pairwise (log2(runs) passes),
  // and drop keys that several updates changed.
  std::vector<size_t> bounds = {0};
  for (size_t i = first; i < change_log_.size(); ++i) {
    keys.insert(keys.end(), change_log_[i].keys.begin(), change_log_[i].keys.end());
    bounds.push_back(keys.size());
  }
  while (bounds.size() > 2) {
    std::vector<size_t> next = {0};
    for (size_t i = 0; i + 2 < bounds.size(); i += 2) {
      std::inplace_merge(keys.begin() + static_cast<ptrdiff_t>(bounds[i]),
                         keys.begin() + static_cast<ptrdiff_t>(bounds[i + 1]),
                         keys.begin() + static_cast<ptrdiff_t>(bounds[i + 2]));
      next.push_back(bounds[i + 2]);
    }
    if (bounds.size() % 2 == 0) next.push_back(bounds.back());  // an odd run out waits for the next pass
    bounds = std::move(next);
  }
  keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
  return true;
}

std::vector<AppliedPush> Shard::take_applied() {
  std::vector<AppliedPush> out;
  out.swap(applied_);
  return out;
}

}  // namespace sps::server
