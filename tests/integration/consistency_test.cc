// BSP, SSP and ASP with real processes: every mode trains the demo model,
// the SSP bound holds in the servers' logs, and a killed worker never hangs
// a job in any mode (continue) or ends it with its reason (abort).
#include <gtest/gtest.h>

#include <signal.h>

#include <chrono>
#include <map>
#include <thread>
#include <tuple>

#include "tests/integration/harness.h"

namespace sps::testing {
namespace {

struct Mode {
  std::string name;
  std::vector<std::string> sets;
};

const std::vector<Mode> kModes = {
    {"bsp", {"consistency.mode=bsp"}},
    {"ssp2", {"consistency.mode=ssp", "consistency.staleness=2"}},
    {"asp", {"consistency.mode=asp"}},
};

std::vector<std::string> with(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

void PrintTo(const Mode& m, std::ostream* os) { *os << m.name; }

class ModeTest : public ::testing::TestWithParam<Mode> {};

TEST_P(ModeTest, TrainsTheDemoModelToTheAccuracyBand) {
  const Mode& m = GetParam();
  // A cosine schedule, so the accuracy is that of the trained model, not of
  // where a constant lr of 0.5 happens to leave the last iterate (which
  // swings by a few points between runs whose update order differs).
  Job job("accuracy_" + m.name, 4, 2, with({"training.steps=1000", "optimizer.lr_schedule=cosine"}, m.sets));
  ASSERT_TRUE(job.start());
  ASSERT_TRUE(job.wait_all(300));
  ASSERT_EQ(job.scheduler.exit_status(), 0) << read_text(job.path("scheduler.out"));
  const auto s = read_json(job.path("summary.json"));
  EXPECT_GE(s["test_accuracy"].get<double>(), 0.80) << m.name;
  EXPECT_EQ(processes_mentioning(job.run_dir), std::vector<int>{});
}

// These jobs run 7 processes on the 2-core machine next to other tests;
// under ThreadSanitizer a healthy server once went 1.5 s without a
// heartbeat (the scheduler then failed the job before the kill). 4 s keeps
// the detection the tests wait for well inside their deadlines.
const char* const kSevenProcessTimeout = "cluster.heartbeat_timeout_ms=4000";

TEST_P(ModeTest, KilledWorkerNeverHangsTheJob) {
  const Mode& m = GetParam();
  Job job("kill_" + m.name, 4, 2,
          with({"cluster.heartbeat_ms=100", kSevenProcessTimeout, "data.train_limit=4000",
                "data.test_limit=500", "training.steps=1500", "training.batch_size=8"},
               m.sets));
  ASSERT_TRUE(job.start());
  ASSERT_GE(wait_for_lines(job.path("worker-1.jsonl"), 100, 60), 100u);
  job.workers[1].send_signal(SIGKILL);
  ASSERT_TRUE(job.wait_all(120)) << m.name << ": the job hung after a worker died";
  EXPECT_EQ(job.scheduler.exit_status(), 0) << read_text(job.path("scheduler.out"));
  for (int w : {0, 2, 3}) EXPECT_EQ(job.workers[w].exit_status(), 0) << "worker " << w;
  const auto s = read_json(job.path("summary.json"));
  EXPECT_EQ(s["dead_workers"], nlohmann::json::array({1}));
  EXPECT_EQ(s["steps"].get<int64_t>(), 1500);
  EXPECT_EQ(processes_mentioning(job.run_dir), std::vector<int>{});
}

// A new process with a dead worker's rank takes its place in the running
// job: it starts at the clock the servers agreed on, every clock is applied
// exactly once on every shard (the new worker's from that clock on), and a
// process asking for a live worker's rank is refused without the job noticing.
TEST_P(ModeTest, AKilledWorkerIsReplacedByANewProcessThatJoinsTheRunningJob) {
  const Mode& m = GetParam();
  // At least 9 s (a paced 3 ms a step, which costs no CPU, so a sanitizer
  // build is not much slower): the job still runs when the replacement starts.
  const int64_t steps = 3000;
  Job job("replace_" + m.name, 3, 2,
          with({"cluster.heartbeat_ms=100", "cluster.heartbeat_timeout_ms=600000", "data.train_limit=4000",
                "data.test_limit=500", "training.steps=3000", "training.batch_size=8", "workers.delay_ms=[3, 3, 3]"},
               m.sets));
  ASSERT_TRUE(job.start());
  ASSERT_GE(wait_for_lines(job.path("worker-2.jsonl"), 100, 60), 100u);
  job.start_worker(0);  // workers[3]: worker 0 is alive
  EXPECT_NE(job.workers[3].wait(60), 0);
  EXPECT_NE(read_text(job.path("worker-0.out")).find("rank 0 is already taken (worker 0 is alive)"), std::string::npos)
      << read_text(job.path("worker-0.out"));
  job.workers[2].send_signal(SIGKILL);
  // The replacement registers once the scheduler has written worker 2 off
  // (as sps-launch --replace-workers waits for it to say so).
  bool written_off = false;
  for (int i = 0; i < 600 && !written_off; ++i) {
    for (const auto& e : read_jsonl(job.path("scheduler.jsonl")))
      written_off = written_off || (e.value("event", "") == "node_dead" && e["rank"] == 2);
    if (!written_off) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_TRUE(written_off);
  job.start_worker(2);  // workers[4]
  ASSERT_TRUE(job.wait_all(120)) << m.name << ": the job hung after a worker was replaced";
  EXPECT_EQ(job.scheduler.exit_status(), 0) << read_text(job.path("scheduler.out"));
  for (int w : {0, 1, 4}) EXPECT_EQ(job.workers[w].exit_status(), 0) << "worker process " << w;
  const auto s = read_json(job.path("summary.json"));
  EXPECT_EQ(s["dead_workers"], nlohmann::json::array({2}));
  ASSERT_EQ(s["rejoined_workers"].size(), 1u) << s.dump();
  EXPECT_EQ(s["rejoined_workers"][0]["rank"], 2);
  const auto join = s["rejoined_workers"][0]["step"].get<int64_t>();
  EXPECT_GT(join, 100);
  EXPECT_LT(join, steps);
  EXPECT_GT(s["test_accuracy"].get<double>(), 0.7);
  // The new process's steps are join .. steps - 1, after the old one's 0 .. a - 1.
  std::vector<int64_t> clocks;
  int64_t rejoin_event = -1;
  size_t rejoined_at = 0;
  for (const auto& e : read_jsonl(job.path("worker-2.jsonl"))) {
    if (e.value("event", "") == "rejoin") {
      rejoin_event = e["step"];
      rejoined_at = clocks.size();
    }
    if (e.contains("clock") && e.contains("loss")) clocks.push_back(e["clock"]);
  }
  EXPECT_EQ(rejoin_event, join);
  ASSERT_GT(rejoined_at, 0u);
  for (size_t i = 0; i < rejoined_at; ++i) ASSERT_EQ(clocks[i], static_cast<int64_t>(i));
  ASSERT_EQ(clocks.size() - rejoined_at, static_cast<size_t>(steps - join));
  for (size_t i = rejoined_at; i < clocks.size(); ++i) ASSERT_EQ(clocks[i], join + static_cast<int64_t>(i - rejoined_at));
  // Every shard: workers 0 and 1 applied at every clock, worker 2 at
  // 0 .. a_s - 1 and join .. steps - 1 (a_s <= join), each clock once.
  for (int sv = 0; sv < 2; ++sv) {
    std::map<int, std::vector<int64_t>> applied;
    int64_t joined_clock = -1;
    for (const auto& e : read_jsonl(job.path("server-" + std::to_string(sv) + ".jsonl"))) {
      if (e.value("event", "") == "apply") applied[e["worker"].get<int>()].push_back(e["clock"]);
      if (e.value("event", "") == "worker_joined") joined_clock = e["clock"];
    }
    EXPECT_EQ(joined_clock, join) << "server " << sv;
    for (int w : {0, 1}) {
      ASSERT_EQ(applied[w].size(), static_cast<size_t>(steps)) << "server " << sv << " worker " << w;
      for (int64_t c = 0; c < steps; ++c) ASSERT_EQ(applied[w][c], c);
    }
    const auto& a2 = applied[2];
    size_t before = 0;
    while (before < a2.size() && a2[before] == static_cast<int64_t>(before)) ++before;
    EXPECT_LE(static_cast<int64_t>(before), join);
    ASSERT_EQ(a2.size() - before, static_cast<size_t>(steps - join)) << "server " << sv;
    for (size_t i = before; i < a2.size(); ++i) ASSERT_EQ(a2[i], join + static_cast<int64_t>(i - before));
  }
  EXPECT_EQ(processes_mentioning(job.run_dir), std::vector<int>{});
}

TEST_P(ModeTest, AbortOnWorkerLossEndsTheJobWithTheReason) {
  const Mode& m = GetParam();
  Job job("abort_" + m.name, 4, 2,
          with({"cluster.heartbeat_ms=100", kSevenProcessTimeout, "cluster.on_worker_loss=abort",
                "data.train_limit=4000", "training.steps=1000000"},
               m.sets));
  ASSERT_TRUE(job.start());
  ASSERT_GE(wait_for_lines(job.path("worker-2.jsonl"), 50, 60), 50u);
  job.workers[2].send_signal(SIGKILL);
  ASSERT_TRUE(job.wait_all(60)) << m.name << ": processes kept running after abort";
  EXPECT_EQ(job.scheduler.exit_status(), 1);
  for (int w : {0, 1, 3}) EXPECT_NE(job.workers[w].exit_status(), 0);
  EXPECT_NE(read_text(job.path("scheduler.out")).find("worker 2 died"), std::string::npos)
      << read_text(job.path("scheduler.out"));
  EXPECT_EQ(processes_mentioning(job.run_dir), std::vector<int>{});
}

INSTANTIATE_TEST_SUITE_P(Modes, ModeTest, ::testing::ValuesIn(kModes),
                         [](const auto& param_info) { return param_info.param.name; });

// From the servers' own logs of a real run with a 3x straggler: no pull was
// answered ahead of the SSP bound, and no applied push was staler than
// (W-1)(2s+1) versions.
TEST(SspBoundTest, NeverExceededInTheLogs) {
  const uint64_t s = 2, W = 4;
  Job job("ssp_bound", 4, 2,
          {"consistency.mode=ssp", "consistency.staleness=2", "data.train_limit=4000", "data.test_limit=500",
           "training.steps=400", "workers.slowdown=[1, 1, 1, 3]", "workers.delay_ms=[0, 0, 0, 1]"});
  ASSERT_TRUE(job.start());
  ASSERT_TRUE(job.wait_all(180));
  ASSERT_EQ(job.scheduler.exit_status(), 0) << read_text(job.path("scheduler.out"));
  const uint64_t bound = (W - 1) * (2 * s + 1);
  uint64_t pulls = 0, applies = 0, waited = 0, max_lead = 0, max_staleness = 0;
  for (int sv = 0; sv < 2; ++sv) {
    for (const auto& line : read_jsonl(job.path("server-" + std::to_string(sv) + ".jsonl"))) {
      const std::string ev = line.value("event", "");
      if (ev == "assign") {
        EXPECT_EQ(line["policy"], "ssp(2)");
        EXPECT_EQ(line["staleness_bound"].get<uint64_t>(), bound);
      } else if (ev == "pull") {
        ++pulls;
        const uint64_t clock = line["clock"], min_clock = line["min_clock"];
        const uint64_t lead = clock > min_clock ? clock - min_clock : 0;
        max_lead = std::max(max_lead, lead);
        EXPECT_LE(lead, s) << line.dump();
        if (line["wait_s"].get<double>() > 0.001) ++waited;
      } else if (ev == "apply") {
        ++applies;
        max_staleness = std::max<uint64_t>(max_staleness, line["staleness"]);
        EXPECT_LE(line["staleness"].get<uint64_t>(), bound) << line.dump();
      }
    }
  }
  EXPECT_EQ(applies, 2 * W * 400);  // every push, on both shards
  EXPECT_GE(pulls, 2 * W * 400);
  EXPECT_GT(waited, 0u) << "the straggler never held anyone back: the bound was not exercised";
  EXPECT_EQ(max_lead, s) << "fast workers should run exactly s clocks ahead of the straggler";
  const auto summary = read_json(job.path("summary.json"));
  EXPECT_EQ(summary["staleness"]["max"].get<uint64_t>(), max_staleness);
  EXPECT_EQ(summary["staleness"]["count"].get<uint64_t>(), applies);
  EXPECT_EQ(summary["staleness_bound"].get<uint64_t>(), bound);
}

// Strict staleness with real processes: ASP with a 3x straggler and
// consistency.max_push_staleness = 2. From the servers' logs: no applied
// push is staler than 2, the staler ones were refused and every push was
// either applied or refused. From the workers' logs: each refusal reached
// the worker that sent it, which put exactly that many values back into
// its residual.
TEST(StrictStalenessTest, RefusesStalerPushesAndTheWorkersTakeTheirValuesBack) {
  const uint64_t W = 4, steps = 300, limit = 2;
  Job job("strict_staleness", 4, 2,
          {"consistency.mode=asp", "consistency.max_push_staleness=2", "data.train_limit=4000", "data.test_limit=500",
           "training.steps=300", "workers.slowdown=[1, 1, 1, 3]", "workers.delay_ms=[0, 0, 0, 2]"});
  ASSERT_TRUE(job.start());
  ASSERT_TRUE(job.wait_all(180));
  ASSERT_EQ(job.scheduler.exit_status(), 0) << read_text(job.path("scheduler.out"));
  // (worker, clock, shard) -> nnz of each refused push, from the servers.
  std::map<std::tuple<uint32_t, uint64_t, uint32_t>, uint64_t> refused;
  uint64_t applies = 0;
  for (uint32_t sv = 0; sv < 2; ++sv) {
    for (const auto& line : read_jsonl(job.path("server-" + std::to_string(sv) + ".jsonl"))) {
      const std::string ev = line.value("event", "");
      if (ev == "assign") {
        EXPECT_EQ(line["staleness_bound"].get<uint64_t>(), limit);
      } else if (ev == "apply") {
        ++applies;
        EXPECT_LE(line["staleness"].get<uint64_t>(), limit) << line.dump();
      } else if (ev == "refuse_stale") {
        EXPECT_GT(line["staleness"].get<uint64_t>(), limit) << line.dump();
        refused[{line["worker"].get<uint32_t>(), line["clock"].get<uint64_t>(), sv}] = line["nnz"].get<uint64_t>();
      }
    }
  }
  EXPECT_EQ(applies + refused.size(), 2 * W * steps) << "every push is applied or refused";
  ASSERT_GT(refused.size(), 0u) << "nothing was refused: the limit was not exercised";
  // Every refusal the workers heard of is one the servers made, with the
  // same size, and went back into the residual; the workers hear of all of
  // them except a refused last push (nothing pulls after it, except on
  // worker 0, which pulls the final model).
  size_t heard = 0;
  for (uint32_t w = 0; w < W; ++w) {
    uint64_t events = 0, done_refused = 0;
    for (const auto& line : read_jsonl(job.path("worker-" + std::to_string(w) + ".jsonl"))) {
      const std::string ev = line.value("event", "");
      if (ev == "push_refused") {
        ++events;
        const auto key = std::make_tuple(w, line["clock"].get<uint64_t>(), line["shard"].get<uint32_t>());
        ASSERT_TRUE(refused.count(key)) << "worker " << w << ": " << line.dump();
        EXPECT_EQ(line["nnz"].get<uint64_t>(), refused[key]) << line.dump();
        EXPECT_TRUE(line["restored"].get<bool>()) << line.dump();
      } else if (ev == "done") {
        done_refused = line["pushes_refused"].get<uint64_t>();
      }
    }
    EXPECT_EQ(done_refused, events) << "worker " << w;
    heard += events;
  }
  size_t unheard_possible = 0;
  for (const auto& [key, nnz] : refused)
    if (std::get<1>(key) == steps - 1 && std::get<0>(key) != 0) ++unheard_possible;
  EXPECT_GE(heard + unheard_possible, refused.size());
  EXPECT_LE(heard, refused.size());
  const auto summary = read_json(job.path("summary.json"));
  EXPECT_EQ(summary["pushes_refused_stale"].get<uint64_t>(), refused.size());
  EXPECT_EQ(summary["max_push_staleness"].get<uint64_t>(), limit);
  EXPECT_EQ(summary["staleness_bound"].get<uint64_t>(), limit);
  EXPECT_LE(summary["staleness"]["max"].get<uint64_t>(), limit);
  EXPECT_EQ(summary["staleness"]["count"].get<uint64_t>(), applies);
}

}  // namespace
}  // namespace sps::testing
