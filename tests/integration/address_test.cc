// Bound vs advertised addresses and failing fast on bad ones, with real
// processes: a server bound to every interface tells workers a routable
// address inside the configured port range; a scheduler or server address
// that does not answer ends the process with an error naming it, within
// cluster.connect_timeout_ms, instead of ZeroMQ's silent reconnect loop.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <thread>

#include <zmq.hpp>

#include "tests/integration/harness.h"

namespace sps::testing {
namespace {

// A loopback port nothing listens on (bound, then released).
int closed_port() {
  zmq::context_t ctx(1);
  zmq::socket_t s(ctx, zmq::socket_type::router);
  s.set(zmq::sockopt::linger, 0);
  s.bind("tcp://127.0.0.1:*");
  const std::string ep = s.get(zmq::sockopt::last_endpoint);
  return std::stoi(ep.substr(ep.rfind(':') + 1));
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The command line of `program` (sps-worker or sps-server) started on its
// own and aimed at a scheduler on 127.0.0.1:`port`, with its output under `dir`.
std::vector<std::string> node_aimed_at(const char* program, int port, int connect_timeout_ms, int heartbeat_timeout_ms,
                                       const std::string& dir) {
  return {bin(program),
          "--set", "cluster.scheduler_port=" + std::to_string(port),
          "--set", "cluster.connect_timeout_ms=" + std::to_string(connect_timeout_ms),
          "--set", "cluster.heartbeat_timeout_ms=" + std::to_string(heartbeat_timeout_ms),
          "--set", "data.train_limit=500",
          "--set", "data.test_limit=100",
          "--set", "run.dir=" + dir};
}

const std::vector<std::string> kSmallJob = {"data.train_limit=2000", "data.test_limit=500", "training.steps=60"};

TEST(NodeAddressTest, WildcardBoundServersAdvertiseARoutableAddressInThePortRange) {
  const int lo = closed_port();
  auto sets = kSmallJob;
  sets.push_back("cluster.bind_host=0.0.0.0");
  sets.push_back("cluster.port_min=" + std::to_string(lo));
  sets.push_back("cluster.port_max=" + std::to_string(std::min(lo + 50, 65535)));
  Job job("wildcard_bind", 2, 2, sets);
  ASSERT_TRUE(job.start()) << read_text(job.path("scheduler.out"));
  ASSERT_TRUE(job.wait_all(120));
  ASSERT_EQ(job.scheduler.exit_status(), 0) << read_text(job.path("scheduler.out"));
  int servers_seen = 0;
  for (const auto& line : read_jsonl(job.path("scheduler.jsonl"))) {
    if (line.value("event", "") != "register" || line.value("role", "") != "server") continue;
    ++servers_seen;
    const std::string ep = line["endpoint"];
    EXPECT_EQ(ep.rfind("tcp://127.0.0.1:", 0), 0u) << ep << " (a wildcard must never be advertised)";
    const int port = std::stoi(ep.substr(ep.rfind(':') + 1));
    EXPECT_GE(port, lo);
    EXPECT_LE(port, lo + 50);
  }
  EXPECT_EQ(servers_seen, 2);
  // The scheduler took the first port of the range (scheduler_port 0), the servers later ones.
  EXPECT_EQ(job.port, lo);
}

TEST(NodeAddressTest, AnUnreachableSchedulerFailsEachNodeNamingTheAddress) {
  const std::string dir = fresh_run_dir("unreachable_scheduler");
  const int port = closed_port();
  for (const char* program : {"sps-worker", "sps-server"}) {
    const auto t0 = std::chrono::steady_clock::now();
    // A fallback to the heartbeat timeout would take a minute.
    Process p(node_aimed_at(program, port, 1000, 60000, dir), dir + "/" + program + ".out");
    const int status = p.wait(45);
    const std::string out = read_text(dir + "/" + program + ".out");
    EXPECT_NE(status, 0) << program;
    EXPECT_NE(status, -1) << program << " hung";
    EXPECT_LT(seconds_since(t0), 30.0) << program;  // start-up (slow under sanitizers) + 1 s
    EXPECT_NE(out.find("127.0.0.1:" + std::to_string(port)), std::string::npos) << program << ": " << out;
    EXPECT_NE(out.find("cluster.scheduler_host"), std::string::npos) << program << ": " << out;
  }
}

// A node still waiting for its scheduler stops at SIGTERM (what a dying
// sps-launch sends its children), not at the end of the connect timeout.
TEST(NodeAddressTest, ASignalStopsANodeWaitingForTheScheduler) {
  const std::string dir = fresh_run_dir("stopped_while_waiting");
  const int port = closed_port();
  for (const char* program : {"sps-worker", "sps-server"}) {
    Process p(node_aimed_at(program, port, 120000, 120000, dir), dir + "/" + program + ".out");
    // Long enough to reach the wait (start-up is slower under sanitizers;
    // a signal that comes earlier ends the process as well).
    std::this_thread::sleep_for(std::chrono::seconds(2));
    ASSERT_TRUE(p.running()) << program << ": " << read_text(dir + "/" + program + ".out");
    const auto t0 = std::chrono::steady_clock::now();
    p.send_signal(SIGTERM);
    const int status = p.wait(20);
    const std::string out = read_text(dir + "/" + program + ".out");
    ASSERT_NE(status, -1) << program << " kept waiting after SIGTERM: " << out;
    EXPECT_EQ(status, 128 + SIGTERM) << program << ": " << out;
    EXPECT_LT(seconds_since(t0), 5.0) << program;
  }
}

// A port that accepts TCP connections but never speaks (a wrong port, a
// proxy): the probe passes, so the silence itself is reported, naming the
// address, after cluster.connect_timeout_ms.
TEST(NodeAddressTest, APortThatAcceptsButNeverAnswersIsNamed) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  ASSERT_EQ(::listen(fd, 16), 0);
  socklen_t len = sizeof(a);
  ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len), 0);
  const int port = ntohs(a.sin_port);
  const std::string dir = fresh_run_dir("mute_scheduler");
  for (const char* program : {"sps-worker", "sps-server"}) {
    const auto t0 = std::chrono::steady_clock::now();
    Process p(node_aimed_at(program, port, 1500, 60000, dir), dir + "/" + program + ".out");
    const int status = p.wait(45);
    const std::string out = read_text(dir + "/" + program + ".out");
    EXPECT_NE(status, 0) << program;
    EXPECT_NE(status, -1) << program << " hung";
    EXPECT_LT(seconds_since(t0), 30.0) << program << " waited for the heartbeat timeout instead";
    EXPECT_NE(out.find("no answer from the scheduler at 127.0.0.1:" + std::to_string(port)), std::string::npos)
        << program << ": " << out;
  }
  ::close(fd);
}

TEST(NodeAddressTest, AnUnresolvableHostIsAnErrorNamingKeyAndHost) {
  const std::string dir = fresh_run_dir("unresolvable_host");
  for (const char* program : {"sps-worker", "sps-server"}) {
    Process p({bin(program), "--set", "cluster.scheduler_port=5", "--set", "cluster.scheduler_host=no-such-host.invalid",
               "--set", "run.dir=" + dir},
              dir + "/" + program + ".out");
    EXPECT_EQ(p.wait(30), 1) << program;
    const std::string out = read_text(dir + "/" + program + ".out");
    EXPECT_NE(out.find("cluster.scheduler_host: cannot resolve host 'no-such-host.invalid'"), std::string::npos)
        << program << ": " << out;
  }
}

// A server that advertises an address where nothing listens: the workers
// report the server and the address, and the job ends instead of hanging.
TEST(NodeAddressTest, AWrongAdvertisedAddressFailsTheWorkersNamingIt) {
  auto sets = kSmallJob;
  sets.push_back("cluster.advertise_host=127.0.0.2");  // bound to 127.0.0.1 only
  sets.push_back("cluster.connect_timeout_ms=1000");
  sets.push_back("cluster.on_worker_loss=abort");
  Job job("wrong_advertised", 1, 1, sets);
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(job.start());
  ASSERT_TRUE(job.wait_all(60)) << "the job hung";
  EXPECT_LT(seconds_since(t0), 30.0);
  EXPECT_NE(job.workers[0].exit_status(), 0);
  EXPECT_NE(job.scheduler.exit_status(), 0);
  const std::string out = read_text(job.path("worker-0.out"));
  EXPECT_NE(out.find("server 0"), std::string::npos) << out;
  EXPECT_NE(out.find("127.0.0.2:"), std::string::npos) << out;
  EXPECT_NE(out.find("cluster.advertise_host"), std::string::npos) << out;
}

}  // namespace
}  // namespace sps::testing
