// CURVE with real processes: a job whose keys are all allowed trains to the
// same parameters as without CURVE, while clients with a wrong key, or no
// CURVE at all, get nothing in or out. A client with the job's key reaches
// the same code paths (counted as bad messages there), which shows the
// attack would have arrived without the key check.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include "net/curve.h"
#include "net/link.h"
#include "protocol/message.h"
#include "tests/integration/harness.h"

namespace sps::testing {
namespace {

namespace fs = std::filesystem;

std::vector<std::string> job_sets(std::vector<std::string> extra) {
  std::vector<std::string> sets = {"data.train_limit=4000", "data.test_limit=500", "training.steps=400",
                                   "training.batch_size=16", "run.save_params=true", "workers.delay_ms=[10, 10]"};
  sets.insert(sets.end(), extra.begin(), extra.end());
  return sets;
}

// A peer that tries the scheduler and one server: registers as a worker,
// pushes into the shard, pulls it. Returns how many replies it got.
int attack(zmq::context_t& ctx, const net::CurveSettings& keys, const std::string& scheduler,
           const std::string& server) {
  zmq::socket_t to_scheduler = net::make_socket(ctx, net::SocketKind::kDealer, 0);
  zmq::socket_t to_server = net::make_socket(ctx, net::SocketKind::kDealer, 0);
  net::make_curve_client(to_scheduler, keys);
  net::make_curve_client(to_server, keys);
  to_scheduler.connect(scheduler);
  to_server.connect(server);
  protocol::Header h;
  h.type = protocol::MessageType::kHeartbeat;  // from a peer that never registered
  (void)net::send(to_scheduler, protocol::encode_control(h));
  protocol::Header push;
  push.type = protocol::MessageType::kPush;
  push.key_begin = 0;
  push.key_end = 1;  // not the shard's range: refused as malformed when it gets in
  push.index_encoding = protocol::IndexEncoding::kNone;
  const std::vector<float> values = {1e6f};
  (void)net::send(to_server, protocol::encode_data(push, {}, values));
  int replies = 0;
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(1000);
  while (std::chrono::steady_clock::now() < until) {
    const auto ready = net::wait_readable({&to_scheduler, &to_server}, std::chrono::milliseconds(50));
    if (ready[0] && net::try_recv(to_scheduler, false)) ++replies;
    if (ready[1] && net::try_recv(to_server, false)) ++replies;
  }
  return replies;
}

TEST(SecurityTest, OnlyPeersWithAnAllowedKeyGetIn) {
  const std::string keys = fresh_run_dir("curve_keys");
  Process keygen({bin("sps-keygen"), keys + "/job", keys + "/rogue"}, keys + "/keygen.out");
  ASSERT_EQ(keygen.wait(30), 0) << read_text(keys + "/keygen.out");
  EXPECT_EQ(fs::status(keys + "/job.key").permissions() & fs::perms::others_read, fs::perms::none);

  Job reference("curve_reference", 2, 2, job_sets({}));
  ASSERT_TRUE(reference.start());
  ASSERT_TRUE(reference.wait_all(120));
  ASSERT_EQ(reference.scheduler.exit_status(), 0) << read_text(reference.path("scheduler.out"));

  Job job("curve_job", 2, 2, job_sets({"security.curve=true", "security.key_file=" + keys + "/job.key"}));
  ASSERT_TRUE(job.start());
  const std::string scheduler = "tcp://127.0.0.1:" + std::to_string(job.port);
  const std::string server = server_endpoint(job, 0);
  ASSERT_FALSE(server.empty());

  auto job_keys = net::load_curve_settings(keys + "/job.key", "", "");
  ASSERT_TRUE(job_keys.ok()) << job_keys.status().to_string();
  // The rogue knows the servers' public key (it is public), not an allowed secret.
  auto rogue_keys = net::load_curve_settings(keys + "/rogue.key", keys + "/job.pub", "");
  ASSERT_TRUE(rogue_keys.ok()) << rogue_keys.status().to_string();
  zmq::context_t ctx(1);
  // The control: the job's own key gets through (and is counted as bad input there).
  attack(ctx, *job_keys, scheduler, server);
  EXPECT_EQ(attack(ctx, *rogue_keys, scheduler, server), 0) << "a wrong key got an answer";
  EXPECT_EQ(attack(ctx, net::CurveSettings{}, scheduler, server), 0) << "a client without CURVE got an answer";
  EXPECT_TRUE(job.scheduler.running()) << "the job ended before the attacks did; make it longer";

  ASSERT_TRUE(job.wait_all(120));
  ASSERT_EQ(job.scheduler.exit_status(), 0) << read_text(job.path("scheduler.out"));
  const auto summary = read_json(job.path("summary.json"));
  EXPECT_EQ(summary["malformed_messages_at_scheduler"].get<int>(), 1) << "only the allowed key's heartbeat arrives";
  EXPECT_EQ(summary["malformed_messages_at_servers"].get<int>(), 1) << "only the allowed key's push arrives";
  EXPECT_NE(read_text(job.path("server-0.out")).find("refused a connection"), std::string::npos);
  EXPECT_NE(read_text(job.path("scheduler.out")).find("key not allowed"), std::string::npos);

  const auto expected = read_f32(reference.path("params.f32"));
  const auto got = read_f32(job.path("params.f32"));
  ASSERT_EQ(got.size(), expected.size());
  ASSERT_FALSE(got.empty());
  EXPECT_EQ(std::memcmp(got.data(), expected.data(), got.size() * sizeof(float)), 0)
      << "the model changed: CURVE must not change results, and no rogue push may land";
}

TEST(SecurityTest, MissingOrBadKeysAreClearErrors) {
  Job job("curve_nokey", 1, 1, {"security.curve=true"});
  EXPECT_FALSE(job.start_scheduler());
  EXPECT_NE(read_text(job.path("scheduler.out")).find("security.key_file"), std::string::npos)
      << read_text(job.path("scheduler.out"));
  const std::string dir = fresh_run_dir("curve_badkey");
  { std::ofstream(dir + "/bad.key") << "public-key abc\nsecret-key def\n"; }
  auto s = net::load_curve_settings(dir + "/bad.key", "", "");
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find(dir + "/bad.key"), std::string::npos) << s.status().message();
  EXPECT_FALSE(net::load_curve_settings(dir + "/absent.key", "", "").ok());
}

}  // namespace
}  // namespace sps::testing
