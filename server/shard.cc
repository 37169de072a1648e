#include "server/shard.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <thread>

#include <fmt/format.h>

#include "common/half_floats.h"
#include "common/scattered_keys.h"

namespace sps::server {

Shard::Shard(uint32_t key_begin, uint32_t key_end, uint32_t num_workers, Optimizer optimizer,
             std::unique_ptr<scheduler::ConsistencyPolicy> policy, int threads)
    : key_begin_(key_begin),
      key_end_(key_end),
      optimizer_(std::move(optimizer)),
      policy_(std::move(policy)),
      params_(key_end - key_begin),
      change_log_((key_end - key_begin) / 2),
      pending_(num_workers),
      pushed_(num_workers),
      refused_clock_(num_workers, kNoClock),
      joined_at_(num_workers, 0) {
  SPS_CHECK(key_end >= key_begin);
  if (threads == 0) threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  if (threads > 1) pool_ = std::make_unique<ThreadPool>(threads);
  scratch_.resize(static_cast<size_t>(std::max(threads, 1)));
  piece_cursors_.resize(scratch_.size());
}

void Shard::set_params(std::span<const float> values) {
  SPS_CHECK(values.size() == params_.size());
  std::copy(values.begin(), values.end(), params_.data());
  if (downlink_) {
    std::copy(values.begin(), values.end(), published_.data());
    published_version_ = version_;
    copy_is_exact();
  }
}

Status Shard::restore(std::span<const float> params, std::span<const float> velocity,
                      std::span<const float> second_moment, uint64_t version, uint64_t clock) {
  if (params.size() != params_.size())
    return invalid_argument(fmt::format("the snapshot holds {} parameters, this shard [{}, {}) has {}", params.size(),
                                        key_begin_, key_end_, params_.size()));
  SPS_RETURN_IF_ERROR(optimizer_.set_state(velocity, second_moment));
  std::copy(params.begin(), params.end(), params_.data());
  if (downlink_) {
    std::copy(params.begin(), params.end(), published_.data());
    published_version_ = version;
    copy_is_exact();
  }
  change_log_.restart(version);
  version_ = version;
  pushed_ = scheduler::ClockTable(pushed_.size());
  for (uint32_t w = 0; w < pushed_.size(); ++w) pushed_.set_clock(w, clock);
  for (auto& p : pending_) p.clear();
  handled_.clear();
  std::fill(refused_clock_.begin(), refused_clock_.end(), kNoClock);
  std::fill(joined_at_.begin(), joined_at_.end(), 0);
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
  const uint64_t clock = pushed_.clock(w) - 1;
  const uint64_t staleness = version_ - p.base_version;
  if (policy_->refuses_staleness(staleness)) {
    handled_.push_back({w, clock, p.base_version, version_, staleness, p.data.size(), /*refused=*/true});
    refused_clock_[w] = clock;
    p.clear();
    return;
  }
  const uint64_t next = version_ + 1;
  optimizer_.apply(std::span<float>(params_), key_begin_, p.data.keys(), p.data.values(), pushed_.live_count(),
                   static_cast<int64_t>(pushed_.clock(w) - 1), pool_.get());
  if (p.data.dense() || optimizer_.dense()) {
    log_dense_change(next);
  } else {
    log_changes(next, p.data.keys());
  }
  handled_.push_back({w, clock, p.base_version, next, staleness, p.data.size()});
  version_ = next;
  p.clear();
}


// Merges sorted lists of which some are dense (a dense push next to sparse
// ones) into merged_keys_ / merged_sums_ (ascending keys); each key's values
// are added in rank order starting from +0.0f, exactly as a zeroed dense sum
// buffer would. Rare, so simple.
void Shard::merge_mixed(const std::vector<Cursor>& const_cursors) {
  std::vector<Cursor> cursors = const_cursors;
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
}

// Sums sparse sorted lists (non-empty) into s.keys / s.sums, each key's
// values added in rank order from +0.0f. Dense enough (about one pair per 64
// keys of the span the lists cover, or more), they are summed block by
// block: each block of kBlockKeys keys gets a small dense buffer that stays
// in cache, every worker's pairs in the block are added into it in rank
// order, and the touched keys are read out in key order through a bitmap;
// each pair is read once and each output written once, whatever the worker
// count. Sparser, the bitmap would be mostly zero words, each a likely
// branch miss, so the lists are folded with two-way merges instead. Returns
// true when it also applied the sums (`apply`, block path; s.sums is then
// empty). Safe to run on several threads at once for disjoint key ranges.
bool Shard::sum_sparse(std::span<Cursor> cursors, SumScratch& s, bool apply, uint32_t count, int64_t step) {
  s.keys.clear();
  s.sums.clear();
  size_t total = 0;
  uint32_t lo = UINT32_MAX, hi = 0;
  for (const Cursor& c : cursors) {
    total += c.size;
    lo = std::min(lo, c.keys[0]);
    hi = std::max(hi, c.keys[c.size - 1]);
  }
  if (total * 64 < uint64_t{hi} - lo + 1) {
    sum_by_fold(cursors, s);
    return false;
  }
  sum_by_blocks(cursors, s, total, apply, count, step);
  return apply;
}

// Sums sparse lists through a per-block dense buffer (see sum_sparse).
// With `apply`, each block's sums go to the optimizer while they are still
// in cache instead of into s.sums.
void Shard::sum_by_blocks(std::span<Cursor> cursors, SumScratch& s, size_t total, bool apply, uint32_t count,
                          int64_t step) {
  s.keys.reserve(total);
  if (!apply) s.sums.reserve(total);
  s.block_sums.resize(kBlockKeys, 0.0f);
  s.block_touched.resize(kBlockKeys / 64, 0);
  s.block_out.resize(kBlockKeys);
  float* const sums = s.block_sums.data();
  uint64_t* const touched = s.block_touched.data();
  float* const x = params_.data();
  while (true) {
    // The block starts at the smallest key still unread, so empty stretches
    // of the key range cost nothing.
    uint32_t first = UINT32_MAX;
    for (const Cursor& c : cursors)
      if (!c.done()) first = std::min(first, c.keys[c.pos]);
    if (first == UINT32_MAX) break;  // keys are below key_end_ <= UINT32_MAX
    const uint64_t end = uint64_t{first} + kBlockKeys;
    uint32_t last_word = 0;
    for (Cursor& c : cursors) {
      size_t pos = c.pos;
      while (pos < c.size && c.keys[pos] < end) {
        const uint32_t off = c.keys[pos] - first;
        // The block's apply follows at once: ask for its parameters now, so
        // their misses overlap this loop (about 10 % at 25M / 1 %).
        if (apply) __builtin_prefetch(x + (c.keys[pos] - key_begin_), 1);
        sums[off] += c.values[pos];
        touched[off / 64] |= uint64_t{1} << (off % 64);
        ++pos;
      }
      if (pos > c.pos) last_word = std::max(last_word, (c.keys[pos - 1] - first) / 64);
      c.pos = pos;
    }
    const size_t block_begin = s.keys.size();
    float* out_sums = s.block_out.data();
    for (uint32_t w = 0; w <= last_word; ++w) {
      uint64_t bits = touched[w];
      if (bits == 0) continue;
      touched[w] = 0;
      do {
        const uint32_t off = w * 64 + static_cast<uint32_t>(std::countr_zero(bits));
        s.keys.push_back(first + off);
        *out_sums++ = sums[off];
        sums[off] = 0.0f;
        bits &= bits - 1;
      } while (bits != 0);
    }
    const std::span<const float> block_sums(s.block_out.data(), out_sums);
    if (apply) {
      optimizer_.apply(std::span<float>(params_), key_begin_, std::span(s.keys).subspan(block_begin), block_sums, count,
                       step);
    } else {
      s.sums.insert(s.sums.end(), block_sums.begin(), block_sums.end());
    }
  }
}

// Sums sparse lists as a left fold of branch-free two-way merges (which
// worker holds the next key is random, so branches would mispredict on most
// keys): merge (0 + w0) with w1, the result with w2, ... so every key's sum
// is ((0 + v0) + v1) + v2 ..., the rank order.
void Shard::sum_by_fold(std::span<const Cursor> cursors, SumScratch& s) {
  s.keys.assign(cursors[0].keys, cursors[0].keys + cursors[0].size);
  s.sums.resize(cursors[0].size);
  for (size_t i = 0; i < cursors[0].size; ++i) s.sums[i] = 0.0f + cursors[0].values[i];
  for (size_t w = 1; w < cursors.size(); ++w) {
    const Cursor& b = cursors[w];
    const size_t na = s.keys.size();
    s.fold_keys.resize(na + b.size);
    s.fold_sums.resize(na + b.size);
    const uint32_t* ak = s.keys.data();
    const float* av = s.sums.data();
    uint32_t* ok = s.fold_keys.data();
    float* ov = s.fold_sums.data();
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
    s.fold_keys.resize(o);
    s.fold_sums.resize(o);
    s.keys.swap(s.fold_keys);
    s.sums.swap(s.fold_sums);
  }
}

// An aggregated clock of sparse pushes (cursors_, none dense): summed, and
// applied, into merged_keys_ (and merged_sums_ for an optimizer that needs
// them whole). With a pool and enough pairs, the key range is cut into one
// piece per thread at quantiles of the longest list; each thread sums and
// applies its piece's keys, which no other thread touches, so every key gets
// the same rank-order sum and the same update as on one thread.
void Shard::sum_sparse_clock(uint32_t count, int64_t step) {
  std::vector<Cursor>& cursors = cursors_;
  const bool apply_in_pieces = !optimizer_.dense();
  size_t total = 0;
  size_t longest = 0;
  for (size_t i = 0; i < cursors.size(); ++i) {
    total += cursors[i].size;
    if (cursors[i].size > cursors[longest].size) longest = i;
  }
  const size_t pieces = std::clamp<size_t>(total / Optimizer::kMinKeysPerThread, 1, scratch_.size());
  if (pieces == 1) {
    SumScratch& s = scratch_[0];
    const bool applied = sum_sparse(cursors, s, apply_in_pieces, count, step);
    merged_keys_.swap(s.keys);
    merged_sums_.swap(s.sums);
    if (!applied)
      optimizer_.apply(std::span<float>(params_), key_begin_, merged_keys_, merged_sums_, count, step, pool_.get());
    return;
  }
  // Piece t holds keys in [bounds[t], bounds[t + 1]); the longest list has
  // at least `pieces` keys (total >= pieces * kMinKeysPerThread), so the
  // bounds increase strictly.
  std::vector<uint64_t> bounds(pieces + 1);
  const Cursor& l = cursors[longest];
  bounds[0] = 0;
  for (size_t t = 1; t < pieces; ++t) bounds[t] = l.keys[l.size * t / pieces];
  bounds[pieces] = uint64_t{UINT32_MAX} + 1;
  for (size_t t = 0; t < pieces; ++t) piece_cursors_[t].clear();
  for (const Cursor& c : cursors) {
    const uint32_t* from = c.keys;
    for (size_t t = 0; t < pieces; ++t) {
      const uint32_t* to = t + 1 == pieces ? c.keys + c.size
                                           : std::lower_bound(from, c.keys + c.size, bounds[t + 1],
                                                              [](uint32_t k, uint64_t b) { return k < b; });
      if (to > from)
        piece_cursors_[t].push_back({from, c.values + (from - c.keys), 0, static_cast<size_t>(to - from), 0});
      from = to;
    }
  }
  pool_->run([&](int thread) {
    const auto t = static_cast<size_t>(thread);
    if (t >= pieces) return;
    SumScratch& s = scratch_[t];
    if (piece_cursors_[t].empty()) {
      s.keys.clear();
      s.sums.clear();
      return;
    }
    if (!sum_sparse(piece_cursors_[t], s, apply_in_pieces, count, step) && apply_in_pieces)
      optimizer_.apply(std::span<float>(params_), key_begin_, s.keys, s.sums, count, step);
  });
  size_t merged = 0;
  for (size_t t = 0; t < pieces; ++t) merged += scratch_[t].keys.size();
  merged_keys_.reserve(merged);
  for (size_t t = 0; t < pieces; ++t) {
    merged_keys_.insert(merged_keys_.end(), scratch_[t].keys.begin(), scratch_[t].keys.end());
    if (!apply_in_pieces) merged_sums_.insert(merged_sums_.end(), scratch_[t].sums.begin(), scratch_[t].sums.end());
  }
  if (!apply_in_pieces)
    optimizer_.apply(std::span<float>(params_), key_begin_, merged_keys_, merged_sums_, count, step, pool_.get());
}

void Shard::apply_clock() {
  // The clock's workers: live ones, less any that joined after it (their
  // first push is a later clock), so the average is over those who pushed.
  auto pushed_this_clock = [&](uint32_t w) { return pushed_.live(w) && joined_at_[w] <= version_; };
  uint32_t live = 0;
  for (uint32_t w = 0; w < pushed_.size(); ++w) live += pushed_this_clock(w) ? 1 : 0;
  const uint64_t next = version_ + 1;
  if (live == 0) {
    // Nobody pushed this clock: the workers that did died, and a replacement
    // starts after it. There is no average to apply; the version moves on.
    log_changes(next, {});
    version_ = next;
    return;
  }
  const auto step = static_cast<int64_t>(version_);
  std::vector<Cursor>& cursors = cursors_;  // live workers in rank order (the summation order)
  cursors.clear();
  bool all_dense = true;
  bool any_dense = false;
  for (uint32_t w = 0; w < pushed_.size(); ++w) {
    if (!pushed_this_clock(w)) continue;
    Pending& p = pending_[w];
    const bool dense = p.data.dense() && p.data.size() > 0;
    all_dense = all_dense && dense;
    if (p.data.size() > 0) {
      any_dense = any_dense || dense;
      cursors.push_back({dense ? nullptr : p.data.keys().data(), p.data.values().data(), 0, p.data.size(), key_begin_});
    }
    handled_.push_back({w, version_, p.base_version, next, version_ - p.base_version, p.data.size()});
  }
  merged_keys_.clear();
  if (all_dense && !cursors.empty()) {
    // Dense pushes (method: dense): an elementwise sum, same order and bits.
    merged_sums_.resize(size());
    float* const out = merged_sums_.data();
    for_pieces(pool_.get(), size(), Optimizer::kMinDensePerThread, [&](size_t begin, size_t end) {
      std::fill(out + begin, out + end, 0.0f);
      for (const Cursor& c : cursors)
        for (size_t j = begin; j < end; ++j) out[j] += c.values[j];
    });
    for (uint32_t w = 0; w < pushed_.size(); ++w) pending_[w].clear();
    optimizer_.apply(std::span<float>(params_), key_begin_, {}, merged_sums_, live, step, pool_.get());
    log_dense_change(next);
  } else {
    merged_sums_.clear();
    if (any_dense) {
      merge_mixed(cursors);
      optimizer_.apply(std::span<float>(params_), key_begin_, merged_keys_, merged_sums_, live, step, pool_.get());
    } else if (cursors.empty()) {
      // Every live worker pushed nothing for this shard: a dense optimizer
      // still takes its step (momentum, weight decay).
      optimizer_.apply(std::span<float>(params_), key_begin_, {}, {}, live, step, pool_.get());
    } else {
      sum_sparse_clock(live, step);
    }
    for (uint32_t w = 0; w < pushed_.size(); ++w) pending_[w].clear();
    if (optimizer_.dense())
      log_dense_change(next);
    else
      log_changes(next, merged_keys_);
  }
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

std::optional<uint64_t> Shard::add_worker(uint32_t w) {
  if (w >= pushed_.size() || pushed_.live(w)) return std::nullopt;
  const uint64_t slowest = pushed_.min_live_clock();
  if (slowest == UINT64_MAX) return std::nullopt;
  pushed_.set_clock(w, slowest);
  joined_at_[w] = slowest;
  pushed_.mark_live(w);
  pending_[w].clear();
  refused_clock_[w] = kNoClock;
  return slowest;
}

Status Shard::set_worker_clock(uint32_t w, uint64_t clock) {
  if (w >= pushed_.size() || !pushed_.live(w)) return failed_precondition(fmt::format("worker {} is not live", w));
  if (clock < pushed_.clock(w))
    return failed_precondition(
        fmt::format("worker {} is at clock {}; it cannot go back to {}", w, pushed_.clock(w), clock));
  // An aggregating shard held at the old clock holds no push of w's (it
  // pushes only once it runs), so nothing is pending for the skipped clocks.
  pushed_.set_clock(w, clock);
  joined_at_[w] = clock;
  return {};
}

Status Shard::restart_worker(uint32_t w, uint64_t clock) {
  if (w >= pushed_.size()) return invalid_argument(fmt::format("no worker {}", w));
  if (!policy_->apply_on_arrival() && clock < version_)
    return failed_precondition(fmt::format("the shard has applied clock {} already (version {})", clock, version_));
  pushed_.set_clock(w, clock);
  joined_at_[w] = clock;
  pushed_.mark_live(w);
  pending_[w].clear();
  refused_clock_[w] = kNoClock;
  return {};
}

std::vector<uint64_t> Shard::worker_clocks() const {
  std::vector<uint64_t> clocks(pushed_.size());
  for (uint32_t w = 0; w < pushed_.size(); ++w) {
    // Aggregating: clocks before version_ are applied and the pushes from
    // there on are held (not in the parameters); a worker that joined later
    // pushed nothing before its join clock.
    const uint64_t c = policy_->apply_on_arrival() ? pushed_.clock(w)
                                                   : std::max(joined_at_[w], std::min(pushed_.clock(w), version_));
    clocks[w] = pushed_.live(w) ? c : kWorkerGone;
  }
  return clocks;
}

Status Shard::restore_workers(std::span<const uint64_t> clocks, std::span<const uint64_t> joined_at) {
  if (clocks.size() != pushed_.size() || joined_at.size() != pushed_.size())
    return invalid_argument(fmt::format("the snapshot lists {} workers' clocks, this job has {} workers",
                                        clocks.size(), pushed_.size()));
  for (uint32_t w = 0; w < pushed_.size(); ++w) {
    pending_[w].clear();
    if (clocks[w] == kWorkerGone) {
      pushed_.mark_dead(w);
      continue;
    }
    pushed_.mark_live(w);
    pushed_.set_clock(w, clocks[w]);
    joined_at_[w] = joined_at[w];
  }
  return {};
}

bool Shard::may_answer_pull(uint64_t clock) const { return policy_->may_answer_pull(clock, version_, pushed_); }

bool Shard::changed_since(uint64_t since_version, size_t limit, std::vector<uint32_t>& keys) const {
  return change_log_.changed_since(since_version, limit, keys);
}

void Shard::gather(std::span<const uint32_t> keys, std::vector<float>& values) const {
  values.resize(keys.size());
  const float* const x = pulled_params().data();
  float* const out = values.data();
  for_pieces(pool_.get(), keys.size(), Optimizer::kMinKeysPerThread, [&](size_t begin, size_t end) {
    for_scattered_keys<Access::kRead>(x, key_begin_, keys.data(), begin, end,
                                      [&](size_t i) { out[i] = x[keys[i] - key_begin_]; });
  });
}

std::vector<HandledPush> Shard::take_handled() {
  std::vector<HandledPush> out;
  out.swap(handled_);
  return out;
}

bool Shard::push_refused_before(uint32_t w, uint64_t pull_clock) const {
  return w < refused_clock_.size() && refused_clock_[w] != kNoClock && refused_clock_[w] + 1 == pull_clock;
}

void Shard::log_changes(uint64_t version, std::span<const uint32_t> keys) {
  if (!downlink_)
    change_log_.add(version, keys);
  else
    track_owed(keys);
}

void Shard::log_dense_change(uint64_t version) {
  if (!downlink_) {
    change_log_.restart(version);
  } else {
    owed_keys_unknown();
    dense_since_publish_ = true;
  }
}

void Shard::track_owed(std::span<const uint32_t> global_keys) {
  if (!incremental_ || !owed_keys_complete_) return;
  if (owed_keys_.size() + global_keys.size() > size() / 8) return owed_keys_unknown();
  const bool rounded = downlink_values_ != ValueFormat::kF32;
  if (!global_keys.empty()) owed_runs_.push_back(owed_keys_.size());  // keys come ascending
  for (const uint32_t key : global_keys) {
    const uint32_t j = key - key_begin_;
    owed_keys_.push_back(j);
    if (rounded) {  // its rounding debt is counted with the candidates now
      rounding_sq_ -= static_cast<double>(debt_[j]) * debt_[j];
      debt_[j] = 0.0f;
    }
  }
}

void Shard::copy_is_exact() {
  owed_keys_.clear();
  owed_runs_.clear();
  owed_keys_complete_ = true;
  if (!debt_.empty()) std::fill(debt_.begin(), debt_.end(), 0.0f);
  rounding_sq_ = 0;
}

void Shard::set_publish_incremental(bool on) {
  publish_incremental_allowed_ = on;
  incremental_ = incremental_capable_ && on;
  owed_keys_unknown();  // nothing was tracked while off
}

void Shard::owed_keys_unknown() {
  owed_keys_complete_ = false;
  owed_keys_.clear();
  owed_runs_.clear();
}

// After a pass over the shard left `owing_left` keys owing, marked nonzero
// in owed_ (the sent ones zeroed): lists them when few, so the next publish
// can read only them.
void Shard::owed_keys_after_full_pass(size_t owing_left) {
  owed_keys_.clear();
  owed_runs_.clear();
  owed_keys_complete_ = false;
  // After a dense update the next is likely dense too (Adam, momentum):
  // listing would cost a pass for nothing. The next pass after sparse
  // updates only lists.
  if (!incremental_ || owing_left > size() / 8 || dense_since_publish_) return;
  const float* const owed = owed_.data();
  const size_t n = size();
  if (owing_left > 0) {
    owed_runs_.push_back(0);
    for (uint32_t j = 0; j < n; ++j)
      if (owed[j] != 0.0f) owed_keys_.push_back(j);
  }
  if (downlink_values_ != ValueFormat::kF32) {
    // With f32 values every key that does not owe has x == x_hat; with
    // 16-bit ones it owes its rounding, x - x_hat: kept per key, and summed
    // (a vectorised pass, partial sums per block as in publish()).
    const float* __restrict const x = params_.data();
    const float* __restrict const x_hat = published_.data();
    float* __restrict const debt = debt_.data();
    constexpr size_t kBlock = 2048;
    double sum = 0;
    for (size_t block = 0; block < n; block += kBlock) {
      const size_t end = std::min(n, block + kBlock);
      double block_sum = 0;
#pragma omp simd reduction(+ : block_sum)
      for (size_t j = block; j < end; ++j) {
        const float d = owed[j] != 0.0f ? 0.0f : x[j] - x_hat[j];
        debt[j] = d;
        block_sum += static_cast<double>(d) * d;
      }
      sum += block_sum;
    }
    rounding_sq_ = sum;
  }
  owed_keys_complete_ = true;
}

kernels::SelectionParams Shard::downlink_selection(const config::DownlinkConfig& d, size_t n) {
  kernels::SelectionParams p;
  switch (d.method) {
    case config::CompressionMethod::kDense: p.method = kernels::Method::kDense; break;
    case config::CompressionMethod::kTopK: p.method = kernels::Method::kTopK; break;
    case config::CompressionMethod::kThreshold: p.method = kernels::Method::kThreshold; break;
    case config::CompressionMethod::kGaussianK: p.method = kernels::Method::kGaussianK; break;
    case config::CompressionMethod::kRandomK: p.method = kernels::Method::kRandomK; break;
    case config::CompressionMethod::kSampled: p.method = kernels::Method::kSampled; break;
  }
  p.k = d.k > 0 ? std::min<size_t>(n, static_cast<size_t>(d.k)) : kernels::k_from_ratio(d.ratio, n);
  p.lambda = static_cast<float>(d.lambda);
  return p;
}

ValueFormat Shard::downlink_values(const config::DownlinkConfig& d) {
  switch (d.values) {
    case config::ValueFormatName::kF16: return ValueFormat::kF16;
    case config::ValueFormatName::kBF16: return ValueFormat::kBF16;
    default: return ValueFormat::kF32;  // config refuses the scaled formats here
  }
}

Status Shard::enable_downlink(const kernels::SelectionParams& selection, ValueFormat values) {
  if (values != ValueFormat::kF32 && values != ValueFormat::kF16 && values != ValueFormat::kBF16)
    return invalid_argument("compressed pulls send f32, f16 or bf16 values");
  kernels::CompressorOptions options;
  options.selection = selection;
  options.selection.k = std::min<size_t>(selection.k, std::max<size_t>(size(), 1));
  options.error_feedback = kernels::ErrorFeedbackMode::kNone;
  options.threads = threads();
  SPS_ASSIGN_OR_RETURN(downlink_, kernels::make_compressor(kernels::Backend::kCpu, size(), options));
  // A threshold never selects below lambda, even when few keys owe anything.
  downlink_k_ = selection.method == kernels::Method::kThreshold ? 0 : options.selection.k;
  downlink_values_ = values;
  downlink_lambda_ = selection.lambda;
  published_.assign(params_.begin(), params_.end());
  published_version_ = version_;
  owed_.assign(size(), 0.0f);
  change_log_.restart(version_);
  // Top-k and threshold of the owing keys alone are those of x - x_hat
  // (the rest is 0); with 16-bit values every key owes its rounding.
  incremental_capable_ =
      (selection.method == kernels::Method::kTopK || selection.method == kernels::Method::kThreshold) &&
      selection.max_nnz == 0;
  incremental_ = incremental_capable_ && publish_incremental_allowed_;
  debt_.clear();
  if (incremental_capable_ && values != ValueFormat::kF32) debt_.assign(size(), 0.0f);
  copy_is_exact();
  return {};
}

Status Shard::restore_published(std::span<const float> published, uint64_t published_version) {
  if (!downlink_) return failed_precondition("the shard has no downlink");
  if (published.size() != published_.size())
    return invalid_argument(fmt::format("the snapshot's published copy holds {} parameters, this shard has {}",
                                        published.size(), published_.size()));
  if (published_version > version_)
    return invalid_argument(fmt::format("the snapshot's published copy is at version {}, after the shard's {}",
                                        published_version, version_));
  std::copy(published.begin(), published.end(), published_.data());
  published_version_ = published_version;
  owed_keys_unknown();  // the next publish passes over the shard
  return {};
}

Shard::Published Shard::publish() {
  Published out;
  if (!downlink_ || published_version_ == version_) return out;
  if (incremental_ && owed_keys_complete_) {
    out = publish_incremental();
    if (out.ran) return out;
    owed_keys_unknown();  // a non-finite x: the pass publishes it whole
  }
  out = publish_pass();
  dense_since_publish_ = false;
  return out;
}

Shard::Published Shard::publish_pass() {
  Published out;
  out.ran = true;
  out.version = version_;
  out.keys_read = size();
  const float* const x = params_.data();
  float* const x_hat = published_.data();
  float* const owed = owed_.data();
  // One pass: ||x - x_hat||^2, and owed = x - x_hat where sending would
  // change x_hat (x != x_hat, and with 16-bit values round(x) != x_hat),
  // else 0, so selections never spend the budget on keys that owe only
  // rounding. While few keys owe, the pass also lists them (from blocks
  // still in L1), so that when they all fit in the budget no second pass
  // or selection is needed. Per piece, combined in piece order so nothing
  // depends on timing. The simd reduction lets the compiler keep several
  // partial sums (a fixed order for a given build); one double sum would be
  // a serial chain of additions, slower than the memory.
  const size_t n = size();
  const size_t pieces = static_cast<size_t>(threads());
  struct PieceSums {
    double norm_sq = 0;
    size_t nonzero = 0;
  };
  std::vector<PieceSums> piece_sums(pieces);
  owing_.resize(pieces);
  const ValueFormat format = downlink_values_;
  const size_t budget = downlink_k_;  // 0 (threshold): never list, always select
  for_pieces(pool_.get(), n, Optimizer::kMinDensePerThread, [&](size_t begin, size_t end) {
    const size_t piece = std::min(pieces - 1, begin * pieces / std::max<size_t>(n, 1));
    std::vector<uint32_t>& owing = owing_[piece];
    owing.clear();
    bool listing = budget > 0;
    constexpr size_t kBlock = 2048;  // x rounded a block at a time, in L1
    alignas(64) float rounded[kBlock];
    double sum = 0;
    size_t nonzero = 0;
    for (size_t block = begin; block < end; block += kBlock) {
      const size_t m = std::min(kBlock, end - block);
      const float* __restrict const xb = x + block;
      const float* __restrict const hb = x_hat + block;
      float* __restrict const ob = owed + block;
      if (format != ValueFormat::kF32) {
        std::copy(xb, xb + m, rounded);
        round_to_half(format, rounded, nullptr, m);
      }
      const float* __restrict const sent = format != ValueFormat::kF32 ? rounded : xb;
      double block_sum = 0;
      uint32_t block_nonzero = 0;
#pragma omp simd reduction(+ : block_sum, block_nonzero)
      for (size_t i = 0; i < m; ++i) {
        const float d = xb[i] - hb[i];
        const float kept = sent[i] != hb[i] ? d : 0.0f;  // 0 when x == x_hat too
        block_sum += static_cast<double>(d) * d;
        ob[i] = kept;
        block_nonzero += kept != 0.0f ? 1 : 0;
      }
      sum += block_sum;
      nonzero += block_nonzero;
      if (listing && block_nonzero > 0) {
        if (nonzero > budget) {
          listing = false;  // a selection will be needed anyway
        } else {
          // 16 keys at a time: owed is +0 or nonzero bits, so one OR tells
          // whether a group holds an owing key (most do not).
          for (size_t g = 0; g < m; g += 16) {
            const size_t group_end = std::min(m, g + 16);
            uint32_t bits = 0;
            for (size_t i = g; i < group_end; ++i) bits |= std::bit_cast<uint32_t>(ob[i]);
            if (bits == 0) continue;
            for (size_t i = g; i < group_end; ++i)
              if (ob[i] != 0.0f) owing.push_back(static_cast<uint32_t>(block + i));
          }
        }
      }
    }
    if (!listing) owing.clear();
    piece_sums[piece].norm_sq += sum;
    piece_sums[piece].nonzero += nonzero;
  });
  double owed_sq = 0;
  size_t nonzero = 0;
  for (const PieceSums& p : piece_sums) {
    owed_sq += p.norm_sq;
    nonzero += p.nonzero;
  }
  // A non-finite x (a diverged model): the workers get it whole, and see
  // (a 16-bit format would saturate it).
  auto publish_whole = [&] {
    std::copy(x, x + n, x_hat);
    change_log_.restart(version_);
    published_version_ = version_;
    out.dense = true;
    out.nnz = n;
    copy_is_exact();
    return out;
  };
  // Keys that owe nothing are never selected. When every owing key fits in
  // the budget they all go, without a selection.
  selected_.clear();
  if (budget > 0 && nonzero <= budget) {
    for (const std::vector<uint32_t>& owing : owing_)
      selected_.indices.insert(selected_.indices.end(), owing.begin(), owing.end());
  } else if (!downlink_->compress(owed_, 1.0f, selected_, version_).ok()) {
    return publish_whole();  // the kernels refuse non-finite input
  }
  for (const uint32_t j : selected_.indices)
    if (!std::isfinite(x[j])) return publish_whole();
  selected_keys_.clear();
  // The owed norm after: owed_sq less what each sent key stops owing (with
  // rounding, a key keeps owing x - round(x)).
  double paid_sq = 0;
  for (const uint32_t j : selected_.indices) {
    if (owed[j] == 0.0f) continue;
    // (owed is 0 where round(x) == x_hat: only rounding was owed)
    const float sent = downlink_values_ == ValueFormat::kF32 ? x[j] : quantise(x[j], downlink_values_);
    const double left = static_cast<double>(x[j]) - sent;
    paid_sq += static_cast<double>(owed[j]) * owed[j] - left * left;
    x_hat[j] = sent;
    selected_keys_.push_back(key_begin_ + j);
  }
  out.nnz = selected_keys_.size();
  out.dense = out.nnz == n;
  if (out.dense)
    change_log_.restart(version_);
  else
    change_log_.add(version_, selected_keys_);
  out.owed_norm = std::sqrt(std::max(0.0, owed_sq - paid_sq));
  published_version_ = version_;
  if (incremental_) {
    // What this publish left owing: the owing keys it did not send.
    for (const uint32_t j : selected_.indices) owed[j] = 0.0f;
    owed_keys_after_full_pass(nonzero - out.nnz);
  }
  return out;
}

// publish() over the keys that may owe (owed_keys_, complete): the same
// selection as the pass over the shard, since every other key owes 0 (f32
// values) or only its rounding (16-bit values: round(x) == x_hat, which the
// pass does not select either; debt_ holds it for the owed norm), top-k
// and threshold never select a 0 when more keys owe than the budget, and
// the candidates are taken in key order, so ties go to the smaller key as
// there. ran = false when a candidate's x is not finite (the caller then
// publishes the whole shard).
Shard::Published Shard::publish_incremental() {
  Published out;
  const float* const x = params_.data();
  float* const x_hat = published_.data();
  // The list is runs of ascending keys (one per update, and what the last
  // publish left owing): merged pairwise, O(m log runs) instead of a sort.
  std::vector<size_t>& runs = owed_runs_;
  while (runs.size() > 1) {
    size_t out_runs = 0;
    for (size_t i = 0; i < runs.size(); i += 2) {
      if (i + 1 < runs.size()) {
        const size_t end = i + 2 < runs.size() ? runs[i + 2] : owed_keys_.size();
        std::inplace_merge(owed_keys_.begin() + static_cast<std::ptrdiff_t>(runs[i]),
                           owed_keys_.begin() + static_cast<std::ptrdiff_t>(runs[i + 1]),
                           owed_keys_.begin() + static_cast<std::ptrdiff_t>(end));
      }
      runs[out_runs++] = runs[i];
    }
    runs.resize(out_runs);
  }
  owed_keys_.erase(std::unique(owed_keys_.begin(), owed_keys_.end()), owed_keys_.end());
  owing_keys_.clear();
  owed_compact_.clear();
  owing_x_.clear();
  const ValueFormat format = downlink_values_;
  const bool rounded = format != ValueFormat::kF32;
  // What sending a key whose x is xj puts into x_hat.
  auto sent = [&](float xj) { return rounded ? quantise(xj, format) : xj; };
  // The keys are scattered over arrays of n floats, so each read is a likely
  // cache miss (the cost of this path at 25M keys): fetch kAhead keys ahead.
  constexpr size_t kAhead = 16;
  const uint32_t* const listed = owed_keys_.data();
  const size_t count = owed_keys_.size();
  // With a threshold, or a top-k budget no smaller than the list, whether a
  // key goes is known when it is read: send it then, while its x_hat is in
  // cache. Else the owing keys are gathered and top-k picks among them.
  const bool decide_now = downlink_k_ == 0 || count <= downlink_k_;
  selected_keys_.clear();
  double left_sq = 0;  // ||x - x_hat||^2 of the keys left owing
  auto send = [&](uint32_t j, float xj) {
    x_hat[j] = sent(xj);
    selected_keys_.push_back(key_begin_ + j);
    if (rounded) {
      debt_[j] = xj - x_hat[j];
      rounding_sq_ += static_cast<double>(debt_[j]) * debt_[j];
    }
  };
  for (size_t i = 0; i < count; ++i) {
    if (i + kAhead < count) {
      const uint32_t ahead = listed[i + kAhead];
      __builtin_prefetch(x + ahead, 0);
      __builtin_prefetch(x_hat + ahead, 1);
      if (rounded) __builtin_prefetch(debt_.data() + ahead, 1);
    }
    const uint32_t j = listed[i];
    const float xj = x[j];
    // A non-finite x: the pass publishes the whole shard instead (so the
    // keys already sent here and the debts changed are all overwritten).
    if (!std::isfinite(xj)) return out;
    if (sent(xj) == x_hat[j]) {
      if (rounded) {  // owes its rounding only: out of the candidates
        debt_[j] = xj - x_hat[j];
        rounding_sq_ += static_cast<double>(debt_[j]) * debt_[j];
      }
      continue;
    }
    const float d = xj - x_hat[j];
    if (!decide_now) {
      owing_keys_.push_back(j);
      owed_compact_.push_back(d);
      owing_x_.push_back(xj);
    } else if (downlink_k_ > 0 || std::fabs(d) >= downlink_lambda_) {
      send(j, xj);
    } else {
      left_sq += static_cast<double>(d) * d;
      owing_keys_.push_back(j);  // stays owing
    }
  }
  out.ran = true;
  out.version = version_;
  out.keys_read = count;
  runs.clear();
  if (decide_now) {
    owed_keys_.swap(owing_keys_);
  } else {
    // Top-k among the owing keys: positions into owing_keys_, ascending.
    const size_t m = owing_keys_.size();
    std::vector<uint32_t>& chosen = compact_selected_.indices;
    chosen.clear();
    if (m <= downlink_k_) {
      for (uint32_t i = 0; i < m; ++i) chosen.push_back(i);
    } else {
      kernels::topk_select(owed_compact_, downlink_k_, compact_selected_, topk_scratch_);
    }
    owed_keys_.clear();
    // The owing keys not sent stay listed (ascending) for the next publish.
    size_t next = 0;  // walks `chosen` alongside the owing keys
    for (uint32_t i = 0; i < m; ++i) {
      if (next < chosen.size() && chosen[next] == i) {
        ++next;
        continue;
      }
      const double d = owed_compact_[i];
      left_sq += d * d;
      owed_keys_.push_back(owing_keys_[i]);
    }
    // The sent ones: only x_hat (and their debt) is touched, ahead again.
    for (size_t c = 0; c < chosen.size(); ++c) {
      if (c + kAhead < chosen.size()) {
        const uint32_t ahead = owing_keys_[chosen[c + kAhead]];
        __builtin_prefetch(x_hat + ahead, 1);
        if (rounded) __builtin_prefetch(debt_.data() + ahead, 1);
      }
      send(owing_keys_[chosen[c]], owing_x_[chosen[c]]);
    }
  }
  if (!owed_keys_.empty()) runs.push_back(0);
  out.nnz = selected_keys_.size();
  out.dense = out.nnz == size();
  if (out.dense)
    change_log_.restart(version_);
  else
    change_log_.add(version_, selected_keys_);
  // (rounding_sq_ is kept by additions and subtractions: never let their
  // rounding make it negative)
  out.owed_norm = std::sqrt(left_sq + std::max(0.0, rounding_sq_));
  published_version_ = version_;
  return out;
}

}  // namespace sps::server
