#include "server/server.h"

#include <unistd.h>

#include <algorithm>
#include <stdexcept>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "common/process.h"
#include "common/snapshot.h"
#include "net/address.h"

namespace sps::server {

using protocol::Header;
using protocol::MessageType;

namespace {
std::string local_hostname() {
  char buf[256] = {0};
  if (gethostname(buf, sizeof(buf) - 1) != 0) return "unknown";
  return buf;
}

}  // namespace

Server::Server(const config::Config& cfg, zmq::context_t& ctx, int requested_rank)
    : cfg_(cfg),
      data_(net::make_socket(ctx, net::SocketKind::kRouter)),
      control_(net::make_socket(ctx, net::SocketKind::kDealer)),
      control_closed_(ctx, control_),
      requested_rank_(requested_rank) {
  if (cfg_.security.curve) {
    auto curve = net::load_curve_settings(cfg_.security.key_file, cfg_.security.server_key_file,
                                          cfg_.security.allowed_keys_file);
    if (!curve.ok()) throw std::runtime_error(curve.status().message());
    curve_ = std::move(curve).value();
    auto zap = net::ZapAuthenticator::start(ctx, curve_.allowed, "server");
    if (!zap.ok()) throw std::runtime_error(zap.status().message());
    zap_ = std::move(zap).value();
    net::make_curve_server(data_, curve_);
    net::make_curve_client(control_, curve_);
  }
  // Bounded receive queue per connection (a valid worker has at most a push
  // and a pull in flight); beyond it libzmq stops reading that connection,
  // so a flooding peer is slowed by TCP instead of growing our memory.
  data_.set(zmq::sockopt::rcvhwm, kDataReceiveHighWaterMark);
  // Names are resolved once, here, so a typo fails now and names its key.
  auto scheduler_ip = net::resolve_ipv4(cfg_.cluster.scheduler_host, "cluster.scheduler_host");
  if (!scheduler_ip.ok()) throw std::runtime_error(scheduler_ip.status().message());
  auto bind_ip = net::resolve_ipv4(cfg_.cluster.bind_host, "cluster.bind_host");
  if (!bind_ip.ok()) throw std::runtime_error(bind_ip.status().message());
  auto advertised = net::advertised_ipv4(cfg_.cluster.advertise_host, *bind_ip, *scheduler_ip);
  if (!advertised.ok()) throw std::runtime_error(advertised.status().message());
  auto bound = net::bind_tcp_in_range(data_, *bind_ip, cfg_.cluster.port_min, cfg_.cluster.port_max);
  if (!bound.ok()) throw std::runtime_error(bound.status().with_context("cluster.bind_host").message());
  auto port = net::parse_tcp_endpoint(*bound);
  if (!port.ok()) throw std::runtime_error(port.status().message());
  // Peers get the advertised address: a server bound to 0.0.0.0 is reached
  // at its routable address, never at the wildcard.
  endpoint_ = fmt::format("tcp://{}:{}", *advertised, port->port);
  scheduler_ip_ = *scheduler_ip;
  control_.connect(fmt::format("tcp://{}:{}", scheduler_ip_, cfg_.cluster.scheduler_port));
}

void Server::send_control(MessageType type, protocol::Bytes payload) {
  Header h;
  h.type = type;
  h.sender = rank_;
  auto r = net::send(control_, protocol::encode_control(h, std::move(payload)));
  if (!r.ok()) spdlog::warn("server {}: cannot reach the scheduler: {}", rank_, r.status().message());
}

int Server::run() {
  // ZeroMQ reconnects silently forever; a plain TCP probe first turns a wrong
  // or unreachable scheduler address into an error that names it.
  const Status reachable = net::wait_for_scheduler(scheduler_ip_, cfg_.cluster.scheduler_port,
                                                   cfg_.cluster.scheduler_host, cfg_.cluster.connect_timeout_ms);
  if (!reachable.ok()) {
    spdlog::error("server {}: {}", requested_rank_, reachable.message());
    return stop_requested() ? 128 + stop_signal() : 1;
  }
  spdlog::info("server: data endpoint {} (bound to {})", endpoint_, cfg_.cluster.bind_host);
  protocol::RegisterInfo reg;
  reg.role = protocol::Role::kServer;
  reg.endpoint = endpoint_;
  reg.host = local_hostname();
  reg.pid = static_cast<uint32_t>(getpid());
  reg.requested_rank = requested_rank_;
  send_control(MessageType::kRegister, protocol::encode_register(reg));
  last_scheduler_seen_ = clock_.seconds();
  const auto tick = std::chrono::milliseconds(std::min(100, cfg_.cluster.heartbeat_ms));
  while (!done_) {
    if (stop_requested()) {
      finish(fmt::format("stopped by signal {}", stop_signal()));
      exit_status_ = 128 + stop_signal();
      break;
    }
    const auto ready = net::wait_readable({&control_, &data_, &control_closed_.socket()}, tick);
    const bool scheduler_closed = !control_closed_.take().empty();
    const bool heard_before = heard_from_scheduler_;
    // What the scheduler sent before its connection closed (the end of the job) comes first.
    if (ready[0] || scheduler_closed) {
      while (auto r = net::try_recv(control_, false)) {
        handle_control(*r);
        if (done_) break;
      }
    }
    // Before the scheduler first answered, a closed connection is a refused
    // handshake (security.curve on one side only), named by the wait for an answer.
    if (scheduler_closed && heard_before && !done_) {
      spdlog::error("server {}: the scheduler at {}:{} closed its connection: its process exited or was killed; exiting",
                    rank_, scheduler_ip_, cfg_.cluster.scheduler_port);
      finish("scheduler lost");
      exit_status_ = 1;
      break;
    }
    if (ready[1] && !done_) {
      for (int i = 0; i < 10000; ++i) {  // bounded so heartbeats still go out under a flood
        auto r = net::try_recv(data_, true);
        if (!r) break;
        handle_data(*r);
      }
    }
    heartbeat_if_due();
    update_metrics();
  }
  return exit_status_;
}

void Server::update_metrics() {
  if (!metrics_ || !shard_) return;
  const uint64_t min_clock = shard_->pushed().min_live_clock();
  metrics_->update(stats_, {.version = shard_->version(),
                            .pending_pulls = pending_pulls_.size(),
                            .early_messages = early_.size(),
                            .live_workers = shard_->pushed().live_count(),
                            .min_clock = min_clock == UINT64_MAX ? 0 : min_clock});
}

void Server::heartbeat_if_due() {
  if (done_) return;
  const double now = clock_.seconds();
  if ((now - last_heartbeat_sent_) * 1000.0 >= cfg_.cluster.heartbeat_ms) {
    // The statistics so far ride along: a server killed before its report
    // still counts in the summary (up to one heartbeat period short).
    send_control(MessageType::kHeartbeat, protocol::encode_server_report(stats_report()));
    last_heartbeat_sent_ = now;
  }
  // A port that accepts connections but never answers (a wrong port, a
  // proxy, or security.curve on one side only) is named, not waited out.
  // The scheduler first speaks when it answers our first heartbeat, so the
  // wait covers a few heartbeat periods however short connect_timeout_ms is.
  const double answer_ms = std::max(cfg_.cluster.connect_timeout_ms, 3 * cfg_.cluster.heartbeat_ms);
  if (!heard_from_scheduler_ && (now - last_scheduler_seen_) * 1000.0 > answer_ms) {
    spdlog::error("server {}: {}; exiting", requested_rank_,
                  net::scheduler_never_answered(scheduler_ip_, cfg_.cluster.scheduler_port,
                                                cfg_.cluster.scheduler_host, answer_ms));
    finish("scheduler never answered");
    exit_status_ = 1;
    return;
  }
  const double limit = cfg_.cluster.heartbeat_timeout_ms / 1000.0;
  if (now - last_scheduler_seen_ > limit) {
    spdlog::error("server {}: the scheduler at {}:{} has been silent for {:.1f} s; exiting", rank_, scheduler_ip_,
                  cfg_.cluster.scheduler_port, now - last_scheduler_seen_);
    finish("scheduler lost");
    exit_status_ = 1;
  }
}

void Server::handle_control(const net::Received& r) {
  auto m = net::decode(r);
  if (!m.ok()) {
    spdlog::warn("server {}: malformed message from the scheduler: {}", rank_, m.status().message());
    return;
  }
  last_scheduler_seen_ = clock_.seconds();
  heard_from_scheduler_ = true;
  switch (m->header.type) {
    case MessageType::kAssign: {
      auto a = protocol::decode_assign(m->frame1);
      if (!a.ok() || a->rank >= a->shards.size()) {
        spdlog::error("server: bad assignment from the scheduler: {}", a.status().message());
        finish("bad assignment");
        exit_status_ = 1;
        return;
      }
      replacing_ = (m->header.flags & protocol::kFlagRejoin) != 0;
      on_assign(*a);
      if (done_) return;
      if (cfg_.metrics.enabled) {
        auto started = ServerMetrics::start(cfg_, rank_);
        if (!started.ok()) {
          spdlog::error("server {}: {}", rank_, started.status().message());
          send_control(MessageType::kError, protocol::encode_text(started.status().message()));
          finish("metrics endpoint failed");
          exit_status_ = 1;
          return;
        }
        metrics_ = std::move(started).value();
        spdlog::info("server {}: metrics on {}", rank_, metrics_->url());
        log_.write({{"event", "metrics"}, {"url", metrics_->url()}});
      }
      if (replacing_) {
        if (!restore_replacement()) return;
      } else if (cfg_.checkpoint.resume && !resume_shard()) {
        return;
      }
      early_bytes_ = 0;
      while (!early_.empty()) {
        net::Received early = std::move(early_.front());
        early_.pop_front();
        handle_data(early);
      }
      break;
    }
    case MessageType::kBarrierRelease:
      running_ = true;
      log_.write({{"event", "start"}});
      break;
    case MessageType::kNodeDead: {
      auto w = protocol::decode_rank(m->frame1);
      if (!w.ok() || !shard_) break;
      shard_->remove_worker(*w);
      if (*w < parked_.size()) {
        for (const auto& p : parked_[*w]) parked_bytes_ -= p.bytes;
        parked_[*w].clear();
      }
      log_.write({{"event", "worker_dead"}, {"worker", *w}, {"version", shard_->version()}});
      spdlog::warn("server {}: worker {} left; continuing with {} workers", rank_, *w,
                   shard_->pushed().live_count());
      shard_->apply_ready();
      record_handled();
      drain_parked();
      answer_pulls();
      snapshot_if_due();
      break;
    }
    case MessageType::kJoin:
    case MessageType::kJoinAt:
      handle_join(*m);
      break;
    case MessageType::kShutdown: {
      auto text = protocol::decode_text(m->frame1);
      const bool error = (m->header.flags & protocol::kFlagError) != 0;
      if (!error) send_report();
      finish(text.ok() ? *text : "shutdown");
      exit_status_ = error ? 1 : 0;
      break;
    }
    case MessageType::kError: {
      auto text = protocol::decode_text(m->frame1);
      spdlog::error("server: the scheduler refused us: {}", text.ok() ? *text : "<unreadable>");
      finish("refused by the scheduler");
      exit_status_ = 1;
      break;
    }
    case MessageType::kHeartbeat:
      break;
    case MessageType::kSnapshotAt:
      if (m->header.clock > last_snapshot_step_) snapshot_steps_.insert(m->header.clock);
      snapshot_if_due();
      break;
    default:
      spdlog::warn("server {}: unexpected {} from the scheduler", rank_, protocol::message_type_name(m->header.type));
  }
}

void Server::reply_join(const protocol::MessageView& m, uint64_t clock) {
  Header h;
  h.type = m.header.type;
  h.sender = rank_;
  h.clock = clock;
  h.base_version = m.header.base_version;  // the scheduler's join attempt
  auto r = net::send(control_, protocol::encode_control(h, protocol::Bytes(m.frame1.begin(), m.frame1.end())));
  if (!r.ok()) spdlog::warn("server {}: cannot reach the scheduler: {}", rank_, r.status().message());
}

void Server::handle_join(const protocol::MessageView& m) {
  auto w = protocol::decode_rank(m.frame1);
  if (!w.ok() || !shard_) {
    spdlog::warn("server {}: unreadable {} from the scheduler", rank_, protocol::message_type_name(m.header.type));
    return;
  }
  if (m.header.type == MessageType::kJoin) {
    // Held at the slowest live clock until the scheduler names the start clock.
    const auto held = shard_->add_worker(*w);
    if (!held) {
      spdlog::warn("server {}: the scheduler asked worker {} to join, but it is live or nobody else is", rank_, *w);
      return;  // the scheduler's join then never completes; it times out there
    }
    reply_join(m, *held);
    return;
  }
  // From the scheduler after this server restored a snapshot older than the
  // worker's join: the worker is live from its join clock, whatever the
  // snapshot said of the dead process that held its rank.
  const bool restart = (m.header.flags & protocol::kFlagRejoin) != 0;
  const Status st = restart ? shard_->restart_worker(*w, m.header.clock) : shard_->set_worker_clock(*w, m.header.clock);
  if (!st.ok()) {
    spdlog::warn("server {}: join_at for worker {}: {}", rank_, *w, st.message());
    return;
  }
  log_.write({{"event", "worker_joined"}, {"worker", *w}, {"clock", m.header.clock}, {"version", shard_->version()}});
  spdlog::info("server {}: worker {} rejoined at clock {}; {} workers", rank_, *w, m.header.clock,
               shard_->pushed().live_count());
  reply_join(m, m.header.clock);
  shard_->apply_ready();
  record_handled();
  answer_pulls();
  snapshot_if_due();
}

void Server::on_assign(const protocol::AssignInfo& a) {
  rank_ = a.rank;
  num_workers_ = a.num_workers;
  const auto& s = a.shards[a.rank];
  shard_.emplace(s.key_begin, s.key_end, a.num_workers, Optimizer::from_config(cfg_, s.key_end - s.key_begin),
                 scheduler::make_policy(cfg_.consistency), cfg_.cluster.server_threads);
  worker_routes_.resize(a.num_workers);
  parked_.resize(a.num_workers);
  // A resumed job, or a server taking a dead one's place, appends to the log.
  auto log = JsonlWriter::open(fmt::format("{}/server-{}.jsonl", cfg_.run_folder(), rank_),
                               cfg_.checkpoint.resume || replacing_);
  if (log.ok()) log_ = std::move(log).value();
  if (cfg_.downlink.method != config::CompressionMethod::kDense) {
    const Status st = shard_->enable_downlink(Shard::downlink_selection(cfg_.downlink, shard_->size()),
                                               Shard::downlink_values(cfg_.downlink));
    if (!st.ok()) {
      spdlog::error("server {}: downlink: {}", rank_, st.message());
      send_control(MessageType::kError, protocol::encode_text("downlink: " + st.message()));
      finish("bad downlink");
      exit_status_ = 1;
      return;
    }
  }
  const uint64_t bound = shard_->policy().staleness_bound(num_workers_);
  log_.write({{"event", "assign"}, {"rank", rank_}, {"key_begin", s.key_begin}, {"key_end", s.key_end},
              {"workers", num_workers_}, {"endpoint", endpoint_}, {"policy", shard_->policy().name()},
              {"apply_threads", shard_->threads()}, {"downlink", config::downlink_name(cfg_.downlink)},
              {"staleness_bound", bound == UINT64_MAX ? nlohmann::json(nullptr) : nlohmann::json(bound)}});
  spdlog::info("server {}: shard [{}, {}) on {}", rank_, s.key_begin, s.key_end, endpoint_);
}

bool Server::resume_shard() {
  const std::string dir = cfg_.checkpoint_dir();
  auto fail = [&](const std::string& why) {
    spdlog::error("server {}: cannot resume: {}", rank_, why);
    send_control(MessageType::kError, protocol::encode_text("cannot resume: " + why));
    finish("cannot resume");
    exit_status_ = 1;
    return false;
  };
  auto point = find_resume_point(dir, static_cast<uint32_t>(cfg_.cluster.num_servers), num_workers_);
  if (!point.ok()) return fail(point.status().message());
  for (const auto& s : point->skipped) spdlog::warn("server {}: skipped a snapshot: {}", rank_, s);
  auto snap = Snapshot::read(snapshot_path(dir, point->step, "server", rank_));
  if (!snap.ok()) return fail(snap.status().message());
  auto key_begin = snap->u64("key_begin");
  auto key_end = snap->u64("key_end");
  auto version = snap->u64("version");
  auto params = snap->f32("params");
  auto velocity = snap->f32("velocity");
  // Snapshots from before adaptive optimizers have no second moment.
  auto second_moment = snap->has("second_moment") ? snap->f32("second_moment") : Result<std::vector<float>>(std::vector<float>{});
  for (const Status* s : {&key_begin.status(), &key_end.status(), &version.status(), &params.status(),
                          &velocity.status(), &second_moment.status()})
    if (!s->ok()) return fail(s->message());
  if (*key_begin != shard_->key_begin() || *key_end != shard_->key_end())
    return fail(fmt::format("{} holds keys [{}, {}) but this job gives shard {} the keys [{}, {}): the model or "
                            "cluster.num_servers changed",
                            snap->path(), *key_begin, *key_end, rank_, shard_->key_begin(), shard_->key_end()));
  const Status restored = shard_->restore(*params, *velocity, *second_moment, *version, point->step);
  if (!restored.ok()) return fail(fmt::format("{}: {}", snap->path(), restored.message()));
  // Compressed pulls: the copy the workers held (a snapshot without one,
  // from a job without a downlink, starts it as the parameters).
  if (shard_->downlink() && snap->has("published")) {
    auto published = snap->f32("published");
    auto published_version = snap->u64("published_version");
    if (!published.ok()) return fail(published.status().message());
    if (!published_version.ok()) return fail(published_version.status().message());
    const Status st = shard_->restore_published(*published, *published_version);
    if (!st.ok()) return fail(fmt::format("{}: {}", snap->path(), st.message()));
  }
  initialised_ = true;
  last_snapshot_step_ = point->step;
  log_.write({{"event", "resume"}, {"step", point->step}, {"version", *version}, {"file", snap->path()},
              {"skipped", point->skipped}});
  spdlog::info("server {}: resumed from {} (step {}, version {})", rank_, snap->path(), point->step, *version);
  send_control(MessageType::kBarrier);
  return true;
}

void Server::snapshot_if_due() {
  const int64_t every = cfg_.checkpoint.interval;
  if ((every <= 0 && snapshot_steps_.empty()) || !shard_) return;
  const uint64_t min_clock = shard_->pushed().min_live_clock();
  if (min_clock == UINT64_MAX) return;
  uint64_t step = every > 0 ? min_clock / static_cast<uint64_t>(every) * static_cast<uint64_t>(every) : 0;
  // bsp: the step's pushes must be applied (they are, right after the last arrives).
  const bool bsp = !shard_->policy().apply_on_arrival();
  // The named steps every live worker has reached.
  while (!snapshot_steps_.empty() && *snapshot_steps_.begin() <= min_clock) {
    const uint64_t named = *snapshot_steps_.begin();
    if (bsp && named > shard_->version()) break;  // not applied yet
    snapshot_steps_.erase(snapshot_steps_.begin());
    if (bsp && named < shard_->version() && named > last_snapshot_step_) {
      // Named after the shard passed it: that step's snapshot is incomplete, the next one is not.
      spdlog::warn("server {}: the snapshot at step {} was named at version {}: skipped", rank_, named,
                   shard_->version());
      log_.write({{"event", "snapshot_missed"}, {"step", named}, {"version", shard_->version()}});
      continue;
    }
    step = std::max(step, named);
  }
  if (step == 0 || step <= last_snapshot_step_ || step >= static_cast<uint64_t>(cfg_.training.steps)) return;
  if (bsp && shard_->version() != step) return;
  Stopwatch sw;
  SnapshotWriter w;
  w.add_u64("rank", rank_);
  w.add_u64("step", step);
  w.add_u64("version", shard_->version());
  w.add_u64("key_begin", shard_->key_begin());
  w.add_u64("key_end", shard_->key_end());
  w.add_u64("workers", num_workers_);
  w.add_f32("params", shard_->params());
  w.add_f32("velocity", shard_->velocity());
  w.add_f32("second_moment", shard_->second_moment());
  // What a server replacing this one needs to take every worker's pushes
  // from the right clock (in ssp/asp workers are at different clocks).
  const std::vector<uint64_t> clocks = shard_->worker_clocks();
  w.add_u64s("worker_clocks", clocks);
  w.add_u64s("joined_at", shard_->joined_at());
  if (shard_->downlink()) {
    w.add_f32("published", shard_->pulled_params());
    w.add_u64("published_version", shard_->published_version());
  }
  const std::string dir = cfg_.checkpoint_dir();
  const std::string path = snapshot_path(dir, step, "server", rank_);
  const Status s = w.write_atomic(path);
  last_snapshot_step_ = step;  // a failed write is not retried for this step
  if (!s.ok()) {
    spdlog::error("server {}: snapshot at step {} failed: {}", rank_, step, s.message());
    log_.write({{"event", "snapshot_failed"}, {"step", step}, {"error", s.message()}});
    return;
  }
  prune_snapshots(dir, "server", rank_, cfg_.checkpoint.keep);
  const double seconds = sw.seconds();
  ++stats_.snapshots;
  stats_.snapshot_seconds += seconds;
  log_.write({{"event", "snapshot"}, {"step", step}, {"version", shard_->version()}, {"bytes", w.bytes()},
              {"seconds", seconds}, {"file", path}});
  notify_snapshot(clocks);
}

void Server::notify_snapshot(const std::vector<uint64_t>& clocks) {
  if (cfg_.cluster.on_server_loss != config::ServerLoss::kReplace) return;
  for (uint32_t w = 0; w < clocks.size() && w < worker_routes_.size(); ++w) {
    if (clocks[w] == Shard::kWorkerGone || worker_routes_[w].size() == 0) continue;
    Header h;
    h.type = MessageType::kSnapshotted;
    h.sender = rank_;
    h.shard = rank_;
    h.clock = clocks[w];
    (void)net::send(data_, protocol::encode_control(h), &worker_routes_[w]);
  }
}

bool Server::restore_replacement() {
  const std::string dir = cfg_.checkpoint_dir();
  auto fail = [&](const std::string& why) {
    spdlog::error("server {}: cannot take the dead server's place: {}", rank_, why);
    send_control(MessageType::kError, protocol::encode_text(fmt::format("server {}'s replacement: {}", rank_, why)));
    finish("cannot restore");
    exit_status_ = 1;
    return false;
  };
  std::vector<std::string> skipped;
  auto snap = newest_snapshot_of(dir, "server", rank_, skipped);
  if (!snap.ok()) return fail(snap.status().message());
  for (const auto& s : skipped) spdlog::warn("server {}: skipped a snapshot: {}", rank_, s);
  auto step = snap->u64("step");
  auto key_begin = snap->u64("key_begin");
  auto key_end = snap->u64("key_end");
  auto version = snap->u64("version");
  auto params = snap->f32("params");
  auto velocity = snap->f32("velocity");
  auto second_moment = snap->f32("second_moment");
  auto clocks = snap->u64s("worker_clocks");
  auto joined_at = snap->u64s("joined_at");
  for (const Status* s : {&step.status(), &key_begin.status(), &key_end.status(), &version.status(),
                          &params.status(), &velocity.status(), &second_moment.status(), &clocks.status(),
                          &joined_at.status()})
    if (!s->ok()) return fail(fmt::format("{}: {}", snap->path(), s->message()));
  if (*key_begin != shard_->key_begin() || *key_end != shard_->key_end())
    return fail(fmt::format("{} holds keys [{}, {}) but shard {} is [{}, {})", snap->path(), *key_begin, *key_end,
                            rank_, shard_->key_begin(), shard_->key_end()));
  Status st = shard_->restore(*params, *velocity, *second_moment, *version, *step);
  if (st.ok()) st = shard_->restore_workers(*clocks, *joined_at);
  if (st.ok() && shard_->downlink() && snap->has("published")) {
    auto published = snap->f32("published");
    auto published_version = snap->u64("published_version");
    st = !published.ok() ? published.status()
         : !published_version.ok() ? published_version.status()
                                   : shard_->restore_published(*published, *published_version);
  }
  if (!st.ok()) return fail(fmt::format("{}: {}", snap->path(), st.message()));
  initialised_ = true;
  running_ = true;
  last_snapshot_step_ = *step;
  log_.write({{"event", "restored"}, {"step", *step}, {"version", *version}, {"file", snap->path()},
              {"worker_clocks", *clocks}, {"skipped", skipped}});
  spdlog::info("server {}: took the dead server's place from {} (step {}, version {})", rank_, snap->path(), *step,
               *version);
  Header h;
  h.type = MessageType::kServerRestored;
  h.sender = rank_;
  h.clock = *step;
  h.base_version = *version;
  auto r = net::send(control_, protocol::encode_control(h, protocol::encode_clocks(*clocks)));
  if (!r.ok()) spdlog::warn("server {}: cannot reach the scheduler: {}", rank_, r.status().message());
  return true;
}

void Server::count_malformed(const std::string& peer, const Status& why) {
  ++stats_.malformed;
  // Log once per sender, and for at most kMaxReportedPeers senders, so a
  // flood (even over fresh connections) cannot fill the disk or memory; the
  // count is exact.
  if (reported_peers_.size() < kMaxReportedPeers && reported_peers_.insert(peer).second) {
    log_.write({{"event", "malformed"}, {"peer", peer}, {"error", why.to_string()}});
    spdlog::warn("server {}: dropped a malformed message from {}: {}", rank_, peer, why.message());
  }
}

namespace {

// A received data message and whatever its decoding could not view in
// place; a held (aggregating) push keeps it alive until it is applied.
struct ReceivedData {
  net::Received msg;
  protocol::DecodeScratch scratch;
};

protocol::IndexEncoding key_coding(config::IndexCoding c, uint64_t nnz, uint64_t range) {
  switch (c) {
    case config::IndexCoding::kRaw: return protocol::IndexEncoding::kRawU32;
    case config::IndexCoding::kDeltaVarint: return protocol::IndexEncoding::kDeltaVarint;
    case config::IndexCoding::kBitmap: return protocol::IndexEncoding::kBitmap;
    case config::IndexCoding::kAuto: break;
  }
  return protocol::choose_index_encoding(nnz, range);
}

}  // namespace

void Server::handle_data(net::Received& received) {
  stats_.bytes_in += received.bytes();
  const std::string peer = net::routing_id_hex(received.routing_id);
  // Moved before decoding: small frames live inside the message object, so
  // views must be taken from where the message will stay.
  auto owned = std::make_shared<ReceivedData>();
  owned->msg = std::move(received);
  net::Received& r = owned->msg;
  auto m = net::decode(r);
  if (!m.ok()) return count_malformed(peer, m.status());
  if (!shard_) {
    if (early_.size() < kMaxEarlyMessages && early_bytes_ + r.bytes() <= kMaxEarlyBytes) {
      stats_.bytes_in -= r.bytes();  // counted again on replay
      early_bytes_ += r.bytes();
      early_.push_back(std::move(r));
      return;
    }
    return count_malformed(peer, failed_precondition("data message before the shard was assigned"));
  }
  const Header& h = m->header;
  if (h.type == MessageType::kPush) {
    auto data = protocol::decode_data(*m, shard_->key_begin(), shard_->key_end(), owned->scratch);
    if (!data.ok()) return count_malformed(peer, data.status());
    if ((h.flags & protocol::kFlagInit) != 0) {
      if (initialised_ || h.sender != 0 || !data->dense())
        return count_malformed(peer, failed_precondition("unexpected initialisation push"));
      shard_->set_params(data->values());
      initialised_ = true;
      log_.write({{"event", "init"}, {"from", h.sender}});
      send_control(MessageType::kBarrier);
      return;
    }
    if (!initialised_) return count_malformed(peer, failed_precondition("push before initialisation"));
    Stopwatch sw;
    // The route first: add_push keeps `owned`, which holds it.
    zmq::message_t route;
    route.copy(r.routing_id);
    const bool resent = (h.flags & protocol::kFlagResent) != 0;
    if (resent && park_if_early(h, *data, owned, r.bytes())) return;
    const uint64_t base_version = resent ? std::min(h.base_version, shard_->version()) : h.base_version;
    Status s = shard_->add_push(h.sender, h.clock, base_version, *data, owned);
    if (!s.ok()) {
      ++stats_.pushes_rejected;
      return count_malformed(peer, s);
    }
    if (h.sender < worker_routes_.size()) worker_routes_[h.sender] = std::move(route);
    shard_->apply_ready();
    stats_.apply_seconds += sw.seconds();
    record_handled();
    drain_parked();
    answer_pulls();
    snapshot_if_due();
    return;
  }
  if (h.type == MessageType::kPullRequest) {
    if (h.key_begin != shard_->key_begin() || h.key_end != shard_->key_end())
      return count_malformed(peer, out_of_range("pull for a key range this server does not own"));
    if (h.sender >= num_workers_) return count_malformed(peer, out_of_range("pull from an unknown worker"));
    if (!initialised_) return count_malformed(peer, failed_precondition("pull before initialisation"));
    // A worker waits for each pull before the next, so one held pull per
    // worker is all a valid job needs; more is a flood and would grow the queue.
    // A worker that reconnected (its server was replaced) asks again on its
    // new connection: that pull takes the old one's place.
    for (auto it = pending_pulls_.begin(); it != pending_pulls_.end(); ++it) {
      if (it->worker != h.sender) continue;
      if (net::routing_id_hex(it->routing_id) == peer)
        return count_malformed(peer, failed_precondition(fmt::format(
                                         "a second pull from worker {} while its clock-{} pull waits", h.sender, it->clock)));
      pending_pulls_.erase(it);
      break;
    }
    PendingPull pull{std::move(r.routing_id), h.sender, h.clock, (h.flags & protocol::kFlagHaveVersion) != 0,
                     h.base_version, clock_.seconds(), (h.flags & protocol::kFlagExact) != 0};
    if (shard_->may_answer_pull(h.clock)) {
      answer_pull(pull);
    } else {
      pending_pulls_.push_back(std::move(pull));
    }
    return;
  }
  count_malformed(peer, malformed(fmt::format("a server does not take {} messages", protocol::message_type_name(h.type))));
}

bool Server::park_if_early(const Header& h, const protocol::DataView& data, std::shared_ptr<const void> owner,
                           size_t bytes) {
  if (h.sender >= parked_.size()) return false;
  auto& q = parked_[h.sender];
  const uint32_t w = h.sender;
  const bool behind_parked = !q.empty() && h.clock == q.back().clock + 1;
  const bool early = q.empty() && shard_->pushed().live(w) && h.clock == shard_->pushed().clock(w) &&
                     !shard_->accepts_push(w, h.clock, std::min(h.base_version, shard_->version()));
  // Bounded like the early messages; past it the push is refused as usual.
  if ((!behind_parked && !early) || parked_bytes_ + bytes > kMaxEarlyBytes) return false;
  q.push_back({std::move(owner), data, h.clock, h.base_version, bytes});
  parked_bytes_ += bytes;
  return true;
}

void Server::drain_parked() {
  if (parked_bytes_ == 0) return;
  for (bool progress = true; progress;) {
    progress = false;
    for (uint32_t w = 0; w < parked_.size(); ++w) {
      auto& q = parked_[w];
      while (!q.empty()) {
        const ParkedPush& p = q.front();
        const uint64_t base_version = std::min(p.base_version, shard_->version());
        if (!shard_->accepts_push(w, p.clock, base_version)) break;
        const Status s = shard_->add_push(w, p.clock, base_version, p.data, p.owner);
        parked_bytes_ -= p.bytes;
        q.pop_front();
        if (!s.ok()) {  // accepts_push said yes: only a key outside the range gets here
          ++stats_.pushes_rejected;
          count_malformed(fmt::format("worker {}", w), s);
          continue;
        }
        shard_->apply_ready();
        progress = true;
      }
    }
  }
  record_handled();
}

void Server::record_handled() {
  for (const auto& a : shard_->take_handled()) {
    if (a.refused) {
      ++stats_.pushes_refused_stale;
      log_.write({{"event", "refuse_stale"}, {"worker", a.worker}, {"clock", a.clock}, {"base_version", a.base_version},
                  {"version", a.version}, {"staleness", a.staleness}, {"nnz", a.nnz}});
      continue;
    }
    ++stats_.pushes_applied;
    stats_.staleness.add(a.staleness);
    if (metrics_) metrics_->observe_staleness(a.staleness);
    log_.write({{"event", "apply"}, {"worker", a.worker}, {"clock", a.clock}, {"base_version", a.base_version},
                {"version", a.version}, {"staleness", a.staleness}, {"nnz", a.nnz}});
  }
}

void Server::answer_pull(const PendingPull& pull) {
  Header h;
  h.type = MessageType::kPullResponse;
  h.sender = rank_;
  h.shard = rank_;
  h.clock = pull.clock;
  h.base_version = shard_->version();
  if (shard_->push_refused_before(pull.worker, pull.clock)) h.flags |= protocol::kFlagPushRefused;
  h.key_begin = shard_->key_begin();
  h.key_end = shard_->key_end();
  // Sparse when the worker holds an older copy and the changed keys cost
  // less than the dense slice (8 bytes per key+value against 4 per value).
  bool sparse = false;
  if (!pull.exact && shard_->downlink()) {
    const double started = clock_.seconds();
    const Shard::Published p = shard_->publish();
    if (p.ran) {
      const double seconds = clock_.seconds() - started;
      ++stats_.publishes;
      stats_.published_keys += p.nnz;
      stats_.publish_keys_read += p.keys_read;
      stats_.publish_seconds += seconds;
      stats_.owed_norm = p.owed_norm;
      log_.write({{"event", "publish"}, {"version", p.version}, {"nnz", p.nnz}, {"dense", p.dense},
                  {"owed_norm", p.owed_norm}, {"keys_read", p.keys_read}, {"seconds", seconds}});
    }
  }
  if (!pull.exact && cfg_.consistency.sparse_pull && pull.have_version && pull.worker_version <= shard_->version()) {
    sparse = shard_->changed_since(pull.worker_version, shard_->size() / 2, changed_keys_);
  }
  protocol::EncodedMessage msg;
  if (sparse) {
    h.index_encoding = key_coding(cfg_.compression.index_coding, changed_keys_.size(), shard_->size());
    shard_->gather(changed_keys_, changed_values_);
    // Published values are already rounded to downlink.values, so this
    // encoding loses nothing.
    msg = protocol::encode_data(h, changed_keys_, changed_values_, protocol::wire_value_type(shard_->downlink_values()),
                                &pool_);
  } else {
    h.index_encoding = protocol::IndexEncoding::kNone;
    msg = protocol::encode_data(h, {}, pull.exact ? shard_->params() : shard_->pulled_params(),
                                protocol::ValueType::kF32, &pool_);
  }
  auto sent = net::send(data_, std::move(msg), &pull.routing_id);
  if (!sent.ok()) return;
  const double waited = clock_.seconds() - pull.since;
  stats_.bytes_out += *sent;
  ++stats_.pulls_answered;
  stats_.sparse_pulls += sparse ? 1 : 0;
  stats_.pull_wait.add(waited);
  if (metrics_) metrics_->observe_pull_wait(waited);
  const uint64_t min_clock = shard_->pushed().min_live_clock();
  log_.write({{"event", "pull"}, {"worker", pull.worker}, {"clock", pull.clock}, {"version", shard_->version()},
              {"min_clock", min_clock == UINT64_MAX ? nlohmann::json(nullptr) : nlohmann::json(min_clock)},
              {"wait_s", waited}, {"sparse", sparse}, {"bytes", *sent}});
}

void Server::answer_pulls() {
  for (auto it = pending_pulls_.begin(); it != pending_pulls_.end();) {
    if (shard_->may_answer_pull(it->clock)) {
      answer_pull(*it);
      it = pending_pulls_.erase(it);
    } else {
      ++it;
    }
  }
}

void Server::send_report() {
  send_control(MessageType::kServerReport, protocol::encode_server_report(stats_report()));
}

protocol::ServerReport Server::stats_report() const {
  protocol::ServerReport r;
  r.version = shard_ ? shard_->version() : 0;
  r.pushes_applied = stats_.pushes_applied;
  r.pushes_rejected = stats_.pushes_rejected;
  r.pushes_refused_stale = stats_.pushes_refused_stale;
  r.malformed = stats_.malformed;
  r.pulls_answered = stats_.pulls_answered;
  r.sparse_pulls = stats_.sparse_pulls;
  r.bytes_in = stats_.bytes_in;
  r.bytes_out = stats_.bytes_out;
  r.staleness = stats_.staleness.pairs();
  r.wait_buckets = stats_.pull_wait.buckets();
  r.wait_sum = stats_.pull_wait.sum();
  r.wait_max = stats_.pull_wait.max();
  return r;
}

void Server::finish(const std::string& reason) {
  done_ = true;
  log_.write({{"event", "stats"},
              {"reason", reason},
              {"version", shard_ ? shard_->version() : 0},
              {"pushes_applied", stats_.pushes_applied},
              {"pushes_rejected", stats_.pushes_rejected},
              {"pushes_refused_stale", stats_.pushes_refused_stale},
              {"malformed", stats_.malformed},
              {"pulls_answered", stats_.pulls_answered},
              {"bytes_in", stats_.bytes_in},
              {"bytes_out", stats_.bytes_out},
              {"sparse_pulls", stats_.sparse_pulls},
              {"apply_seconds", stats_.apply_seconds},
              {"snapshots", stats_.snapshots},
              {"snapshot_seconds", stats_.snapshot_seconds},
              {"staleness", stats_.staleness.summary()},
              {"pull_wait_s", stats_.pull_wait.summary()}});
  spdlog::info("server {}: {} ({} versions, {} malformed messages dropped)", rank_, reason,
               shard_ ? shard_->version() : 0, stats_.malformed);
}

}  // namespace sps::server
