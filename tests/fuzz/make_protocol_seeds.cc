// Writes the protocol fuzzer's seed corpus: one valid message of every type
// (sparse and dense data in f32/f16/bf16, every control payload), in the
// harness's input layout. Usage: sps-fuzz-protocol-seeds OUT_DIR
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "protocol/message.h"

using namespace sps::protocol;

namespace {

void write(const std::string& path, const EncodedMessage& m) {
  std::vector<char> out;
  out.push_back(3);
  for (ByteSpan f : {ByteSpan(m.header), m.frame1.span(), m.frame2.span()}) {
    out.push_back(static_cast<char>(f.size() & 0xff));
    out.push_back(static_cast<char>((f.size() >> 8) & 0xff));
    for (std::byte b : f) out.push_back(static_cast<char>(b));
  }
  std::ofstream(path, std::ios::binary).write(out.data(), static_cast<std::streamsize>(out.size()));
}

Header data_header(MessageType t, IndexEncoding e) {
  Header h;
  h.type = t;
  h.key_begin = 100;
  h.key_end = 120;
  h.index_encoding = e;
  return h;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  const std::vector<uint32_t> keys{101, 105, 119};
  const std::vector<float> values{1.5f, -2.0f, 0.25f};
  std::vector<float> dense(20, 0.5f);
  int i = 0;
  for (ValueType vt : {ValueType::kF32, ValueType::kF16, ValueType::kBF16}) {
    write(dir + "/push_sparse_" + std::to_string(i), encode_data(data_header(MessageType::kPush, IndexEncoding::kRawU32), keys, values, vt));
    write(dir + "/push_dense_" + std::to_string(i), encode_data(data_header(MessageType::kPush, IndexEncoding::kNone), {}, dense, vt));
    write(dir + "/pull_sparse_" + std::to_string(i), encode_data(data_header(MessageType::kPullResponse, IndexEncoding::kRawU32), keys, values, vt));
    write(dir + "/push_varint_" + std::to_string(i), encode_data(data_header(MessageType::kPush, IndexEncoding::kDeltaVarint), keys, values, vt));
    write(dir + "/push_bitmap_" + std::to_string(i), encode_data(data_header(MessageType::kPush, IndexEncoding::kBitmap), keys, values, vt));
    ++i;
  }
  // Scaled values: two runs (values are level * scale, as a compressor sends them).
  const std::vector<sps::ScaleRun> runs{{2, 0.5f}, {1, 0.25f}};
  const std::vector<float> scaled{63.5f, -1.0f, 0.25f};
  write(dir + "/push_int8", encode_data(data_header(MessageType::kPush, IndexEncoding::kRawU32), keys, scaled,
                                        ValueType::kI8, nullptr, runs));
  const std::vector<float> signs{0.5f, -0.5f, 0.25f};
  write(dir + "/push_sign", encode_data(data_header(MessageType::kPush, IndexEncoding::kDeltaVarint), keys, signs,
                                        ValueType::kSign, nullptr, runs));
  const std::vector<sps::ScaleRun> onebit_runs{{2, 0.5f, 0.75f}, {1, 0.25f, 0.0f}};
  const std::vector<float> onebit{0.5f, -0.75f, 0.25f};
  write(dir + "/push_onebit", encode_data(data_header(MessageType::kPush, IndexEncoding::kRawU32), keys, onebit,
                                          ValueType::kOneBit, nullptr, onebit_runs));
  // A varint gap that needs several bytes (keys far apart in a wide range).
  Header wide = data_header(MessageType::kPush, IndexEncoding::kDeltaVarint);
  wide.key_begin = 0;
  wide.key_end = 1u << 30;
  write(dir + "/push_varint_wide", encode_data(wide, std::vector<uint32_t>{5, 300, 70000, (1u << 30) - 1}, std::vector<float>{1, 2, 3, 4}));
  Header h;
  h.type = MessageType::kRegister;
  RegisterInfo r;
  r.num_params = 7850;
  r.endpoint = "tcp://127.0.0.1:5555";
  r.host = "node";
  write(dir + "/register", encode_control(h, encode_register(r)));
  h.type = MessageType::kAssign;
  AssignInfo a;
  a.num_workers = 2;
  a.num_servers = 2;
  a.num_params = 100;
  a.shards = {{0, 50, "tcp://127.0.0.1:1"}, {50, 100, "tcp://127.0.0.1:2"}};
  write(dir + "/assign", encode_control(h, encode_assign(a)));
  h.type = MessageType::kDone;
  write(dir + "/done", encode_control(h, encode_done(DoneReport{})));
  h.type = MessageType::kShutdown;
  write(dir + "/shutdown", encode_control(h, encode_text("job over")));
  for (MessageType t : {MessageType::kBarrier, MessageType::kHeartbeat, MessageType::kPullRequest}) {
    h.type = t;
    write(dir + "/control_" + std::to_string(static_cast<int>(t)), encode_control(h));
  }
  // A worker replacing a dead one: its assignment, the servers' join
  // messages (a rank and a clock) and its barrier release at that clock.
  h.type = MessageType::kAssign;
  h.flags = kFlagRejoin;
  a.rank = 1;
  write(dir + "/assign_rejoin", encode_control(h, encode_assign(a)));
  h.flags = 0;
  h.clock = 1286;
  for (MessageType t : {MessageType::kNodeDead, MessageType::kJoin, MessageType::kJoinAt}) {
    h.type = t;
    write(dir + "/rank_" + std::to_string(static_cast<int>(t)), encode_control(h, encode_rank(1)));
  }
  h.type = MessageType::kBarrierRelease;
  write(dir + "/barrier_release_at", encode_control(h));
  // A server replacing a dead one: its restore report (a clock per worker,
  // one gone), the scheduler's move notice, a snapshot notice.
  h.type = MessageType::kServerRestored;
  const uint64_t clocks[] = {200, 203, kWorkerGone};
  write(dir + "/server_restored", encode_control(h, encode_clocks(clocks)));
  h.type = MessageType::kServerMoved;
  h.shard = 1;
  write(dir + "/server_moved", encode_control(h, encode_text("tcp://127.0.0.1:40123")));
  h.type = MessageType::kSnapshotted;
  write(dir + "/snapshotted", encode_control(h));
  h.type = MessageType::kSnapshotAt;
  h.clock = 1234;
  write(dir + "/snapshot_at", encode_control(h));
  return 0;
}
