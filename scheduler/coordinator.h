// The coordinator (sps-scheduler): membership, rank and key-range
// assignment, the start barrier, heartbeats and dead-node detection, the end
// of the job and its summary. Not on the data path.
//
// Threading: single-threaded; run() owns its socket and returns when the job
// ends. A node is dead when its connection to the scheduler closes before it
// finished (its process exited or was killed: milliseconds) or when it is
// silent for cluster.heartbeat_timeout_ms (a frozen process, a lost network).
// Failure behaviour: a dead worker is announced to the servers (they
// stop waiting for it) and the job goes on while one worker lives; a dead
// server, a startup timeout or a stop signal ends the job with an error
// shutdown to every node.
// Rejoin (cluster.on_worker_loss: continue): a worker that registers while
// the job runs takes the place of a dead worker of its rank. The servers
// each hold it at their slowest live clock (kJoin) and answer with it; the
// largest answer J is where it starts (kJoinAt to every server, echoed),
// and then its start barrier is released with J. No shard can have applied
// clock J before that, so every clock from J on waits for the new worker.
// Server replacement (cluster.on_server_loss: replace): a dead server does
// not end the job; the workers wait while a server that registers in its
// place loads that shard's newest snapshot and reports, per worker, the
// clock of the first push it lacks (kServerRestored). Each worker is then
// sent the new endpoint and its clock (kServerMoved) and sends its pushes
// again from there, from the copies it keeps until a snapshot holds them.
#pragma once

#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>
#include <zmq.hpp>

#include "common/jsonl.h"
#include "common/process.h"
#include "config/config.h"
#include "net/curve.h"
#include "net/link.h"
#include "protocol/message.h"

namespace sps::scheduler {

// The key range [begin, end) of shard `s` of `servers` over `num_params`
// keys: contiguous, covering [0, num_params) with no gap or overlap, sizes
// differing by at most one (exact 64-bit integer math, so no key is lost at
// the top of the range even for num_params = 2^32 - 1).
std::pair<uint32_t, uint32_t> shard_range(uint64_t num_params, uint32_t servers, uint32_t s);

class Coordinator {
 public:
  // Binds the scheduler socket (throws zmq::error_t when it cannot: setup).
  Coordinator(const config::Config& cfg, zmq::context_t& ctx);
  ~Coordinator();
  Coordinator(const Coordinator&) = delete;
  Coordinator& operator=(const Coordinator&) = delete;

  const std::string& endpoint() const { return endpoint_; }
  int port() const;
  // Runs the job to its end; returns the process exit status (0 = success).
  int run();

 private:
  struct Node {
    protocol::Role role = protocol::Role::kWorker;
    uint32_t rank = 0;
    zmq::message_t routing_id;
    std::string endpoint;
    std::string host;
    uint32_t pid = 0;
    bool alive = true;
    bool in_barrier = false;
    bool done = false;
    std::optional<protocol::DoneReport> report;
    std::optional<protocol::ServerReport> server_report;
    // The counters its last heartbeat carried: the summary's figures for a
    // node that died before its final report.
    std::optional<protocol::DoneReport> progress;
    std::optional<protocol::ServerReport> server_progress;
    // Steps per second over the last ≥ kRateWindow seconds of heartbeats
    // (NaN until a window has passed): status.json's rate and ETA.
    double steps_per_second = NAN;
    double rate_since = -1;
    uint64_t rate_from_step = 0;
    double last_seen = 0;
    int fd = -1;                      // its connection to the scheduler, until that closes
    bool connection_closed = false;   // the kernel closed it: the process exited or was killed
    // A worker replacing a dead one: joining until every server has set its
    // start clock (the largest of their answers) and its barrier is released.
    bool joining = false;
    uint64_t join_id = 0;  // in the join messages' base_version: replies to an earlier attempt are stale
    double join_deadline = 0;
    uint64_t join_clock = 0;
    std::set<uint32_t> join_replied;  // servers that answered kJoin, then that echoed kJoinAt
    bool join_clock_sent = false;
    bool join_clock_set = false;  // every server echoed kJoinAt
    // A server replacing a dead one: restoring until it reports kServerRestored
    // (join_deadline bounds that too).
    bool restoring = false;
    // Restored, and told to start these workers at their join clock (they took
    // a dead worker's place after the snapshot): announced once each is echoed.
    std::set<uint32_t> awaiting_join_at;
    std::vector<uint64_t> restored_clocks;  // where each worker resends from
    uint64_t restored_step = 0;
  };

  // Returns true when the socket was read empty (false: stopped at the bound).
  bool drain_messages();
  void handle(const std::string& key, net::Received& received, const protocol::MessageView& m);
  void handle_register(const std::string& key, net::Received& received, const protocol::MessageView& m);
  // A registration after the start: a worker replacing a dead one, or a refusal.
  void handle_rejoin(const std::string& key, net::Received& received, const protocol::RegisterInfo& info);
  Node& add_node(const std::string& key, net::Received& received, const protocol::RegisterInfo& info, uint32_t rank);
  // A server's kJoin answer or kJoinAt echo for worker `rank`.
  void handle_join_reply(Node& server, const protocol::MessageView& m);
  // A server registering after the start: one replacing a dead server, or a refusal.
  void handle_server_rejoin(const std::string& key, net::Received& received, const protocol::RegisterInfo& info);
  // The replacement's kServerRestored: tells every worker where to resend from.
  void handle_server_restored(Node& server, const protocol::MessageView& m);
  // The restored server takes its shard's place: every live worker learns where to resend from.
  void announce_restored(Node& server);
  // Ranks of `role` whose node died and that no live node holds again, ascending.
  std::vector<uint32_t> free_ranks(protocol::Role role) const;
  // Answers a registration it cannot take with the reason (and logs it).
  void refuse_registration(const net::Received& received, const protocol::RegisterInfo& info, const std::string& why);
  // Why a server's registration cannot be taken ("" when it can).
  std::string server_endpoint_refusal(const protocol::RegisterInfo& info) const;
  void release_joined(Node& n);
  // A worker's heartbeat counted `steps` at time `t`: updates its rate.
  static void note_steps(Node& n, double t, uint64_t steps);
  // Seconds until every live worker is done at its current rate; NaN when unknown.
  double eta_seconds() const;
  // checkpoint.every_seconds: names every node a step to snapshot at, one
  // no live worker has reached yet.
  void announce_snapshot_if_due();
  void send_snapshot_at(const Node& n, uint64_t step);
  Node* joining_worker(uint32_t rank);
  void note_closed_connections();
  void check_closed_connections();
  void assign_all();
  void check_barrier();
  void check_liveness();
  void check_done();
  void check_reports();
  void node_died(Node& n, const std::string& why);
  void fail(const std::string& reason);
  void send_to(const Node& n, const protocol::EncodedMessage& m);
  void shutdown_all(bool error, const std::string& reason);
  void write_summary();
  uint32_t live_nodes(protocol::Role role) const;
  // Whether a node of `role` holds `rank` (`live_only`: a live one; a dead
  // worker's rank is free for a replacement).
  bool rank_taken(protocol::Role role, uint32_t rank, bool live_only = false) const;

  // metrics.enabled: the job's state for Prometheus, refreshed every tick.
  struct Metrics;
  void update_metrics();
  // <run>/status.json: the job's state and every node's progress from its
  // heartbeats, rewritten once a second and at the end (what sps-status shows).
  void write_status_if_due(bool now = false);

  config::Config cfg_;
  std::unique_ptr<Metrics> metrics_;
  // security.curve: declared before the socket so it outlives it.
  std::unique_ptr<net::ZapAuthenticator> zap_;
  zmq::socket_t socket_;
  net::ClosedConnections closed_;
  std::string endpoint_;
  JsonlWriter log_;
  Stopwatch clock_;
  std::map<std::string, Node> nodes_;  // by routing id (hex)
  uint32_t workers_registered_ = 0;
  uint32_t servers_registered_ = 0;
  uint64_t num_params_ = 0;
  bool assigned_ = false;
  bool released_ = false;
  double release_time_ = 0;
  bool finishing_ = false;      // all workers done; collecting server reports
  double finish_deadline_ = 0;
  bool finished_ = false;
  int exit_status_ = 0;
  std::string failure_;         // why the job failed, once it has
  bool stopped_ = false;        // it failed because a signal stopped it
  double next_snapshot_at_ = -1;  // clock_ seconds of the next checkpoint.every_seconds announcement
  uint64_t last_announced_step_ = 0;
  double status_written_ = -1;  // clock_ seconds of the last status.json
  bool status_failed_ = false;
  uint64_t malformed_ = 0;
  std::vector<uint32_t> dead_workers_;
  uint64_t last_join_id_ = 0;
  protocol::AssignInfo assignment_;     // what assign_all sent (rank aside)
  nlohmann::json rejoined_ = nlohmann::json::array();  // {rank, step, seconds} per rejoin
  // on_server_loss: replace: when the wait for the dead servers' replacements
  // ends, and why the first of them died.
  double server_wait_deadline_ = 0;
  std::string server_loss_;
  nlohmann::json replaced_servers_ = nlohmann::json::array();  // {rank, step, seconds} per replacement
};

}  // namespace sps::scheduler
