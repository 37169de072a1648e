#include "scheduler/coordinator.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <unistd.h>

#include <fmt/format.h>
#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <spdlog/spdlog.h>

#include "common/histogram.h"
#include "net/address.h"
#include "net/link.h"
#include "net/metrics_http.h"
#include "scheduler/consistency.h"

namespace sps::scheduler {

using protocol::Header;
using protocol::MessageType;
using protocol::Role;

namespace {

void write_file_atomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << text;
  }
  std::filesystem::rename(tmp, path);
}

nlohmann::json finite_or_null(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); }

}  // namespace

struct Coordinator::Metrics {
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
  std::unique_ptr<net::MetricsEndpoint> endpoint;
  // nodes{role, state}: registered, live, dead, done (done: workers only).
  std::map<std::pair<std::string, std::string>, prometheus::Gauge*> nodes;
  prometheus::Gauge* expected_workers = nullptr;
  prometheus::Gauge* expected_servers = nullptr;
  prometheus::Gauge* running = nullptr;
  prometheus::Counter* malformed = nullptr;
  prometheus::Counter* replaced = nullptr;
  prometheus::Counter* servers_replaced = nullptr;
  // Per worker rank, from the heartbeats; a rank's counters add up every
  // process that held it (a dead one's last heartbeat and its replacement's).
  struct WorkerSeries {
    prometheus::Gauge* step = nullptr;
    prometheus::Gauge* loss = nullptr;
    prometheus::Counter* pushed_bytes = nullptr;
    prometheus::Counter* pulled_bytes = nullptr;
    prometheus::Counter* pushed_values = nullptr;
  };
  std::vector<WorkerSeries> workers;
};

namespace {

// prometheus-cpp counters only go up by increments: raise one to a total.
void raise_to(prometheus::Counter& c, double total) {
  if (total > c.Value()) c.Increment(total - c.Value());
}

}  // namespace

Coordinator::Coordinator(const config::Config& cfg, zmq::context_t& ctx)
    : cfg_(cfg), socket_(net::make_socket(ctx, net::SocketKind::kRouter)), closed_(ctx, socket_) {
  if (cfg_.security.curve) {
    auto curve = net::load_curve_settings(cfg_.security.key_file, cfg_.security.server_key_file,
                                          cfg_.security.allowed_keys_file);
    if (!curve.ok()) throw std::runtime_error(curve.status().message());
    auto zap = net::ZapAuthenticator::start(ctx, curve->allowed, "scheduler");
    if (!zap.ok()) throw std::runtime_error(zap.status().message());
    zap_ = std::move(zap).value();
    net::make_curve_server(socket_, *curve);
  }
  auto bind_ip = net::resolve_ipv4(cfg_.cluster.bind_host, "cluster.bind_host");
  if (!bind_ip.ok()) throw std::runtime_error(bind_ip.status().message());
  if (cfg_.cluster.scheduler_port != 0) {
    try {
      endpoint_ = net::bind_tcp(socket_, *bind_ip, cfg_.cluster.scheduler_port);
    } catch (const zmq::error_t& e) {
      throw std::runtime_error(fmt::format("cluster.bind_host, cluster.scheduler_port: cannot bind to {}:{}: {}",
                                           *bind_ip, cfg_.cluster.scheduler_port, e.what()));
    }
  } else {
    auto bound = net::bind_tcp_in_range(socket_, *bind_ip, cfg_.cluster.port_min, cfg_.cluster.port_max);
    if (!bound.ok()) throw std::runtime_error(bound.status().with_context("cluster.bind_host").message());
    endpoint_ = *bound;
  }
  std::filesystem::create_directories(cfg_.run_folder());
  if (cfg_.metrics.enabled) {
    metrics_ = std::make_unique<Metrics>();
    auto& r = *metrics_->registry;
    auto& nodes = prometheus::BuildGauge()
                      .Name("sps_scheduler_nodes")
                      .Help("Nodes of the job by role and state (registered, live, dead, done)")
                      .Register(r);
    for (const char* role : {"worker", "server"})
      for (const char* state : {"registered", "live", "dead", "done"})
        metrics_->nodes[{role, state}] = &nodes.Add({{"role", role}, {"state", state}});
    auto& expected = prometheus::BuildGauge().Name("sps_scheduler_expected_nodes").Help("Nodes the job needs").Register(r);
    metrics_->expected_workers = &expected.Add({{"role", "worker"}});
    metrics_->expected_servers = &expected.Add({{"role", "server"}});
    metrics_->running = &prometheus::BuildGauge()
                             .Name("sps_scheduler_job_running")
                             .Help("1 from the start barrier's release until the job ends")
                             .Register(r)
                             .Add({});
    metrics_->malformed = &prometheus::BuildCounter()
                               .Name("sps_scheduler_malformed_messages_total")
                               .Help("Messages to the scheduler dropped because they failed validation")
                               .Register(r)
                               .Add({});
    metrics_->replaced = &prometheus::BuildCounter()
                              .Name("sps_scheduler_workers_replaced_total")
                              .Help("Dead workers whose place a new process took while the job ran")
                              .Register(r)
                              .Add({});
    metrics_->servers_replaced = &prometheus::BuildCounter()
                                      .Name("sps_scheduler_servers_replaced_total")
                                      .Help("Dead servers whose shard a new process restored while the job ran")
                                      .Register(r)
                                      .Add({});
    auto& step = prometheus::BuildGauge()
                     .Name("sps_worker_step")
                     .Help("Steps the worker has pushed (its next clock), from its last heartbeat")
                     .Register(r);
    auto& loss = prometheus::BuildGauge()
                     .Name("sps_worker_last_batch_loss")
                     .Help("Loss of the worker's last training batch, from its last heartbeat")
                     .Register(r);
    auto& pushed = prometheus::BuildCounter()
                       .Name("sps_worker_pushed_bytes_total")
                       .Help("Protocol bytes the worker pushed, from its heartbeats")
                       .Register(r);
    auto& pulled = prometheus::BuildCounter()
                       .Name("sps_worker_pulled_bytes_total")
                       .Help("Protocol bytes the worker pulled, from its heartbeats")
                       .Register(r);
    auto& values = prometheus::BuildCounter()
                       .Name("sps_worker_pushed_values_total")
                       .Help("Values (nonzeros) the worker pushed, from its heartbeats")
                       .Register(r);
    for (int rank = 0; rank < cfg_.cluster.num_workers; ++rank) {
      const prometheus::Labels l = {{"rank", std::to_string(rank)}};
      metrics_->workers.push_back(
          {&step.Add(l), &loss.Add(l), &pushed.Add(l), &pulled.Add(l), &values.Add(l)});
      metrics_->workers.back().loss->Set(NAN);
    }
    auto ep = net::MetricsEndpoint::start(cfg_.metrics.bind_host, cfg_.metrics.port, metrics_->registry);
    if (!ep.ok()) throw std::runtime_error(ep.status().message());
    metrics_->endpoint = std::move(ep).value();
    write_file_atomically(cfg_.run_folder() + "/metrics-scheduler.url", metrics_->endpoint->url() + "\n");
    spdlog::info("scheduler: metrics on {}", metrics_->endpoint->url());
  }
  auto log = JsonlWriter::open(cfg_.run_folder() + "/scheduler.jsonl", cfg_.checkpoint.resume);
  if (log.ok()) log_ = std::move(log).value();
  log_.write({{"event", "start"}, {"endpoint", endpoint_}, {"config", config::to_json(cfg_)}});
  // The launcher waits for this file to learn the port; write it last and atomically.
  write_file_atomically(cfg_.run_folder() + "/scheduler.port", std::to_string(port()) + "\n");
}

Coordinator::~Coordinator() = default;

int Coordinator::port() const {
  const auto colon = endpoint_.rfind(':');
  return std::stoi(endpoint_.substr(colon + 1));
}

bool Coordinator::rank_taken(protocol::Role role, uint32_t rank, bool live_only) const {
  for (const auto& [k, node] : nodes_)
    if (node.role == role && node.rank == rank && (node.alive || !live_only)) return true;
  return false;
}

void Coordinator::update_metrics() {
  if (!metrics_) return;
  std::map<std::pair<std::string, std::string>, double> count;
  for (const auto& [k, n] : nodes_) {
    const std::string role = n.role == Role::kWorker ? "worker" : "server";
    count[{role, "registered"}] += 1;
    count[{role, n.alive ? "live" : "dead"}] += 1;
    if (n.done) count[{role, "done"}] += 1;
  }
  for (auto& [key, g] : metrics_->nodes) g->Set(count[key]);
  metrics_->expected_workers->Set(cfg_.cluster.num_workers);
  metrics_->expected_servers->Set(cfg_.cluster.num_servers);
  metrics_->running->Set(released_ && !finished_ ? 1 : 0);
  raise_to(*metrics_->malformed, static_cast<double>(malformed_));
  raise_to(*metrics_->replaced, static_cast<double>(rejoined_.size()));
  raise_to(*metrics_->servers_replaced, static_cast<double>(replaced_servers_.size()));

  const size_t ranks = metrics_->workers.size();
  std::vector<protocol::DoneReport> sum(ranks);
  std::vector<const protocol::DoneReport*> current(ranks, nullptr);  // the live process's, else the last one's
  std::vector<bool> current_alive(ranks, false);
  for (const auto& [k, n] : nodes_) {
    if (n.role != Role::kWorker || n.rank >= ranks) continue;
    const protocol::DoneReport* r = n.report ? &*n.report : n.progress ? &*n.progress : nullptr;
    if (r == nullptr) continue;
    sum[n.rank].bytes_pushed += r->bytes_pushed;
    sum[n.rank].bytes_pulled += r->bytes_pulled;
    sum[n.rank].nnz_pushed += r->nnz_pushed;
    const bool newer = current[n.rank] == nullptr || n.alive ||
                       (!current_alive[n.rank] && r->steps >= current[n.rank]->steps);
    if (newer) {
      current[n.rank] = r;
      current_alive[n.rank] = n.alive;
    }
  }
  for (size_t rank = 0; rank < ranks; ++rank) {
    auto& series = metrics_->workers[rank];
    raise_to(*series.pushed_bytes, static_cast<double>(sum[rank].bytes_pushed));
    raise_to(*series.pulled_bytes, static_cast<double>(sum[rank].bytes_pulled));
    raise_to(*series.pushed_values, static_cast<double>(sum[rank].nnz_pushed));
    if (current[rank] == nullptr) continue;
    series.step->Set(static_cast<double>(current[rank]->steps));
    if (std::isfinite(current[rank]->last_batch_loss)) series.loss->Set(current[rank]->last_batch_loss);
  }
}

uint32_t Coordinator::live_nodes(Role role) const {
  uint32_t n = 0;
  for (const auto& [k, node] : nodes_) n += (node.role == role && node.alive) ? 1 : 0;
  return n;
}

void Coordinator::send_to(const Node& n, const protocol::EncodedMessage& m) {
  auto r = net::send(socket_, m, &n.routing_id);
  if (!r.ok()) spdlog::warn("scheduler: cannot reach {} {}: {}", n.role == Role::kWorker ? "worker" : "server", n.rank,
                            r.status().message());
}

int Coordinator::run() {
  spdlog::info("scheduler: listening on {}, waiting for {} servers and {} workers", endpoint_,
               cfg_.cluster.num_servers, cfg_.cluster.num_workers);
  const auto tick = std::chrono::milliseconds(std::min(100, cfg_.cluster.heartbeat_ms));
  while (!finished_) {
    if (stop_requested()) {
      fail("stopped");
      break;
    }
    (void)net::wait_readable({&socket_, &closed_.socket()}, tick);
    note_closed_connections();
    // A closed connection is acted on only after the socket was read empty:
    // what the node sent before it closed (its done report) comes first.
    if (drain_messages() && !finished_) check_closed_connections();
    if (!finished_) check_liveness();
    if (finishing_ && !finished_) check_reports();
    if (!finished_) announce_snapshot_if_due();
    update_metrics();
    write_status_if_due();
  }
  update_metrics();
  write_status_if_due(true);
  return exit_status_;
}

void Coordinator::note_steps(Node& n, double t, uint64_t steps) {
  constexpr double kRateWindow = 2.0;  // long enough that one late heartbeat barely moves it
  if (n.rate_since < 0 || steps < n.rate_from_step) {
    n.rate_since = t;
    n.rate_from_step = steps;
  } else if (t - n.rate_since >= kRateWindow) {
    n.steps_per_second = static_cast<double>(steps - n.rate_from_step) / (t - n.rate_since);
    n.rate_since = t;
    n.rate_from_step = steps;
  }
}

double Coordinator::eta_seconds() const {
  if (!released_) return NAN;
  double eta = 0;
  for (const auto& [k, n] : nodes_) {
    if (n.role != Role::kWorker || !n.alive || n.done) continue;
    if (!n.progress || !(n.steps_per_second > 0)) return NAN;
    const double left = static_cast<double>(cfg_.training.steps) - static_cast<double>(n.progress->steps);
    eta = std::max(eta, std::max(0.0, left) / n.steps_per_second);
  }
  return eta;
}

void Coordinator::send_snapshot_at(const Node& n, uint64_t step) {
  Header h;
  h.type = MessageType::kSnapshotAt;
  h.clock = step;
  send_to(n, protocol::encode_control(h));
}

void Coordinator::announce_snapshot_if_due() {
  const double every = cfg_.checkpoint.every_seconds;
  if (every <= 0 || !released_ || finishing_) return;
  const double t = clock_.seconds();
  if (next_snapshot_at_ < 0) next_snapshot_at_ = release_time_ + every;
  if (t < next_snapshot_at_) return;
  // Ahead of every live worker by what the fastest can do before the
  // message reaches it: its last heartbeat is up to one period old.
  uint64_t ahead = 0;
  double fastest = 0;
  for (const auto& [k, n] : nodes_) {
    if (n.role != Role::kWorker || !n.alive || n.done) continue;
    if (!n.progress || !(n.steps_per_second >= 0)) return;  // rates need 2 s of heartbeats: next tick
    ahead = std::max(ahead, n.progress->steps);
    fastest = std::max(fastest, n.steps_per_second);
  }
  const double lead_seconds = 2.0 * cfg_.cluster.heartbeat_ms / 1000.0 + 0.5;
  const uint64_t step = std::max(ahead + static_cast<uint64_t>(std::ceil(fastest * lead_seconds)) + 1,
                                 last_announced_step_ + 1);
  next_snapshot_at_ = t + every;
  if (step >= static_cast<uint64_t>(cfg_.training.steps)) return;  // the job ends first
  last_announced_step_ = step;
  // A joining worker hears of it when released (release_joined), if it starts before it.
  for (const auto& [k, n] : nodes_)
    if (n.alive && !n.joining) send_snapshot_at(n, step);
  log_.write({{"event", "snapshot_at"}, {"step", step}, {"ahead_of", ahead}});
  spdlog::info("scheduler: snapshot at step {} (checkpoint.every_seconds {})", step, every);
}

void Coordinator::write_status_if_due(bool now) {
  const double t = clock_.seconds();
  if (!now && status_written_ >= 0 && t - status_written_ < 1.0) return;
  status_written_ = t;
  const char* state = finished_ ? (exit_status_ == 0 ? "finished" : stopped_ ? "stopped" : "failed")
                      : finishing_ ? "finishing"
                      : released_  ? "training"
                                   : "starting";
  nlohmann::json workers = nlohmann::json::array(), servers = nlohmann::json::array();
  for (const auto& [k, n] : nodes_) {
    nlohmann::json node = {{"rank", n.rank},      {"alive", n.alive},
                           {"host", n.host},      {"pid", n.pid},
                           {"heard_seconds_ago", std::max(0.0, t - n.last_seen)}};
    if (n.role == Role::kWorker) {
      const protocol::DoneReport* r = n.report ? &*n.report : n.progress ? &*n.progress : nullptr;
      node["done"] = n.done;
      node["joining"] = n.joining;
      if (r != nullptr) {
        node["step"] = r->steps;
        node["steps_per_second"] = finite_or_null(n.done ? NAN : n.steps_per_second);
        node["last_batch_loss"] = finite_or_null(r->last_batch_loss);
        node["bytes_pushed"] = r->bytes_pushed;
        node["bytes_pulled"] = r->bytes_pulled;
      }
      workers.push_back(std::move(node));
    } else {
      const protocol::ServerReport* r = n.server_report ? &*n.server_report : n.server_progress ? &*n.server_progress : nullptr;
      node["restoring"] = n.restoring;
      node["done"] = n.server_report.has_value();  // sent its final statistics
      if (r != nullptr) {
        node["version"] = r->version;
        node["pushes_applied"] = r->pushes_applied;
        node["pulls_answered"] = r->pulls_answered;
        node["bytes_in"] = r->bytes_in;
        node["bytes_out"] = r->bytes_out;
      }
      servers.push_back(std::move(node));
    }
  }
  const auto by_rank = [](const nlohmann::json& a, const nlohmann::json& b) { return a["rank"] < b["rank"]; };
  std::stable_sort(workers.begin(), workers.end(), by_rank);
  std::stable_sort(servers.begin(), servers.end(), by_rank);
  const nlohmann::json status = {
      {"run", cfg_.run.name},
      {"state", state},
      {"failure", failure_.empty() ? nlohmann::json(nullptr) : nlohmann::json(failure_)},
      {"seconds", t},
      {"written_at", std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count()},
      {"train_seconds", released_ ? t - release_time_ : 0.0},
      {"eta_seconds", finite_or_null(finished_ || finishing_ ? 0.0 : eta_seconds())},
      {"steps", cfg_.training.steps},
      {"consistency", make_policy(cfg_.consistency)->name()},
      {"num_workers", cfg_.cluster.num_workers},
      {"num_servers", cfg_.cluster.num_servers},
      {"heartbeat_ms", cfg_.cluster.heartbeat_ms},
      {"workers", workers},
      {"servers", servers},
      {"dead_workers", dead_workers_},
      {"rejoined_workers", rejoined_},
      {"replaced_servers", replaced_servers_},
  };
  const std::string text = status.dump(1) + "\n";
  if (metrics_ && metrics_->endpoint) metrics_->endpoint->publish("/status", text);
  try {
    write_file_atomically(cfg_.run_folder() + "/status.json", text);
  } catch (const std::exception& e) {  // the job goes on without it
    if (!status_failed_) spdlog::warn("scheduler: cannot write status.json: {}", e.what());
    status_failed_ = true;
  }
}

bool Coordinator::drain_messages() {
  // Bounded so timers still run under a flood.
  for (int i = 0; i < 1000 && !finished_; ++i) {
    auto r = net::try_recv(socket_, /*routed=*/true);
    if (!r) return true;
    const std::string key = net::routing_id_hex(r->routing_id);
    auto m = net::decode(*r);
    if (!m.ok()) {
      ++malformed_;
      log_.write({{"event", "malformed"}, {"peer", key}, {"error", m.status().message()}, {"count", malformed_}});
      continue;
    }
    handle(key, *r, *m);
  }
  return false;
}

void Coordinator::note_closed_connections() {
  for (int fd : closed_.take()) {
    for (auto& [k, n] : nodes_) {
      if (n.fd != fd) continue;
      n.fd = -1;
      n.connection_closed = true;
    }
  }
}

void Coordinator::check_closed_connections() {
  for (auto& [k, n] : nodes_) {
    // Done workers and servers shutting down close their connections as they exit.
    if (!n.connection_closed || !n.alive || n.done || finishing_ || finished_) continue;
    node_died(n, "its connection to the scheduler closed: the process exited or was killed");
  }
}

void Coordinator::handle(const std::string& key, net::Received& received, const protocol::MessageView& m) {
  if (m.header.type == MessageType::kRegister) {
    handle_register(key, received, m);
    return;
  }
  auto it = nodes_.find(key);
  if (it == nodes_.end()) {
    ++malformed_;
    log_.write({{"event", "unknown_peer"}, {"peer", key}, {"type", protocol::message_type_name(m.header.type)}});
    return;
  }
  Node& n = it->second;
  n.last_seen = clock_.seconds();
  switch (m.header.type) {
    case MessageType::kHeartbeat: {
      if (!m.frame1.empty()) {
        if (n.role == Role::kWorker) {
          auto d = protocol::decode_done(m.frame1);
          if (d.ok()) {
            n.progress = *d;
            note_steps(n, clock_.seconds(), d->steps);
          } else {
            ++malformed_;
          }
        } else {
          auto r = protocol::decode_server_report(m.frame1);
          if (r.ok()) n.server_progress = *r; else ++malformed_;
        }
      }
      Header h;
      h.type = MessageType::kHeartbeat;
      send_to(n, protocol::encode_control(h));
      break;
    }
    case MessageType::kBarrier:
      n.in_barrier = true;
      check_barrier();
      release_joined(n);
      break;
    case MessageType::kJoin:
    case MessageType::kJoinAt:
      handle_join_reply(n, m);
      break;
    case MessageType::kServerRestored:
      handle_server_restored(n, m);
      break;
    case MessageType::kDone: {
      auto d = protocol::decode_done(m.frame1);
      if (!d.ok() || n.role != Role::kWorker) {
        ++malformed_;
        break;
      }
      n.done = true;
      n.report = *d;
      log_.write({{"event", "worker_done"}, {"rank", n.rank}, {"steps", d->steps}, {"bytes_pushed", d->bytes_pushed}});
      check_done();
      break;
    }
    case MessageType::kServerReport: {
      auto r = protocol::decode_server_report(m.frame1);
      if (!r.ok() || n.role != Role::kServer) {
        ++malformed_;
        break;
      }
      n.server_report = *r;
      check_reports();
      break;
    }
    case MessageType::kError: {
      auto text = protocol::decode_text(m.frame1);
      fail(fmt::format("{} {} reported an error: {}", n.role == Role::kWorker ? "worker" : "server", n.rank,
                       text.ok() ? *text : std::string("<unreadable>")));
      break;
    }
    default:
      ++malformed_;
      log_.write({{"event", "unexpected"}, {"peer", key}, {"type", protocol::message_type_name(m.header.type)}});
  }
}

void Coordinator::handle_register(const std::string& key, net::Received& received, const protocol::MessageView& m) {
  zmq::message_t& routing_id = received.routing_id;
  auto info = protocol::decode_register(m.frame1);
  Header err;
  err.type = MessageType::kError;
  if (!info.ok()) {
    ++malformed_;
    auto msg = protocol::encode_control(err, protocol::encode_text(info.status().message()));
    (void)net::send(socket_, msg, &routing_id);
    return;
  }
  const bool worker = info->role == Role::kWorker;
  if (assigned_ && nodes_.count(key) == 0) {
    if (worker) {
      handle_rejoin(key, received, *info);
    } else {
      handle_server_rejoin(key, received, *info);
    }
    return;
  }
  const uint32_t have = worker ? workers_registered_ : servers_registered_;
  const uint32_t want = static_cast<uint32_t>(worker ? cfg_.cluster.num_workers : cfg_.cluster.num_servers);
  std::string refusal;
  if (assigned_ || nodes_.count(key) != 0) refusal = "registration is closed (the job has started)";
  else if (have >= want) refusal = fmt::format("the job already has {} {}s", want, worker ? "worker" : "server");
  else if (worker && info->num_params == 0) refusal = "a worker must report a model size > 0";
  else if (worker && info->num_params > UINT32_MAX)
    refusal = fmt::format("a model of {} parameters is too large: sps keys are 32-bit", info->num_params);
  else if (worker && info->num_params < static_cast<uint64_t>(cfg_.cluster.num_servers))
    refusal = fmt::format("a model of {} parameters cannot be split over {} servers (cluster.num_servers)",
                          info->num_params, cfg_.cluster.num_servers);
  else if (worker && num_params_ != 0 && info->num_params != num_params_)
    refusal = fmt::format("model size {} differs from the first worker's {}", info->num_params, num_params_);
  else if (!worker && !server_endpoint_refusal(*info).empty()) refusal = server_endpoint_refusal(*info);
  else if (info->requested_rank >= static_cast<int32_t>(want))
    refusal = fmt::format("requested rank {} but the job has {} {}s", info->requested_rank, want,
                          worker ? "worker" : "server");
  else if (info->requested_rank >= 0 && rank_taken(info->role, static_cast<uint32_t>(info->requested_rank)))
    refusal = fmt::format("rank {} is already taken", info->requested_rank);
  if (!refusal.empty()) {
    spdlog::warn("scheduler: refused registration from {} (pid {}): {}", info->host, info->pid, refusal);
    auto msg = protocol::encode_control(err, protocol::encode_text(refusal));
    (void)net::send(socket_, msg, &routing_id);
    return;
  }
  // A requested rank (the launcher passes each process its index) is kept;
  // otherwise the smallest free rank is given.
  uint32_t rank = 0;
  if (info->requested_rank >= 0) {
    rank = static_cast<uint32_t>(info->requested_rank);
  } else {
    while (rank_taken(info->role, rank)) ++rank;
  }
  Node& n = add_node(key, received, *info, rank);
  if (worker) {
    ++workers_registered_;
    num_params_ = info->num_params;
  } else {
    ++servers_registered_;
  }
  log_.write({{"event", "register"}, {"role", worker ? "worker" : "server"}, {"rank", n.rank}, {"host", n.host},
              {"pid", n.pid}, {"endpoint", n.endpoint}});
  spdlog::info("scheduler: {} {} registered (host {}, pid {}{}{})", worker ? "worker" : "server", n.rank, n.host,
               n.pid, worker ? "" : ", data ", n.endpoint);
  if (workers_registered_ == static_cast<uint32_t>(cfg_.cluster.num_workers) &&
      servers_registered_ == static_cast<uint32_t>(cfg_.cluster.num_servers))
    assign_all();
}

Coordinator::Node& Coordinator::add_node(const std::string& key, net::Received& received,
                                         const protocol::RegisterInfo& info, uint32_t rank) {
  Node n;
  n.role = info.role;
  n.rank = rank;
  n.routing_id = std::move(received.routing_id);
  n.endpoint = info.endpoint;
  n.host = info.host;
  n.pid = info.pid;
  n.last_seen = clock_.seconds();
  // A connection that closed before this one opened may have had the same
  // descriptor: its event was posted before the descriptor was free again,
  // so taking the events now keeps it from being pinned on this node.
  note_closed_connections();
  n.fd = net::source_fd(received);
  // An open descriptor names one connection; should an event ever be missed,
  // the older node falls back to the heartbeat timeout rather than this one dying.
  for (auto& [k, other] : nodes_)
    if (other.fd == n.fd) other.fd = -1;
  return nodes_.emplace(key, std::move(n)).first->second;
}

void Coordinator::refuse_registration(const net::Received& received, const protocol::RegisterInfo& info,
                                      const std::string& why) {
  spdlog::warn("scheduler: refused registration from {} (pid {}): {}", info.host, info.pid, why);
  Header err;
  err.type = MessageType::kError;
  (void)net::send(socket_, protocol::encode_control(err, protocol::encode_text(why)), &received.routing_id);
}

std::string Coordinator::server_endpoint_refusal(const protocol::RegisterInfo& info) const {
  if (info.endpoint.empty()) return "a server must report its data endpoint";
  auto ep = net::parse_tcp_endpoint(info.endpoint);
  if (!ep.ok()) return fmt::format("the data endpoint '{}' is not tcp://host:port", info.endpoint);
  if (net::is_wildcard_host(ep->host))
    return fmt::format("the data endpoint '{}' is a wildcard address that workers cannot connect to; set "
                       "cluster.advertise_host",
                       info.endpoint);
  return "";
}

std::vector<uint32_t> Coordinator::free_ranks(Role role) const {
  std::vector<uint32_t> ranks;
  for (const auto& [k, n] : nodes_)
    if (n.role == role && !n.alive && !rank_taken(role, n.rank, true)) ranks.push_back(n.rank);
  std::sort(ranks.begin(), ranks.end());
  ranks.erase(std::unique(ranks.begin(), ranks.end()), ranks.end());
  return ranks;
}

void Coordinator::handle_server_rejoin(const std::string& key, net::Received& received,
                                       const protocol::RegisterInfo& info) {
  const std::vector<uint32_t> free = free_ranks(Role::kServer);
  const bool any_rank = info.requested_rank < 0;
  const auto wanted = static_cast<uint32_t>(info.requested_rank);
  std::string refusal;
  if (!released_) refusal = "registration is closed (the job is starting)";
  else if (finishing_) refusal = "registration is closed (the job is finishing)";
  else if (cfg_.cluster.on_server_loss != config::ServerLoss::kReplace)
    refusal = "registration is closed (the job has started; with cluster.on_server_loss: replace a new server can "
              "take a dead server's place)";
  else if (!server_endpoint_refusal(info).empty()) refusal = server_endpoint_refusal(info);
  else if (!any_rank && wanted >= static_cast<uint32_t>(cfg_.cluster.num_servers))
    refusal = fmt::format("requested rank {} but the job has {} servers", wanted, cfg_.cluster.num_servers);
  else if (!any_rank && rank_taken(Role::kServer, wanted, true))
    refusal = fmt::format("rank {} is already taken (server {} is alive)", wanted, wanted);
  else if (free.empty()) refusal = fmt::format("the job already has its {} servers, all alive", cfg_.cluster.num_servers);
  if (!refusal.empty()) {
    refuse_registration(received, info, refusal);
    return;
  }
  const uint32_t rank = any_rank ? free.front() : wanted;
  Node& n = add_node(key, received, info, rank);
  n.restoring = true;
  n.in_barrier = true;  // it starts running at once, past the start barrier
  n.join_deadline = clock_.seconds() + cfg_.cluster.startup_timeout_ms / 1000.0;
  log_.write({{"event", "register"}, {"role", "server"}, {"rank", rank}, {"host", n.host}, {"pid", n.pid},
              {"endpoint", n.endpoint}, {"rejoin", true}});
  spdlog::info("scheduler: server {} registered again (host {}, pid {}, data {}): it takes the dead server's place",
               rank, n.host, n.pid, n.endpoint);
  protocol::AssignInfo a = assignment_;
  a.rank = rank;
  a.shards[rank].endpoint = n.endpoint;
  Header h;
  h.type = MessageType::kAssign;
  h.flags = protocol::kFlagRejoin;
  send_to(n, protocol::encode_control(h, protocol::encode_assign(a)));
}

void Coordinator::handle_server_restored(Node& server, const protocol::MessageView& m) {
  auto clocks = protocol::decode_clocks(m.frame1);
  if (server.role != Role::kServer || !server.restoring || !server.awaiting_join_at.empty() || !clocks.ok() ||
      clocks->size() != static_cast<size_t>(assignment_.num_workers)) {
    ++malformed_;
    log_.write({{"event", "unexpected"}, {"rank", server.rank}, {"type", protocol::message_type_name(m.header.type)}});
    return;
  }
  server.restored_step = m.header.clock;
  server.restored_clocks = std::move(clocks).value();
  log_.write({{"event", "server_restored"}, {"rank", server.rank}, {"step", server.restored_step},
              {"version", m.header.base_version}, {"worker_clocks", server.restored_clocks}});
  // A worker that took a dead worker's place after the snapshot pushed
  // nothing before its join clock, and holds its pushes from there: the
  // shard starts it there. What the dead process pushed to this shard after
  // the snapshot is lost, as its residual was.
  std::map<uint32_t, uint64_t> joined;
  for (const auto& r : rejoined_) {
    const uint32_t rank = r["rank"];
    joined[rank] = std::max<uint64_t>(joined[rank], r["step"].get<uint64_t>());
  }
  for (const auto& [rank, at] : joined) {
    const uint64_t from = server.restored_clocks[rank];
    if (!rank_taken(Role::kWorker, rank, true) || (from != protocol::kWorkerGone && from >= at)) continue;
    Header h;
    h.type = MessageType::kJoinAt;
    h.flags = protocol::kFlagRejoin;
    h.clock = at;
    h.base_version = 0;  // no join attempt: join ids start at 1
    send_to(server, protocol::encode_control(h, protocol::encode_rank(rank)));
    server.awaiting_join_at.insert(rank);
    server.restored_clocks[rank] = at;
    spdlog::warn("scheduler: server {}'s newest snapshot (step {}) is older than worker {}'s replacement, which "
                 "joined at step {}: the shard starts it there (the dead worker's pushes to this shard since the "
                 "snapshot are lost)",
                 server.rank, server.restored_step, rank, at);
  }
  if (server.awaiting_join_at.empty()) announce_restored(server);
}

void Coordinator::announce_restored(Node& server) {
  server.restoring = false;
  assignment_.shards[server.rank].endpoint = server.endpoint;
  // Workers that died since the snapshot: the restored shard must not wait for them.
  Header dead;
  dead.type = MessageType::kNodeDead;
  for (const uint32_t rank : free_ranks(Role::kWorker)) send_to(server, protocol::encode_control(dead, protocol::encode_rank(rank)));
  uint32_t resending = 0;
  for (const auto& [k, w] : nodes_) {
    if (w.role != Role::kWorker || !w.alive || server.restored_clocks[w.rank] == protocol::kWorkerGone) continue;
    Header h;
    h.type = MessageType::kServerMoved;
    h.shard = server.rank;
    h.clock = server.restored_clocks[w.rank];
    send_to(w, protocol::encode_control(h, protocol::encode_text(server.endpoint)));
    ++resending;
  }
  // The newest named step, which it may not have heard of (it would skip one it passed).
  if (last_announced_step_ > server.restored_step) send_snapshot_at(server, last_announced_step_);
  const uint64_t step = server.restored_step;
  const double at = clock_.seconds();
  replaced_servers_.push_back({{"rank", server.rank}, {"step", step}, {"seconds", at}});
  log_.write({{"event", "server_replaced"}, {"rank", server.rank}, {"step", step},
              {"worker_clocks", server.restored_clocks}});
  spdlog::info("scheduler: server {} took the dead server's place from its snapshot of step {}; {} workers resend "
               "their pushes since",
               server.rank, step, resending);
  if (free_ranks(Role::kServer).empty()) {
    server_wait_deadline_ = 0;
    server_loss_.clear();
  }
}

Coordinator::Node* Coordinator::joining_worker(uint32_t rank) {
  for (auto& [k, n] : nodes_)
    if (n.role == Role::kWorker && n.rank == rank && n.alive && n.joining) return &n;
  return nullptr;
}

void Coordinator::handle_rejoin(const std::string& key, net::Received& received, const protocol::RegisterInfo& info) {
  // Ranks whose worker died and that no live worker holds again.
  const std::vector<uint32_t> free_ranks = this->free_ranks(Role::kWorker);
  bool server_missing = !this->free_ranks(Role::kServer).empty();
  for (const auto& [k, n] : nodes_) server_missing = server_missing || n.restoring;
  const bool any_rank = info.requested_rank < 0;
  const auto wanted = static_cast<uint32_t>(info.requested_rank);
  std::string refusal;
  if (!released_)
    refusal = "registration is closed (the job is starting; a worker can take a dead worker's place only once "
              "training runs)";
  else if (finishing_) refusal = "registration is closed (the job is finishing)";
  else if (cfg_.cluster.on_worker_loss != config::WorkerLoss::kContinue)
    refusal = "registration is closed (the job has started; with cluster.on_worker_loss: continue a new worker can "
              "take a dead worker's place)";
  else if (server_missing) refusal = "a dead server is being replaced; try again once it is";
  else if (info.num_params != num_params_)
    refusal = fmt::format("model size {} differs from the job's {}", info.num_params, num_params_);
  else if (!any_rank && wanted >= static_cast<uint32_t>(cfg_.cluster.num_workers))
    refusal = fmt::format("requested rank {} but the job has {} workers", wanted, cfg_.cluster.num_workers);
  else if (!any_rank && rank_taken(Role::kWorker, wanted, true))
    refusal = fmt::format("rank {} is already taken (worker {} is alive)", wanted, wanted);
  else if (free_ranks.empty())
    refusal = fmt::format("the job already has its {} workers, all alive", cfg_.cluster.num_workers);
  else if (!any_rank && !std::binary_search(free_ranks.begin(), free_ranks.end(), wanted))
    refusal = fmt::format("rank {} is free but never ran in this job", wanted);
  if (!refusal.empty()) {
    refuse_registration(received, info, refusal);
    return;
  }
  const uint32_t rank = any_rank ? free_ranks.front() : wanted;
  Node& n = add_node(key, received, info, rank);
  n.joining = true;
  n.join_id = ++last_join_id_;
  n.join_deadline = clock_.seconds() + cfg_.cluster.startup_timeout_ms / 1000.0;
  log_.write({{"event", "register"}, {"role", "worker"}, {"rank", rank}, {"host", n.host}, {"pid", n.pid},
              {"rejoin", true}});
  spdlog::info("scheduler: worker {} registered again (host {}, pid {}): it takes the dead worker's place", rank,
               n.host, n.pid);
  protocol::AssignInfo a = assignment_;
  a.rank = rank;
  Header h;
  h.type = MessageType::kAssign;
  h.flags = protocol::kFlagRejoin;
  send_to(n, protocol::encode_control(h, protocol::encode_assign(a)));
  Header join;
  join.type = MessageType::kJoin;
  join.base_version = n.join_id;
  const auto msg = protocol::encode_control(join, protocol::encode_rank(rank));
  for (const auto& [k, s] : nodes_)
    if (s.role == Role::kServer && s.alive) send_to(s, msg);
}

void Coordinator::handle_join_reply(Node& server, const protocol::MessageView& m) {
  auto rank = protocol::decode_rank(m.frame1);
  Node* w = rank.ok() ? joining_worker(*rank) : nullptr;
  const bool answer = m.header.type == MessageType::kJoin;
  if (server.role != Role::kServer) {  // only servers answer joins
    ++malformed_;
    log_.write({{"event", "unexpected"}, {"worker", server.rank}, {"type", protocol::message_type_name(m.header.type)}});
    return;
  }
  // A restored server set a replaced worker's start clock (handle_server_restored).
  if (!answer && m.header.base_version == 0 && rank.ok() && server.restoring &&
      server.awaiting_join_at.erase(*rank) == 1) {
    if (server.awaiting_join_at.empty()) announce_restored(server);
    return;
  }
  // A reply to an earlier attempt (a replacement that died while joining),
  // or a second one from this server, is stale.
  if (w == nullptr || m.header.base_version != w->join_id || answer == w->join_clock_sent ||
      !w->join_replied.insert(server.rank).second) {
    log_.write({{"event", "stale_join_reply"}, {"server", server.rank}, {"type", protocol::message_type_name(m.header.type)}});
    return;
  }
  if (answer) w->join_clock = std::max(w->join_clock, m.header.clock);
  if (w->join_replied.size() < live_nodes(Role::kServer)) return;
  w->join_replied.clear();
  if (answer) {
    // Every shard holds the worker at or below join_clock: none has applied it.
    w->join_clock_sent = true;
    Header h;
    h.type = MessageType::kJoinAt;
    h.clock = w->join_clock;
    h.base_version = w->join_id;
    const auto msg = protocol::encode_control(h, protocol::encode_rank(w->rank));
    for (const auto& [k, s] : nodes_)
      if (s.role == Role::kServer && s.alive) send_to(s, msg);
    return;
  }
  w->join_clock_set = true;
  release_joined(*w);
}

void Coordinator::release_joined(Node& n) {
  // Both needed: every server set the start clock, and the worker waits at its barrier.
  if (!n.joining || !n.join_clock_set || !n.in_barrier) return;
  n.joining = false;
  Header h;
  h.type = MessageType::kBarrierRelease;
  h.clock = n.join_clock;
  send_to(n, protocol::encode_control(h));
  if (last_announced_step_ > n.join_clock) send_snapshot_at(n, last_announced_step_);
  const double at = clock_.seconds();
  rejoined_.push_back({{"rank", n.rank}, {"step", n.join_clock}, {"seconds", at}});
  log_.write({{"event", "worker_rejoined"}, {"rank", n.rank}, {"step", n.join_clock}});
  spdlog::info("scheduler: worker {} rejoined the job at step {}", n.rank, n.join_clock);
}

std::pair<uint32_t, uint32_t> shard_range(uint64_t num_params, uint32_t servers, uint32_t s) {
  SPS_CHECK(servers > 0 && s < servers && num_params <= UINT32_MAX);
  // num_params < 2^32 and servers <= 2^32, so the products fit in 64 bits.
  return {static_cast<uint32_t>(num_params * s / servers), static_cast<uint32_t>(num_params * (s + 1) / servers)};
}

void Coordinator::assign_all() {
  protocol::AssignInfo a;
  a.num_workers = workers_registered_;
  a.num_servers = servers_registered_;
  a.num_params = num_params_;
  a.shards.resize(a.num_servers);
  // Contiguous, near-equal key ranges; server rank s owns shard s.
  for (const auto& [k, n] : nodes_) {
    if (n.role != Role::kServer) continue;
    const auto [b, e] = shard_range(num_params_, a.num_servers, n.rank);
    a.shards[n.rank] = {b, e, n.endpoint};
  }
  for (const auto& [k, n] : nodes_) {
    a.rank = n.rank;
    Header h;
    h.type = MessageType::kAssign;
    send_to(n, protocol::encode_control(h, protocol::encode_assign(a)));
  }
  assigned_ = true;
  assignment_ = a;
  nlohmann::json shards = nlohmann::json::array();
  for (const auto& s : a.shards) shards.push_back({{"begin", s.key_begin}, {"end", s.key_end}, {"endpoint", s.endpoint}});
  log_.write({{"event", "assign"}, {"num_params", num_params_}, {"shards", shards}});
  spdlog::info("scheduler: model of {} parameters over {} shards; waiting at the start barrier", num_params_,
               a.num_servers);
}

void Coordinator::check_barrier() {
  if (!assigned_ || released_) return;
  for (const auto& [k, n] : nodes_)
    if (n.alive && !n.in_barrier) return;
  released_ = true;
  release_time_ = clock_.seconds();
  Header h;
  h.type = MessageType::kBarrierRelease;
  const auto msg = protocol::encode_control(h);
  for (const auto& [k, n] : nodes_)
    if (n.alive) send_to(n, msg);
  log_.write({{"event", "barrier_release"}, {"barrier", 0}});
  spdlog::info("scheduler: all nodes ready, training starts");
}

void Coordinator::check_liveness() {
  const double now = clock_.seconds();
  if (!assigned_ && now * 1000.0 > cfg_.cluster.startup_timeout_ms) {
    fail(fmt::format("only {}/{} servers and {}/{} workers registered within {} ms", servers_registered_,
                     cfg_.cluster.num_servers, workers_registered_, cfg_.cluster.num_workers,
                     cfg_.cluster.startup_timeout_ms));
    return;
  }
  const double limit = cfg_.cluster.heartbeat_timeout_ms / 1000.0;
  for (auto& [k, n] : nodes_) {
    // Done workers and servers shutting down stop heartbeating; do not call them dead.
    if (!n.alive || n.done || finished_ || finishing_) continue;
    if (now - n.last_seen > limit) {
      node_died(n, fmt::format("silent for {:.1f} s", now - n.last_seen));
    } else if ((n.joining || n.restoring) && now > n.join_deadline) {
      node_died(n, fmt::format("it did not {} within cluster.startup_timeout_ms ({} ms)",
                               n.joining ? "rejoin" : "restore the shard", cfg_.cluster.startup_timeout_ms));
    }
    if (finished_) return;
  }
  bool restoring = false;  // a replacement registered: its own deadline runs
  for (const auto& [k, n] : nodes_) restoring = restoring || (n.alive && n.restoring);
  if (server_wait_deadline_ > 0 && now > server_wait_deadline_ && !restoring)
    fail(fmt::format("{}, and no new server took its place within cluster.startup_timeout_ms ({} ms)", server_loss_,
                     cfg_.cluster.startup_timeout_ms));
}

void Coordinator::node_died(Node& n, const std::string& why) {
  n.alive = false;
  const bool worker = n.role == Role::kWorker;
  log_.write({{"event", "node_dead"}, {"role", worker ? "worker" : "server"}, {"rank", n.rank}, {"why", why}});
  spdlog::warn("scheduler: {} {} is dead ({})", worker ? "worker" : "server", n.rank, why);
  if (!worker) {
    if (cfg_.cluster.on_server_loss != config::ServerLoss::kReplace || !released_ || finishing_) {
      fail(fmt::format("server {} died ({}); its shard is lost", n.rank, why));
      return;
    }
    // The workers wait (their pulls of this shard go unanswered) while a new
    // server takes its place. A worker joining now would get a start clock
    // without this shard's answer: it is written off (it may register again).
    server_wait_deadline_ = clock_.seconds() + cfg_.cluster.startup_timeout_ms / 1000.0;
    if (server_loss_.empty()) server_loss_ = fmt::format("server {} died ({})", n.rank, why);
    spdlog::warn("scheduler: waiting up to {} ms for a new server to take server {}'s place "
                 "(cluster.on_server_loss: replace)",
                 cfg_.cluster.startup_timeout_ms, n.rank);
    for (auto& [k, w] : nodes_)
      if (w.role == Role::kWorker && w.alive && w.joining) node_died(w, "a server died while it joined");
    return;
  }
  dead_workers_.push_back(n.rank);
  if (live_nodes(Role::kWorker) == 0) {
    fail("every worker died");
    return;
  }
  if (cfg_.cluster.on_worker_loss == config::WorkerLoss::kAbort) {
    fail(fmt::format("worker {} died ({}) and cluster.on_worker_loss is abort", n.rank, why));
    return;
  }
  // Servers stop waiting for the dead worker; the job goes on without it.
  Header h;
  h.type = MessageType::kNodeDead;
  const auto msg = protocol::encode_control(h, protocol::encode_rank(n.rank));
  for (const auto& [k, s] : nodes_)
    if (s.role == Role::kServer && s.alive) send_to(s, msg);
  check_barrier();
  check_done();
}

void Coordinator::check_done() {
  if (finished_ || finishing_ || !released_) return;
  for (const auto& [k, n] : nodes_)
    if (n.role == Role::kWorker && n.alive && !n.done) return;
  // Every worker is done: stop the job, then give the servers a moment to
  // send their statistics (staleness, pull waits) for the summary.
  shutdown_all(false, "job complete");
  finishing_ = true;
  finish_deadline_ = clock_.seconds() + 5.0;
  check_reports();
}

void Coordinator::check_reports() {
  if (!finishing_ || finished_) return;
  bool all = true;
  for (const auto& [k, n] : nodes_)
    if (n.role == Role::kServer && n.alive && !n.server_report) all = false;
  if (!all && clock_.seconds() < finish_deadline_) return;
  if (!all)
    spdlog::warn("scheduler: not every server sent its final statistics; the summary counts their last heartbeat's");
  write_summary();
  exit_status_ = 0;
  finished_ = true;
}

void Coordinator::fail(const std::string& why) {
  if (finished_) return;
  // A signal to the scheduler stops the job on purpose, even when the
  // scheduler first hears of it as a node that the same signal stopped.
  stopped_ = stop_requested();
  const std::string reason = stopped_ ? fmt::format("stopped by signal {}", stop_signal()) : why;
  if (stopped_) {
    spdlog::warn("scheduler: job stopped: {}", reason);
  } else {
    spdlog::error("scheduler: job failed: {}", reason);
  }
  failure_ = reason;
  log_.write({{"event", stopped_ ? "job_stopped" : "job_failed"}, {"reason", reason}});
  shutdown_all(true, reason);
  exit_status_ = 1;
  finished_ = true;
}

void Coordinator::shutdown_all(bool error, const std::string& reason) {
  Header h;
  h.type = MessageType::kShutdown;
  h.flags = error ? protocol::kFlagError : 0;
  const auto msg = protocol::encode_control(h, protocol::encode_text(reason));
  for (const auto& [k, n] : nodes_)
    if (n.alive) send_to(n, msg);
  log_.write({{"event", "shutdown"}, {"error", error}, {"reason", reason}, {"malformed", malformed_}});
}

void Coordinator::write_summary() {
  protocol::DoneReport total;
  double train_loss = NAN, test_accuracy = NAN, last_batch_loss = NAN;
  double max_wall = 0;
  // Nodes that died (or never reported) count with their last heartbeat's figures.
  nlohmann::json from_heartbeats = nlohmann::json::array();
  const auto note_heartbeat = [&](const Node& n) {
    from_heartbeats.push_back({{"role", n.role == Role::kWorker ? "worker" : "server"}, {"rank", n.rank}});
  };
  for (const auto& [k, n] : nodes_) {
    if (n.role != Role::kWorker || (!n.report && !n.progress)) continue;
    if (!n.report) note_heartbeat(n);
    const auto& r = n.report ? *n.report : *n.progress;
    total.steps = std::max(total.steps, r.steps);
    total.bytes_pushed += r.bytes_pushed;
    total.bytes_pushed_dense_equivalent += r.bytes_pushed_dense_equivalent;
    total.bytes_pulled += r.bytes_pulled;
    total.nnz_pushed += r.nnz_pushed;
    max_wall = std::max(max_wall, r.wall_seconds);
    if (std::isfinite(r.train_loss)) train_loss = r.train_loss;
    if (std::isfinite(r.test_accuracy)) test_accuracy = r.test_accuracy;
    if (n.rank == 0 && n.report && std::isfinite(r.last_batch_loss)) last_batch_loss = r.last_batch_loss;
  }
  CountHistogram staleness;
  LogHistogram pull_wait;
  uint64_t sparse_pulls = 0, pulls = 0, malformed_at_servers = 0, refused_stale = 0, applied = 0;
  for (const auto& [k, n] : nodes_) {
    if (n.role != Role::kServer || (!n.server_report && !n.server_progress)) continue;
    if (!n.server_report) note_heartbeat(n);
    const auto& r = n.server_report ? *n.server_report : *n.server_progress;
    for (const auto& [value, count] : r.staleness) staleness.add(value, count);
    pull_wait.merge(LogHistogram::from_raw(r.wait_buckets, r.wait_sum, r.wait_max));
    sparse_pulls += r.sparse_pulls;
    pulls += r.pulls_answered;
    malformed_at_servers += r.malformed;
    refused_stale += r.pushes_refused_stale;
    applied += r.pushes_applied;
  }
  auto policy = make_policy(cfg_.consistency);
  const uint64_t bound = policy->staleness_bound(static_cast<uint32_t>(cfg_.cluster.num_workers));
  const double now = clock_.seconds();
  nlohmann::json s = {
      {"consistency", policy->name()},
      {"optimizer", config::optimizer_name(cfg_.optimizer)},
      {"downlink", config::downlink_name(cfg_.downlink)},
      {"staleness", staleness.summary()},
      {"staleness_bound", bound == UINT64_MAX ? nlohmann::json(nullptr) : nlohmann::json(bound)},
      {"max_push_staleness", cfg_.consistency.max_push_staleness < 0
                                 ? nlohmann::json(nullptr)
                                 : nlohmann::json(cfg_.consistency.max_push_staleness)},
      {"pushes_applied", applied},
      {"pushes_refused_stale", refused_stale},
      {"pull_wait_seconds", pull_wait.summary()},
      {"pulls", pulls},
      {"sparse_pulls", sparse_pulls},
      {"malformed_messages_at_servers", malformed_at_servers},
      {"run", cfg_.run.name},
      {"steps", total.steps},
      {"train_loss", finite_or_null(train_loss)},
      {"test_accuracy", finite_or_null(test_accuracy)},
      {"last_batch_loss", finite_or_null(last_batch_loss)},
      {"bytes_pushed", total.bytes_pushed},
      {"bytes_pushed_dense_equivalent", total.bytes_pushed_dense_equivalent},
      {"push_compression", total.bytes_pushed > 0 ? double(total.bytes_pushed_dense_equivalent) / double(total.bytes_pushed) : 0.0},
      {"bytes_pulled", total.bytes_pulled},
      {"nnz_pushed", total.nnz_pushed},
      {"wall_seconds", now},
      {"train_seconds", now - release_time_},
      {"num_params", num_params_},
      {"workers", cfg_.cluster.num_workers},
      {"servers", cfg_.cluster.num_servers},
      {"dead_workers", dead_workers_},
      {"rejoined_workers", rejoined_},
      {"replaced_servers", replaced_servers_},
      {"stats_from_heartbeats", from_heartbeats},
      {"malformed_messages_at_scheduler", malformed_},
      {"config", config::to_json(cfg_)},
  };
  write_file_atomically(cfg_.run_folder() + "/summary.json", s.dump(2) + "\n");
  spdlog::info("scheduler: staleness mean {:.2f}, p50 {}, p99 {}, max {} (bound {}); pull wait p50 {:.2g} s, p99 {:.2g} s",
               staleness.mean(), staleness.quantile(0.5), staleness.quantile(0.99), staleness.max(),
               bound == UINT64_MAX ? std::string("none") : std::to_string(bound), pull_wait.quantile(0.5),
               pull_wait.quantile(0.99));
  if (cfg_.consistency.max_push_staleness >= 0)
    spdlog::info("scheduler: {} pushes refused as staler than consistency.max_push_staleness = {} (with error "
                 "feedback their values went back into the workers' residuals)",
                 refused_stale, cfg_.consistency.max_push_staleness);
  log_.write({{"event", "summary"}, {"summary", s}});
}

}  // namespace sps::scheduler
