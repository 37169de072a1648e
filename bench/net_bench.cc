// sps-bench-net: push (and push+pull) throughput of the real sps server and
// client code over loopback TCP, against a bare ZeroMQ DEALER -> ROUTER
// stream carrying the same frames with the same process layout, in the same
// run. The ratio sps / bare ZeroMQ is the headline figure.
//
// Every case forks real processes from this binary: for sps a scheduler, S
// servers (server::Server) and W pushing clients (worker::PsClient) in an
// asynchronous job; for the baseline S receivers that read and drop (or
// answer a pull-sized reply) and W senders that send prebuilt frames
// without copying them. Throughput is counted at the receivers over a
// window that starts after a warm-up: for sps from the servers' "apply" and
// "pull" log lines, for the baseline from per-10 ms byte counters the
// receivers keep in shared memory. Every process keeps freed memory for
// reuse, as sps-server and sps-worker do (--keep-freed-memory). With pulls, an sps worker's run starts
// after its first round (whose pull is the dense copy of the whole model),
// and the baseline's replies are as large as the window's mean pull.
//
// The parent never touches ZeroMQ (a forked child must not inherit a context).
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>
#include <zmq.hpp>

#include "common/huge_pages.h"
#include "common/process.h"
#include "config/config.h"
#include "kernels/sparsify.h"
#include "net/link.h"
#include "protocol/message.h"
#include "scheduler/coordinator.h"
#include "server/server.h"
#include "worker/client.h"

namespace {

using namespace sps;
namespace fs = std::filesystem;
using json = nlohmann::json;

double now_s() { return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count(); }

struct Case {
  uint64_t n = 0;
  double density = 0;
  int workers = 1;
  int servers = 1;
  std::string mode;  // push | push_pull
  bool dense() const { return density >= 1.0; }
};

struct Options {
  std::vector<uint64_t> n = {1'000'000, 25'000'000};
  std::vector<double> density = {0.001, 0.01, 1.0};
  std::vector<int> workers = {1, 2, 4};
  std::vector<int> servers = {1, 2};
  std::vector<std::string> modes = {"push", "push_pull"};
  double seconds = 1.5;
  double warmup = 0.4;
  std::string index_coding = "auto";
  int server_threads = 1;
  std::string dir;
  std::string json_path;
};

// The keys top-k picks from i.i.d. data: each key with probability k/n.
kernels::SparseVector selection(uint64_t n, double density, uint32_t seed) {
  kernels::SparseVector sel;
  if (density >= 1.0) return sel;
  std::mt19937_64 rng(seed);
  std::geometric_distribution<uint64_t> gap(density);
  for (uint64_t k = gap(rng); k < n; k += 1 + gap(rng)) {
    sel.indices.push_back(static_cast<uint32_t>(k));
    sel.values.push_back(1e-3f * static_cast<float>(static_cast<int>(k % 17) - 8));
  }
  return sel;
}

// Exact integer split used by the scheduler (every server the same count, +-1).
std::vector<std::pair<uint32_t, uint32_t>> ranges(uint64_t n, int servers) {
  std::vector<std::pair<uint32_t, uint32_t>> out;
  for (int s = 0; s < servers; ++s)
    out.emplace_back(static_cast<uint32_t>(n * s / servers), static_cast<uint32_t>(n * (s + 1) / servers));
  return out;
}

pid_t spawn(const std::function<int()>& body) {
  std::cout.flush();
  const pid_t pid = fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) {
    int rc = 1;
    try {
      rc = body();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "sps-bench-net child: %s\n", e.what());
    }
    std::fflush(nullptr);
    _exit(rc);
  }
  return pid;
}

// Waits for every child; kills the rest after `timeout_s`. True when all exited 0.
bool wait_all(std::vector<pid_t>& pids, double timeout_s) {
  const double deadline = now_s() + timeout_s;
  bool ok = true;
  for (pid_t pid : pids) {
    int status = 0;
    while (true) {
      const pid_t r = waitpid(pid, &status, WNOHANG);
      if (r == pid) break;
      if (now_s() > deadline) {
        for (pid_t p : pids) kill(p, SIGKILL);
        waitpid(pid, &status, 0);
        ok = false;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) ok = false;
  }
  pids.clear();
  return ok;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool wait_for_file(const std::string& path, double timeout_s) {
  const double deadline = now_s() + timeout_s;
  while (!fs::exists(path) || fs::file_size(path) == 0) {
    if (now_s() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

void write_json(const std::string& path, const json& j) {
  const std::string tmp = path + ".tmp";
  std::ofstream(tmp) << j.dump();
  fs::rename(tmp, path);
}

struct Measured {
  double gbps = 0;           // payload bytes counted at the receivers per second / 1e9
  double pushes_per_s = 0;   // whole pushes (all shards) per second
  double apply_us = NAN;     // sps: server apply time per shard push
  double pull_bytes = 0;     // sps: mean pull-response bytes per shard (for the baseline's replies)
  bool ok = false;
  std::string error;
};

// ---- sps ------------------------------------------------------------------

int run_sps_worker(const config::Config& cfg, const Case& c, int rank, double run_seconds, const std::string& out) {
  zmq::context_t ctx(1);
  worker::PsClient client(cfg, ctx);
  if (auto s = client.register_worker(c.n, rank); !s.ok()) throw std::runtime_error(s.to_string());
  sps::HugePageVector<float> params(c.n, 0.0f);  // as the worker holds them
  if (client.rank() == 0)
    if (auto s = client.init_params(params); !s.ok()) throw std::runtime_error(s.to_string());
  if (auto s = client.start_barrier(); !s.ok()) throw std::runtime_error(s.to_string());
  const auto sel = selection(c.n, c.density, 1000 + static_cast<uint32_t>(rank));
  std::vector<float> dense(c.dense() ? c.n : 0, 1e-3f);
  // Bytes of one push per shard (the selection is the same every step).
  std::vector<uint64_t> shard_bytes;
  uint64_t clock = 0;
  auto round = [&] {
    const uint64_t before = client.counters().bytes_pushed;
    const Status s = c.dense() ? client.push_dense(clock, dense) : client.push_sparse(clock, sel);
    if (!s.ok()) throw std::runtime_error(s.to_string());
    if (clock == 0) shard_bytes.push_back(client.counters().bytes_pushed - before);
    if (c.mode == "push_pull") {
      auto v = client.pull(clock + 1, params);
      if (!v.ok()) throw std::runtime_error(v.status().to_string());
    }
    client.keep_alive();
    ++clock;
  };
  // A worker's first pull copies the whole model (dense: it holds no
  // version yet), which at 25M takes most of a second: start-up, not
  // throughput, so the run (and its warm-up) starts after it.
  if (c.mode == "push_pull") round();
  const double start = now_s();
  const double stop_at = start + run_seconds;
  while (now_s() < stop_at) round();
  const double stop = now_s();
  write_json(out, {{"start", start}, {"stop", stop}, {"pushes", clock}, {"push_bytes", shard_bytes.at(0)}});
  protocol::DoneReport report;
  report.steps = clock;
  report.train_loss = report.test_accuracy = report.last_batch_loss = NAN;
  if (auto s = client.finish(report); !s.ok()) throw std::runtime_error(s.to_string());
  return 0;
}

Measured run_sps(const Options& o, const Case& c, const std::string& dir) {
  Measured m;
  const std::string yaml = fmt::format(
      "run: {{name: sps, dir: '{}', log_level: warn, progress: false}}\n"
      "cluster: {{num_workers: {}, num_servers: {}, server_threads: {}, scheduler_port: 0, "
      "heartbeat_timeout_ms: 30000}}\n"
      "consistency: {{mode: asp}}\n"
      "compression: {{method: {}, index_coding: {}}}\n",
      dir, c.workers, c.servers, o.server_threads, c.dense() ? "dense" : "topk", o.index_coding);
  auto loaded = config::load_from_string(yaml, "sps-bench-net");
  if (!loaded.ok()) {
    m.error = loaded.status().to_string();
    return m;
  }
  config::Config cfg = *loaded;
  const std::string run = cfg.run_folder();
  fs::create_directories(run);
  std::vector<pid_t> pids;
  pids.push_back(spawn([&] {
    zmq::context_t ctx(1);
    scheduler::Coordinator coordinator(cfg, ctx);
    return coordinator.run();
  }));
  if (!wait_for_file(run + "/scheduler.port", 20)) {
    wait_all(pids, 1);
    m.error = "the scheduler did not start";
    return m;
  }
  cfg.cluster.scheduler_port = std::stoi(read_file(run + "/scheduler.port"));
  for (int s = 0; s < c.servers; ++s) {
    pids.push_back(spawn([&, s] {
      zmq::context_t ctx(1);
      server::Server server(cfg, ctx, s);
      return server.run();
    }));
  }
  const double run_seconds = o.warmup + o.seconds + 0.2;
  for (int w = 0; w < c.workers; ++w) {
    const std::string out = fmt::format("{}/bench-worker-{}.json", run, w);
    pids.push_back(spawn([&, w, out] { return run_sps_worker(cfg, c, w, run_seconds, out); }));
  }
  // Setup includes a dense initial push of n floats; generous for 25M.
  if (!wait_all(pids, 120 + 2 * run_seconds)) {
    m.error = "an sps process failed (see " + run + ")";
    return m;
  }
  double t0 = 0, t1 = 1e300;
  std::map<int, uint64_t> push_bytes;  // per worker, all shards
  for (int w = 0; w < c.workers; ++w) {
    const json r = json::parse(read_file(fmt::format("{}/bench-worker-{}.json", run, w)));
    t0 = std::max(t0, r["start"].get<double>() + o.warmup);
    t1 = std::min(t1, r["stop"].get<double>() - 0.1);
    push_bytes[w] = r["push_bytes"].get<uint64_t>();
  }
  if (t1 <= t0) {
    m.error = "measurement window is empty";
    return m;
  }
  // Each worker's push splits evenly over the shards (same counts +-1), so a
  // shard message of worker w is push_bytes[w] / S bytes.
  double bytes = 0, shard_pushes = 0, apply_s = 0, applied = 0, pull_bytes = 0, pulls = 0;
  for (int s = 0; s < c.servers; ++s) {
    std::ifstream in(fmt::format("{}/server-{}.jsonl", run, s));
    std::string line;
    while (std::getline(in, line)) {
      const json e = json::parse(line, nullptr, false);
      if (e.is_discarded()) continue;
      const std::string ev = e.value("event", "");
      if (ev == "stats") {
        apply_s += e.value("apply_seconds", 0.0);
        applied += e.value("pushes_applied", 0.0);
        continue;
      }
      if (ev != "apply" && ev != "pull") continue;
      const double t = e.value("t", 0.0);
      if (t < t0 || t > t1) continue;
      if (ev == "apply") {
        bytes += static_cast<double>(push_bytes[e["worker"].get<int>()]) / c.servers;
        shard_pushes += 1;
      } else {
        // The bare stream answers with pulls of the size measured here.
        bytes += e.value("bytes", 0.0);
        pull_bytes += e.value("bytes", 0.0);
        pulls += 1;
      }
    }
  }
  const double window = t1 - t0;
  m.gbps = bytes / window / 1e9;
  m.pushes_per_s = shard_pushes / c.servers / window;
  m.apply_us = applied > 0 ? 1e6 * apply_s / applied : NAN;
  m.pull_bytes = pulls > 0 ? pull_bytes / pulls : 0;
  m.ok = shard_pushes > 0;
  if (!m.ok) m.error = "no push was applied inside the window";
  return m;
}

// ---- bare ZeroMQ ----------------------------------------------------------

constexpr double kBucketSeconds = 0.01;
constexpr size_t kBuckets = 8192;  // 82 s of 10 ms buckets

// Receivers add the bytes they take in (and send back) to per-10 ms buckets
// in memory shared with the parent.
struct SharedCounters {
  double base = 0;
  std::atomic<uint64_t> bytes[kBuckets];
  std::atomic<int> ready;
  char endpoints[4][64];
  double sender_start[64];  // when each sender began its timed loop
};

void count(SharedCounters* sc, uint64_t n) {
  const double t = now_s() - sc->base;
  const auto b = static_cast<size_t>(std::max(0.0, t / kBucketSeconds));
  if (b < kBuckets) sc->bytes[b].fetch_add(n, std::memory_order_relaxed);
}

int run_bare_receiver(SharedCounters* sc, int index, const Case& c, size_t reply_bytes) {
  zmq::context_t ctx(1);
  auto sock = net::make_socket(ctx, net::SocketKind::kRouter, 0);
  sock.set(zmq::sockopt::rcvhwm, server::Server::kDataReceiveHighWaterMark);  // as the sps server
  const std::string ep = net::bind_tcp(sock, "127.0.0.1", 0);
  std::snprintf(sc->endpoints[index], sizeof sc->endpoints[index], "%s", ep.c_str());
  sc->ready.fetch_add(1);
  const std::vector<std::byte> reply(reply_bytes, std::byte{0});
  int finished = 0;
  zmq::message_t part;
  while (finished < c.workers) {
    zmq::message_t id;
    if (!sock.recv(id)) continue;
    uint64_t bytes = 0;
    int parts = 0;
    while (true) {
      if (!sock.recv(part)) break;
      bytes += part.size();
      ++parts;
      if (!part.more()) break;
    }
    // Data messages have three frames; a sender's end is one "stop" frame.
    if (parts == 1 && part.size() == 4 && std::memcmp(part.data(), "stop", 4) == 0) {
      ++finished;
      continue;
    }
    if (c.mode == "push_pull") {
      // Answer like a server answers a pull: header + the response's frames.
      sock.send(id, zmq::send_flags::sndmore);
      sock.send(zmq::buffer(reply.data(), std::min<size_t>(64, reply.size())), zmq::send_flags::sndmore);
      sock.send(zmq::buffer(reply.data(), reply.size() > 64 ? reply.size() - 64 : 0), zmq::send_flags::none);
      bytes += reply.size();
    }
    count(sc, bytes);
  }
  return 0;
}

int run_bare_sender(SharedCounters* sc, const Case& c, int rank, double run_seconds,
                    std::vector<protocol::EncodedMessage>& msgs) {
  zmq::context_t ctx(1);
  std::vector<zmq::socket_t> socks;
  for (int s = 0; s < c.servers; ++s) {
    // Linger so the final "stop" is delivered before the context closes.
    socks.push_back(net::make_socket(ctx, net::SocketKind::kDealer, 10000));
    socks.back().set(zmq::sockopt::sndhwm, worker::PsClient::kDataSendHighWaterMark);  // as the sps client
    socks.back().connect(sc->endpoints[s]);
  }
  sc->sender_start[rank] = now_s();
  const double stop_at = sc->sender_start[rank] + run_seconds;
  auto frame = [](const protocol::Frame& f) {
    // Zero-copy of a prebuilt buffer that outlives the send: the transport's
    // best case (small frames are copied, as net::send does).
    if (f.size() < net::kZeroCopyBytes) return zmq::message_t(f.data(), f.size());
    return zmq::message_t(const_cast<std::byte*>(f.data()), f.size(), [](void*, void*) {}, nullptr);
  };
  zmq::message_t reply;
  while (now_s() < stop_at) {
    for (int s = 0; s < c.servers; ++s) {
      const auto& m = msgs[s];
      socks[s].send(zmq::buffer(m.header), zmq::send_flags::sndmore);
      socks[s].send(frame(m.frame1), zmq::send_flags::sndmore);
      socks[s].send(frame(m.frame2), zmq::send_flags::none);
    }
    if (c.mode == "push_pull") {
      for (int s = 0; s < c.servers; ++s) {
        do {
          if (!socks[s].recv(reply)) throw std::runtime_error("no reply");
        } while (reply.more());
      }
    }
  }
  for (auto& s : socks) s.send(zmq::str_buffer("stop"), zmq::send_flags::none);
  return 0;
}

Measured run_bare(const Options& o, const Case& c, double reply_bytes) {
  Measured m;
  auto* sc = static_cast<SharedCounters*>(
      mmap(nullptr, sizeof(SharedCounters), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  if (sc == MAP_FAILED) {
    m.error = "mmap failed";
    return m;
  }
  new (sc) SharedCounters();
  sc->base = now_s();
  std::vector<pid_t> pids;
  for (int s = 0; s < c.servers; ++s)
    pids.push_back(spawn([&, s] { return run_bare_receiver(sc, s, c, static_cast<size_t>(reply_bytes)); }));
  const double deadline = now_s() + 10;
  while (sc->ready.load() < c.servers && now_s() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  const double run_seconds = o.warmup + o.seconds + 0.2;
  for (int w = 0; w < c.workers; ++w) {
    pids.push_back(spawn([&, w] {
      // The frames an sps client sends for this case, built the same way.
      const auto sel = selection(c.n, c.density, 1000 + static_cast<uint32_t>(w));
      std::vector<float> dense(c.dense() ? c.n : 0, 1e-3f);
      std::vector<protocol::EncodedMessage> msgs;
      size_t pos = 0;
      for (auto [b, e] : ranges(c.n, c.servers)) {
        protocol::Header h;
        h.type = protocol::MessageType::kPush;
        h.key_begin = b;
        h.key_end = e;
        if (c.dense()) {
          h.index_encoding = protocol::IndexEncoding::kNone;
          msgs.push_back(protocol::encode_data(h, {}, std::span(dense).subspan(b, e - b)));
        } else {
          const size_t begin = pos;
          while (pos < sel.size() && sel.indices[pos] < e) ++pos;
          h.index_encoding = protocol::choose_index_encoding(pos - begin, e - b);
          if (o.index_coding == "raw") h.index_encoding = protocol::IndexEncoding::kRawU32;
          if (o.index_coding == "delta_varint") h.index_encoding = protocol::IndexEncoding::kDeltaVarint;
          if (o.index_coding == "bitmap") h.index_encoding = protocol::IndexEncoding::kBitmap;
          msgs.push_back(protocol::encode_data(h, std::span(sel.indices).subspan(begin, pos - begin),
                                               std::span(sel.values).subspan(begin, pos - begin)));
        }
      }
      return run_bare_sender(sc, c, w, run_seconds, msgs);
    }));
  }
  const bool ok = wait_all(pids, 60 + 2 * run_seconds);
  const std::vector<double> starts(sc->sender_start, sc->sender_start + c.workers);
  // Window as for sps: after the warm-up of the last sender, until shortly
  // before the first one stops.
  const double t0 = *std::max_element(starts.begin(), starts.end()) + o.warmup + 0.05 - sc->base;
  const double t1 = *std::min_element(starts.begin(), starts.end()) + run_seconds - 0.1 - sc->base;
  const auto b0 = static_cast<size_t>(std::ceil(t0 / kBucketSeconds));
  const auto b1 = std::min(kBuckets, static_cast<size_t>(t1 / kBucketSeconds));
  double bytes = 0;
  for (size_t b = b0; b < b1; ++b) bytes += static_cast<double>(sc->bytes[b].load());
  const double window = static_cast<double>(b1 - b0) * kBucketSeconds;
  munmap(sc, sizeof(SharedCounters));
  if (!ok || b1 <= b0) {
    m.error = ok ? "measurement window is empty" : "a baseline process failed";
    return m;
  }
  m.gbps = bytes / window / 1e9;
  m.ok = true;
  return m;
}

// ---- driver ---------------------------------------------------------------

template <class T>
std::vector<T> parse_list(const std::string& s) {
  std::vector<T> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    if constexpr (std::is_same_v<T, std::string>) {
      out.push_back(item);
    } else {
      std::stringstream is(item);
      double v = 0;
      is >> v;
      if (!is || !is.eof()) throw CLI::ValidationError("not a number: " + item);
      out.push_back(static_cast<T>(v));
    }
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"sps-bench-net: push and push+pull throughput of the sps server and client over loopback,\n"
               "against a bare ZeroMQ DEALER->ROUTER stream of the same frames in the same run.\n"
               "Prints one row per case; sps / bare ZeroMQ is the ratio column."};
  Options o;
  std::string n_list = "1000000,25000000", density_list = "0.001,0.01,1", worker_list = "1,2,4",
              server_list = "1,2", mode_list = "push,push_pull";
  app.add_option("--n", n_list, "Model sizes, comma-separated")->capture_default_str();
  app.add_option("--density", density_list, "Fractions of the model per push (1 = dense), comma-separated")
      ->capture_default_str();
  app.add_option("--workers", worker_list, "Worker counts, comma-separated")->capture_default_str();
  app.add_option("--servers", server_list, "Server counts, comma-separated")->capture_default_str();
  app.add_option("--modes", mode_list, "push and/or push_pull")->capture_default_str();
  app.add_option("--seconds", o.seconds, "Measured seconds per case and side")->capture_default_str()->check(
      CLI::PositiveNumber);
  app.add_option("--warmup", o.warmup, "Seconds before the window opens")->capture_default_str()->check(
      CLI::NonNegativeNumber);
  app.add_option("--index-coding", o.index_coding, "Sparse key coding: auto | raw | delta_varint | bitmap")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "raw", "delta_varint", "bitmap"}));
  bool keep_freed_memory = true;
  app.add_option("--keep-freed-memory", keep_freed_memory,
                 "Every process (sps and bare ZeroMQ alike) keeps freed memory for reuse, as sps-server and\n"
                 "sps-worker do by default (cluster.keep_freed_memory); false: the allocator's defaults")
      ->capture_default_str();
  app.add_option("--server-threads", o.server_threads, "Threads each sps server applies with (cluster.server_threads)")
      ->capture_default_str()
      ->check(CLI::Range(0, 256));
  app.add_option("--dir", o.dir, "Folder for the run's logs (default: a fresh temporary folder)");
  app.add_option("--json", o.json_path, "Also write the rows to this JSON file");
  CLI11_PARSE(app, argc, argv);
  // Before any process is forked, so both sides of every case run with it.
  if (keep_freed_memory) sps::keep_freed_memory_for_reuse();
  try {
    o.n = parse_list<uint64_t>(n_list);
    o.density = parse_list<double>(density_list);
    o.workers = parse_list<int>(worker_list);
    o.servers = parse_list<int>(server_list);
    o.modes = parse_list<std::string>(mode_list);
  } catch (const CLI::Error& e) {
    std::cerr << "sps-bench-net: " << e.what() << "\n";
    return 2;
  }
  for (const auto& mode : o.modes)
    if (mode != "push" && mode != "push_pull") {
      std::cerr << "sps-bench-net: --modes takes push and push_pull, not " << mode << "\n";
      return 2;
    }
  for (double d : o.density)
    if (!(d > 0 && d <= 1)) {
      std::cerr << "sps-bench-net: a density must be in (0, 1], not " << d << "\n";
      return 2;
    }
  for (int s : o.servers)
    if (s < 1 || s > 4) {
      std::cerr << "sps-bench-net: servers must be 1..4\n";
      return 2;
    }
  if (o.dir.empty()) {
    char tmpl[] = "/tmp/sps-bench-net-XXXXXX";
    if (mkdtemp(tmpl) == nullptr) {
      std::cerr << "sps-bench-net: cannot make a temporary folder\n";
      return 1;
    }
    o.dir = tmpl;
  }
  spdlog::set_level(spdlog::level::warn);
  std::vector<Case> cases;
  for (uint64_t n : o.n)
    for (double d : o.density)
      for (int s : o.servers)
        for (int w : o.workers)
          for (const auto& mode : o.modes) cases.push_back({n, d, w, s, mode});
  fmt::print("{:>10} {:>8} {:>3} {:>3} {:>9} {:>11} {:>10} {:>9} {:>9} {:>7} {:>10}\n", "n", "density", "W", "S", "mode",
             "push bytes", "pushes/s", "sps GB/s", "zmq GB/s", "ratio", "apply us");
  json rows = json::array();
  int failures = 0;
  const double started = now_s();
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    const std::string dir = fmt::format("{}/case-{}", o.dir, i);
    const Measured sps = run_sps(o, c, dir);
    Measured bare;
    if (sps.ok) bare = run_bare(o, c, c.mode == "push_pull" ? sps.pull_bytes : 0);
    // The push size as the sps client counted it (worker 0, all shards).
    uint64_t push_bytes = 0;
    if (sps.ok) {
      const json r = json::parse(read_file(dir + "/sps/bench-worker-0.json"));
      push_bytes = r["push_bytes"].get<uint64_t>();
    }
    if (!sps.ok || !bare.ok) {
      ++failures;
      fmt::print("{:>10} {:>8} {:>3} {:>3} {:>9}  failed: {}\n", c.n, c.density, c.workers, c.servers, c.mode,
                 !sps.ok ? sps.error : bare.error);
      continue;
    }
    const double ratio = sps.gbps / bare.gbps;
    fmt::print("{:>10} {:>8} {:>3} {:>3} {:>9} {:>11} {:>10.0f} {:>9.3f} {:>9.3f} {:>7.2f} {:>10.1f}\n", c.n, c.density,
               c.workers, c.servers, c.mode, push_bytes, sps.pushes_per_s, sps.gbps, bare.gbps, ratio, sps.apply_us);
    std::fflush(stdout);
    rows.push_back({{"n", c.n},
                    {"density", c.density},
                    {"workers", c.workers},
                    {"servers", c.servers},
                    {"mode", c.mode},
                    {"push_bytes", push_bytes},
                    {"pushes_per_s", sps.pushes_per_s},
                    {"sps_gbps", sps.gbps},
                    {"bare_zmq_gbps", bare.gbps},
                    {"ratio", ratio},
                    {"apply_us_per_shard_push", std::isnan(sps.apply_us) ? json(nullptr) : json(sps.apply_us)},
                    {"index_coding", o.index_coding},
                    {"server_threads", o.server_threads}});
  }
  fmt::print("{} cases in {:.0f} s; logs in {}\n", cases.size(), now_s() - started, o.dir);
  if (!o.json_path.empty()) std::ofstream(o.json_path) << rows.dump(2) << "\n";
  return failures == 0 ? 0 : 1;
}
