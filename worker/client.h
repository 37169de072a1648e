// PsClient: a worker's connection to the job — the scheduler (registration,
// barrier, heartbeats, end of job) and every server (push, pull).
//
// Blocking calls wait with a poll loop that also sends heartbeats, watches
// the scheduler for an early shutdown and checks the stop flag, so a worker
// never hangs on a dead job: every wait ends in a value or a Status.
// Threading: one thread owns a client and all its sockets.
#pragma once

#include <cstdint>
#include <deque>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <zmq.hpp>

#include "common/process.h"
#include "common/status.h"
#include "common/value_format.h"
#include "config/config.h"
#include "kernels/sparsify.h"
#include "net/curve.h"
#include "net/link.h"
#include "protocol/message.h"

namespace sps::worker {

struct ClientCounters {
  uint64_t bytes_pushed = 0;
  uint64_t bytes_pushed_dense_equivalent = 0;  // what dense pushes of the same shards would cost
  uint64_t bytes_pulled = 0;
  uint64_t sparse_pulls = 0;  // shard pulls answered with changed keys only
  uint64_t nnz_pushed = 0;
  // cluster.on_server_loss: replace: pushes sent again to servers that took
  // a dead one's place (not in bytes_pushed), and their bytes.
  uint64_t pushes_resent = 0;
  uint64_t bytes_resent = 0;
};

// What a pull rewrote in the caller's buffer: whole key ranges (shards that
// answered densely) and single keys (sparse answers), for a GPU worker that
// mirrors the parameters in device memory.
struct PullChanges {
  std::vector<std::pair<uint32_t, uint32_t>> ranges;  // [begin, end)
  std::vector<uint32_t> keys;
  void clear() {
    ranges.clear();
    keys.clear();
  }
};

class PsClient {
 public:
  PsClient(const config::Config& cfg, zmq::context_t& ctx);
  PsClient(const PsClient&) = delete;
  PsClient& operator=(const PsClient&) = delete;

  // Registers as a worker with a model of `num_params` and waits for the
  // assignment (rank, shard map), then connects to every server.
  // `requested_rank` >= 0 asks for that rank (the scheduler refuses a taken one).
  Status register_worker(uint64_t num_params, int requested_rank = -1);
  // Rank 0 only: sends the initial parameters to every shard.
  Status init_params(std::span<const float> params);
  // Enters the start barrier and waits for its release.
  Status start_barrier();
  // This worker replaces a dead worker of its rank in a running job (the
  // scheduler said so with the assignment): it sends no initial parameters
  // and starts at start_clock(), which the barrier's release carries.
  bool rejoining() const { return rejoining_; }
  uint64_t start_clock() const { return start_clock_; }
  // Fetches every shard's parameters for `clock` into `params` (blocks while
  // the consistency policy holds the pull back). After the first pull a
  // server may send only the keys changed since this client's last pull of
  // that shard, so `params` must hold what the previous pull left there.
  // Returns the oldest shard version received.
  // `changes`, when given, receives what this pull wrote.
  // refused_shards() then lists the shards that refused this client's push
  // for clock - 1 as too stale (consistency.max_push_staleness).
  // `exact`: every server answers densely with its parameters themselves,
  // not the copy compressed pulls publish (downlink.*); the next pull is
  // then dense again.
  Result<uint64_t> pull(uint64_t clock, std::span<float> params, PullChanges* changes = nullptr, bool exact = false);
  const std::vector<uint32_t>& refused_shards() const { return refused_shards_; }
  // Pushes a sparse selection (global keys, ascending) tagged with `clock`;
  // each shard's part carries the version of that shard this client last
  // pulled. Every shard receives a message, empty or not, so clocks advance
  // everywhere.
  // Values go out in `values` format (already quantised by the compressor;
  // scaled formats with sel.scale_runs).
  Status push_sparse(uint64_t clock, const kernels::SparseVector& sel, ValueFormat values = ValueFormat::kF32);
  // Pushes the whole vector as dense slices (scaled formats: `scale_runs`
  // over the whole vector).
  Status push_dense(uint64_t clock, std::span<const float> values, ValueFormat format = ValueFormat::kF32,
                    std::span<const ScaleRun> scale_runs = {});
  // Reports the end of this worker's run and waits until the scheduler ends the job.
  Status finish(const protocol::DoneReport& report);
  // Tells the scheduler this worker failed (best effort).
  void report_error(const std::string& what);

  // Messages queued per server before a push waits (a worker has at most a
  // push and a pull request in flight per server; a pushing loop that
  // outruns a server is slowed to its pace instead of queueing without bound).
  static constexpr int kDataSendHighWaterMark = 8;

  uint32_t rank() const { return assign_.rank; }
  const protocol::AssignInfo& assignment() const { return assign_; }
  const ClientCounters& counters() const { return counters_; }
  // The last training batch's loss, for the heartbeats (the scheduler's
  // sps_worker_last_batch_loss metric).
  void note_batch_loss(double loss) { last_batch_loss_ = loss; }
  double last_pull_wait_seconds() const { return last_pull_wait_; }
  // The steps the scheduler named for a snapshot (checkpoint.every_seconds)
  // since the last call, in the order they came.
  std::vector<uint64_t> take_snapshot_steps() { return std::exchange(snapshot_steps_, {}); }

  // For long local work between protocol calls (evaluating a model):
  // reads what the scheduler sent and sends a heartbeat when one is due,
  // without waiting, so the worker is not taken for dead. Errors surface at
  // the next protocol call.
  void keep_alive() { (void)pump_scheduler(0); }

 private:
  // Handles every waiting scheduler message (waiting up to timeout_ms for
  // the first); fails when the job ended with an error, the scheduler went
  // silent, or a stop signal arrived.
  Status pump_scheduler(int timeout_ms);
  Status drain_scheduler();
  Status handle_scheduler_message(const protocol::MessageView& m);
  Status check_alive();
  void heartbeat_if_due();
  Status send_to_server(size_t s, protocol::EncodedMessage&& m);
  // Sends a push and, with cluster.on_server_loss: replace, keeps a copy
  // until a snapshot of that shard holds it.
  Status send_push(size_t s, uint64_t clock, protocol::EncodedMessage&& m);
  zmq::socket_t connect_server(const std::string& endpoint);
  // Sends shard s's pull request for the pull in progress.
  Status request_pull(size_t s);
  // kServerMoved: shard s is served by a new process at `endpoint`, which
  // lacks this worker's pushes from `clock` on: reconnect, send them again,
  // and ask again for the pull in progress.
  Status move_server(size_t s, const std::string& endpoint, uint64_t clock);
  // kSnapshotted: shard s's snapshot holds this worker's pushes before `clock`.
  void drop_retained(size_t s, uint64_t clock);
  Status send_control(protocol::MessageType type, protocol::Bytes payload = {});
  // cluster.link_mbps: waits as long as `bytes` take on the emulated link in
  // one direction, queued behind that direction's earlier transfers.
  void emulate_link(uint64_t bytes, double& link_free_at);

  config::Config cfg_;
  net::CurveSettings curve_;  // security.curve: every socket here is a CURVE client
  zmq::context_t& ctx_;
  zmq::socket_t control_;
  // The scheduler's process ended (its kernel closed our connection): no
  // need to wait out cluster.heartbeat_timeout_ms.
  net::ClosedConnections control_closed_;
  bool scheduler_connection_closed_ = false;
  std::string scheduler_ip_;  // cluster.scheduler_host, resolved once
  bool heard_from_scheduler_ = false;
  std::vector<zmq::socket_t> servers_;
  protocol::AssignInfo assign_;
  ClientCounters counters_;
  Stopwatch clock_;
  double last_heartbeat_sent_ = -1e9;
  double last_scheduler_seen_ = 0;
  bool assigned_ = false;
  bool released_ = false;
  bool rejoining_ = false;
  uint64_t start_clock_ = 0;
  bool shutdown_seen_ = false;
  Status shutdown_status_;  // non-OK when the job ended with an error
  double last_pull_wait_ = 0;
  double uplink_free_at_ = 0;    // emulated link: when each direction is idle again (clock_ seconds)
  double downlink_free_at_ = 0;
  std::vector<uint64_t> versions_;  // per shard: the version last pulled
  std::vector<bool> pulled_;        // per shard: pulled at least once
  // The pull in progress (a replaced server is asked again).
  struct PullInFlight {
    bool active = false;
    uint64_t clock = 0;
    bool exact = false;
    std::vector<bool> got;  // per shard: answered
  };
  PullInFlight pull_;
  // on_server_loss: replace. Per shard, copies of the pushes no snapshot of
  // it holds yet, contiguous in clock and ending at the last push (cleared
  // when over cluster.replay_buffer_mb: a replacement before the next
  // snapshot then fails, saying so).
  struct RetainedPush {
    uint64_t clock = 0;
    protocol::EncodedMessage msg;
  };
  bool retain_ = false;
  std::vector<std::deque<RetainedPush>> retained_;
  uint64_t retained_bytes_ = 0;
  uint64_t next_push_clock_ = 0;  // the clock of this worker's next push
  double last_batch_loss_ = NAN;  // for the heartbeats
  std::vector<uint64_t> snapshot_steps_;  // kSnapshotAt steps not yet taken
  std::vector<uint32_t> refused_shards_;  // the last pull's PUSH_REFUSED flags, ascending
  std::vector<ScaleRun> runs_;  // one shard message's scale runs (reused)
  // Push frames are encoded straight into pooled buffers that ZeroMQ adopts
  // (no copy on send); pull responses decode in place or into the scratch.
  protocol::FramePool pool_{16};
  protocol::DecodeScratch scratch_;
};

}  // namespace sps::worker
