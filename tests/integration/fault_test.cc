// Failure injection with real processes: SIGKILL a worker or a server,
// SIGTERM the scheduler. A dead node never hangs the job, and no process is
// left behind.
#include <gtest/gtest.h>

#include <signal.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <thread>
#include <string>
#include <tuple>
#include <vector>

#include "net/link.h"
#include "protocol/message.h"
#include "tests/integration/harness.h"

namespace sps::testing {
namespace {

// 4 s, not less: under a loaded sanitizer run a healthy process's heartbeat
// has been seen to stall for 1.5 s, and a false death fails the test.
const std::vector<std::string> kFastFailure = {"cluster.heartbeat_ms=100", "cluster.heartbeat_timeout_ms=4000",
                                               "data.train_limit=2000", "data.test_limit=500"};

std::vector<std::string> with(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// The scheduler's node_dead events as (role, rank, why).
std::vector<std::tuple<std::string, int, std::string>> deaths(const Job& job) {
  std::vector<std::tuple<std::string, int, std::string>> out;
  for (const auto& e : read_jsonl(job.path("scheduler.jsonl")))
    if (e.value("event", "") == "node_dead") out.emplace_back(e["role"], e["rank"], e["why"]);
  return out;
}

TEST(FaultTest, KilledWorkerIsDroppedAndTheJobCompletes) {
  // A heartbeat timeout longer than the test may take: the death must be
  // noticed by the closed connection, not by the worker's silence.
  Job job("kill_worker", 3, 2,
          {"cluster.heartbeat_ms=100", "cluster.heartbeat_timeout_ms=600000", "data.train_limit=2000",
           "data.test_limit=500", "training.steps=1500", "training.batch_size=8"});
  ASSERT_TRUE(job.start());
  ASSERT_GE(wait_for_lines(job.path("worker-2.jsonl"), 50, 60), 50u) << "worker 2 never got going";
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // a few heartbeats with counters in them
  job.workers[2].send_signal(SIGKILL);
  ASSERT_TRUE(job.wait_all(120)) << "the job hung after a worker died";
  EXPECT_EQ(job.scheduler.exit_status(), 0) << read_text(job.path("scheduler.out"));
  EXPECT_EQ(job.workers[0].exit_status(), 0);
  EXPECT_EQ(job.workers[1].exit_status(), 0);
  EXPECT_EQ(job.servers[0].exit_status(), 0);
  const auto s = read_json(job.path("summary.json"));
  ASSERT_TRUE(s.is_object());
  EXPECT_EQ(s["steps"].get<int64_t>(), 1500);
  ASSERT_EQ(s["dead_workers"], nlohmann::json::array({2}));  // the harness asks for rank = index
  int servers_told = 0;
  for (int sv = 0; sv < 2; ++sv)
    for (const auto& line : read_jsonl(job.path("server-" + std::to_string(sv) + ".jsonl")))
      if (line.value("event", "") == "worker_dead" && line["worker"] == 2) ++servers_told;
  EXPECT_EQ(servers_told, 2);
  const auto dead = deaths(job);
  ASSERT_EQ(dead.size(), 1u);
  EXPECT_EQ(std::get<0>(dead[0]), "worker");
  EXPECT_EQ(std::get<1>(dead[0]), 2);
  EXPECT_NE(std::get<2>(dead[0]).find("connection to the scheduler closed"), std::string::npos) << std::get<2>(dead[0]);

  // The dead worker's pushes count in the totals, from its last heartbeat:
  // more than nothing, and no more than it logged plus the push in flight.
  int64_t live_bytes = 0;
  for (int w = 0; w < 2; ++w)
    for (const auto& line : read_jsonl(job.path("worker-" + std::to_string(w) + ".jsonl")))
      if (line.value("event", "") == "done") live_bytes += line["bytes_pushed"].get<int64_t>();
  int64_t logged = 0, largest_step = 0;
  for (const auto& line : read_jsonl(job.path("worker-2.jsonl")))
    if (line.contains("step") && line.contains("bytes_pushed")) {
      logged += line["bytes_pushed"].get<int64_t>();
      largest_step = std::max(largest_step, line["bytes_pushed"].get<int64_t>());
    }
  const int64_t dead_share = s["bytes_pushed"].get<int64_t>() - live_bytes;
  EXPECT_GT(dead_share, 0) << s.dump();
  EXPECT_LE(dead_share, logged + largest_step) << "logged " << logged;
  EXPECT_EQ(s["stats_from_heartbeats"], nlohmann::json::parse(R"([{"role": "worker", "rank": 2}])")) << s.dump();
}

TEST(FaultTest, AFrozenWorkerIsDeclaredDeadByItsSilence) {
  // SIGSTOP keeps the process and its connections: only the heartbeat
  // timeout can tell, and the job still completes without the worker.
  Job job("freeze_worker", 3, 1, with(kFastFailure, {"training.steps=1500", "training.batch_size=8"}));
  ASSERT_TRUE(job.start());
  ASSERT_GE(wait_for_lines(job.path("worker-2.jsonl"), 50, 60), 50u) << "worker 2 never got going";
  job.workers[2].send_signal(SIGSTOP);
  EXPECT_EQ(job.scheduler.wait(120), 0) << read_text(job.path("scheduler.out"));
  job.workers[2].send_signal(SIGKILL);
  ASSERT_TRUE(job.wait_all(60));
  EXPECT_EQ(job.workers[0].exit_status(), 0);
  EXPECT_EQ(job.workers[1].exit_status(), 0);
  const auto s = read_json(job.path("summary.json"));
  ASSERT_TRUE(s.is_object());
  EXPECT_EQ(s["steps"].get<int64_t>(), 1500);
  EXPECT_EQ(s["dead_workers"], nlohmann::json::array({2}));
  const auto dead = deaths(job);
  ASSERT_EQ(dead.size(), 1u);
  EXPECT_EQ(std::get<1>(dead[0]), 2);
  EXPECT_NE(std::get<2>(dead[0]).find("silent for"), std::string::npos) << std::get<2>(dead[0]);
}

bool scheduler_wrote_off(const Job& job, int rank, size_t times, double timeout_s) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  while (std::chrono::steady_clock::now() < until) {
    size_t n = 0;
    for (const auto& d : deaths(job)) n += (std::get<0>(d) == "worker" && std::get<1>(d) == rank) ? 1 : 0;
    if (n >= times) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

// A replacement that dies after it was assigned but before it started
// (here the test plays it: it registers for the dead rank, gets the REJOIN
// assignment and closes its connection without entering its barrier) is
// dead like any worker: the servers drop it again, and the next
// replacement joins and the job completes.
TEST(FaultTest, AReplacementThatDiesWhileJoiningIsDroppedAndTheNextOneJoins) {
  Job job("replace_twice", 3, 2,
          {"cluster.heartbeat_ms=100", "cluster.heartbeat_timeout_ms=600000", "data.train_limit=4000",
           "data.test_limit=500", "training.steps=3000", "training.batch_size=8", "workers.delay_ms=[3, 3, 3]"});
  ASSERT_TRUE(job.start());
  ASSERT_GE(wait_for_lines(job.path("worker-2.jsonl"), 100, 60), 100u);
  job.workers[2].send_signal(SIGKILL);
  ASSERT_TRUE(scheduler_wrote_off(job, 2, 1, 30));
  uint64_t num_params = 0;
  for (const auto& e : read_jsonl(job.path("scheduler.jsonl")))
    if (e.value("event", "") == "assign") num_params = e["num_params"];
  ASSERT_GT(num_params, 0u);
  {
    zmq::context_t ctx;
    zmq::socket_t s = net::make_socket(ctx, net::SocketKind::kDealer, 0);
    s.connect("tcp://127.0.0.1:" + std::to_string(job.port));
    protocol::Header h;
    h.type = protocol::MessageType::kRegister;
    protocol::RegisterInfo info;
    info.role = protocol::Role::kWorker;
    info.num_params = num_params;
    info.host = "test";
    info.requested_rank = 2;
    ASSERT_TRUE(net::send(s, protocol::encode_control(h, protocol::encode_register(info))).ok());
    bool assigned = false;
    for (int i = 0; i < 100 && !assigned; ++i) {
      (void)net::wait_readable({&s}, std::chrono::milliseconds(100));
      while (auto r = net::try_recv(s, false)) {
        auto m = net::decode(*r);
        ASSERT_TRUE(m.ok());
        if (m->header.type != protocol::MessageType::kAssign) continue;
        EXPECT_NE(m->header.flags & protocol::kFlagRejoin, 0);
        auto a = protocol::decode_assign(m->frame1);
        ASSERT_TRUE(a.ok());
        EXPECT_EQ(a->rank, 2u);
        assigned = true;
      }
    }
    ASSERT_TRUE(assigned) << read_text(job.path("scheduler.out"));
    // Both servers set its start clock; only its barrier is missing.
    auto joined_at_servers = [&] {
      int n = 0;
      for (int sv = 0; sv < 2; ++sv)
        for (const auto& e : read_jsonl(job.path("server-" + std::to_string(sv) + ".jsonl")))
          n += e.value("event", "") == "worker_joined" ? 1 : 0;
      return n;
    };
    for (int i = 0; i < 300 && joined_at_servers() < 2; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ASSERT_EQ(joined_at_servers(), 2);
  }  // closes the connection: this "replacement" died while joining
  ASSERT_TRUE(scheduler_wrote_off(job, 2, 2, 30)) << read_text(job.path("scheduler.out"));
  job.start_worker(2);  // workers[3]
  ASSERT_TRUE(job.wait_all(120));
  EXPECT_EQ(job.scheduler.exit_status(), 0) << read_text(job.path("scheduler.out"));
  for (int w : {0, 1, 3}) EXPECT_EQ(job.workers[w].exit_status(), 0) << "worker process " << w;
  const auto s = read_json(job.path("summary.json"));
  EXPECT_EQ(s["dead_workers"], nlohmann::json::array({2, 2}));
  ASSERT_EQ(s["rejoined_workers"].size(), 1u) << s.dump();
  EXPECT_EQ(s["steps"], 3000);
  int joined = 0, dropped = 0;
  for (int sv = 0; sv < 2; ++sv)
    for (const auto& e : read_jsonl(job.path("server-" + std::to_string(sv) + ".jsonl"))) {
      joined += e.value("event", "") == "worker_joined" ? 1 : 0;
      dropped += e.value("event", "") == "worker_dead" ? 1 : 0;
    }
  EXPECT_EQ(joined, 4) << "each server: the one that died while joining, then the one that ran";
  EXPECT_EQ(dropped, 4);
}

TEST(FaultTest, KilledServerEndsTheJobWithAnErrorNotAHang) {
  Job job("kill_server", 2, 2, with(kFastFailure, {"training.steps=1000000"}));
  ASSERT_TRUE(job.start());
  ASSERT_GE(wait_for_lines(job.path("worker-0.jsonl"), 20, 60), 20u);
  job.servers[1].send_signal(SIGKILL);
  ASSERT_TRUE(job.wait_all(60)) << "processes hung after a server died";
  EXPECT_EQ(job.scheduler.exit_status(), 1);
  EXPECT_NE(job.workers[0].exit_status(), 0);
  EXPECT_NE(job.workers[1].exit_status(), 0);
  EXPECT_NE(read_text(job.path("scheduler.out")).find("server 1 died (its connection to the scheduler closed"),
            std::string::npos)
      << read_text(job.path("scheduler.out"));
}

TEST(FaultTest, SigtermToTheSchedulerStopsEveryProcess) {
  Job job("sigterm", 2, 1, with(kFastFailure, {"training.steps=1000000"}));
  ASSERT_TRUE(job.start());
  ASSERT_GE(wait_for_lines(job.path("worker-1.jsonl"), 20, 60), 20u);
  job.scheduler.send_signal(SIGTERM);
  ASSERT_TRUE(job.wait_all(30)) << "processes kept running after the scheduler was stopped";
  EXPECT_NE(job.scheduler.exit_status(), 0);
  for (auto& w : job.workers) EXPECT_NE(w.exit_status(), 0);
}

TEST(FaultTest, KilledSchedulerEndsEveryNodeWithTheReason) {
  // A heartbeat timeout longer than the test may take: the nodes must learn
  // of it from their closed connections.
  Job job("kill_scheduler", 2, 2,
          {"cluster.heartbeat_ms=100", "cluster.heartbeat_timeout_ms=600000", "data.train_limit=2000",
           "data.test_limit=500", "training.steps=1000000"});
  ASSERT_TRUE(job.start());
  ASSERT_GE(wait_for_lines(job.path("worker-1.jsonl"), 20, 60), 20u);
  job.scheduler.send_signal(SIGKILL);
  ASSERT_TRUE(job.wait_all(30)) << "nodes kept running after the scheduler was killed";
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(job.workers[i].exit_status(), 1);
    EXPECT_EQ(job.servers[i].exit_status(), 1);
    for (const std::string node : {"worker-", "server-"}) {
      const auto out = read_text(job.path(node + std::to_string(i) + ".out"));
      EXPECT_NE(out.find("closed its connection: its process exited or was killed"), std::string::npos) << out;
    }
  }
}

TEST(FaultTest, SigintToAWorkerStopsItCleanly) {
  Job job("sigint_worker", 1, 1, with(kFastFailure, {"training.steps=1000000"}));
  ASSERT_TRUE(job.start());
  ASSERT_GE(wait_for_lines(job.path("worker-0.jsonl"), 20, 60), 20u);
  job.workers[0].send_signal(SIGINT);
  EXPECT_EQ(job.workers[0].wait(10), 128 + SIGINT) << read_text(job.path("worker-0.out"));
  // With its only worker gone the scheduler ends the job with an error.
  ASSERT_TRUE(job.wait_all(30));
  EXPECT_EQ(job.scheduler.exit_status(), 1) << read_text(job.path("scheduler.out"));
}

TEST(FaultTest, BadConfigNamesFileLineAndKey) {
  const auto dir = fresh_run_dir("bad_config");
  const std::string cfg = dir + "/bad.yaml";
  {
    std::ofstream f(cfg);
    f << "training:\n  steps: 10\n  learning_rate: 0.1\n";
  }
  Process p({bin("sps-worker"), "--config", cfg}, dir + "/out.txt");
  EXPECT_EQ(p.wait(10), 2);
  EXPECT_NE(read_text(dir + "/out.txt").find("bad.yaml:3:3: unknown key 'training.learning_rate'"), std::string::npos)
      << read_text(dir + "/out.txt");
}

}  // namespace
}  // namespace sps::testing
