// A real sps-scheduler and sps-server; this test is the job's only worker
// (through the worker library's PsClient) and, on a second raw ZeroMQ
// socket, a hostile peer. Every malformed message must be counted and
// dropped, the parameters must stay unchanged, and the server must keep
// serving the real worker.
#include <gtest/gtest.h>

#include <signal.h>

#include <fstream>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <zmq.hpp>

#include "net/link.h"
#include "protocol/message.h"
#include "tests/integration/harness.h"
#include "worker/client.h"

namespace sps::testing {
namespace {

using protocol::Bytes;
using protocol::Header;
using protocol::MessageType;

void set_u32(Bytes& b, size_t offset, uint32_t v) {
  for (int i = 0; i < 4; ++i) b[offset + i] = static_cast<std::byte>((v >> (8 * i)) & 0xFF);
}

void send_frames(zmq::socket_t& s, const std::vector<Bytes>& frames) {
  for (size_t i = 0; i < frames.size(); ++i)
    s.send(zmq::buffer(frames[i]), i + 1 < frames.size() ? zmq::send_flags::sndmore : zmq::send_flags::none);
}

TEST(MalformedMessageTest, ServerCountsDropsAndKeepsServing) {
  const int n = 7850;  // the logreg model size this config implies
  Job job("malformed", 1, 1, {"cluster.heartbeat_ms=100", "cluster.heartbeat_timeout_ms=5000"});
  ASSERT_TRUE(job.start_scheduler());
  job.start_server(0);

  auto cfg = config::load(std::string(SPS_SOURCE_DIR) + "/config/demo.yaml", job.sets);
  ASSERT_TRUE(cfg.ok());
  cfg->cluster.scheduler_port = job.port;
  zmq::context_t ctx(1);
  worker::PsClient client(*cfg, ctx);
  ASSERT_TRUE(client.register_worker(n).ok());
  std::vector<float> init(n);
  for (int i = 0; i < n; ++i) init[i] = 0.001f * static_cast<float>(i % 97);
  ASSERT_TRUE(client.init_params(init).ok());
  ASSERT_TRUE(client.start_barrier().ok());
  std::vector<float> params(n);
  ASSERT_TRUE(client.pull(0, params).ok());
  ASSERT_EQ(params, init);

  // The hostile peer.
  zmq::socket_t evil(ctx, zmq::socket_type::dealer);
  evil.set(zmq::sockopt::linger, 0);
  evil.connect(client.assignment().shards[0].endpoint);
  Header h;
  h.type = MessageType::kPush;
  h.sender = 0;
  h.clock = 0;
  h.key_begin = 0;
  h.key_end = n;
  h.index_encoding = protocol::IndexEncoding::kRawU32;
  const auto good = protocol::encode_data(h, std::vector<uint32_t>{1, 2}, std::vector<float>{5, 5});
  auto variant = [&](auto mutate) {
    std::vector<Bytes> f = {good.header, good.frame1.to_bytes(), good.frame2.to_bytes()};
    mutate(f);
    return f;
  };
  std::vector<std::vector<Bytes>> bad = {
      variant([](auto& f) { f[0][0] = std::byte{'X'}; }),                  // wrong magic
      variant([](auto& f) { f[0][4] = std::byte{9}; }),                    // unknown version
      variant([](auto& f) { f[0][6] = std::byte{99}; }),                   // unknown type
      variant([](auto& f) { f[0].resize(10); }),                           // truncated header
      variant([](auto& f) { f.resize(1); }),                               // frames missing
      variant([](auto& f) { f.push_back(Bytes(8)); f.push_back(Bytes(8)); }),  // extra frames
      variant([](auto& f) { f[1].resize(4); }),                            // truncated index frame
      variant([](auto& f) { set_u32(f[0], 44, 0x7FFFFFFF); }),             // huge count
      variant([&](auto& f) { set_u32(f[1], 4, static_cast<uint32_t>(n + 5)); }),  // index out of range
      variant([](auto& f) { set_u32(f[1], 4, 1); }),                       // not increasing
      variant([](auto& f) { set_u32(f[2], 4, 0x7FC00000); }),              // NaN value
      variant([](auto& f) { set_u32(f[0], 40, 100); }),                    // another shard's range
      variant([](auto& f) { set_u32(f[0], 12, 7); }),                      // unknown worker
      variant([](auto& f) { f[0][16] = std::byte{5}; }),                   // clock from the future
      variant([](auto& f) { f[0][60] = std::byte{1}; }),                   // reserved bytes set
      {Bytes{}},                                                           // one empty frame
      variant([](auto& f) { f[0][6] = std::byte{static_cast<uint8_t>(MessageType::kPullResponse)}; }),
  };
  // Compact index codings: a varint that runs past its frame, one wider than
  // 32 bits, a gap that leaves the range, and a bitmap whose bit count
  // disagrees with nnz.
  Header hv = h;
  hv.index_encoding = protocol::IndexEncoding::kDeltaVarint;
  const auto varint = protocol::encode_data(hv, std::vector<uint32_t>{1, 2}, std::vector<float>{5, 5});
  auto with_index = [&](const protocol::EncodedMessage& m, Bytes index) {
    auto head = protocol::decode_header(m.header);
    head->frame1_bytes = static_cast<uint32_t>(index.size());
    return std::vector<Bytes>{protocol::encode_header(*head), std::move(index), m.frame2.to_bytes()};
  };
  auto b = [](std::initializer_list<int> v) {
    Bytes out;
    for (int x : v) out.push_back(static_cast<std::byte>(x));
    return out;
  };
  bad.push_back(with_index(varint, b({0x01, 0x80})));
  bad.push_back(with_index(varint, b({0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F})));
  bad.push_back(with_index(varint, b({0x01, 0xFF, 0xFF, 0x7F})));
  Header hb = h;
  hb.index_encoding = protocol::IndexEncoding::kBitmap;
  const auto bitmap = protocol::encode_data(hb, std::vector<uint32_t>{1, 2}, std::vector<float>{5, 5});
  Bytes three_bits = bitmap.frame1.to_bytes();
  three_bits[0] |= std::byte{0x08};
  bad.push_back(with_index(bitmap, three_bits));
  for (const auto& f : bad) send_frames(evil, f);
  // Messages on one connection are handled in order: once a valid pull sent
  // after the bad messages is answered, the server has judged every one.
  Header pull;
  pull.type = MessageType::kPullRequest;
  pull.key_begin = 0;
  pull.key_end = n;
  const auto pull_msg = protocol::encode_control(pull);
  send_frames(evil, {pull_msg.header, pull_msg.frame1.to_bytes(), pull_msg.frame2.to_bytes()});
  ASSERT_TRUE(net::wait_readable({&evil}, std::chrono::seconds(10))[0]) << "the server stopped answering";
  auto reply = net::try_recv(evil, false);
  ASSERT_TRUE(reply.has_value());
  auto reply_view = net::decode(*reply);
  ASSERT_TRUE(reply_view.ok()) << reply_view.status().to_string();
  EXPECT_EQ(reply_view->header.type, MessageType::kPullResponse);

  // Parameters unchanged, and the server still answers the real worker.
  ASSERT_TRUE(client.pull(0, params).ok());
  EXPECT_EQ(params, init);
  kernels::SparseVector sel;
  sel.indices = {3, 4000};
  sel.values = {1.0f, -2.0f};
  ASSERT_TRUE(client.push_sparse(0, sel).ok());
  ASSERT_TRUE(client.pull(1, params).ok());
  std::vector<float> expected = init;
  expected[3] -= 1.0f;
  expected[4000] += 2.0f;
  EXPECT_EQ(params, expected);

  // Pulls for a clock the shard has not reached are held, one per worker:
  // a second one is dropped instead of growing the queue.
  Header future = pull;
  future.clock = 50;
  const auto future_msg = protocol::encode_control(future);
  for (int i = 0; i < 2; ++i) send_frames(evil, {future_msg.header, future_msg.frame1.to_bytes(), future_msg.frame2.to_bytes()});
  send_frames(evil, {pull_msg.header, pull_msg.frame1.to_bytes(), pull_msg.frame2.to_bytes()});  // refused too: worker 0 has one held
  const size_t refused_pulls = 2;
  // Refused messages get no answer to wait for; give the server a moment
  // before the job ends (it handles a message in microseconds).
  std::this_thread::sleep_for(std::chrono::milliseconds(300));

  protocol::DoneReport report;
  report.steps = 1;
  ASSERT_TRUE(client.finish(report).ok());
  ASSERT_TRUE(job.wait_all(30));
  EXPECT_EQ(job.servers[0].exit_status(), 0);
  uint64_t malformed = 0;
  bool found = false;
  for (const auto& line : read_jsonl(job.path("server-0.jsonl"))) {
    if (line.value("event", "") == "stats") {
      malformed = line["malformed"].get<uint64_t>();
      found = true;
    }
  }
  ASSERT_TRUE(found) << "the server wrote no stats line";
  EXPECT_EQ(malformed, bad.size() + refused_pulls);
}

// A registered worker whose heartbeats carry payloads that do not decode:
// each is counted and dropped, every heartbeat is still answered (the node
// stays alive), and the next good payload's progress shows in status.json.
TEST(MalformedMessageTest, SchedulerCountsBadHeartbeatPayloadsAndKeepsTheNode) {
  Job job("bad-heartbeat", 1, 1, {"cluster.heartbeat_ms=100", "cluster.heartbeat_timeout_ms=5000"});
  ASSERT_TRUE(job.start_scheduler());
  job.start_server(0);
  zmq::context_t ctx(1);
  zmq::socket_t peer(ctx, zmq::socket_type::dealer);
  peer.set(zmq::sockopt::linger, 0);
  peer.connect(fmt::format("tcp://127.0.0.1:{}", job.port));
  auto send = [&](MessageType type, Bytes payload) {
    Header h;
    h.type = type;
    const auto m = protocol::encode_control(h, std::move(payload));
    send_frames(peer, {m.header, m.frame1.to_bytes(), m.frame2.to_bytes()});
  };
  auto receive = [&]() -> MessageType {
    if (!net::wait_readable({&peer}, std::chrono::seconds(10))[0]) return MessageType{};
    auto r = net::try_recv(peer, false);
    if (!r) return MessageType{};
    auto m = net::decode(*r);
    return m.ok() ? m->header.type : MessageType{};
  };
  protocol::RegisterInfo info;
  info.role = protocol::Role::kWorker;
  info.num_params = 7850;
  info.host = "hostile";
  info.pid = 4242;
  send(MessageType::kRegister, protocol::encode_register(info));
  ASSERT_EQ(receive(), MessageType::kAssign) << "the scheduler did not assign the worker";

  protocol::DoneReport progress;
  progress.steps = 7;
  progress.bytes_pushed = 1234;
  progress.last_batch_loss = 0.5;
  Bytes longer = protocol::encode_done(progress);
  longer.push_back(std::byte{0});
  Bytes shorter = protocol::encode_done(progress);
  shorter.resize(shorter.size() - 8);
  const std::vector<Bytes> bad = {Bytes(3), longer, shorter, protocol::encode_server_report({})};
  for (const auto& payload : bad) send(MessageType::kHeartbeat, payload);
  send(MessageType::kHeartbeat, protocol::encode_done(progress));
  for (size_t i = 0; i < bad.size() + 1; ++i)
    ASSERT_EQ(receive(), MessageType::kHeartbeat) << "heartbeat " << i << " was not answered";

  // status.json is rewritten once a second: the good payload's figures show.
  nlohmann::json worker = nlohmann::json::object();
  for (int i = 0; i < 100 && worker.value("step", 0) != 7; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    std::ifstream in(job.path("status.json"));
    const auto status = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (!status.is_discarded() && status.contains("workers") && status["workers"].size() == 1)
      worker = status["workers"][0];
  }
  EXPECT_EQ(worker.value("step", 0), 7) << worker.dump();
  EXPECT_EQ(worker.value("bytes_pushed", 0), 1234);
  EXPECT_TRUE(worker.value("alive", false));
  EXPECT_EQ(worker.value("host", ""), "hostile");

  job.scheduler.send_signal(SIGTERM);
  ASSERT_TRUE(job.wait_all(20));
  uint64_t malformed = 0;
  bool found = false;
  for (const auto& line : read_jsonl(job.path("scheduler.jsonl"))) {
    if (line.value("event", "") == "shutdown") {
      malformed = line["malformed"].get<uint64_t>();
      found = true;
    }
  }
  ASSERT_TRUE(found) << "the scheduler logged no shutdown";
  EXPECT_EQ(malformed, bad.size());
}

// The scheduler refuses registrations it cannot honour, with a reason, and
// keeps the job's registration open for the right peers.
TEST(RegistrationTest, RefusesTakenRanksWrongSizesAndExtraNodes) {
  Job job("registration", 2, 1, {"cluster.heartbeat_ms=100"});
  ASSERT_TRUE(job.start_scheduler());
  auto cfg = config::load(std::string(SPS_SOURCE_DIR) + "/config/demo.yaml", job.sets);
  ASSERT_TRUE(cfg.ok());
  cfg->cluster.scheduler_port = job.port;
  zmq::context_t ctx(1);

  worker::PsClient first(*cfg, ctx);
  Status first_status;
  std::thread t([&] { first_status = first.register_worker(100, 1); });
  ASSERT_GT(wait_for_lines(job.path("scheduler.jsonl"), 2, 20), 1u);  // "register" logged

  worker::PsClient same_rank(*cfg, ctx);
  Status s = same_rank.register_worker(100, 1);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("rank 1 is already taken"), std::string::npos) << s.message();

  worker::PsClient other_size(*cfg, ctx);
  s = other_size.register_worker(99);
  EXPECT_NE(s.message().find("model size 99 differs"), std::string::npos) << s.message();

  worker::PsClient huge(*cfg, ctx);
  s = huge.register_worker(uint64_t{1} << 33);
  EXPECT_NE(s.message().find("model size 8589934592 exceeds"), std::string::npos) << s.message();

  worker::PsClient bad_rank(*cfg, ctx);
  s = bad_rank.register_worker(100, 5);
  EXPECT_NE(s.message().find("requested rank 5"), std::string::npos) << s.message();

  worker::PsClient second(*cfg, ctx);
  Status second_status;
  std::thread t2([&] { second_status = second.register_worker(100); });
  job.start_server(0);
  t.join();
  t2.join();
  ASSERT_TRUE(first_status.ok()) << first_status.to_string();
  ASSERT_TRUE(second_status.ok()) << second_status.to_string();
  EXPECT_EQ(first.rank(), 1u);
  EXPECT_EQ(second.rank(), 0u);  // the smallest free rank
  EXPECT_EQ(second.assignment().shards.size(), 1u);

  worker::PsClient late(*cfg, ctx);
  s = late.register_worker(100);
  EXPECT_NE(s.message().find("registration is closed"), std::string::npos) << s.message();
  job.scheduler.send_signal(SIGTERM);
  EXPECT_TRUE(job.wait_all(20));
}

}  // namespace
}  // namespace sps::testing
