#include "protocol/message.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>

#include <fmt/format.h>

#include "common/half_floats.h"

namespace sps::protocol {

std::string Reader::get_string(size_t max_len) {
  const uint32_t len = get<uint32_t>();
  if (failed_ || len > max_len || !need(len)) {
    failed_ = true;
    return {};
  }
  std::string s(reinterpret_cast<const char*>(bytes_.data() + pos_), len);
  pos_ += len;
  return s;
}

Status Reader::finish(std::string_view what) const {
  if (failed_) return malformed(fmt::format("{} payload truncated or a field is too long", what));
  if (pos_ != bytes_.size())
    return malformed(fmt::format("{} payload has {} trailing bytes", what, bytes_.size() - pos_));
  return {};
}

const char* message_type_name(MessageType type) {
  switch (type) {
    case MessageType::kRegister: return "register";
    case MessageType::kAssign: return "assign";
    case MessageType::kBarrier: return "barrier";
    case MessageType::kBarrierRelease: return "barrier_release";
    case MessageType::kHeartbeat: return "heartbeat";
    case MessageType::kShutdown: return "shutdown";
    case MessageType::kError: return "error";
    case MessageType::kPush: return "push";
    case MessageType::kPullRequest: return "pull_request";
    case MessageType::kPullResponse: return "pull_response";
    case MessageType::kDone: return "done";
    case MessageType::kNodeDead: return "node_dead";
    case MessageType::kServerReport: return "server_report";
    case MessageType::kJoin: return "join";
    case MessageType::kJoinAt: return "join_at";
    case MessageType::kServerRestored: return "server_restored";
    case MessageType::kServerMoved: return "server_moved";
    case MessageType::kSnapshotted: return "snapshotted";
    case MessageType::kSnapshotAt: return "snapshot_at";
  }
  return "unknown";
}

namespace {

bool is_data_type(MessageType t) { return t == MessageType::kPush || t == MessageType::kPullResponse; }

// The index frame's size against nnz and the range, per encoding.
bool index_frame_size_ok(const Header& h) {
  const uint64_t bytes = h.frame1_bytes;
  const uint64_t nnz = h.nnz;
  switch (h.index_encoding) {
    case IndexEncoding::kRawU32: return bytes == 4 * nnz;
    case IndexEncoding::kDeltaVarint: return bytes >= nnz && bytes <= kMaxVarintBytes * nnz;
    case IndexEncoding::kBitmap: return bytes == bitmap_bytes(uint64_t{h.key_end} - h.key_begin);
    case IndexEncoding::kNone: return bytes == 0;
  }
  return false;
}

constexpr bool kLittleEndianHost = std::endian::native == std::endian::little;

template <class T>
bool aligned_for(const std::byte* p) {
  return reinterpret_cast<uintptr_t>(p) % alignof(T) == 0;
}

// First entry of `v` that is NaN or infinite, or v.size(). The OR-reduction
// vectorises; the position is searched only when something is wrong.
size_t first_non_finite(std::span<const float> v) {
  uint32_t any = 0;
  for (float x : v) any |= static_cast<uint32_t>((std::bit_cast<uint32_t>(x) & 0x7F800000u) == 0x7F800000u);
  if (any == 0) return v.size();
  for (size_t i = 0; i < v.size(); ++i)
    if (!std::isfinite(v[i])) return i;
  return v.size();
}

}  // namespace

// Layout (offsets in bytes), all little-endian:
//  0 magic u32 | 4 version u16 | 6 type u16 | 8 flags u16 | 10 index_encoding u8
// 11 value_type u8 | 12 sender u32 | 16 clock u64 | 24 base_version u64
// 32 shard u32 | 36 key_begin u32 | 40 key_end u32 | 44 nnz u32
// 48 frame1_bytes u32 | 52 frame2_bytes u32 | 56 reserved u64 (zero)
Bytes encode_header(const Header& h) {
  Bytes out;
  out.reserve(kHeaderBytes);
  put_le<uint32_t>(out, kMagic);
  put_le<uint16_t>(out, kVersion);
  put_le<uint16_t>(out, static_cast<uint16_t>(h.type));
  put_le<uint16_t>(out, h.flags);
  put_le<uint8_t>(out, static_cast<uint8_t>(h.index_encoding));
  put_le<uint8_t>(out, static_cast<uint8_t>(h.value_type));
  put_le<uint32_t>(out, h.sender);
  put_le<uint64_t>(out, h.clock);
  put_le<uint64_t>(out, h.base_version);
  put_le<uint32_t>(out, h.shard);
  put_le<uint32_t>(out, h.key_begin);
  put_le<uint32_t>(out, h.key_end);
  put_le<uint32_t>(out, h.nnz);
  put_le<uint32_t>(out, h.frame1_bytes);
  put_le<uint32_t>(out, h.frame2_bytes);
  put_le<uint64_t>(out, 0);
  return out;
}

Result<Header> decode_header(ByteSpan bytes) {
  if (bytes.size() != kHeaderBytes)
    return malformed(fmt::format("header is {} bytes, expected {}", bytes.size(), kHeaderBytes));
  Reader r(bytes);
  const auto magic = r.get<uint32_t>();
  if (magic != kMagic) return malformed(fmt::format("bad magic 0x{:08x}", magic));
  const auto version = r.get<uint16_t>();
  if (version != kVersion)
    return malformed(fmt::format("unsupported protocol version {} (this build speaks {})", version, kVersion));
  Header h;
  const auto type = r.get<uint16_t>();
  if (type == 0 || type > kMaxMessageType) return malformed(fmt::format("unknown message type {}", type));
  h.type = static_cast<MessageType>(type);
  h.flags = r.get<uint16_t>();
  const auto enc = r.get<uint8_t>();
  if (enc > kMaxIndexEncoding)
    return malformed(fmt::format("unknown index encoding {}", enc));
  h.index_encoding = static_cast<IndexEncoding>(enc);
  const auto vt = r.get<uint8_t>();
  if (vt > kMaxValueType) return malformed(fmt::format("unknown value type {}", vt));
  h.value_type = static_cast<ValueType>(vt);
  h.sender = r.get<uint32_t>();
  h.clock = r.get<uint64_t>();
  h.base_version = r.get<uint64_t>();
  h.shard = r.get<uint32_t>();
  h.key_begin = r.get<uint32_t>();
  h.key_end = r.get<uint32_t>();
  h.nnz = r.get<uint32_t>();
  h.frame1_bytes = r.get<uint32_t>();
  h.frame2_bytes = r.get<uint32_t>();
  const auto reserved = r.get<uint64_t>();
  SPS_RETURN_IF_ERROR(r.finish("header"));
  if (reserved != 0) return malformed("reserved header bytes are not zero");
  if (h.key_end < h.key_begin)
    return malformed(fmt::format("key range [{}, {}) is reversed", h.key_begin, h.key_end));
  if (uint64_t{h.key_end} - h.key_begin > kMaxKeys)
    return malformed(fmt::format("key range of {} keys exceeds the limit {}", h.key_end - h.key_begin, kMaxKeys));
  return h;
}

Result<MessageView> decode_message(std::span<const ByteSpan> frames) {
  if (frames.size() != kFrameCount)
    return malformed(fmt::format("message has {} frames, expected {}", frames.size(), kFrameCount));
  SPS_ASSIGN_OR_RETURN(Header h, decode_header(frames[0]));
  const char* name = message_type_name(h.type);
  if (frames[1].size() != h.frame1_bytes || frames[2].size() != h.frame2_bytes)
    return malformed(fmt::format("{}: frame sizes {}/{} differ from the header's {}/{}", name, frames[1].size(),
                                 frames[2].size(), h.frame1_bytes, h.frame2_bytes));
  if (is_data_type(h.type)) {
    if (h.value_type == ValueType::kNone) return malformed(fmt::format("{}: data message without a value type", name));
    const uint64_t range = uint64_t{h.key_end} - h.key_begin;
    if (h.nnz > range)
      return malformed(fmt::format("{}: nnz {} exceeds the key range of {} keys", name, h.nnz, range));
    uint64_t runs = 0;
    if (is_scaled(h.value_type)) {
      if (frames[2].size() < 4) return malformed(fmt::format("{}: scaled value frame has no run count", name));
      runs = load_le<uint32_t>(frames[2].data());
      if (runs > h.nnz)
        return malformed(fmt::format("{}: {} scale runs for nnz {}", name, runs, h.nnz));
    }
    if (uint64_t{h.frame2_bytes} != value_frame_bytes(h.value_type, h.nnz, runs))
      return malformed(fmt::format("{}: value frame is {} bytes for nnz {}", name, h.frame2_bytes, h.nnz));
    if (h.index_encoding == IndexEncoding::kNone) {
      if (h.nnz != range) return malformed(fmt::format("{}: dense slice has nnz {} for {} keys", name, h.nnz, range));
      if (h.frame1_bytes != 0) return malformed(fmt::format("{}: dense slice carries an index frame", name));
    } else if (!index_frame_size_ok(h)) {
      return malformed(fmt::format("{}: {} index frame is {} bytes for nnz {} over {} keys", name,
                                   index_encoding_name(h.index_encoding), h.frame1_bytes, h.nnz, range));
    }
  } else {
    if (h.frame2_bytes != 0 || h.nnz != 0 || h.value_type != ValueType::kNone ||
        h.index_encoding != IndexEncoding::kNone)
      return malformed(fmt::format("{}: control message carries data fields", name));
    if (h.frame1_bytes > kMaxControlPayload)
      return malformed(fmt::format("{}: control payload of {} bytes exceeds {}", name, h.frame1_bytes,
                                   kMaxControlPayload));
  }
  return MessageView{h, frames[1], frames[2]};
}

uint64_t value_frame_bytes(ValueType t, uint64_t nnz, uint64_t runs) {
  switch (t) {
    case ValueType::kF32: return 4 * nnz;
    case ValueType::kF16:
    case ValueType::kBF16: return 2 * nnz;
    case ValueType::kI8: return 4 + 8 * runs + nnz;
    case ValueType::kSign: return 4 + 8 * runs + (nnz + 7) / 8;
    case ValueType::kOneBit: return 4 + 12 * runs + (nnz + 7) / 8;
    default: return 0;
  }
}

EncodedMessage encode_data(const Header& h, std::span<const uint32_t> indices, std::span<const float> values,
                           ValueType value_type, FramePool* pool, std::span<const ScaleRun> runs) {
  Header out = h;
  SPS_CHECK(value_type != ValueType::kNone);
  if (is_scaled(value_type)) {
    uint64_t counted = 0;
    for (const ScaleRun& r : runs) counted += r.count;
    SPS_CHECK(counted == values.size());
  }
  out.value_type = value_type;
  out.nnz = static_cast<uint32_t>(values.size());
  const uint64_t range = uint64_t{h.key_end} - h.key_begin;
  auto frame = [pool](size_t n) { return pool != nullptr ? pool->take(n) : Frame(n); };
  EncodedMessage m;
  switch (out.index_encoding) {
    case IndexEncoding::kNone:
      SPS_CHECK(values.size() == range);
      break;
    case IndexEncoding::kRawU32:
      SPS_CHECK(indices.size() == values.size());
      m.frame1 = frame(4 * indices.size());
      if constexpr (kLittleEndianHost) {
        if (!indices.empty()) std::memcpy(m.frame1.data(), indices.data(), 4 * indices.size());
      } else {
        for (size_t i = 0; i < indices.size(); ++i)
          for (int j = 0; j < 4; ++j) m.frame1[4 * i + j] = static_cast<std::byte>((indices[i] >> (8 * j)) & 0xFF);
      }
      break;
    case IndexEncoding::kDeltaVarint:
      SPS_CHECK(indices.size() == values.size());
      m.frame1 = frame(kMaxVarintBytes * indices.size());
      m.frame1.shrink(encode_delta_varint(indices, h.key_begin, m.frame1.data()));
      break;
    case IndexEncoding::kBitmap:
      SPS_CHECK(indices.size() == values.size());
      m.frame1 = frame(bitmap_bytes(range));
      encode_bitmap(indices, h.key_begin, range, m.frame1.data());
      break;
  }
  m.frame2 = frame(value_frame_bytes(value_type, values.size(), runs.size()));
  std::byte* v = m.frame2.data();
  switch (value_type) {
    case ValueType::kI8:
    case ValueType::kSign:
    case ValueType::kOneBit: {
      const size_t run_bytes = scale_run_bytes(value_type);
      store_le<uint32_t>(v, static_cast<uint32_t>(runs.size()));
      std::byte* levels = v + 4 + run_bytes * runs.size();
      if (value_type != ValueType::kI8) std::memset(levels, 0, (values.size() + 7) / 8);
      size_t i = 0;
      for (size_t r = 0; r < runs.size(); ++r) {
        std::byte* run = v + 4 + run_bytes * r;
        store_le<uint32_t>(run, runs[r].count);
        store_le<uint32_t>(run + 4, std::bit_cast<uint32_t>(runs[r].scale));
        if (value_type == ValueType::kOneBit) store_le<uint32_t>(run + 8, std::bit_cast<uint32_t>(runs[r].negative_scale));
        for (const size_t end = i + runs[r].count; i < end; ++i) {
          if (value_type == ValueType::kI8) {
            levels[i] = static_cast<std::byte>(static_cast<int8_t>(level_of(values[i], runs[r].scale)));
          } else if (values[i] < 0.0f) {
            levels[i / 8] |= static_cast<std::byte>(1u << (i % 8));
          }
        }
      }
      break;
    }
    case ValueType::kF16: encode_f16(values.data(), values.size(), v); break;
    case ValueType::kBF16: encode_bf16(values.data(), values.size(), v); break;
    default:
      if constexpr (kLittleEndianHost) {
        if (!values.empty()) std::memcpy(v, values.data(), 4 * values.size());
      } else {
        for (size_t i = 0; i < values.size(); ++i) {
          const uint32_t b = std::bit_cast<uint32_t>(values[i]);
          for (int j = 0; j < 4; ++j) v[4 * i + j] = static_cast<std::byte>((b >> (8 * j)) & 0xFF);
        }
      }
  }
  out.frame1_bytes = static_cast<uint32_t>(m.frame1.size());
  out.frame2_bytes = static_cast<uint32_t>(m.frame2.size());
  m.header = encode_header(out);
  return m;
}

Result<DataView> decode_data(const MessageView& m, uint32_t expected_begin, uint32_t expected_end,
                             DecodeScratch& scratch) {
  const Header& h = m.header;
  const char* name = message_type_name(h.type);
  if (!is_data_type(h.type)) return malformed(fmt::format("{} is not a data message", name));
  if (h.key_begin != expected_begin || h.key_end != expected_end)
    return out_of_range(fmt::format("{}: key range [{}, {}) is not this shard's [{}, {})", name, h.key_begin,
                                    h.key_end, expected_begin, expected_end));
  // decode_message checked the frame sizes against nnz, the encoding and the value type.
  const uint32_t nnz = h.nnz;
  std::span<const uint32_t> keys;
  switch (h.index_encoding) {
    case IndexEncoding::kNone:
      break;
    case IndexEncoding::kRawU32: {
      const std::byte* p = m.frame1.data();
      if (kLittleEndianHost && aligned_for<uint32_t>(p)) {
        keys = {reinterpret_cast<const uint32_t*>(p), nnz};
      } else {
        scratch.keys.resize(nnz);
        for (uint32_t i = 0; i < nnz; ++i) scratch.keys[i] = load_le<uint32_t>(p + 4 * size_t{i});
        keys = scratch.keys;
      }
      // Strictly increasing and inside the range: a vectorisable sweep, then
      // the first and last key; the offending entry is looked up only on failure.
      uint32_t unordered = 0;
      for (uint32_t i = 1; i < nnz; ++i) unordered |= static_cast<uint32_t>(keys[i] <= keys[i - 1]);
      if (unordered != 0) {
        for (uint32_t i = 1; i < nnz; ++i)
          if (keys[i] <= keys[i - 1])
            return malformed(fmt::format("{}: keys not strictly increasing at entry {} ({} after {})", name, i,
                                         keys[i], keys[i - 1]));
      }
      if (nnz > 0 && (keys.front() < h.key_begin || keys.back() >= h.key_end)) {
        const uint32_t i = keys.front() < h.key_begin ? 0 : nnz - 1;
        return out_of_range(fmt::format("{}: key {} at entry {} is outside [{}, {})", name, keys[i], i, h.key_begin,
                                        h.key_end));
      }
      break;
    }
    case IndexEncoding::kDeltaVarint:
    case IndexEncoding::kBitmap: {
      scratch.keys.resize(nnz);
      const Status s = h.index_encoding == IndexEncoding::kBitmap
                           ? decode_bitmap(m.frame1, nnz, h.key_begin, h.key_end, scratch.keys.data())
                           : decode_delta_varint(m.frame1, nnz, h.key_begin, h.key_end, scratch.keys.data());
      if (!s.ok()) return Status(s.code(), fmt::format("{}: {}", name, s.message()));
      keys = scratch.keys;
      break;
    }
  }
  std::span<const float> values;
  const std::byte* v = m.frame2.data();
  if (is_scaled(h.value_type)) {
    // decode_message checked the frame size against the run count.
    const size_t run_bytes = scale_run_bytes(h.value_type);
    const uint32_t runs = load_le<uint32_t>(v);
    const std::byte* levels = v + 4 + run_bytes * runs;
    scratch.values.resize(nnz);
    uint32_t i = 0;
    for (uint32_t r = 0; r < runs; ++r) {
      const std::byte* run = v + 4 + run_bytes * r;
      const uint32_t count = load_le<uint32_t>(run);
      const float scale = std::bit_cast<float>(load_le<uint32_t>(run + 4));
      const float negative_scale =
          h.value_type == ValueType::kOneBit ? std::bit_cast<float>(load_le<uint32_t>(run + 8)) : 0.0f;
      if (count == 0 || count > nnz - i)
        return malformed(fmt::format("{}: scale run {} has count {} with {} of {} values left", name, r, count,
                                     nnz - i, nnz));
      if (!std::isfinite(scale) || !(scale >= 0.0f))
        return invalid_argument(fmt::format("{}: scale run {} has scale {}", name, r, scale));
      if (!std::isfinite(negative_scale) || !(negative_scale >= 0.0f))
        return invalid_argument(fmt::format("{}: scale run {} has negative scale {}", name, r, negative_scale));
      for (const uint32_t end = i + count; i < end; ++i) {
        if (h.value_type == ValueType::kI8) {
          const int level = static_cast<int8_t>(levels[i]);
          if (level < -kMaxQuantLevel)
            return malformed(fmt::format("{}: int8 level {} at entry {} is outside [-127, 127]", name, level, i));
          scratch.values[i] = dequantise(level, scale);
          continue;
        }
        const bool negative = ((static_cast<unsigned>(levels[i / 8]) >> (i % 8)) & 1u) != 0;
        scratch.values[i] = h.value_type == ValueType::kOneBit ? onebit_sent(negative, scale, negative_scale)
                                                               : dequantise(negative ? -1 : 1, scale);
      }
    }
    if (i != nnz) return malformed(fmt::format("{}: scale runs cover {} of {} values", name, i, nnz));
    if (h.value_type != ValueType::kI8 && nnz % 8 != 0 &&
        (static_cast<unsigned>(levels[nnz / 8]) >> (nnz % 8)) != 0)
      return malformed(fmt::format("{}: sign bits past entry {} are set", name, nnz));
    values = scratch.values;
  } else if (h.value_type == ValueType::kF32 && kLittleEndianHost && aligned_for<float>(v)) {
    values = {reinterpret_cast<const float*>(v), nnz};
  } else {
    scratch.values.resize(nnz);
    switch (h.value_type) {
      case ValueType::kF16: decode_f16(v, nnz, scratch.values.data()); break;
      case ValueType::kBF16: decode_bf16(v, nnz, scratch.values.data()); break;
      default:
        for (uint32_t i = 0; i < nnz; ++i)
          scratch.values[i] = std::bit_cast<float>(load_le<uint32_t>(v + 4 * size_t{i}));
    }
    values = scratch.values;
  }
  if (const size_t bad = first_non_finite(values); bad != values.size())
    return invalid_argument(fmt::format("{}: value at entry {} is not finite", name, bad));
  return DataView(h, keys, values);
}

EncodedMessage encode_control(const Header& h, Bytes payload) {
  Header out = h;
  out.index_encoding = IndexEncoding::kNone;
  out.value_type = ValueType::kNone;
  out.nnz = 0;
  out.frame1_bytes = static_cast<uint32_t>(payload.size());
  out.frame2_bytes = 0;
  EncodedMessage m;
  m.header = encode_header(out);
  m.frame1 = Frame::copy_of(payload);
  return m;
}

Bytes encode_register(const RegisterInfo& r) {
  Bytes out;
  put_le<uint8_t>(out, static_cast<uint8_t>(r.role));
  put_le<uint64_t>(out, r.num_params);
  put_string(out, r.endpoint);
  put_string(out, r.host);
  put_le<uint32_t>(out, r.pid);
  put_le<int32_t>(out, r.requested_rank);
  return out;
}

Result<RegisterInfo> decode_register(ByteSpan payload) {
  Reader rd(payload);
  RegisterInfo r;
  const auto role = rd.get<uint8_t>();
  r.num_params = rd.get<uint64_t>();
  r.endpoint = rd.get_string(kMaxStringBytes);
  r.host = rd.get_string(kMaxStringBytes);
  r.pid = rd.get<uint32_t>();
  r.requested_rank = rd.get<int32_t>();
  SPS_RETURN_IF_ERROR(rd.finish("register"));
  if (role != static_cast<uint8_t>(Role::kWorker) && role != static_cast<uint8_t>(Role::kServer))
    return malformed(fmt::format("register: unknown role {}", role));
  r.role = static_cast<Role>(role);
  if (r.requested_rank < -1) return malformed(fmt::format("register: requested rank {} is negative", r.requested_rank));
  if (r.num_params > kMaxKeys) return out_of_range(fmt::format("register: model size {} exceeds {}", r.num_params, kMaxKeys));
  return r;
}

Bytes encode_assign(const AssignInfo& a) {
  Bytes out;
  put_le<uint32_t>(out, a.rank);
  put_le<uint32_t>(out, a.num_workers);
  put_le<uint32_t>(out, a.num_servers);
  put_le<uint64_t>(out, a.num_params);
  put_le<uint32_t>(out, static_cast<uint32_t>(a.shards.size()));
  for (const auto& s : a.shards) {
    put_le<uint32_t>(out, s.key_begin);
    put_le<uint32_t>(out, s.key_end);
    put_string(out, s.endpoint);
  }
  return out;
}

Result<AssignInfo> decode_assign(ByteSpan payload) {
  Reader rd(payload);
  AssignInfo a;
  a.rank = rd.get<uint32_t>();
  a.num_workers = rd.get<uint32_t>();
  a.num_servers = rd.get<uint32_t>();
  a.num_params = rd.get<uint64_t>();
  const auto count = rd.get<uint32_t>();
  if (count > kMaxShards) return malformed(fmt::format("assign: {} shards exceeds {}", count, kMaxShards));
  for (uint32_t i = 0; i < count && !rd.failed(); ++i) {
    ShardInfo s;
    s.key_begin = rd.get<uint32_t>();
    s.key_end = rd.get<uint32_t>();
    s.endpoint = rd.get_string(kMaxStringBytes);
    a.shards.push_back(std::move(s));
  }
  SPS_RETURN_IF_ERROR(rd.finish("assign"));
  if (a.num_params > kMaxKeys) return out_of_range("assign: model size exceeds the key limit");
  if (count != a.num_servers) return malformed(fmt::format("assign: {} shards for {} servers", count, a.num_servers));
  uint64_t next = 0;
  for (const auto& s : a.shards) {
    if (s.key_begin != next || s.key_end < s.key_begin)
      return malformed("assign: shards are not contiguous and increasing");
    next = s.key_end;
  }
  if (next != a.num_params) return malformed("assign: shards do not cover the model");
  return a;
}

Bytes encode_done(const DoneReport& d) {
  Bytes out;
  put_le<uint64_t>(out, d.steps);
  put_le<uint64_t>(out, d.bytes_pushed);
  put_le<uint64_t>(out, d.bytes_pushed_dense_equivalent);
  put_le<uint64_t>(out, d.bytes_pulled);
  put_le<uint64_t>(out, d.nnz_pushed);
  put_f64(out, d.train_loss);
  put_f64(out, d.test_accuracy);
  put_f64(out, d.last_batch_loss);
  put_f64(out, d.wall_seconds);
  return out;
}

Result<DoneReport> decode_done(ByteSpan payload) {
  Reader rd(payload);
  DoneReport d;
  d.steps = rd.get<uint64_t>();
  d.bytes_pushed = rd.get<uint64_t>();
  d.bytes_pushed_dense_equivalent = rd.get<uint64_t>();
  d.bytes_pulled = rd.get<uint64_t>();
  d.nnz_pushed = rd.get<uint64_t>();
  d.train_loss = rd.get_f64();
  d.test_accuracy = rd.get_f64();
  d.last_batch_loss = rd.get_f64();
  d.wall_seconds = rd.get_f64();
  SPS_RETURN_IF_ERROR(rd.finish("done"));
  return d;
}

Bytes encode_server_report(const ServerReport& r) {
  Bytes out;
  for (uint64_t v : {r.version, r.pushes_applied, r.pushes_rejected, r.pushes_refused_stale, r.malformed,
                     r.pulls_answered, r.sparse_pulls, r.bytes_in, r.bytes_out})
    put_le<uint64_t>(out, v);
  const size_t pairs = std::min(r.staleness.size(), kMaxReportEntries);
  put_le<uint32_t>(out, static_cast<uint32_t>(pairs));
  for (size_t i = 0; i < pairs; ++i) {
    put_le<uint64_t>(out, r.staleness[i].first);
    put_le<uint64_t>(out, r.staleness[i].second);
  }
  const size_t buckets = std::min(r.wait_buckets.size(), kMaxReportEntries);
  put_le<uint32_t>(out, static_cast<uint32_t>(buckets));
  for (size_t i = 0; i < buckets; ++i) put_le<uint64_t>(out, r.wait_buckets[i]);
  put_f64(out, r.wait_sum);
  put_f64(out, r.wait_max);
  return out;
}

Result<ServerReport> decode_server_report(ByteSpan payload) {
  Reader rd(payload);
  ServerReport r;
  for (uint64_t* v : {&r.version, &r.pushes_applied, &r.pushes_rejected, &r.pushes_refused_stale, &r.malformed,
                      &r.pulls_answered, &r.sparse_pulls, &r.bytes_in, &r.bytes_out})
    *v = rd.get<uint64_t>();
  const auto pairs = rd.get<uint32_t>();
  if (pairs > kMaxReportEntries) return malformed("server report: too many staleness entries");
  for (uint32_t i = 0; i < pairs && !rd.failed(); ++i) {
    const auto value = rd.get<uint64_t>();
    const auto count = rd.get<uint64_t>();
    r.staleness.emplace_back(value, count);
  }
  const auto buckets = rd.get<uint32_t>();
  if (buckets > kMaxReportEntries) return malformed("server report: too many wait buckets");
  for (uint32_t i = 0; i < buckets && !rd.failed(); ++i) r.wait_buckets.push_back(rd.get<uint64_t>());
  r.wait_sum = rd.get_f64();
  r.wait_max = rd.get_f64();
  SPS_RETURN_IF_ERROR(rd.finish("server report"));
  return r;
}

Bytes encode_text(std::string_view text) {
  Bytes out;
  put_string(out, text.substr(0, kMaxStringBytes));
  return out;
}

Result<std::string> decode_text(ByteSpan payload) {
  Reader rd(payload);
  std::string s = rd.get_string(kMaxStringBytes);
  SPS_RETURN_IF_ERROR(rd.finish("text"));
  return s;
}

Bytes encode_rank(uint32_t rank) {
  Bytes out;
  put_le<uint32_t>(out, rank);
  return out;
}

Result<uint32_t> decode_rank(ByteSpan payload) {
  Reader rd(payload);
  const auto rank = rd.get<uint32_t>();
  SPS_RETURN_IF_ERROR(rd.finish("rank"));
  return rank;
}

Bytes encode_clocks(std::span<const uint64_t> clocks) {
  Bytes out;
  put_le<uint32_t>(out, static_cast<uint32_t>(clocks.size()));
  for (uint64_t c : clocks) put_le<uint64_t>(out, c);
  return out;
}

Result<std::vector<uint64_t>> decode_clocks(ByteSpan payload) {
  Reader rd(payload);
  const auto n = rd.get<uint32_t>();
  if (n > kMaxReportEntries) return malformed(fmt::format("clocks: {} entries exceed {}", n, kMaxReportEntries));
  std::vector<uint64_t> clocks;
  for (uint32_t i = 0; i < n && !rd.failed(); ++i) clocks.push_back(rd.get<uint64_t>());
  SPS_RETURN_IF_ERROR(rd.finish("clocks"));
  return clocks;
}

}  // namespace sps::protocol
