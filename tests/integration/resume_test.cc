// Snapshots and resume with real processes: SIGKILL a server mid-training,
// restart the job with checkpoint.resume, and it finishes with exactly the
// parameters of a run that was never interrupted (BSP is deterministic, and
// the snapshot holds everything the run depends on: shard, residuals, step).
#include <gtest/gtest.h>

#include <signal.h>

#include <bit>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <thread>

#include <fmt/format.h>

#include "common/snapshot.h"
#include "tests/integration/harness.h"

namespace sps::testing {
namespace {

namespace fs = std::filesystem;

std::vector<std::string> resume_sets(std::vector<std::string> extra) {
  // A 4 s heartbeat timeout: a loaded sanitizer run can stall a healthy
  // process's heartbeat for 1.5 s, and a false death fails the test.
  std::vector<std::string> sets = {"cluster.heartbeat_ms=100", "cluster.heartbeat_timeout_ms=4000",
                                   "data.train_limit=4000",   "data.test_limit=1000",
                                   "training.steps=600",      "training.batch_size=16",
                                   "checkpoint.interval=50",  "checkpoint.keep=3",
                                   "run.save_params=true",    "workers.delay_ms=[4, 4]"};
  sets.insert(sets.end(), extra.begin(), extra.end());
  return sets;
}

bool wait_for_file(const std::string& path, double timeout_s) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  while (!fs::exists(path)) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

// Some step folder holds `role`-`rank`'s snapshot.
bool wait_for_any_snapshot(const std::string& dir, const std::string& role, uint32_t rank, double timeout_s) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  const std::string file = fmt::format("{}-{}.snap", role, rank);
  while (std::chrono::steady_clock::now() < deadline) {
    std::error_code ec;
    for (const auto& step : fs::directory_iterator(dir, ec))
      if (fs::exists(step.path() / file)) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return false;
}

// Parameters whose bit patterns differ (got and expected must have one size).
size_t bits_differing(const std::vector<float>& got, const std::vector<float>& expected) {
  size_t differ = 0;
  for (size_t i = 0; i < got.size(); ++i)
    differ += std::bit_cast<uint32_t>(got[i]) != std::bit_cast<uint32_t>(expected[i]) ? 1 : 0;
  return differ;
}

// A replaced server's log after its last restore: each worker's clock in
// the snapshot ("restored"), and the clocks it applied for each worker since.
struct AfterRestore {
  std::vector<uint64_t> from;
  std::map<uint32_t, std::vector<uint64_t>> applied;
};
AfterRestore after_last_restore(const std::string& server_log) {
  AfterRestore out;
  for (const auto& line : read_jsonl(server_log)) {
    if (line.value("event", "") == "restored") {
      out.from = line["worker_clocks"].get<std::vector<uint64_t>>();
      out.applied.clear();
    } else if (line.value("event", "") == "apply" && !out.from.empty()) {
      out.applied[line["worker"].get<uint32_t>()].push_back(line["clock"].get<uint64_t>());
    }
  }
  return out;
}

int64_t resumed_step(const std::string& worker_log) {
  for (const auto& line : read_jsonl(worker_log))
    if (line.value("event", "") == "resume") return line["step"].get<int64_t>();
  return -1;
}

// Runs `name` uninterrupted, then again with a server SIGKILLed after step
// 200 and the job resumed from its newest snapshot; the final parameters
// must be the same bits.
void kill_a_server_and_resume(const std::string& name, const std::vector<std::string>& extra) {
  Job reference(name + "_reference", 2, 2, resume_sets(extra));
  ASSERT_TRUE(reference.start());
  ASSERT_TRUE(reference.wait_all(120));
  ASSERT_EQ(reference.scheduler.exit_status(), 0) << read_text(reference.path("scheduler.out"));
  const std::vector<float> expected = read_f32(reference.path("params.f32"));
  ASSERT_FALSE(expected.empty());

  Job killed(name + "_job", 2, 2, resume_sets(extra));
  ASSERT_TRUE(killed.start());
  const std::string ckpt = killed.path("checkpoints");
  // Both shards of step 200 are on disk: the job is well into training.
  ASSERT_TRUE(wait_for_file(snapshot_path(ckpt, 200, "server", 1), 60)) << read_text(killed.path("scheduler.out"));
  ASSERT_TRUE(wait_for_file(snapshot_path(ckpt, 200, "server", 0), 10));
  killed.servers[1].send_signal(SIGKILL);
  ASSERT_TRUE(killed.wait_all(60)) << "the job hung after a server died";
  EXPECT_EQ(killed.scheduler.exit_status(), 1);
  EXPECT_FALSE(fs::exists(killed.path("params.f32"))) << "the killed job should not have finished";

  // A damaged newer step (as a crash while writing could leave if renames
  // were not atomic) is skipped with a message naming the file.
  uint64_t newest = 0;
  for (uint64_t s = 600; s > 0 && newest == 0; s -= 50)
    if (fs::exists(snapshot_path(ckpt, s, "server", 0)) && fs::exists(snapshot_path(ckpt, s, "server", 1))) newest = s;
  ASSERT_GE(newest, 200u);
  const std::string fake = snapshot_path(ckpt, 900, "server", 0);
  fs::create_directories(fs::path(fake).parent_path());
  fs::copy_file(snapshot_path(ckpt, newest, "server", 0), fake);
  fs::resize_file(fake, fs::file_size(fake) / 2);
  fs::copy_file(snapshot_path(ckpt, newest, "server", 1), snapshot_path(ckpt, 900, "server", 1));

  const auto started = std::chrono::steady_clock::now();
  const double started_unix =
      std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  std::vector<std::string> resume = extra;
  resume.push_back("checkpoint.resume=true");
  Job resumed(name + "_job", 2, 2, resume_sets(resume), /*fresh_folder=*/false);
  ASSERT_TRUE(resumed.start());
  ASSERT_TRUE(resumed.wait_all(120));
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  const std::string sched_out = read_text(resumed.path("scheduler.out"));
  ASSERT_EQ(resumed.scheduler.exit_status(), 0) << sched_out;
  for (auto& p : resumed.servers) EXPECT_EQ(p.exit_status(), 0);
  for (auto& p : resumed.workers) EXPECT_EQ(p.exit_status(), 0);
  EXPECT_NE(sched_out.find("resuming the job from step " + std::to_string(newest)), std::string::npos) << sched_out;
  EXPECT_NE(sched_out.find("step-000000000900/server-0.snap is corrupted or truncated"), std::string::npos)
      << sched_out;
  EXPECT_EQ(resumed_step(resumed.path("worker-0.jsonl")), static_cast<int64_t>(newest));
  EXPECT_EQ(resumed_step(resumed.path("worker-1.jsonl")), static_cast<int64_t>(newest));
  const auto summary = read_json(resumed.path("summary.json"));
  EXPECT_EQ(summary["steps"].get<int64_t>(), 600);

  const std::vector<float> got = read_f32(resumed.path("params.f32"));
  ASSERT_EQ(got.size(), expected.size());
  const size_t differ = bits_differing(got, expected);
  EXPECT_EQ(differ, 0u) << "the resumed run's parameters differ from the uninterrupted run's in " << differ
                        << " of " << got.size() << " entries";
  // Recovery time: from starting the resumed processes to its first step.
  double first_step_unix = 0;
  bool after_resume = false;
  for (const auto& line : read_jsonl(resumed.path("worker-0.jsonl"))) {
    if (line.value("event", "") == "resume") after_resume = true;
    if (after_resume && line.contains("step") && line.contains("loss")) {
      first_step_unix = line["t"].get<double>();
      break;
    }
  }
  EXPECT_GT(first_step_unix, started_unix);
  std::cout << name << ": resumed from step " << newest << "; first step " << first_step_unix - started_unix
            << " s after the restart; the rest of the job took " << seconds << " s\n";
}

TEST(ResumeTest, KilledServerResumesBitIdenticalToAnUninterruptedRun) { kill_a_server_and_resume("resume", {}); }

// checkpoint.every_seconds: the scheduler names the steps. Every process
// snapshots exactly those, and a run resumed from one ends bit for bit as
// an uninterrupted one.
TEST(ResumeTest, SnapshotsNamedByTimeResumeBitIdentical) {
  const std::vector<std::string> by_time = {"checkpoint.interval=0", "checkpoint.every_seconds=0.5",
                                            "training.steps=1000"};
  Job reference("by_time_reference", 2, 2, resume_sets(by_time));
  ASSERT_TRUE(reference.start());
  ASSERT_TRUE(reference.wait_all(120));
  ASSERT_EQ(reference.scheduler.exit_status(), 0) << read_text(reference.path("scheduler.out"));
  const std::vector<float> expected = read_f32(reference.path("params.f32"));
  ASSERT_FALSE(expected.empty());

  Job killed("by_time_job", 2, 2, resume_sets(by_time));
  ASSERT_TRUE(killed.start());
  const std::string ckpt = killed.path("checkpoints");
  auto named_steps = [&] {
    std::set<uint64_t> steps;
    for (const auto& line : read_jsonl(killed.path("scheduler.jsonl")))
      if (line.value("event", "") == "snapshot_at") steps.insert(line["step"].get<uint64_t>());
    return steps;
  };
  // Wait for a named step that both servers wrote, then kill one.
  uint64_t written = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (written == 0 && std::chrono::steady_clock::now() < deadline) {
    for (const uint64_t s : named_steps())
      if (fs::exists(snapshot_path(ckpt, s, "server", 0)) && fs::exists(snapshot_path(ckpt, s, "server", 1))) written = s;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_GT(written, 0u) << "no named step was written: " << read_text(killed.path("scheduler.out"));
  killed.servers[1].send_signal(SIGKILL);
  ASSERT_TRUE(killed.wait_all(60)) << "the job hung after a server died";
  EXPECT_EQ(killed.scheduler.exit_status(), 1);
  const std::set<uint64_t> named = named_steps();
  // Only named steps were written (checkpoint.interval is 0).
  for (const auto& dir : fs::directory_iterator(ckpt)) {
    const std::string name = dir.path().filename().string();
    ASSERT_EQ(name.rfind("step-", 0), 0u) << name;
    EXPECT_EQ(named.count(std::stoull(name.substr(5))), 1u) << name << " was not named by the scheduler";
  }

  std::vector<std::string> resume = by_time;
  resume.push_back("checkpoint.resume=true");
  Job resumed("by_time_job", 2, 2, resume_sets(resume), /*fresh_folder=*/false);
  ASSERT_TRUE(resumed.start());
  ASSERT_TRUE(resumed.wait_all(120));
  ASSERT_EQ(resumed.scheduler.exit_status(), 0) << read_text(resumed.path("scheduler.out"));
  const int64_t from = resumed_step(resumed.path("worker-0.jsonl"));
  EXPECT_GE(from, static_cast<int64_t>(written));
  EXPECT_EQ(named.count(static_cast<uint64_t>(from)), 1u) << from;
  EXPECT_EQ(resumed_step(resumed.path("worker-1.jsonl")), from);
  const std::vector<float> got = read_f32(resumed.path("params.f32"));
  ASSERT_EQ(got.size(), expected.size());
  EXPECT_EQ(bits_differing(got, expected), 0u) << "resumed from named step " << from;
  std::cout << "steps named: " << named.size() << ", resumed from " << from << "\n";
}

// Adam's two moments per key are in the servers' snapshots: without them
// the resumed run would restart the moments at zero and end elsewhere.
TEST(ResumeTest, AdamStateResumesBitIdentical) {
  kill_a_server_and_resume("resume_adam", {"optimizer.name=adam", "compression.scale=1", "training.lr=0.005"});
}

// Compressed pulls: the copy the workers pull (x_hat) and its version are in
// the snapshots too; without them x_hat would restart as x and the resumed
// run would train on a different copy.
TEST(ResumeTest, CompressedPullsResumeBitIdentical) {
  kill_a_server_and_resume("resume_downlink", {"downlink.method=topk", "downlink.ratio=0.002"});
}

// The workers' DGC momentum buffers are in their snapshots: without them
// momentum correction would restart from zero after the resume.
TEST(ResumeTest, WorkerMomentumCorrectionResumesBitIdentical) {
  kill_a_server_and_resume("resume_momentum", {"compression.momentum_correction=0.9", "training.lr=0.05"});
}

// hessian_diag: the estimate h and the step it was taken at are in the
// workers' snapshots. h is refreshed every 30 steps and snapshots are every
// 50, so a resumed worker that recomputed h at once would take it at another
// step, on other parameters, than the uninterrupted run.
TEST(ResumeTest, HessianDiagEstimateResumesBitIdentical) {
  kill_a_server_and_resume("resume_hessian",
                           {"compression.error_feedback=hessian_diag", "compression.hessian_every=30"});
}

// Asynchronous training is not deterministic, so the bar is the accuracy
// band of an uninterrupted run.
TEST(ResumeTest, AsyncJobResumesAfterAServerKillAndReachesTheSameAccuracy) {
  const std::vector<std::string> asp = {"consistency.mode=asp", "run.save_params=false", "training.lr=0.2"};
  Job reference("resume_asp_reference", 2, 2, resume_sets(asp));
  ASSERT_TRUE(reference.start());
  ASSERT_TRUE(reference.wait_all(120));
  ASSERT_EQ(reference.scheduler.exit_status(), 0) << read_text(reference.path("scheduler.out"));
  const double expected = read_json(reference.path("summary.json"))["test_accuracy"].get<double>();

  Job killed("resume_asp", 2, 2, resume_sets(asp));
  ASSERT_TRUE(killed.start());
  ASSERT_TRUE(wait_for_file(snapshot_path(killed.path("checkpoints"), 250, "server", 0), 60));
  killed.servers[0].send_signal(SIGKILL);
  ASSERT_TRUE(killed.wait_all(60));
  EXPECT_EQ(killed.scheduler.exit_status(), 1);

  std::vector<std::string> again = asp;
  again.push_back("checkpoint.resume=true");
  Job resumed("resume_asp", 2, 2, resume_sets(again), /*fresh_folder=*/false);
  ASSERT_TRUE(resumed.start());
  ASSERT_TRUE(resumed.wait_all(120));
  ASSERT_EQ(resumed.scheduler.exit_status(), 0) << read_text(resumed.path("scheduler.out"));
  EXPECT_GE(resumed_step(resumed.path("worker-0.jsonl")), 200);
  const auto summary = read_json(resumed.path("summary.json"));
  EXPECT_EQ(summary["steps"].get<int64_t>(), 600);
  std::cout << "asp: uninterrupted " << expected << ", resumed " << summary["test_accuracy"].get<double>() << "\n";
  // ASP's own run-to-run spread is a few points (more in sanitizer builds,
  // where timing and so staleness differ, and with other tests on the same
  // cores: 0.817 against 0.729 once under ctest -j2, 0.007-0.028 apart in
  // three runs alone); resuming must not add to it.
  EXPECT_NEAR(summary["test_accuracy"].get<double>(), expected, 0.10);
  EXPECT_GT(expected, 0.6) << "the reference run did not learn";
}

TEST(ResumeTest, ResumeWithoutSnapshotsFailsFastAndSaysWhy) {
  Job job("resume_nothing", 2, 1, resume_sets({"checkpoint.resume=true"}));
  ASSERT_FALSE(job.start_scheduler()) << "the scheduler should refuse to start";
  EXPECT_EQ(job.scheduler.wait(10), 2);
  const std::string out = read_text(job.path("scheduler.out"));
  EXPECT_NE(out.find("cannot resume"), std::string::npos) << out;
  EXPECT_NE(out.find("checkpoints"), std::string::npos) << out;
}

// cluster.on_server_loss: replace. A server is SIGKILLed some steps after its
// snapshot and a new process takes its place while the workers wait: it
// loads the snapshot and the workers send it again every push since. From
// the servers' own apply logs, every (worker, clock) is applied exactly once
// on the surviving shard, and on the replaced shard once after its restore
// from the snapshot's clock on; in bsp the final parameters are bit for bit
// those of a run that was never interrupted.
class ServerReplacementTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ServerReplacementTest, AKilledServerIsReplacedAndNoPushIsLostOrAppliedTwice) {
  // "bsp+downlink": compressed pulls, whose published copy restarts from the
  // snapshot's (the shard itself is restored exactly, the workers' view is
  // not), so the bar is learning, not bit-identity.
  // "asp+every_seconds": snapshots at the steps the scheduler names by time.
  const std::string param = GetParam();
  const bool downlink = param == "bsp+downlink";
  const bool by_time = param == "asp+every_seconds";
  const std::string mode = param.substr(0, 3);
  std::vector<std::string> extra = {"consistency.mode=" + mode, "cluster.on_server_loss=replace"};
  if (by_time) {
    // Longer: the first step is named after 2 s (the workers' rates), ahead of the fast worker.
    extra.push_back("checkpoint.interval=0");
    extra.push_back("checkpoint.every_seconds=0.5");
    extra.push_back("training.steps=1200");
  }
  if (downlink) {
    extra.push_back("downlink.method=topk");
    extra.push_back("downlink.ratio=0.1");
  }
  // ssp/asp: worker 1 twice as slow, so the workers' clocks in the snapshot
  // differ and each must resend from its own.
  if (mode != "bsp") extra.push_back("workers.delay_ms=[4, 8]");
  const int64_t steps = by_time ? 1200 : 600;
  std::vector<float> expected;
  if (mode == "bsp" && !downlink) {
    Job reference("replace_server_reference", 2, 2, resume_sets(extra));
    ASSERT_TRUE(reference.start());
    ASSERT_TRUE(reference.wait_all(120));
    ASSERT_EQ(reference.scheduler.exit_status(), 0) << read_text(reference.path("scheduler.out"));
    expected = read_f32(reference.path("params.f32"));
    ASSERT_FALSE(expected.empty());
  }
  Job job("replace_server_" + (downlink ? std::string("bsp_downlink") : by_time ? std::string("asp_by_time") : mode),
          2, 2, resume_sets(extra));
  ASSERT_TRUE(job.start());
  if (by_time) {
    ASSERT_TRUE(wait_for_any_snapshot(job.path("checkpoints"), "server", 1, 60)) << read_text(job.path("scheduler.out"));
  } else {
    ASSERT_TRUE(wait_for_file(snapshot_path(job.path("checkpoints"), 200, "server", 1), 60))
        << read_text(job.path("scheduler.out"));
  }
  // Some steps after the snapshot (4 ms each), so there is something to resend.
  std::this_thread::sleep_for(std::chrono::milliseconds(120));
  job.servers[1].send_signal(SIGKILL);
  EXPECT_EQ(job.servers[1].wait(10), 128 + SIGKILL);
  job.start_server(1);  // servers[2]
  ASSERT_TRUE(job.wait_all(120)) << "the job hung after a server was replaced";
  const std::string sched_out = read_text(job.path("scheduler.out"));
  ASSERT_EQ(job.scheduler.exit_status(), 0) << sched_out;
  EXPECT_EQ(job.servers[0].exit_status(), 0);
  EXPECT_EQ(job.servers[2].exit_status(), 0) << read_text(job.path("server-1.out"));
  for (auto& p : job.workers) EXPECT_EQ(p.exit_status(), 0);
  const auto summary = read_json(job.path("summary.json"));
  EXPECT_EQ(summary["steps"].get<int64_t>(), steps);
  ASSERT_EQ(summary["replaced_servers"].size(), 1u) << summary.dump();
  EXPECT_EQ(summary["replaced_servers"][0]["rank"].get<int>(), 1);
  const auto restored_step = summary["replaced_servers"][0]["step"].get<int64_t>();
  EXPECT_GE(restored_step, by_time ? 1 : 200);

  // The replaced shard: its log holds the dead process's lines, then the
  // replacement's "restored" event with each worker's clock, then applies.
  std::vector<uint64_t> from;
  std::map<uint32_t, std::vector<uint64_t>> after_restore;
  int64_t applied_by_dead = -1;
  int64_t applies_by_dead = 0, applies_after_restore = 0;
  for (const auto& line : read_jsonl(job.path("server-1.jsonl"))) {
    const std::string event = line.value("event", "");
    if (event == "restored") {
      from = line["worker_clocks"].get<std::vector<uint64_t>>();
      after_restore.clear();
    } else if (event == "apply" && !from.empty()) {
      after_restore[line["worker"].get<uint32_t>()].push_back(line["clock"].get<uint64_t>());
      ++applies_after_restore;
    } else if (event == "apply") {
      applied_by_dead = std::max<int64_t>(applied_by_dead, line["clock"].get<int64_t>());
      ++applies_by_dead;
    }
  }
  // The dead server's applies count in the totals, from its last heartbeat:
  // more than nothing, no more than it logged (server 0 applied 2 x steps).
  const int64_t dead_share = summary["pushes_applied"].get<int64_t>() - 2 * steps - applies_after_restore;
  EXPECT_GT(dead_share, 0) << summary.dump();
  EXPECT_LE(dead_share, applies_by_dead);
  EXPECT_EQ(summary["stats_from_heartbeats"], nlohmann::json::parse(R"([{"role": "server", "rank": 1}])"))
      << summary.dump();
  ASSERT_EQ(from.size(), 2u) << "no restore in server-1.jsonl";
  uint64_t resent_any = 0;
  for (uint32_t w = 0; w < 2; ++w) {
    std::vector<uint64_t> want;
    for (uint64_t c = from[w]; c < static_cast<uint64_t>(steps); ++c) want.push_back(c);
    EXPECT_EQ(after_restore[w], want) << "worker " << w << "'s clocks on the replaced shard after its restore";
    resent_any += applied_by_dead >= 0 && static_cast<int64_t>(from[w]) <= applied_by_dead ? 1 : 0;
  }
  EXPECT_GT(resent_any, 0u) << "the dead server had applied nothing after its snapshot: nothing was resent";
  // The surviving shard saw each clock once.
  std::map<uint32_t, std::vector<uint64_t>> applied;
  for (const auto& line : read_jsonl(job.path("server-0.jsonl")))
    if (line.value("event", "") == "apply") applied[line["worker"].get<uint32_t>()].push_back(line["clock"].get<uint64_t>());
  for (uint32_t w = 0; w < 2; ++w) {
    ASSERT_EQ(applied[w].size(), static_cast<size_t>(steps)) << "worker " << w << " on server 0";
    for (int64_t c = 0; c < steps; ++c) ASSERT_EQ(applied[w][c], static_cast<uint64_t>(c));
  }
  EXPECT_NE(read_text(job.path("worker-0.out")).find("resent"), std::string::npos);

  if (mode == "bsp" && !downlink) {
    const std::vector<float> got = read_f32(job.path("params.f32"));
    ASSERT_EQ(got.size(), expected.size());
    const size_t differ = bits_differing(got, expected);
    EXPECT_EQ(differ, 0u) << "the run with a replaced server differs from the uninterrupted one in " << differ
                          << " of " << got.size() << " parameters";
  } else {
    EXPECT_GT(summary["test_accuracy"].get<double>(), 0.6) << "the job did not learn";
  }
  std::cout << param << ": server 1 restored from step " << restored_step << " (dead process had applied up to clock "
            << applied_by_dead << "); workers resent from clocks " << from[0] << ", " << from[1] << "\n";
}

INSTANTIATE_TEST_SUITE_P(Modes, ServerReplacementTest,
                         ::testing::Values("bsp", "ssp", "asp", "bsp+downlink", "asp+every_seconds"));

// A replacement is a server like any other: when it dies too, the next one
// restores (from the first's snapshot if it wrote one, else the same one)
// and the workers resend from there again.
TEST(ServerReplacementTest, WhenTheReplacementDiesTooTheNextOneTakesOver) {
  Job job("replace_server_twice", 2, 2, resume_sets({"cluster.on_server_loss=replace"}));
  ASSERT_TRUE(job.start());
  ASSERT_TRUE(wait_for_file(snapshot_path(job.path("checkpoints"), 150, "server", 1), 60));
  job.servers[1].send_signal(SIGKILL);
  EXPECT_EQ(job.servers[1].wait(10), 128 + SIGKILL);
  job.start_server(1);  // servers[2]
  // Once it has restored and applied a while, it dies too.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  size_t applied_after_restore = 0;
  while (applied_after_restore < 100 && std::chrono::steady_clock::now() < deadline) {
    applied_after_restore = 0;
    bool restored = false;
    for (const auto& line : read_jsonl(job.path("server-1.jsonl"))) {
      restored = restored || line.value("event", "") == "restored";
      applied_after_restore += restored && line.value("event", "") == "apply" ? 1 : 0;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_GE(applied_after_restore, 100u) << read_text(job.path("server-1.out"));
  job.servers[2].send_signal(SIGKILL);
  EXPECT_EQ(job.servers[2].wait(10), 128 + SIGKILL);
  job.start_server(1);  // servers[3]
  ASSERT_TRUE(job.wait_all(120)) << "the job hung";
  ASSERT_EQ(job.scheduler.exit_status(), 0) << read_text(job.path("scheduler.out"));
  EXPECT_EQ(job.servers[3].exit_status(), 0);
  const auto summary = read_json(job.path("summary.json"));
  ASSERT_EQ(summary["replaced_servers"].size(), 2u) << summary.dump();
  EXPECT_EQ(summary["steps"].get<int64_t>(), 600);
  // After the last restore, each worker's clocks on the shard run from its
  // restored clock to the end, once each.
  auto [from, after] = after_last_restore(job.path("server-1.jsonl"));
  ASSERT_EQ(from.size(), 2u);
  EXPECT_GE(from[0], 150u);
  for (uint32_t w = 0; w < 2; ++w) {
    ASSERT_EQ(after[w].size(), 600 - from[w]) << "worker " << w;
    for (size_t i = 0; i < after[w].size(); ++i) ASSERT_EQ(after[w][i], from[w] + i);
  }
}

// Every server dies at once: nothing holds the parameters but the snapshots
// and the workers' copies. Both ranks are replaced, each from its own newest
// snapshot, and the job still ends bit for bit as an uninterrupted one.
TEST(ServerReplacementTest, EveryServerKilledAtOnceIsReplacedAndTheRunIsBitIdentical) {
  const std::vector<std::string> extra = {"cluster.on_server_loss=replace"};
  Job reference("replace_all_servers_reference", 2, 2, resume_sets(extra));
  ASSERT_TRUE(reference.start());
  ASSERT_TRUE(reference.wait_all(120));
  ASSERT_EQ(reference.scheduler.exit_status(), 0) << read_text(reference.path("scheduler.out"));
  const std::vector<float> expected = read_f32(reference.path("params.f32"));
  ASSERT_FALSE(expected.empty());

  Job job("replace_all_servers", 2, 2, resume_sets(extra));
  ASSERT_TRUE(job.start());
  ASSERT_TRUE(wait_for_file(snapshot_path(job.path("checkpoints"), 200, "server", 0), 60));
  ASSERT_TRUE(wait_for_file(snapshot_path(job.path("checkpoints"), 200, "server", 1), 60));
  std::this_thread::sleep_for(std::chrono::milliseconds(120));
  job.servers[0].send_signal(SIGKILL);
  job.servers[1].send_signal(SIGKILL);
  EXPECT_EQ(job.servers[0].wait(10), 128 + SIGKILL);
  EXPECT_EQ(job.servers[1].wait(10), 128 + SIGKILL);
  job.start_server(1);  // servers[2]
  job.start_server(0);  // servers[3]
  ASSERT_TRUE(job.wait_all(120)) << "the job hung after both servers were replaced";
  ASSERT_EQ(job.scheduler.exit_status(), 0) << read_text(job.path("scheduler.out"));
  for (auto& p : job.workers) EXPECT_EQ(p.exit_status(), 0);
  const auto summary = read_json(job.path("summary.json"));
  EXPECT_EQ(summary["steps"].get<int64_t>(), 600);
  ASSERT_EQ(summary["replaced_servers"].size(), 2u) << summary.dump();
  std::set<int> ranks;
  for (const auto& r : summary["replaced_servers"]) {
    ranks.insert(r["rank"].get<int>());
    EXPECT_GE(r["step"].get<int64_t>(), 200);
  }
  EXPECT_EQ(ranks, (std::set<int>{0, 1}));
  const std::vector<float> got = read_f32(job.path("params.f32"));
  ASSERT_EQ(got.size(), expected.size());
  const size_t differ = bits_differing(got, expected);
  EXPECT_EQ(differ, 0u) << "differs from the uninterrupted run in " << differ << " of " << got.size()
                        << " parameters";
}

// A worker dies and a new process takes its place; then a server dies before
// its next snapshot. The snapshot knows only the dead worker process, and
// the new one holds its pushes from its join on: the replacement server
// starts it there (what the dead process pushed to this shard since the
// snapshot is lost, as its residual was) and the job trains on.
TEST(ServerReplacementTest, ASnapshotOlderThanAReplacedWorkerStartsThatWorkerAtItsJoin) {
  // 10 ms a step and one snapshot, at 500: a 5 s window for the worker's
  // replacement to join before the job ends, sanitizers included.
  const int64_t steps = 1000;
  Job job("replace_server_after_worker", 2, 2,
          resume_sets({"cluster.on_server_loss=replace", "training.steps=1000", "checkpoint.interval=500",
                       "workers.delay_ms=[10, 10]"}));
  ASSERT_TRUE(job.start());
  ASSERT_TRUE(wait_for_file(snapshot_path(job.path("checkpoints"), 500, "server", 1), 60));
  job.workers[1].send_signal(SIGKILL);
  EXPECT_EQ(job.workers[1].wait(10), 128 + SIGKILL);
  auto scheduler_logged = [&](const std::string& event) {
    for (int i = 0; i < 1200; ++i) {
      for (const auto& e : read_jsonl(job.path("scheduler.jsonl")))
        if (e.value("event", "") == event) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return false;
  };
  ASSERT_TRUE(scheduler_logged("node_dead"));
  job.start_worker(1);  // workers[2]
  ASSERT_TRUE(scheduler_logged("worker_rejoined")) << read_text(job.path("scheduler.out"));
  job.servers[1].send_signal(SIGKILL);
  EXPECT_EQ(job.servers[1].wait(10), 128 + SIGKILL);
  job.start_server(1);  // servers[2]
  ASSERT_TRUE(job.wait_all(120)) << "the job hung";
  const std::string out = read_text(job.path("scheduler.out"));
  ASSERT_EQ(job.scheduler.exit_status(), 0) << out;
  EXPECT_EQ(job.workers[0].exit_status(), 0);
  EXPECT_EQ(job.workers[2].exit_status(), 0) << read_text(job.path("worker-1.out"));
  const auto summary = read_json(job.path("summary.json"));
  EXPECT_EQ(summary["steps"].get<int64_t>(), steps);
  ASSERT_EQ(summary["rejoined_workers"].size(), 1u) << summary.dump();
  const auto join = summary["rejoined_workers"][0]["step"].get<int64_t>();
  ASSERT_EQ(summary["replaced_servers"].size(), 1u) << summary.dump();
  ASSERT_EQ(summary["replaced_servers"][0]["step"].get<int64_t>(), 500);
  EXPECT_GT(join, 500);
  EXPECT_NE(out.find(fmt::format("server 1's newest snapshot (step 500) is older than worker 1's replacement, which "
                                 "joined at step {}: the shard starts it there",
                                 join)),
            std::string::npos)
      << out;
  // On the replaced shard after its restore: worker 0 from its snapshot
  // clock, the new worker 1 from its join, each clock once, to the end.
  auto [from, after] = after_last_restore(job.path("server-1.jsonl"));
  ASSERT_EQ(from.size(), 2u);
  const std::vector<uint64_t> start = {from[0], static_cast<uint64_t>(join)};
  for (uint32_t w = 0; w < 2; ++w) {
    ASSERT_EQ(after[w].size(), static_cast<size_t>(steps) - start[w]) << "worker " << w;
    for (size_t i = 0; i < after[w].size(); ++i) ASSERT_EQ(after[w][i], start[w] + i) << "worker " << w;
  }
  EXPECT_GT(summary["test_accuracy"].get<double>(), 0.6);
}

// Dense pushes of the demo model are 31 KB a step, so a 1 MiB buffer is
// full about 33 steps after a snapshot; the copies are dropped with a
// warning and a replacement from that snapshot cannot be fed: the job ends
// naming the key, instead of training on with pushes missing.
TEST(ServerReplacementTest, AWorkerThatDroppedItsCopiesEndsTheJobNamingTheBuffer) {
  Job job("replace_server_overflow", 2, 2,
          resume_sets({"cluster.on_server_loss=replace", "cluster.replay_buffer_mb=1", "compression.method=dense",
                       "checkpoint.interval=100"}));
  ASSERT_TRUE(job.start());
  ASSERT_TRUE(wait_for_file(snapshot_path(job.path("checkpoints"), 200, "server", 1), 60));
  // Well past the overflow (about step 233), before the next snapshot (300).
  size_t steps_seen = 0;
  for (int i = 0; i < 2000 && steps_seen < 260; ++i) {
    steps_seen = 0;
    for (const auto& line : read_jsonl(job.path("worker-0.jsonl"))) steps_seen += line.contains("loss") ? 1 : 0;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_GE(steps_seen, 260u);
  ASSERT_LT(steps_seen, 300u) << "the job ran past the next snapshot before the kill";
  job.servers[1].send_signal(SIGKILL);
  EXPECT_EQ(job.servers[1].wait(10), 128 + SIGKILL);
  job.start_server(1);
  ASSERT_TRUE(job.wait_all(60)) << "the job hung";
  EXPECT_EQ(job.scheduler.exit_status(), 1);
  const std::string out = read_text(job.path("scheduler.out"));
  EXPECT_NE(out.find("lacks this worker's pushes from clock 200 on, and this worker no longer holds them"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("cluster.replay_buffer_mb is 1 MiB"), std::string::npos) << out;
  EXPECT_NE(read_text(job.path("worker-0.out")).find("exceed cluster.replay_buffer_mb (1 MiB)"), std::string::npos);
}

TEST(ServerReplacementTest, WithoutAReplacementTheJobEndsAfterTheWaitNamingTheServer) {
  // The wait is cluster.startup_timeout_ms, which also bounds the job's own
  // start: long enough for a loaded sanitizer run to register every node.
  Job job("replace_server_none", 2, 2,
          resume_sets({"cluster.on_server_loss=replace", "cluster.startup_timeout_ms=30000"}));
  ASSERT_TRUE(job.start());
  ASSERT_TRUE(wait_for_file(snapshot_path(job.path("checkpoints"), 100, "server", 1), 60))
      << read_text(job.path("scheduler.out"));
  job.servers[1].send_signal(SIGKILL);
  ASSERT_TRUE(job.wait_all(90)) << "the job hung without a replacement";
  EXPECT_EQ(job.scheduler.exit_status(), 1);
  const std::string out = read_text(job.path("scheduler.out"));
  EXPECT_NE(out.find("waiting up to 30000 ms for a new server to take server 1's place"), std::string::npos) << out;
  EXPECT_NE(out.find("server 1 died (its connection to the scheduler closed"), std::string::npos) << out;
  EXPECT_NE(out.find("no new server took its place within cluster.startup_timeout_ms (30000 ms)"), std::string::npos)
      << out;
  for (int w = 0; w < 2; ++w) EXPECT_EQ(job.workers[w].exit_status(), 1);
}

}  // namespace
}  // namespace sps::testing
