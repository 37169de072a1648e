// Shard: one contiguous key range of the flat parameter vector, the pushes
// waiting to be applied, the apply rule and a log of recent changes. Pure
// state, no sockets, so the single-process reference run in the tests uses
// exactly this code.
//
// Apply rules (the policy decides which):
// - aggregating (bsp): when every live worker has pushed clock c, the shard
//   sums the pushes in worker-rank order (a fixed order, so reruns agree bit
//   for bit) and hands sum / live to the optimizer; version c -> c+1. The
//   sum is built from the workers' sorted key lists block by block through a
//   small cached buffer (or, for very sparse lists, by merging them), so
//   each pair is read once; a plain-SGD shard applies each block's sums
//   while they are still in cache.
// - on arrival (ssp, asp): each push v goes to the optimizer at once as
//   v / live, one version per push, so W pushes move the model as far as
//   one averaged synchronous step.
// The optimizer (optimizer.h) turns that average into a parameter change:
// plain SGD is x[j] -= a * avg[j], with a = 1 for lr-scaled pushes (the lr
// is inside the values) or lr for gradient pushes.
//
// Staleness of an applied push = shard version when it is applied - the
// version the worker computed it on (base_version). With strict staleness
// (the policy's max_push_staleness) an on-arrival push staler than the
// limit is refused: its clock counts, nothing is applied, and the shard
// remembers it so the worker's next pull can say so.
//
// Compressed pulls (enable_downlink): the shard also keeps x_hat, the copy
// workers pull. publish() moves x_hat toward the parameters x by one
// compressed step, S = select(x - x_hat), x_hat[S] = x[S], at most once per
// version; what it leaves out stays owed in x - x_hat and is sent by a later
// publish (error feedback, on the server). The change log then records
// what publishes changed in x_hat, so sparse pulls carry only S. With f16
// or bf16 values x_hat[S] = round(x[S]): the copy holds exactly what the
// wire carries, and the rounding error stays owed like the rest.
// Not thread-safe: owned by the server's loop thread (which may hand large
// applies to the shard's own pool and waits for them).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/huge_pages.h"
#include "common/status.h"
#include "common/thread_pool.h"
#include "common/value_format.h"
#include "kernels/compressor.h"
#include "protocol/message.h"
#include "scheduler/consistency.h"
#include "server/change_log.h"
#include "server/optimizer.h"

namespace sps::server {

// A push the shard has applied, or refused as too stale.
struct HandledPush {
  uint32_t worker = 0;
  uint64_t clock = 0;
  uint64_t base_version = 0;
  uint64_t version = 0;    // shard version after the apply (unchanged when refused)
  uint64_t staleness = 0;  // version before the apply - base_version
  uint32_t nnz = 0;
  bool refused = false;    // staleness above the policy's max_push_staleness
};

class Shard {
 public:
  // `threads`: how many threads large applies and aggregated sums are split
  // over (0: all cores); the parameters come out bit for bit the same for
  // every count.
  Shard(uint32_t key_begin, uint32_t key_end, uint32_t num_workers, Optimizer optimizer,
        std::unique_ptr<scheduler::ConsistencyPolicy> policy, int threads = 1);

  uint32_t key_begin() const { return key_begin_; }
  uint32_t key_end() const { return key_end_; }
  uint32_t size() const { return key_end_ - key_begin_; }
  uint64_t version() const { return version_; }
  int threads() const { return pool_ ? pool_->size() : 1; }
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
  // The view form takes a validated push (protocol::decode_data against this
  // shard's range) whose arrays live as long as `owner`; the shard keeps
  // `owner` until the push is applied, so nothing is copied. The span form
  // validates and copies (tests, the reference run).
  Status add_push(uint32_t w, uint64_t clock, uint64_t base_version, const protocol::DataView& data,
                  std::shared_ptr<const void> owner);
  Status add_push(uint32_t w, uint64_t clock, uint64_t base_version, std::span<const uint32_t> keys,
                  std::span<const float> values);
  // Whether add_push would take worker w's push for `clock` now.
  bool accepts_push(uint32_t w, uint64_t clock, uint64_t base_version) const {
    return check_push(w, clock, base_version).ok();
  }

  // Compressed pulls from now on: `selection` picks what each publish sends
  // of x - x_hat (its k counts keys of this shard); `values` is the wire
  // format sparse pull answers use (f32, f16 or bf16). x_hat starts as x.
  // Fails on a selection the kernels refuse or a scaled format.
  Status enable_downlink(const kernels::SelectionParams& selection, ValueFormat values = ValueFormat::kF32);
  // The selection downlink.* asks for on a shard of `n` keys.
  static kernels::SelectionParams downlink_selection(const config::DownlinkConfig& d, size_t n);
  // The value format downlink.values names.
  static ValueFormat downlink_values(const config::DownlinkConfig& d);
  bool downlink() const { return downlink_ != nullptr; }
  ValueFormat downlink_values() const { return downlink_values_; }
  // What one publish did.
  struct Published {
    bool ran = false;        // false: x_hat was already at this version (or no downlink)
    bool dense = false;      // everything was sent (a non-finite x, or a dense selection)
    uint64_t version = 0;
    size_t nnz = 0;          // keys of x_hat changed (a key whose rounded value is unchanged is not sent)
    double owed_norm = 0;    // ||x - x_hat|| after the publish
    size_t keys_read = 0;    // keys it read: the shard's size, or the tracked ones (its cost)
  };
  // Brings x_hat to the current version by one compressed step (a no-op
  // without a downlink or when it is there already).
  // Cost: with top-k or threshold selection, the shard tracks which keys
  // may owe (those the updates since the last publish changed, plus those
  // it left owing), and a publish reads only them: O(changed keys), not
  // O(shard size). A dense update (Adam, momentum, weight decay, a dense
  // push) or a list longer than size() / 8 falls back to one pass over the
  // shard; so do the other selections (their statistics span every key).
  // Both ways select the same keys. With 16-bit values every other key
  // still owes its rounding error: kept per key (debt_) for the owed norm.
  Published publish();
  // Tests and benchmarks: false makes every publish take the pass over the
  // whole shard, tracking nothing (the results are the same).
  void set_publish_incremental(bool on);
  // What pulls read: x_hat with a downlink, else the parameters.
  std::span<const float> pulled_params() const { return downlink_ ? std::span<const float>(published_) : params(); }

  // Snapshot state (server.cc writes it; restore() reads it back).
  std::span<const float> velocity() const { return optimizer_.velocity(); }
  std::span<const float> second_moment() const { return optimizer_.second_moment(); }
  // Restarts the shard from a snapshot: parameters, optimizer state and
  // version; every worker is live at clock `clock` (the step the whole job
  // resumes from) and the change log starts empty at the version (a
  // restarted worker pulls densely). Fails, changing nothing, on a size mismatch.
  Status restore(std::span<const float> params, std::span<const float> velocity,
                 std::span<const float> second_moment, uint64_t version, uint64_t clock);

  // After restore(): the published copy and its version from the same
  // snapshot, so a resumed job publishes exactly as an uninterrupted one
  // (without this, x_hat restarts as x). Fails, changing nothing, without a
  // downlink, on a size mismatch or a version above the shard's.
  Status restore_published(std::span<const float> published, uint64_t published_version);
  uint64_t published_version() const { return published_version_; }

  // Per worker, the clock of its first push the parameters do not hold yet
  // (a held aggregating push is not held by them), or kWorkerGone for a
  // worker that left the job: with joined_at(), what a snapshot needs so a
  // server replacing this one can restore() and then restore_workers() to
  // take each worker's pushes from exactly there.
  static constexpr uint64_t kWorkerGone = UINT64_MAX;
  std::vector<uint64_t> worker_clocks() const;
  std::span<const uint64_t> joined_at() const { return joined_at_; }
  // After restore(): every worker at its own clock (kWorkerGone: dead) and
  // join clock. Fails, changing nothing, on a size mismatch.
  Status restore_workers(std::span<const uint64_t> clocks, std::span<const uint64_t> joined_at);

  // Aggregating policies: applies every complete clock; returns how many.
  int apply_ready();
  // Worker `w` left the job: its held push is dropped and nobody waits for it.
  void remove_worker(uint32_t w);
  // A new process takes dead worker `w`'s place (two steps, run by the
  // scheduler across every shard so they agree on one start clock):
  // add_worker makes `w` live again at the smallest clock of the other live
  // workers, so it holds nothing back yet and this shard can apply no clock
  // at or after that one without it, and returns that clock; every shard's
  // answer has been collected when set_worker_clock(w, J) moves it to the
  // largest of them, J, where it starts. In between, an aggregating shard
  // waits (a round trip). Returns std::nullopt (and changes nothing) when
  // `w` is out of range or live, or no other worker is.
  std::optional<uint64_t> add_worker(uint32_t w);
  // REQUIRES: w live; `clock` >= its clock (a clock only moves forward).
  Status set_worker_clock(uint32_t w, uint64_t clock);
  // A shard restored from a snapshot older than `w`'s replacement: `w` is
  // live from `clock`, its join, whatever the snapshot held for the dead
  // process (its held push dropped). Fails, changing nothing, when an
  // aggregating shard has applied `clock` already.
  Status restart_worker(uint32_t w, uint64_t clock);
  bool may_answer_pull(uint64_t clock) const;

  // Keys (global) of pulled_params() changed after `since_version`, ascending, into `keys`;
  // false (and `keys` unspecified) when the updates since then changed more
  // than `limit` entries (counting a key once per update), changed every
  // key (dense pushes, momentum), or are older than the change log keeps.
  // Costs time in the changes, not in the shard size.
  bool changed_since(uint64_t since_version, size_t limit, std::vector<uint32_t>& keys) const;
  // pulled_params() at `keys` (global, ascending, in range) into `values`
  // (resized), for a sparse pull answer; on the shard's threads when long.
  void gather(std::span<const uint32_t> keys, std::vector<float>& values) const;

  // Pushes applied or refused since the last take_handled(), in order (for
  // logs and statistics).
  std::vector<HandledPush> take_handled();
  // Whether worker w's push for clock `pull_clock - 1`, the one before its
  // pull for `pull_clock`, was refused as too stale.
  bool push_refused_before(uint32_t w, uint64_t pull_clock) const;

 private:
  struct Pending {
    std::shared_ptr<const void> owner;  // keeps data's arrays alive
    protocol::DataView data;            // global keys; size() == 0 when nothing is held
    std::vector<uint32_t> own_keys;     // the span form's copy
    std::vector<float> own_values;
    uint64_t base_version = 0;
    void clear() {
      owner.reset();
      data = protocol::DataView();
    }
  };
  Status check_push(uint32_t w, uint64_t clock, uint64_t base_version) const;
  void accept(uint32_t w, uint64_t clock);
  void apply_clock();
  void apply_one(uint32_t w);
  // The change log follows x unless a downlink makes it follow x_hat.
  void log_changes(uint64_t version, std::span<const uint32_t> keys);
  void log_dense_change(uint64_t version);

  uint32_t key_begin_;
  uint32_t key_end_;
  Optimizer optimizer_;
  // One worker's held push as a sorted stream of (key, value).
  struct Cursor {
    const uint32_t* keys = nullptr;  // null: dense from `first`
    const float* values = nullptr;
    size_t pos = 0;
    size_t size = 0;
    uint32_t first = 0;
    bool done() const { return pos == size; }
    uint32_t key() const { return keys != nullptr ? keys[pos] : first + static_cast<uint32_t>(pos); }
  };
  // One thread's buffers for summing (a key range of) an aggregated clock.
  struct SumScratch {
    std::vector<uint32_t> keys;  // the merged keys (global), ascending
    std::vector<float> sums;     // their sums; empty when applied block by block
    // sum_by_blocks' per-block sum buffer and its bitmap of touched keys
    // (both all zero between calls): 64 KiB, stays in L2 while a block fills.
    std::vector<float> block_sums;
    std::vector<uint64_t> block_touched;
    std::vector<float> block_out;  // one block's sums in key order
    std::vector<uint32_t> fold_keys;  // sum_by_fold's second buffers
    std::vector<float> fold_sums;
  };
  static constexpr uint32_t kBlockKeys = 16384;
  void merge_mixed(const std::vector<Cursor>& cursors);
  void sum_sparse_clock(uint32_t count, int64_t step);
  bool sum_sparse(std::span<Cursor> cursors, SumScratch& s, bool apply, uint32_t count, int64_t step);
  void sum_by_blocks(std::span<Cursor> cursors, SumScratch& s, size_t total, bool apply, uint32_t count,
                     int64_t step);
  static void sum_by_fold(std::span<const Cursor> cursors, SumScratch& s);
  std::vector<Cursor> cursors_;
  std::vector<std::vector<Cursor>> piece_cursors_;  // per thread: its key range of every cursor
  std::vector<SumScratch> scratch_;                 // per thread
  // Scratch for an aggregated clock: the merged keys (global; empty when the
  // sum is dense) and their sums.
  std::vector<uint32_t> merged_keys_;
  std::vector<float> merged_sums_;
  // Threads for large applies and sums (null: the loop thread alone).
  std::unique_ptr<ThreadPool> pool_;
  std::unique_ptr<scheduler::ConsistencyPolicy> policy_;
  // On huge pages: pushes scatter over the whole shard, and with 4 KiB pages
  // nearly every key of a large shard would also miss the TLB.
  HugePageVector<float> params_;
  // Sparse pulls: the keys each recent update changed, at most size() / 2.
  ChangeLog change_log_;
  std::vector<Pending> pending_;  // per worker: the held (aggregating) or in-flight push
  scheduler::ClockTable pushed_;  // per worker, pushes received
  uint64_t version_ = 0;
  std::vector<HandledPush> handled_;
  // Compressed pulls: x_hat, the version it is at, x - x_hat (scratch) and
  // the selector (a kernels compressor without error feedback: the owed
  // part lives in x - x_hat itself).
  std::unique_ptr<kernels::Compressor> downlink_;
  size_t downlink_k_ = 0;  // the selection's budget (0: threshold, no budget)
  ValueFormat downlink_values_ = ValueFormat::kF32;
  float downlink_lambda_ = 0;  // threshold
  HugePageVector<float> published_;
  uint64_t published_version_ = 0;
  std::vector<float> owed_;
  kernels::SparseVector selected_;
  std::vector<std::vector<uint32_t>> owing_;  // per piece of publish()'s pass: the owing keys, while few
  std::vector<uint32_t> selected_keys_;
  // Incremental publish (see publish()): whether this downlink can use it,
  // and the keys (local, unsorted, maybe repeated) that may owe; complete
  // while every key with x != x_hat is among them.
  Published publish_incremental();
  Published publish_pass();  // the pass over the whole shard
  void track_owed(std::span<const uint32_t> global_keys);
  void owed_keys_unknown();
  void owed_keys_after_full_pass(size_t owing_left);
  void copy_is_exact();  // x_hat == x: nothing owed
  bool publish_incremental_allowed_ = true;
  bool incremental_capable_ = false;  // top-k or threshold
  bool incremental_ = false;          // capable and allowed
  bool dense_since_publish_ = false;  // a dense update since the last publish
  bool owed_keys_complete_ = false;
  std::vector<uint32_t> owed_keys_;
  std::vector<size_t> owed_runs_;  // where each ascending run of owed_keys_ starts
  // 16-bit values: per key outside owed_keys_, its rounding debt x - x_hat
  // (0 for the keys in it), and the sum of their squares.
  HugePageVector<float> debt_;
  double rounding_sq_ = 0;
  std::vector<float> owed_compact_;  // owed values of the owing candidates, in key order
  std::vector<uint32_t> owing_keys_;
  std::vector<float> owing_x_;  // their x, so that sending them reads no x again
  kernels::SparseVector compact_selected_;
  kernels::TopKScratch topk_scratch_;
  // Per worker: the clock of its latest push refused as too stale
  // (kNoClock: none).
  static constexpr uint64_t kNoClock = UINT64_MAX;
  std::vector<uint64_t> refused_clock_;
  // Per worker: the first clock it pushes (0; a worker that took a dead
  // one's place: the clock it joined at). An aggregated clock before it
  // neither waits for nor counts that worker.
  std::vector<uint64_t> joined_at_;
};

}  // namespace sps::server
