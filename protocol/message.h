// The sps wire format: message types, the fixed header, and validated
// encode/decode of every message. Pure functions over bytes; no sockets.
//
// Every message is exactly three ZeroMQ frames (see docs/protocol.md):
//   frame 0  header, kHeaderBytes, little-endian, magic + version first
//   frame 1  indices (data messages) or a control payload (may be empty)
//   frame 2  values (data messages; empty for control messages)
// Decoders take the frames as byte spans, validate everything the header
// claims against the frames before trusting it, and return a Status on any
// mismatch. Decoded views point into the caller's frames (no copy); the
// frames must outlive the view.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"
#include "common/value_format.h"
#include "protocol/coding.h"
#include "protocol/frame.h"
#include "protocol/index_coding.h"

namespace sps::protocol {

inline constexpr uint32_t kMagic = 0x31535053;  // bytes "SPS1" on the wire
inline constexpr uint16_t kVersion = 1;
inline constexpr size_t kHeaderBytes = 64;
inline constexpr size_t kFrameCount = 3;
// Largest key range one message may address (indices are u32 keys).
inline constexpr uint64_t kMaxKeys = uint64_t{1} << 31;
// Largest control payload and string; control messages are small.
inline constexpr size_t kMaxControlPayload = 1 << 20;
inline constexpr size_t kMaxStringBytes = 4096;
inline constexpr size_t kMaxShards = 4096;

enum class MessageType : uint16_t {
  kRegister = 1,         // node -> scheduler: role, data endpoint, model size
  kAssign = 2,           // scheduler -> node: rank, sizes, shard map
  kBarrier = 3,          // node -> scheduler: entered barrier `clock`
  kBarrierRelease = 4,   // scheduler -> node: barrier `clock` released
  kHeartbeat = 5,        // node <-> scheduler: alive (scheduler echoes)
  kShutdown = 6,         // scheduler -> node: job over; flags kFlagError if failed
  kError = 7,            // any -> any: a refused request, payload = reason
  kPush = 8,             // worker -> server: sparse or dense update for a shard
  kPullRequest = 9,      // worker -> server: parameters for clock `clock`
  kPullResponse = 10,    // server -> worker: dense shard values at `base_version`
  kDone = 11,            // worker -> scheduler: finished, with its report
  kNodeDead = 12,        // scheduler -> server: a worker left the job
  kServerReport = 13,    // server -> scheduler: end-of-job statistics
  // A worker replacing a dead one (same rank) in a running job:
  kJoin = 14,            // scheduler -> server: hold worker `rank` at your slowest clock;
                         // server -> scheduler: that clock, in `clock`
  kJoinAt = 15,          // scheduler -> server: worker `rank` starts at `clock`; echoed back when set
  // A server replacing a dead one (same rank) in a running job:
  kServerRestored = 16,  // server -> scheduler: restored the snapshot of step `clock`; payload = per-worker clocks
  kServerMoved = 17,     // scheduler -> worker: shard `shard` is now served at the payload's endpoint;
                         // resend your pushes from clock `clock` on
  kSnapshotted = 18,     // server -> worker: a snapshot holds your pushes before clock `clock`
  kSnapshotAt = 19,      // scheduler -> node: snapshot at step `clock` too (checkpoint.every_seconds)
};
inline constexpr uint16_t kMaxMessageType = 19;

enum class ValueType : uint8_t {
  kNone = 0,  // no values (control messages)
  kF32 = 1,   // little-endian IEEE-754 binary32, finite
  kF16 = 2,   // little-endian IEEE-754 binary16, finite
  kBF16 = 3,  // little-endian bfloat16 (the top half of a binary32), finite
  // Scaled: the value frame starts with u32 run count R and R runs
  // (u32 count, f32 scale), counts >= 1 summing to nnz, scales finite and
  // >= 0; then one level per value. A value is level * its run's scale.
  kI8 = 4,    // levels as int8 in [-127, 127]
  kSign = 5,  // levels as sign bits, LSB first: 0 = +1, 1 = -1
  // Like kSign with two scales a run (u32 count, f32 scale, f32 negative
  // scale; both finite and >= 0): bit 0 is +scale, bit 1 -negative scale.
  kOneBit = 6,
};
inline constexpr uint8_t kMaxValueType = 6;
inline bool is_scaled(ValueType t) {
  return t == ValueType::kI8 || t == ValueType::kSign || t == ValueType::kOneBit;
}
// The wire type that carries values in `format` (qsgd's levels travel as int8).
inline ValueType wire_value_type(ValueFormat format) {
  switch (format) {
    case ValueFormat::kF16: return ValueType::kF16;
    case ValueFormat::kBF16: return ValueType::kBF16;
    case ValueFormat::kInt8:
    case ValueFormat::kQsgd: return ValueType::kI8;
    case ValueFormat::kSign: return ValueType::kSign;
    case ValueFormat::kOneBit: return ValueType::kOneBit;
    default: return ValueType::kF32;
  }
}
// Bytes of one scale run in a scaled value frame.
inline uint64_t scale_run_bytes(ValueType t) { return t == ValueType::kOneBit ? 12 : 8; }
// Bytes of a value frame holding `nnz` values in `runs` scale runs (the
// run count is ignored by the unscaled types; 0 for kNone).
uint64_t value_frame_bytes(ValueType t, uint64_t nnz, uint64_t runs);

// Header flags.
inline constexpr uint16_t kFlagInit = 1 << 0;   // kPush: initial parameters, set not add
inline constexpr uint16_t kFlagError = 1 << 1;  // kShutdown: the job failed
// kPullRequest: base_version is the version this worker last received for
// the shard, so the server may answer with only the keys changed since.
inline constexpr uint16_t kFlagHaveVersion = 1 << 2;
// kPullResponse: this worker's push for clock `clock - 1` (the one sent just
// before this pull) was refused as too stale and not applied
// (consistency.max_push_staleness); the worker puts its values back into
// its residual.
inline constexpr uint16_t kFlagPushRefused = 1 << 3;
// kPullRequest: answer with the server's parameters themselves, densely,
// not the copy compressed pulls publish (downlink.*): a worker's final pull
// before it evaluates and saves the model.
inline constexpr uint16_t kFlagExact = 1 << 4;
// kAssign: this worker replaces a dead worker of its rank in a running job:
// it sends no initial parameters, and its start barrier is released with
// the clock it starts at (kBarrierRelease's `clock`).
inline constexpr uint16_t kFlagRejoin = 1 << 5;
// kPush: sent again to a server that took a dead one's place (kServerMoved).
// Its base_version may be ahead of the restored shard's version, which
// catches up as the resent pushes are applied; the push counts as computed
// on the shard's version then.
inline constexpr uint16_t kFlagResent = 1 << 6;

struct Header {
  MessageType type = MessageType::kHeartbeat;
  uint16_t flags = 0;
  IndexEncoding index_encoding = IndexEncoding::kNone;
  ValueType value_type = ValueType::kNone;
  uint32_t sender = 0;        // rank of the sender within its role
  uint64_t clock = 0;         // worker clock (pushes completed) or barrier id
  uint64_t base_version = 0;  // parameter version a push was computed on / a pull answers with
  uint32_t shard = 0;         // server shard the data refers to
  uint32_t key_begin = 0;     // key range [key_begin, key_end) of the data
  uint32_t key_end = 0;
  uint32_t nnz = 0;           // entries in the value frame
  uint32_t frame1_bytes = 0;  // size of frame 1
  uint32_t frame2_bytes = 0;  // size of frame 2
};

// A message as three byte buffers ready to be sent as frames (net::send
// hands the data frames to ZeroMQ without copying them).
struct EncodedMessage {
  Bytes header;
  Frame frame1;
  Frame frame2;
  size_t total_bytes() const { return header.size() + frame1.size() + frame2.size(); }
};

// A validated message whose frames are borrowed from the caller.
struct MessageView {
  Header header;
  ByteSpan frame1;
  ByteSpan frame2;
};

const char* message_type_name(MessageType type);

Bytes encode_header(const Header& h);
// Parses and validates the fixed header alone (magic, version, type, enums,
// reserved bytes, key range).
Result<Header> decode_header(ByteSpan bytes);
// Validates header + frames: count, sizes against the header, per-type rules
// (data messages need consistent nnz/encoding/value type; control messages
// carry no values). Index order/range is checked by the typed decoders.
Result<MessageView> decode_message(std::span<const ByteSpan> frames);

// ---- data messages --------------------------------------------------------

// A validated sparse or dense slice of values for one shard. Keys (global)
// and values are plain arrays: views straight into the received frames where
// the wire layout is the host's (raw u32 keys, f32 values on a little-endian
// host), else decoded into a DecodeScratch the caller owns.
class DataView {
 public:
  DataView() = default;
  // `keys` is ignored (empty) for dense slices.
  DataView(const Header& h, std::span<const uint32_t> keys, std::span<const float> values)
      : header_(h), keys_(keys), values_(values) {}
  const Header& header() const { return header_; }
  bool dense() const { return header_.index_encoding == IndexEncoding::kNone; }
  uint32_t size() const { return static_cast<uint32_t>(values_.size()); }
  // Global key of entry i (dense: key_begin + i).
  uint32_t key(uint32_t i) const { return dense() ? header_.key_begin + i : keys_[i]; }
  float value(uint32_t i) const { return values_[i]; }
  std::span<const uint32_t> keys() const { return keys_; }  // empty when dense
  std::span<const float> values() const { return values_; }

 private:
  Header header_;
  std::span<const uint32_t> keys_;
  std::span<const float> values_;
};

// Where decode_data puts keys and values it cannot view in place; reused
// across messages so steady-state decoding allocates nothing.
struct DecodeScratch {
  std::vector<uint32_t> keys;
  std::vector<float> values;
};

// Encodes a push or pull response. With h.index_encoding == kNone the values
// are a dense slice over [key_begin, key_end) and `indices` is ignored;
// otherwise `indices` (sorted global keys) pairs with `values` and goes out in
// h.index_encoding (see index_coding.h; choose_index_encoding picks the
// smallest). Values go out as `value_type` (f16/bf16 round to nearest even
// and saturate; senders that care about the rounding error quantise first,
// as the compressor does, so nothing more is lost here). The scaled types
// need `runs` (counts summing to values.size()) and values that are
// level * scale already (what a compressor with that format sent), so they
// too go out exactly. Frames come from `pool` when given. One pass over the
// input; no other copy is made.
EncodedMessage encode_data(const Header& h, std::span<const uint32_t> indices, std::span<const float> values,
                           ValueType value_type = ValueType::kF32, FramePool* pool = nullptr,
                           std::span<const ScaleRun> runs = {});
// Full validation for kPush / kPullResponse against the range the receiver
// owns: the header's range must equal `expected_begin/end`, keys must be
// strictly increasing and inside the range, values finite. The view points
// into `m`'s frames and `scratch`, which must outlive it.
Result<DataView> decode_data(const MessageView& m, uint32_t expected_begin, uint32_t expected_end,
                             DecodeScratch& scratch);

// ---- control messages -----------------------------------------------------

enum class Role : uint8_t { kWorker = 1, kServer = 2 };

struct RegisterInfo {
  Role role = Role::kWorker;
  uint64_t num_params = 0;   // workers: model size (all workers must agree)
  std::string endpoint;      // servers: where workers connect (tcp://host:port)
  std::string host;          // informational: hostname of the process
  uint32_t pid = 0;
  int32_t requested_rank = -1;  // a specific rank within the role, or -1 for any
};

struct ShardInfo {
  uint32_t key_begin = 0;
  uint32_t key_end = 0;
  std::string endpoint;
};

struct AssignInfo {
  uint32_t rank = 0;
  uint32_t num_workers = 0;
  uint32_t num_servers = 0;
  uint64_t num_params = 0;
  std::vector<ShardInfo> shards;  // one per server, contiguous, covering [0, num_params)
};

// A worker's end-of-run report; NaN where a figure was not measured.
struct DoneReport {
  uint64_t steps = 0;
  uint64_t bytes_pushed = 0;
  uint64_t bytes_pushed_dense_equivalent = 0;
  uint64_t bytes_pulled = 0;
  uint64_t nnz_pushed = 0;
  double train_loss = 0;     // full-training-set loss of the final model (rank 0), or NaN
  double test_accuracy = 0;  // test accuracy of the final model (rank 0), or NaN
  double last_batch_loss = 0;
  double wall_seconds = 0;
};

// A server's end-of-job statistics. Staleness as exact (value, count) pairs;
// pull waits as log-spaced bucket counts plus sum and max (seconds).
struct ServerReport {
  uint64_t version = 0;
  uint64_t pushes_applied = 0;
  uint64_t pushes_rejected = 0;
  uint64_t pushes_refused_stale = 0;  // strict staleness: too stale to apply
  uint64_t malformed = 0;
  uint64_t pulls_answered = 0;
  uint64_t sparse_pulls = 0;
  uint64_t bytes_in = 0;
  uint64_t bytes_out = 0;
  std::vector<std::pair<uint64_t, uint64_t>> staleness;
  std::vector<uint64_t> wait_buckets;
  double wait_sum = 0;
  double wait_max = 0;
};
inline constexpr size_t kMaxReportEntries = 16384;

EncodedMessage encode_control(const Header& h, Bytes payload = {});
Bytes encode_server_report(const ServerReport& r);
Result<ServerReport> decode_server_report(ByteSpan payload);
Bytes encode_register(const RegisterInfo& r);
Result<RegisterInfo> decode_register(ByteSpan payload);
Bytes encode_assign(const AssignInfo& a);
Result<AssignInfo> decode_assign(ByteSpan payload);
Bytes encode_done(const DoneReport& d);
Result<DoneReport> decode_done(ByteSpan payload);
Bytes encode_text(std::string_view text);          // kError / kShutdown reason
Result<std::string> decode_text(ByteSpan payload);
Bytes encode_rank(uint32_t rank);                  // kNodeDead, kJoin, kJoinAt
Result<uint32_t> decode_rank(ByteSpan payload);
// kServerRestored: per worker, the clock of its first push the restored
// shard lacks (UINT64_MAX: the worker had left the job).
inline constexpr uint64_t kWorkerGone = UINT64_MAX;
Bytes encode_clocks(std::span<const uint64_t> clocks);
Result<std::vector<uint64_t>> decode_clocks(ByteSpan payload);

}  // namespace sps::protocol
