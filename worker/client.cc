#include "worker/client.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <thread>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "common/scattered_keys.h"
#include "net/address.h"
#include "net/link.h"

namespace sps::worker {

using protocol::Header;
using protocol::MessageType;

PsClient::PsClient(const config::Config& cfg, zmq::context_t& ctx)
    : cfg_(cfg), ctx_(ctx), control_(net::make_socket(ctx, net::SocketKind::kDealer)), control_closed_(ctx, control_) {
  if (cfg_.security.curve) {
    auto curve = net::load_curve_settings(cfg_.security.key_file, cfg_.security.server_key_file,
                                          cfg_.security.allowed_keys_file);
    if (!curve.ok()) throw std::runtime_error(curve.status().message());
    curve_ = std::move(curve).value();
    net::make_curve_client(control_, curve_);
  }
  auto scheduler_ip = net::resolve_ipv4(cfg_.cluster.scheduler_host, "cluster.scheduler_host");
  if (!scheduler_ip.ok()) throw std::runtime_error(scheduler_ip.status().message());
  scheduler_ip_ = *scheduler_ip;
  control_.connect(fmt::format("tcp://{}:{}", scheduler_ip_, cfg_.cluster.scheduler_port));
}

Status PsClient::send_control(MessageType type, protocol::Bytes payload) {
  Header h;
  h.type = type;
  h.sender = assign_.rank;
  auto r = net::send(control_, protocol::encode_control(h, std::move(payload)));
  if (!r.ok()) return r.status().with_context("cannot reach the scheduler");
  return {};
}

void PsClient::heartbeat_if_due() {
  const double now = clock_.seconds();
  if ((now - last_heartbeat_sent_) * 1000.0 < cfg_.cluster.heartbeat_ms) return;
  last_heartbeat_sent_ = now;
  // The counters so far ride along, so a worker killed before its kDone
  // still counts in the job's totals (up to one heartbeat period short).
  protocol::DoneReport progress;
  progress.steps = next_push_clock_;
  progress.bytes_pushed = counters_.bytes_pushed;
  progress.bytes_pushed_dense_equivalent = counters_.bytes_pushed_dense_equivalent;
  progress.bytes_pulled = counters_.bytes_pulled;
  progress.nnz_pushed = counters_.nnz_pushed;
  progress.train_loss = NAN;
  progress.test_accuracy = NAN;
  progress.last_batch_loss = last_batch_loss_;
  progress.wall_seconds = now;
  (void)send_control(MessageType::kHeartbeat, protocol::encode_done(progress));
}

Status PsClient::check_alive() {
  if (stop_requested()) return unavailable(fmt::format("stopped by signal {}", stop_signal()));
  if (shutdown_seen_ && !shutdown_status_.ok()) return shutdown_status_;
  if (!control_closed_.take().empty()) scheduler_connection_closed_ = true;
  // Before the scheduler first answered, a closed connection is a refused
  // handshake (security.curve on one side only), named below by the wait for an answer.
  if (scheduler_connection_closed_ && heard_from_scheduler_ && !shutdown_seen_) {
    // What it sent before its connection closed (the end of the job) comes first.
    SPS_RETURN_IF_ERROR(drain_scheduler());
    if (!shutdown_seen_)
      return unavailable(fmt::format("the scheduler at {}:{} closed its connection: its process exited or was killed",
                                     scheduler_ip_, cfg_.cluster.scheduler_port));
  }
  const double silent = clock_.seconds() - last_scheduler_seen_;
  // A port that accepts connections but never answers (a wrong port, a
  // proxy, or security.curve on one side only) is named, not waited out.
  // The scheduler first speaks when it answers our first heartbeat, so the
  // wait covers a few heartbeat periods however short connect_timeout_ms is.
  const double answer_ms = std::max(cfg_.cluster.connect_timeout_ms, 3 * cfg_.cluster.heartbeat_ms);
  if (!heard_from_scheduler_ && silent * 1000.0 > answer_ms)
    return unavailable(net::scheduler_never_answered(scheduler_ip_, cfg_.cluster.scheduler_port,
                                                     cfg_.cluster.scheduler_host, answer_ms));
  if (silent * 1000.0 > cfg_.cluster.heartbeat_timeout_ms)
    return unavailable(fmt::format("the scheduler at {}:{} has been silent for {:.1f} s", scheduler_ip_,
                                   cfg_.cluster.scheduler_port, silent));
  heartbeat_if_due();
  return {};
}

Status PsClient::handle_scheduler_message(const protocol::MessageView& m) {
  last_scheduler_seen_ = clock_.seconds();
  heard_from_scheduler_ = true;
  switch (m.header.type) {
    case MessageType::kAssign: {
      SPS_ASSIGN_OR_RETURN(assign_, protocol::decode_assign(m.frame1));
      if (assign_.rank >= assign_.num_workers) return malformed("assignment rank out of range");
      rejoining_ = (m.header.flags & protocol::kFlagRejoin) != 0;
      assigned_ = true;
      return {};
    }
    case MessageType::kBarrierRelease:
      released_ = true;
      start_clock_ = m.header.clock;
      next_push_clock_ = start_clock_;
      return {};
    case MessageType::kServerMoved: {
      auto endpoint = protocol::decode_text(m.frame1);
      if (!endpoint.ok() || m.header.shard >= servers_.size())
        return malformed("unreadable server_moved message from the scheduler");
      return move_server(m.header.shard, *endpoint, m.header.clock);
    }
    case MessageType::kShutdown: {
      auto text = protocol::decode_text(m.frame1);
      shutdown_seen_ = true;
      if ((m.header.flags & protocol::kFlagError) != 0)
        shutdown_status_ = unavailable(fmt::format("the job was stopped: {}", text.ok() ? *text : "<no reason>"));
      return shutdown_status_;
    }
    case MessageType::kError: {
      auto text = protocol::decode_text(m.frame1);
      return failed_precondition(fmt::format("the scheduler refused this worker: {}", text.ok() ? *text : "?"));
    }
    case MessageType::kHeartbeat:
      return {};
    case MessageType::kSnapshotAt:
      snapshot_steps_.push_back(m.header.clock);
      return {};
    default:
      spdlog::warn("worker: unexpected {} from the scheduler", protocol::message_type_name(m.header.type));
      return {};
  }
}

Status PsClient::drain_scheduler() {
  while (auto r = net::try_recv(control_, false)) {
    auto m = net::decode(*r);
    if (!m.ok()) return m.status().with_context("malformed message from the scheduler");
    SPS_RETURN_IF_ERROR(handle_scheduler_message(*m));
  }
  return {};
}

Status PsClient::pump_scheduler(int timeout_ms) {
  const auto ready = net::wait_readable({&control_, &control_closed_.socket()}, std::chrono::milliseconds(timeout_ms));
  if (ready[0]) SPS_RETURN_IF_ERROR(drain_scheduler());
  return check_alive();
}

Status PsClient::register_worker(uint64_t num_params, int requested_rank) {
  // ZeroMQ reconnects silently forever; a plain TCP probe first turns a wrong
  // or unreachable address into an error that names it.
  SPS_RETURN_IF_ERROR(net::wait_for_scheduler(scheduler_ip_, cfg_.cluster.scheduler_port,
                                              cfg_.cluster.scheduler_host, cfg_.cluster.connect_timeout_ms));
  protocol::RegisterInfo reg;
  reg.role = protocol::Role::kWorker;
  reg.num_params = num_params;
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  reg.host = host;
  reg.pid = static_cast<uint32_t>(getpid());
  reg.requested_rank = requested_rank;
  SPS_RETURN_IF_ERROR(send_control(MessageType::kRegister, protocol::encode_register(reg)));
  last_scheduler_seen_ = clock_.seconds();
  const double deadline = clock_.seconds() + cfg_.cluster.startup_timeout_ms / 1000.0;
  while (!assigned_) {
    SPS_RETURN_IF_ERROR(pump_scheduler(100));
    if (clock_.seconds() > deadline) return deadline_exceeded("no assignment from the scheduler in time");
  }
  if (assign_.num_params != num_params)
    return failed_precondition(fmt::format("assigned model size {} differs from ours ({})", assign_.num_params,
                                           num_params));
  for (size_t i = 0; i < assign_.shards.size(); ++i) {
    auto ep = net::parse_tcp_endpoint(assign_.shards[i].endpoint);
    if (!ep.ok()) return ep.status().with_context(fmt::format("server {}'s endpoint", i));
    SPS_RETURN_IF_ERROR(net::wait_tcp_reachable(
        ep->host, ep->port, cfg_.cluster.connect_timeout_ms,
        fmt::format("server {} (the address it advertised; see cluster.advertise_host)", i)));
  }
  for (const auto& shard : assign_.shards) servers_.push_back(connect_server(shard.endpoint));
  versions_.assign(assign_.shards.size(), 0);
  pulled_.assign(assign_.shards.size(), false);
  retain_ = cfg_.cluster.on_server_loss == config::ServerLoss::kReplace && cfg_.checkpoint.enabled();
  retained_.clear();
  retained_.resize(assign_.shards.size());
  return {};
}

zmq::socket_t PsClient::connect_server(const std::string& endpoint) {
  zmq::socket_t sock = net::make_socket(ctx_, net::SocketKind::kDealer);
  sock.set(zmq::sockopt::sndhwm, kDataSendHighWaterMark);
  net::make_curve_client(sock, curve_);
  sock.connect(endpoint);
  return sock;
}

Status PsClient::send_push(size_t s, uint64_t clock, protocol::EncodedMessage&& m) {
  next_push_clock_ = clock + 1;
  if (retain_) {
    RetainedPush copy{clock, {m.header, protocol::Frame::copy_of(m.frame1), protocol::Frame::copy_of(m.frame2)}};
    retained_bytes_ += copy.msg.total_bytes();
    retained_[s].push_back(std::move(copy));
    if (retained_bytes_ > static_cast<uint64_t>(cfg_.cluster.replay_buffer_mb) << 20) {
      spdlog::warn("worker {}: the pushes since the servers' last snapshots exceed cluster.replay_buffer_mb ({} MiB); "
                   "dropped: a server replaced before its next snapshot cannot get them back",
                   assign_.rank, cfg_.cluster.replay_buffer_mb);
      for (auto& q : retained_) q.clear();
      retained_bytes_ = 0;
    }
  }
  return send_to_server(s, std::move(m));
}

void PsClient::drop_retained(size_t s, uint64_t clock) {
  auto& q = retained_[s];
  while (!q.empty() && q.front().clock < clock) {
    retained_bytes_ -= q.front().msg.total_bytes();
    q.pop_front();
  }
}

Status PsClient::move_server(size_t s, const std::string& endpoint, uint64_t clock) {
  if (!retain_) return failed_precondition(fmt::format("server {} was replaced, but this worker keeps no pushes to "
                                                       "send it again (cluster.on_server_loss)", s));
  auto& q = retained_[s];
  // Every push from `clock` to the last one must be here (they are contiguous).
  const bool held = clock <= next_push_clock_ && (q.empty() ? clock == next_push_clock_ : q.front().clock <= clock);
  if (!held)
    return failed_precondition(fmt::format(
        "server {}'s replacement restored a snapshot that lacks this worker's pushes from clock {} on, and this "
        "worker no longer holds them (it holds {}; cluster.replay_buffer_mb is {} MiB)",
        s, clock, q.empty() ? std::string("none") : fmt::format("clocks {} to {}", q.front().clock, q.back().clock),
        cfg_.cluster.replay_buffer_mb));
  servers_[s].set(zmq::sockopt::linger, 0);  // what waits for the dead server is dropped
  servers_[s].close();
  servers_[s] = connect_server(endpoint);
  assign_.shards[s].endpoint = endpoint;
  pulled_[s] = false;  // the new server answers the next pull densely
  uint64_t resent = 0, bytes = 0;
  for (auto& p : q) {
    if (p.clock < clock) continue;
    auto h = protocol::decode_header(p.msg.header);
    if (!h.ok()) return h.status().with_context("a kept push");
    h->flags |= protocol::kFlagResent;
    p.msg.header = protocol::encode_header(*h);
    auto r = net::send(servers_[s], p.msg, nullptr);
    if (!r.ok()) return r.status().with_context(fmt::format("resending to server {}", s));
    ++resent;
    bytes += *r;
  }
  drop_retained(s, clock);
  counters_.pushes_resent += resent;
  counters_.bytes_resent += bytes;
  if (resent == 0)
    spdlog::info("worker {}: server {} moved to {}; resent nothing (its snapshot holds every push)", assign_.rank, s,
                 endpoint);
  else
    spdlog::info("worker {}: server {} moved to {}; resent {} push{} (clocks {} to {})", assign_.rank, s, endpoint,
                 resent, resent == 1 ? "" : "es", clock, clock + resent - 1);
  if (pull_.active && !pull_.got[s]) return request_pull(s);
  return {};
}

Status PsClient::send_to_server(size_t s, protocol::EncodedMessage&& m) {
  auto r = net::send(servers_[s], std::move(m), nullptr);
  if (!r.ok()) return r.status().with_context(fmt::format("server {}", s));
  return {};
}

void PsClient::emulate_link(uint64_t bytes, double& link_free_at) {
  if (cfg_.cluster.link_mbps <= 0 || bytes == 0) return;
  const double now = clock_.seconds();
  link_free_at = std::max(link_free_at, now) + static_cast<double>(bytes) * 8.0 / (cfg_.cluster.link_mbps * 1e6);
  std::this_thread::sleep_for(std::chrono::duration<double>(link_free_at - now));
}

Status PsClient::init_params(std::span<const float> params) {
  for (size_t s = 0; s < assign_.shards.size(); ++s) {
    const auto& shard = assign_.shards[s];
    Header h;
    h.type = MessageType::kPush;
    h.flags = protocol::kFlagInit;
    h.sender = assign_.rank;
    h.shard = static_cast<uint32_t>(s);
    h.key_begin = shard.key_begin;
    h.key_end = shard.key_end;
    h.index_encoding = protocol::IndexEncoding::kNone;
    SPS_RETURN_IF_ERROR(send_to_server(
        s, protocol::encode_data(h, {}, params.subspan(shard.key_begin, shard.key_end - shard.key_begin))));
  }
  return {};
}

Status PsClient::start_barrier() {
  SPS_RETURN_IF_ERROR(send_control(MessageType::kBarrier));
  const double deadline = clock_.seconds() + cfg_.cluster.startup_timeout_ms / 1000.0;
  while (!released_) {
    SPS_RETURN_IF_ERROR(pump_scheduler(100));
    if (clock_.seconds() > deadline)
      return deadline_exceeded("the start barrier was not released within cluster.startup_timeout_ms");
  }
  return {};
}

Status PsClient::request_pull(size_t s) {
  const auto& shard = assign_.shards[s];
  Header h;
  h.type = MessageType::kPullRequest;
  h.sender = assign_.rank;
  h.clock = pull_.clock;
  h.shard = static_cast<uint32_t>(s);
  h.key_begin = shard.key_begin;
  h.key_end = shard.key_end;
  if (pull_.exact) {
    h.flags = protocol::kFlagExact;
  } else if (pulled_[s]) {
    h.flags = protocol::kFlagHaveVersion;
    h.base_version = versions_[s];
  }
  return send_to_server(s, protocol::encode_control(h));
}

Result<uint64_t> PsClient::pull(uint64_t clock, std::span<float> params, PullChanges* changes, bool exact) {
  if (changes != nullptr) changes->clear();
  refused_shards_.clear();
  const uint64_t pulled_before = counters_.bytes_pulled;
  Stopwatch wait;
  const size_t n = servers_.size();
  pull_.active = true;
  pull_.clock = clock;
  pull_.exact = exact;
  pull_.got.assign(n, false);
  struct EndPull {
    PullInFlight& p;
    ~EndPull() { p.active = false; }
  } end_pull{pull_};
  for (size_t s = 0; s < n; ++s) SPS_RETURN_IF_ERROR(request_pull(s));
  std::vector<bool>& got = pull_.got;
  size_t remaining = n;
  uint64_t min_version = UINT64_MAX;
  std::vector<zmq::socket_t*> socks;
  for (auto& s : servers_) socks.push_back(&s);
  socks.push_back(&control_);
  while (remaining > 0) {
    const auto ready = net::wait_readable(socks, std::chrono::milliseconds(100));
    for (size_t s = 0; s < n; ++s) {
      if (!ready[s]) continue;
      while (auto r = net::try_recv(servers_[s], false)) {
        auto m = net::decode(*r);
        if (!m.ok()) return m.status().with_context(fmt::format("pull response from server {}", s));
        if (m->header.type == MessageType::kSnapshotted) {
          drop_retained(s, m->header.clock);
          continue;
        }
        const auto& shard = assign_.shards[s];
        auto data = protocol::decode_data(*m, shard.key_begin, shard.key_end, scratch_);
        if (!data.ok()) return data.status().with_context(fmt::format("pull response from server {}", s));
        if (m->header.type != MessageType::kPullResponse || m->header.clock != clock || got[s] ||
            (!data->dense() && (!pulled_[s] || exact)))
          return malformed(fmt::format("unexpected reply from server {} to the pull for clock {}", s, clock));
        if (data->dense()) {
          std::copy(data->values().begin(), data->values().end(), params.begin() + shard.key_begin);
        } else {
          const auto keys = data->keys();
          const auto values = data->values();
          for_scattered_keys<Access::kWrite>(params.data(), 0, keys.data(), 0, keys.size(),
                                             [&](size_t i) { params[keys[i]] = values[i]; });
        }
        if (changes != nullptr) {
          if (data->dense()) {
            changes->ranges.emplace_back(shard.key_begin, shard.key_end);
          } else {
            changes->keys.insert(changes->keys.end(), data->keys().begin(), data->keys().end());
          }
        }
        counters_.bytes_pulled += r->bytes();
        counters_.sparse_pulls += data->dense() ? 0 : 1;
        versions_[s] = m->header.base_version;
        // After an exact pull this copy is not the published one a sparse
        // answer would patch.
        pulled_[s] = !exact;
        if ((m->header.flags & protocol::kFlagPushRefused) != 0) refused_shards_.push_back(static_cast<uint32_t>(s));
        min_version = std::min(min_version, m->header.base_version);
        got[s] = true;
        --remaining;
      }
    }
    if (ready[n]) {
      SPS_RETURN_IF_ERROR(pump_scheduler(0));
    } else {
      SPS_RETURN_IF_ERROR(check_alive());
    }
    if (shutdown_seen_) return unavailable("the job ended while this worker waited for parameters");
  }
  emulate_link(counters_.bytes_pulled - pulled_before, downlink_free_at_);
  std::sort(refused_shards_.begin(), refused_shards_.end());
  last_pull_wait_ = wait.seconds();
  return min_version;
}

namespace {
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

Status PsClient::push_sparse(uint64_t clock, const kernels::SparseVector& sel, ValueFormat values) {
  const uint64_t before = counters_.bytes_pushed;
  size_t pos = 0;
  RunCursor runs_from;
  for (size_t s = 0; s < assign_.shards.size(); ++s) {
    const auto& shard = assign_.shards[s];
    // Selections are sorted, so each shard's entries are one contiguous run.
    const size_t begin = pos;
    while (pos < sel.size() && sel.indices[pos] < shard.key_end) ++pos;
    Header h;
    h.type = MessageType::kPush;
    h.sender = assign_.rank;
    h.clock = clock;
    h.base_version = versions_[s];
    h.shard = static_cast<uint32_t>(s);
    h.key_begin = shard.key_begin;
    h.key_end = shard.key_end;
    h.index_encoding = key_coding(cfg_.compression.index_coding, pos - begin, shard.key_end - shard.key_begin);
    slice_runs(sel.scale_runs, begin, pos, runs_, runs_from);
    auto msg = protocol::encode_data(h, std::span(sel.indices).subspan(begin, pos - begin),
                                     std::span(sel.values).subspan(begin, pos - begin), protocol::wire_value_type(values), &pool_,
                                     runs_);
    counters_.bytes_pushed += msg.total_bytes();
    SPS_RETURN_IF_ERROR(send_push(s, clock, std::move(msg)));
    counters_.bytes_pushed_dense_equivalent += protocol::kHeaderBytes + 4 * uint64_t{shard.key_end - shard.key_begin};
    counters_.nnz_pushed += pos - begin;
  }
  emulate_link(counters_.bytes_pushed - before, uplink_free_at_);
  return {};
}

Status PsClient::push_dense(uint64_t clock, std::span<const float> values, ValueFormat format,
                            std::span<const ScaleRun> scale_runs) {
  const uint64_t before = counters_.bytes_pushed;
  RunCursor runs_from;
  for (size_t s = 0; s < assign_.shards.size(); ++s) {
    const auto& shard = assign_.shards[s];
    Header h;
    h.type = MessageType::kPush;
    h.sender = assign_.rank;
    h.clock = clock;
    h.base_version = versions_[s];
    h.shard = static_cast<uint32_t>(s);
    h.key_begin = shard.key_begin;
    h.key_end = shard.key_end;
    h.index_encoding = protocol::IndexEncoding::kNone;
    slice_runs(scale_runs, shard.key_begin, shard.key_end, runs_, runs_from);
    auto msg = protocol::encode_data(h, {}, values.subspan(shard.key_begin, shard.key_end - shard.key_begin),
                                     protocol::wire_value_type(format), &pool_, runs_);
    counters_.bytes_pushed += msg.total_bytes();
    SPS_RETURN_IF_ERROR(send_push(s, clock, std::move(msg)));
    counters_.bytes_pushed_dense_equivalent += protocol::kHeaderBytes + 4 * uint64_t{shard.key_end - shard.key_begin};
    counters_.nnz_pushed += shard.key_end - shard.key_begin;
  }
  emulate_link(counters_.bytes_pushed - before, uplink_free_at_);
  return {};
}

Status PsClient::finish(const protocol::DoneReport& report) {
  SPS_RETURN_IF_ERROR(send_control(MessageType::kDone, protocol::encode_done(report)));
  while (!shutdown_seen_) SPS_RETURN_IF_ERROR(pump_scheduler(100));
  return shutdown_status_;
}

void PsClient::report_error(const std::string& what) {
  (void)send_control(MessageType::kError, protocol::encode_text(what));
}

}  // namespace sps::worker
