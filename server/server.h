// Server (sps-server): owns one shard, applies pushes, answers pulls and
// enforces the consistency policy for its shard.
//
// Threading: single-threaded; run() owns both sockets (data ROUTER, control
// DEALER to the scheduler). Bad input: a message that fails validation, or a
// push the shard refuses, is counted, logged once per sender and dropped;
// the shard is never touched by a message that failed validation.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <set>
#include <string>

#include <zmq.hpp>

#include "common/histogram.h"
#include "common/jsonl.h"
#include "common/process.h"
#include "config/config.h"
#include "net/curve.h"
#include "net/link.h"
#include "protocol/message.h"
#include "server/metrics.h"
#include "server/shard.h"

namespace sps::server {

struct ServerStats {
  uint64_t pushes_applied = 0;   // pushes applied to the shard
  uint64_t pushes_rejected = 0;  // well-formed pushes the shard refused
  uint64_t pushes_refused_stale = 0;  // strict staleness: too stale to apply
  uint64_t malformed = 0;        // messages that failed validation
  uint64_t pulls_answered = 0;
  uint64_t sparse_pulls = 0;     // of those, answered with changed keys only
  uint64_t bytes_in = 0;
  uint64_t bytes_out = 0;
  double apply_seconds = 0;
  uint64_t snapshots = 0;        // snapshots written
  double snapshot_seconds = 0;   // time spent writing them (the loop waits)
  uint64_t publishes = 0;        // compressed pulls: publishes of x_hat
  uint64_t published_keys = 0;   // keys those publishes sent
  uint64_t publish_keys_read = 0;  // keys they read (the shard, or only the keys that may owe)
  double publish_seconds = 0;    // time spent publishing (the pull waits)
  double owed_norm = 0;          // ||x - x_hat|| after the last publish
  CountHistogram staleness;      // per applied push, in shard versions
  LogHistogram pull_wait;        // per answered pull, seconds held back by the policy
};

class Server {
 public:
  // Binds the data socket and connects to the scheduler (throws on setup errors).
  // `requested_rank` >= 0 asks the scheduler for that shard rank.
  Server(const config::Config& cfg, zmq::context_t& ctx, int requested_rank = -1);
  // Runs until the scheduler ends the job or a stop signal arrives; returns
  // the exit status (0 after a clean job end).
  int run();
  const std::string& endpoint() const { return endpoint_; }
  // Messages queued per data connection before libzmq stops reading it.
  static constexpr int kDataReceiveHighWaterMark = 64;

 private:
  struct PendingPull {
    zmq::message_t routing_id;
    uint32_t worker = 0;
    uint64_t clock = 0;
    bool have_version = false;
    uint64_t worker_version = 0;
    double since = 0;
    bool exact = false;  // kFlagExact: the parameters themselves, not the published copy
  };
  void handle_control(const net::Received& r);
  void handle_data(net::Received& r);
  void count_malformed(const std::string& peer, const Status& why);
  void on_assign(const protocol::AssignInfo& a);
  void answer_pulls();
  void answer_pull(const PendingPull& pull);
  // Logs and counts the pushes the shard applied or refused.
  void record_handled();
  void heartbeat_if_due();
  // Writes the shard when every live worker has passed a multiple of
  // checkpoint.interval or a step the scheduler named (common/snapshot.h).
  void snapshot_if_due();
  // checkpoint.resume: loads this rank's shard from the newest complete
  // snapshot; false (after telling the scheduler) when it cannot.
  bool resume_shard();
  // The scheduler assigned this server a dead server's shard
  // (cluster.on_server_loss: replace): loads that rank's newest snapshot,
  // with each worker's clock, and tells the scheduler (kServerRestored)
  // where each worker's pushes must start again; false (after telling the
  // scheduler why) when it cannot.
  bool restore_replacement();
  // on_server_loss: replace: tells each live worker that the snapshot just
  // written holds its pushes before its clock there, so it can drop them.
  void notify_snapshot(const std::vector<uint64_t>& clocks);
  void send_control(protocol::MessageType type, protocol::Bytes payload = {});
  // Answers (kJoin) or echoes (kJoinAt) the scheduler's join message `m` with `clock`.
  void reply_join(const protocol::MessageView& m, uint64_t clock);
  // kJoin / kJoinAt from the scheduler: a worker replacing a dead one.
  void handle_join(const protocol::MessageView& m);
  void finish(const std::string& reason);
  void send_report();
  protocol::ServerReport stats_report() const;
  // Pushes a worker resends to a server that took a dead one's place come
  // all at once, but an aggregating shard takes a worker's push only for the
  // clock it aggregates: a resent push for a later clock waits here (per
  // worker, in clock order) until the shard gets there. True when parked.
  bool park_if_early(const protocol::Header& h, const protocol::DataView& data, std::shared_ptr<const void> owner,
                     size_t bytes);
  // Feeds parked pushes the shard takes now, applying as it goes.
  void drain_parked();
  struct ParkedPush {
    std::shared_ptr<const void> owner;  // keeps data's arrays alive
    protocol::DataView data;
    uint64_t clock = 0;
    uint64_t base_version = 0;
    size_t bytes = 0;
  };
  std::vector<std::deque<ParkedPush>> parked_;
  size_t parked_bytes_ = 0;

  config::Config cfg_;
  // security.curve: declared before the sockets so the authenticator
  // outlives them (without it, libzmq would admit any CURVE client).
  net::CurveSettings curve_;
  std::unique_ptr<net::ZapAuthenticator> zap_;
  zmq::socket_t data_;
  zmq::socket_t control_;
  // The scheduler's process ended (its kernel closed our connection): no
  // need to wait out cluster.heartbeat_timeout_ms.
  net::ClosedConnections control_closed_;
  std::string endpoint_;
  std::string scheduler_ip_;  // cluster.scheduler_host, resolved once
  bool heard_from_scheduler_ = false;
  JsonlWriter log_;
  Stopwatch clock_;
  std::optional<Shard> shard_;
  int requested_rank_ = -1;
  uint32_t rank_ = 0;
  uint32_t num_workers_ = 0;
  bool initialised_ = false;
  bool replacing_ = false;  // assigned a dead server's shard (kFlagRejoin)
  // Per worker: the routing id its last valid push came from (the
  // snapshot notices go there); empty until it pushed.
  std::vector<zmq::message_t> worker_routes_;
  bool running_ = false;
  bool done_ = false;
  int exit_status_ = 0;
  double last_heartbeat_sent_ = -1e9;
  double last_scheduler_seen_ = 0;
  std::deque<PendingPull> pending_pulls_;
  // Data messages that arrived before our own assignment (a worker learns
  // the shard map at the same moment we do and may be faster): replayed
  // once the shard exists. Bounded in count and bytes; beyond, they count as
  // malformed.
  std::deque<net::Received> early_;
  size_t early_bytes_ = 0;
  static constexpr size_t kMaxEarlyMessages = 4096;
  static constexpr size_t kMaxEarlyBytes = size_t{256} << 20;
  static constexpr size_t kMaxReportedPeers = 1024;
  uint64_t last_snapshot_step_ = 0;
  std::set<uint64_t> snapshot_steps_;  // named by the scheduler (checkpoint.every_seconds), not yet written
  std::set<std::string> reported_peers_;  // malformed senders already logged
  ServerStats stats_;
  std::unique_ptr<ServerMetrics> metrics_;  // metrics.enabled, from the assignment on
  void update_metrics();
  std::vector<uint32_t> changed_keys_;  // scratch for sparse pulls
  std::vector<float> changed_values_;
  protocol::FramePool pool_{16};  // pull responses: frames ZeroMQ adopts without a copy
};

}  // namespace sps::server
