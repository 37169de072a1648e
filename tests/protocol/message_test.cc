#include "protocol/message.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <limits>
#include <vector>

namespace sps::protocol {
namespace {

DecodeScratch g_scratch;  // decoded views in these tests are used before the next decode

std::vector<ByteSpan> spans(const EncodedMessage& m) { return {m.header, m.frame1, m.frame2}; }

Header push_header(uint32_t begin, uint32_t end) {
  Header h;
  h.type = MessageType::kPush;
  h.sender = 3;
  h.clock = 42;
  h.base_version = 41;
  h.shard = 1;
  h.key_begin = begin;
  h.key_end = end;
  h.index_encoding = IndexEncoding::kRawU32;
  return h;
}

TEST(HeaderTest, RoundTripsEveryField) {
  Header h = push_header(10, 20);
  h.flags = kFlagInit;
  h.nnz = 3;
  h.frame1_bytes = 12;
  h.frame2_bytes = 12;
  h.value_type = ValueType::kF32;
  const Bytes b = encode_header(h);
  ASSERT_EQ(b.size(), kHeaderBytes);
  auto d = decode_header(b);
  ASSERT_TRUE(d.ok()) << d.status().to_string();
  EXPECT_EQ(d->type, MessageType::kPush);
  EXPECT_EQ(d->flags, kFlagInit);
  EXPECT_EQ(d->sender, 3u);
  EXPECT_EQ(d->clock, 42u);
  EXPECT_EQ(d->base_version, 41u);
  EXPECT_EQ(d->shard, 1u);
  EXPECT_EQ(d->key_begin, 10u);
  EXPECT_EQ(d->key_end, 20u);
  EXPECT_EQ(d->nnz, 3u);
  EXPECT_EQ(d->frame1_bytes, 12u);
  EXPECT_EQ(d->frame2_bytes, 12u);
  EXPECT_EQ(d->index_encoding, IndexEncoding::kRawU32);
  EXPECT_EQ(d->value_type, ValueType::kF32);
}

TEST(HeaderTest, LittleEndianMagicFirst) {
  const Bytes b = encode_header(Header{});
  EXPECT_EQ(static_cast<char>(b[0]), 'S');
  EXPECT_EQ(static_cast<char>(b[1]), 'P');
  EXPECT_EQ(static_cast<char>(b[2]), 'S');
  EXPECT_EQ(static_cast<char>(b[3]), '1');
  EXPECT_EQ(static_cast<uint8_t>(b[4]), kVersion);  // version LSB
}

TEST(DataTest, SparsePushRoundTrip) {
  const std::vector<uint32_t> keys = {100, 105, 199};
  const std::vector<float> values = {1.5f, -2.0f, 3.25f};
  const auto m = encode_data(push_header(100, 200), keys, values);
  auto f = spans(m);
  auto view = decode_message(f);
  ASSERT_TRUE(view.ok()) << view.status().to_string();
  auto data = decode_data(*view, 100, 200, g_scratch);
  ASSERT_TRUE(data.ok()) << data.status().to_string();
  ASSERT_EQ(data->size(), 3u);
  EXPECT_FALSE(data->dense());
  for (uint32_t i = 0; i < 3; ++i) {
    EXPECT_EQ(data->key(i), keys[i]);
    EXPECT_EQ(data->value(i), values[i]);
  }
}

TEST(DataTest, HalfPrecisionValuesRoundTripAndAreSizeChecked) {
  const std::vector<uint32_t> keys = {100, 105, 199};
  const std::vector<float> values = {1.5f, -2.0f, 3.140625f};  // exact in f16 and bf16
  for (ValueType t : {ValueType::kF16, ValueType::kBF16}) {
    const auto m = encode_data(push_header(100, 200), keys, values, t);
    EXPECT_EQ(m.frame2.size(), 6u);
    auto f = spans(m);
    auto view = decode_message(f);
    ASSERT_TRUE(view.ok()) << view.status().to_string();
    EXPECT_EQ(view->header.value_type, t);
    auto data = decode_data(*view, 100, 200, g_scratch);
    ASSERT_TRUE(data.ok()) << data.status().to_string();
    for (uint32_t i = 0; i < 3; ++i) EXPECT_EQ(data->value(i), values[i]);
    // A value frame sized for f32 does not pass as f16.
    Header h = view->header;
    h.frame2_bytes = 12;
    const Bytes wrong(12, std::byte{0});
    const Bytes hb = encode_header(h);
    const std::vector<ByteSpan> frames = {ByteSpan(hb), ByteSpan(m.frame1), ByteSpan(wrong)};
    EXPECT_FALSE(decode_message(frames).ok());
  }
  // An f16 Inf on the wire is refused like an f32 one.
  const auto inf = encode_data(push_header(100, 200), std::vector<uint32_t>{101}, std::vector<float>{0.0f},
                               ValueType::kF16);
  Bytes values_inf = inf.frame2.to_bytes();
  values_inf[0] = std::byte{0x00};
  values_inf[1] = std::byte{0x7C};
  const std::vector<ByteSpan> frames = {ByteSpan(inf.header), ByteSpan(inf.frame1), ByteSpan(values_inf)};
  auto view = decode_message(frames);
  ASSERT_TRUE(view.ok());
  EXPECT_FALSE(decode_data(*view, 100, 200, g_scratch).ok());
}

// A value frame with its bytes replaced (header sizes adjusted to match).
Result<DataView> decode_with_values(const EncodedMessage& m, const Bytes& values, uint32_t begin, uint32_t end) {
  Header h = *decode_header(m.header);
  h.frame2_bytes = static_cast<uint32_t>(values.size());
  const Bytes hb = encode_header(h);
  const std::vector<ByteSpan> frames = {ByteSpan(hb), ByteSpan(m.frame1), ByteSpan(values)};
  SPS_ASSIGN_OR_RETURN(MessageView view, decode_message(frames));
  return decode_data(view, begin, end, g_scratch);
}

TEST(DataTest, ScaledValuesRoundTripExactlyPerRun) {
  const std::vector<uint32_t> keys = {100, 101, 150, 160, 199};
  // Two runs: levels {127, -3, 0} at scale 0.1 and {5, -127} at scale 3e-5,
  // as a compressor sends them (level * scale in float).
  const std::vector<ScaleRun> runs = {{3, 0.1f}, {2, 3e-5f}};
  const std::vector<float> values = {127 * 0.1f, -3 * 0.1f, 0.0f, 5 * 3e-5f, -127 * 3e-5f};
  const auto m = encode_data(push_header(100, 200), keys, values, ValueType::kI8, nullptr, runs);
  EXPECT_EQ(m.frame2.size(), 4u + 2 * 8 + 5);
  auto f = spans(m);
  auto view = decode_message(f);
  ASSERT_TRUE(view.ok()) << view.status().to_string();
  auto data = decode_data(*view, 100, 200, g_scratch);
  ASSERT_TRUE(data.ok()) << data.status().to_string();
  for (uint32_t i = 0; i < 5; ++i) EXPECT_EQ(data->value(i), values[i]) << i;

  // Sign: one bit a value; 9 values need 2 bytes of bits.
  std::vector<uint32_t> sign_keys;
  for (uint32_t k = 100; k < 109; ++k) sign_keys.push_back(k);
  const std::vector<float> signs = {0.5f, -0.5f, 0.5f, 0.5f, -0.5f, -0.5f, 0.5f, -2.0f, 2.0f};
  const std::vector<ScaleRun> sign_runs = {{7, 0.5f}, {2, 2.0f}};
  const auto s = encode_data(push_header(100, 200), sign_keys, signs, ValueType::kSign, nullptr, sign_runs);
  EXPECT_EQ(s.frame2.size(), 4u + 2 * 8 + 2);
  auto sf = spans(s);
  auto sdata = decode_data(*decode_message(sf), 100, 200, g_scratch);
  ASSERT_TRUE(sdata.ok()) << sdata.status().to_string();
  for (uint32_t i = 0; i < 9; ++i) EXPECT_EQ(sdata->value(i), signs[i]) << i;

  // One-bit: a sign bit a value and two scales a run (+scale, -negative scale).
  const std::vector<float> onebit = {0.75f, -0.25f, 0.75f, 0.75f, -0.25f, -0.25f, 0.0f, -3.0f, 1.5f};
  const std::vector<ScaleRun> onebit_runs = {{6, 0.75f, 0.25f}, {1, 0.0f, 0.0f}, {2, 1.5f, 3.0f}};
  const auto o = encode_data(push_header(100, 200), sign_keys, onebit, ValueType::kOneBit, nullptr, onebit_runs);
  EXPECT_EQ(o.frame2.size(), 4u + 3 * 12 + 2);
  EXPECT_EQ(value_frame_bytes(ValueType::kOneBit, 9, 3), o.frame2.size());
  auto of = spans(o);
  auto odata = decode_data(*decode_message(of), 100, 200, g_scratch);
  ASSERT_TRUE(odata.ok()) << odata.status().to_string();
  for (uint32_t i = 0; i < 9; ++i) EXPECT_EQ(odata->value(i), onebit[i]) << i;

  // Dense slices and empty messages take them too.
  Header dense = push_header(5, 9);
  dense.index_encoding = IndexEncoding::kNone;
  const std::vector<float> dv = {0.25f, -0.25f, 0.25f, 0.25f};
  const std::vector<ScaleRun> one = {{4, 0.25f}};
  const auto d = encode_data(dense, {}, dv, ValueType::kSign, nullptr, one);
  auto df = spans(d);
  auto ddata = decode_data(*decode_message(df), 5, 9, g_scratch);
  ASSERT_TRUE(ddata.ok()) << ddata.status().to_string();
  for (uint32_t i = 0; i < 4; ++i) EXPECT_EQ(ddata->value(i), dv[i]);
  const auto e = encode_data(push_header(5, 9), {}, {}, ValueType::kI8, nullptr, {});
  auto ef = spans(e);
  auto edata = decode_data(*decode_message(ef), 5, 9, g_scratch);
  ASSERT_TRUE(edata.ok()) << edata.status().to_string();
  EXPECT_EQ(edata->size(), 0u);
}

TEST(DataTest, MalformedScaleRunsAreRefused) {
  const std::vector<uint32_t> keys = {100, 101, 150};
  const std::vector<ScaleRun> runs = {{2, 0.5f}, {1, 1.0f}};
  const auto m = encode_data(push_header(100, 200), keys, std::vector<float>{0.5f, -1.0f, 3.0f}, ValueType::kI8,
                             nullptr, runs);
  const Bytes good = m.frame2.to_bytes();
  ASSERT_TRUE(decode_with_values(m, good, 100, 200).ok());
  auto expect_refused = [&](Bytes b, const char* what) {
    auto d = decode_with_values(m, b, 100, 200);
    EXPECT_FALSE(d.ok()) << what;
  };
  Bytes b = good;
  store_le<uint32_t>(b.data() + 4, 3);  // counts 3 + 1 exceed nnz
  expect_refused(b, "counts past nnz");
  b = good;
  store_le<uint32_t>(b.data() + 4, 1);  // counts 1 + 1 fall short
  expect_refused(b, "counts short of nnz");
  b = good;
  store_le<uint32_t>(b.data() + 4, 0);
  store_le<uint32_t>(b.data() + 12, 3);
  expect_refused(b, "an empty run");
  b = good;
  store_le<uint32_t>(b.data() + 8, std::bit_cast<uint32_t>(std::numeric_limits<float>::quiet_NaN()));
  expect_refused(b, "NaN scale");
  b = good;
  store_le<uint32_t>(b.data() + 16, std::bit_cast<uint32_t>(-1.0f));
  expect_refused(b, "negative scale");
  b = good;
  store_le<uint32_t>(b.data() + 16, std::bit_cast<uint32_t>(std::numeric_limits<float>::max()));
  expect_refused(b, "a level times the scale overflows");
  b = good;
  b[4 + 16] = std::byte{0x80};  // level -128
  expect_refused(b, "level -128");
  b = good;
  store_le<uint32_t>(b.data(), 5);  // more runs than the frame holds
  expect_refused(b, "run count past the frame");
  expect_refused(Bytes(3, std::byte{0}), "no run count");
  // Sign bits past nnz must be zero.
  const auto s = encode_data(push_header(100, 200), keys, std::vector<float>{0.5f, -0.5f, 1.0f}, ValueType::kSign,
                             nullptr, runs);
  Bytes sb = s.frame2.to_bytes();
  ASSERT_TRUE(decode_with_values(s, sb, 100, 200).ok());
  sb.back() |= std::byte{0x80};
  EXPECT_FALSE(decode_with_values(s, sb, 100, 200).ok());
  // One-bit: the second scale is checked like the first, and the runs are
  // 12 bytes (a frame sized for 8-byte runs is refused).
  const std::vector<ScaleRun> onebit_runs = {{2, 0.5f, 0.5f}, {1, 1.0f, 2.0f}};
  const auto o = encode_data(push_header(100, 200), keys, std::vector<float>{0.5f, -0.5f, 1.0f}, ValueType::kOneBit,
                             nullptr, onebit_runs);
  const Bytes ob = o.frame2.to_bytes();
  ASSERT_EQ(ob.size(), 4u + 2 * 12 + 1);
  ASSERT_TRUE(decode_with_values(o, ob, 100, 200).ok());
  // Decoded under the one-bit header, each refused for its own reason.
  auto expect_onebit_refused = [&](const Bytes& bad, const char* reason) {
    auto d = decode_with_values(o, bad, 100, 200);
    ASSERT_FALSE(d.ok()) << reason;
    EXPECT_NE(d.status().message().find(reason), std::string::npos) << d.status().message();
  };
  b = ob;
  store_le<uint32_t>(b.data() + 24, std::bit_cast<uint32_t>(std::numeric_limits<float>::infinity()));
  expect_onebit_refused(b, "scale run 1 has negative scale inf");
  b = ob;
  store_le<uint32_t>(b.data() + 12, std::bit_cast<uint32_t>(-0.5f));
  expect_onebit_refused(b, "scale run 0 has negative scale -0.5");
  b = ob;
  b.back() |= std::byte{0x10};
  expect_onebit_refused(b, "sign bits past entry 3 are set");
  b = ob;
  b.resize(b.size() - 4);
  expect_onebit_refused(b, "value frame is 25 bytes for nnz 3");  // 8-byte runs in a one-bit frame
}

TEST(DataTest, DenseRoundTripAndEmptySparse) {
  Header h = push_header(5, 9);
  h.index_encoding = IndexEncoding::kNone;
  const std::vector<float> values = {1, 2, 3, 4};
  const auto m = encode_data(h, {}, values);
  EXPECT_TRUE(m.frame1.empty());
  auto f = spans(m);
  auto data = decode_data(*decode_message(f), 5, 9, g_scratch);
  ASSERT_TRUE(data.ok());
  EXPECT_TRUE(data->dense());
  EXPECT_EQ(data->key(3), 8u);
  EXPECT_EQ(data->value(3), 4.0f);

  const auto e = encode_data(push_header(5, 9), {}, {});
  auto fe = spans(e);
  auto empty = decode_data(*decode_message(fe), 5, 9, g_scratch);
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(empty->size(), 0u);
}

TEST(ControlTest, PayloadsRoundTrip) {
  RegisterInfo r{Role::kServer, 0, "tcp://127.0.0.1:5555", "host-a", 1234, 3};
  auto rr = decode_register(encode_register(r));
  ASSERT_TRUE(rr.ok());
  EXPECT_EQ(rr->role, Role::kServer);
  EXPECT_EQ(rr->endpoint, r.endpoint);
  EXPECT_EQ(rr->host, "host-a");
  EXPECT_EQ(rr->pid, 1234u);
  EXPECT_EQ(rr->requested_rank, 3);
  r.requested_rank = -2;
  EXPECT_FALSE(decode_register(encode_register(r)).ok());

  AssignInfo a{1, 4, 2, 100, {{0, 50, "tcp://a:1"}, {50, 100, "tcp://b:2"}}};
  auto ar = decode_assign(encode_assign(a));
  ASSERT_TRUE(ar.ok()) << ar.status().to_string();
  EXPECT_EQ(ar->rank, 1u);
  EXPECT_EQ(ar->shards[1].endpoint, "tcp://b:2");
  EXPECT_EQ(ar->shards[1].key_begin, 50u);

  DoneReport d;
  d.steps = 7;
  d.bytes_pushed = 99;
  d.test_accuracy = NAN;
  d.train_loss = 0.25;
  auto dr = decode_done(encode_done(d));
  ASSERT_TRUE(dr.ok());
  EXPECT_EQ(dr->steps, 7u);
  EXPECT_EQ(dr->bytes_pushed, 99u);
  EXPECT_TRUE(std::isnan(dr->test_accuracy));
  EXPECT_EQ(dr->train_loss, 0.25);

  ServerReport sr;
  sr.version = 40;
  sr.pushes_applied = 37;
  sr.pushes_rejected = 1;
  sr.pushes_refused_stale = 3;
  sr.malformed = 2;
  sr.staleness = {{0, 30}, {5, 7}};
  sr.wait_buckets = {1, 0, 4};
  sr.wait_sum = 0.5;
  sr.wait_max = 0.25;
  const Bytes sr_bytes = encode_server_report(sr);
  auto srr = decode_server_report(sr_bytes);
  ASSERT_TRUE(srr.ok()) << srr.status().to_string();
  EXPECT_EQ(srr->version, 40u);
  EXPECT_EQ(srr->pushes_applied, 37u);
  EXPECT_EQ(srr->pushes_rejected, 1u);
  EXPECT_EQ(srr->pushes_refused_stale, 3u);
  EXPECT_EQ(srr->malformed, 2u);
  EXPECT_EQ(srr->staleness, sr.staleness);
  EXPECT_EQ(srr->wait_buckets, sr.wait_buckets);
  EXPECT_EQ(srr->wait_max, 0.25);
  EXPECT_FALSE(decode_server_report(ByteSpan(sr_bytes).first(sr_bytes.size() - 1)).ok());

  auto t = decode_text(encode_text("job complete"));
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(*t, "job complete");
  EXPECT_EQ(*decode_rank(encode_rank(17)), 17u);
}

// ---- malformed input: every case is an error, never a crash ---------------

Status decode_push_frames(const std::vector<Bytes>& frames, uint32_t begin = 100, uint32_t end = 200) {
  std::vector<ByteSpan> s(frames.begin(), frames.end());
  auto m = decode_message(s);
  if (!m.ok()) return m.status();
  auto d = decode_data(*m, begin, end, g_scratch);
  return d.status();
}

std::vector<Bytes> good_push() {
  const auto m = encode_data(push_header(100, 200), std::vector<uint32_t>{101, 150}, std::vector<float>{1, 2});
  return {m.header, m.frame1.to_bytes(), m.frame2.to_bytes()};
}

void set_u32(Bytes& b, size_t offset, uint32_t v) {
  for (int i = 0; i < 4; ++i) b[offset + i] = static_cast<std::byte>((v >> (8 * i)) & 0xFF);
}

TEST(MalformedTest, GoodPushIsAccepted) { EXPECT_TRUE(decode_push_frames(good_push()).ok()); }

TEST(MalformedTest, WrongMagic) {
  auto f = good_push();
  f[0][0] = std::byte{'X'};
  EXPECT_EQ(decode_push_frames(f).code(), StatusCode::kMalformed);
}

TEST(MalformedTest, UnknownVersionTypeEncodingValueType) {
  for (size_t offset : {4, 6, 10, 11}) {
    auto f = good_push();
    f[0][offset] = std::byte{0x7F};
    EXPECT_EQ(decode_push_frames(f).code(), StatusCode::kMalformed) << "offset " << offset;
  }
}

TEST(MalformedTest, ReservedBytesMustBeZero) {
  auto f = good_push();
  f[0][60] = std::byte{1};
  EXPECT_EQ(decode_push_frames(f).code(), StatusCode::kMalformed);
}

TEST(MalformedTest, TruncatedAndOversizedHeader) {
  for (size_t size : {0, 1, 10, 63, 65, 200}) {
    auto f = good_push();
    f[0].resize(size, std::byte{0});
    EXPECT_FALSE(decode_push_frames(f).ok()) << "size " << size;
  }
}

TEST(MalformedTest, WrongFrameCount) {
  auto f = good_push();
  EXPECT_FALSE(decode_push_frames({f[0]}).ok());
  EXPECT_FALSE(decode_push_frames({f[0], f[1]}).ok());
  EXPECT_FALSE(decode_push_frames({f[0], f[1], f[2], f[2]}).ok());
  EXPECT_FALSE(decode_push_frames({}).ok());
}

TEST(MalformedTest, TruncatedFrames) {
  auto f = good_push();
  f[1].resize(4);
  EXPECT_EQ(decode_push_frames(f).code(), StatusCode::kMalformed);
  f = good_push();
  f[2].pop_back();
  EXPECT_EQ(decode_push_frames(f).code(), StatusCode::kMalformed);
}

TEST(MalformedTest, HugeCountsAreRefusedBeforeAnyAllocation) {
  auto f = good_push();
  set_u32(f[0], 44, 0x7FFFFFFF);  // nnz
  EXPECT_FALSE(decode_push_frames(f).ok());
  set_u32(f[0], 48, 0xFFFFFFFF);  // frame1_bytes
  set_u32(f[0], 52, 0xFFFFFFFF);  // frame2_bytes
  EXPECT_FALSE(decode_push_frames(f).ok());
  auto g = good_push();
  set_u32(g[0], 36, 0);           // key_begin
  set_u32(g[0], 40, 0xFFFFFFFF);  // key_end: range larger than kMaxKeys
  EXPECT_EQ(decode_push_frames(g).code(), StatusCode::kMalformed);
}

TEST(MalformedTest, ReversedKeyRange) {
  auto f = good_push();
  set_u32(f[0], 36, 300);
  EXPECT_EQ(decode_push_frames(f).code(), StatusCode::kMalformed);
}

TEST(MalformedTest, IndicesOutOfRangeOrNotIncreasing) {
  const std::vector<std::vector<uint32_t>> bad = {{99, 150}, {101, 200}, {150, 150}, {150, 101}, {0xFFFFFFFF, 5}};
  for (const auto& keys : bad) {
    const auto m = encode_data(push_header(100, 200), keys, std::vector<float>{1, 2});
    EXPECT_FALSE(decode_push_frames({m.header, m.frame1.to_bytes(), m.frame2.to_bytes()}).ok()) << keys[0] << "," << keys[1];
  }
}

TEST(MalformedTest, NonFiniteValues) {
  for (float v : {NAN, INFINITY, -INFINITY}) {
    const auto m = encode_data(push_header(100, 200), std::vector<uint32_t>{101, 102}, std::vector<float>{1, v});
    EXPECT_EQ(decode_push_frames({m.header, m.frame1.to_bytes(), m.frame2.to_bytes()}).code(), StatusCode::kInvalidArgument);
  }
}

TEST(MalformedTest, KeyRangeOfAnotherShard) {
  EXPECT_EQ(decode_push_frames(good_push(), 0, 100).code(), StatusCode::kOutOfRange);
}

TEST(MalformedTest, DenseSliceWithWrongCountOrIndexFrame) {
  Header h = push_header(100, 104);
  h.index_encoding = IndexEncoding::kNone;
  auto m = encode_data(h, {}, std::vector<float>{1, 2, 3, 4});
  std::vector<Bytes> f = {m.header, m.frame1.to_bytes(), m.frame2.to_bytes()};
  set_u32(f[0], 44, 3);  // nnz 3 for a 4-key dense range
  EXPECT_FALSE(decode_push_frames(f, 100, 104).ok());
  f = {m.header, Bytes(4), m.frame2.to_bytes()};
  set_u32(f[0], 48, 4);  // dense with an index frame
  EXPECT_FALSE(decode_push_frames(f, 100, 104).ok());
}

TEST(MalformedTest, ControlMessageWithDataFields) {
  Header h;
  h.type = MessageType::kHeartbeat;
  auto m = encode_control(h);
  std::vector<Bytes> f = {m.header, m.frame1.to_bytes(), Bytes(4)};
  set_u32(f[0], 52, 4);
  std::vector<ByteSpan> s(f.begin(), f.end());
  EXPECT_FALSE(decode_message(s).ok());
}

TEST(MalformedTest, ControlPayloadsTruncatedOrTrailing) {
  Bytes reg = encode_register({Role::kWorker, 10, "", "h", 1, -1});
  for (size_t cut = 0; cut < reg.size(); ++cut) {
    Bytes t(reg.begin(), reg.begin() + static_cast<std::ptrdiff_t>(cut));
    EXPECT_FALSE(decode_register(t).ok()) << "cut " << cut;
  }
  reg.push_back(std::byte{0});
  EXPECT_FALSE(decode_register(reg).ok());
  Bytes huge_string;
  put_le<uint32_t>(huge_string, 0xFFFFFFFF);
  EXPECT_FALSE(decode_text(huge_string).ok());
  Bytes bad_role = encode_register({Role::kWorker, 10, "", "h", 1, -1});
  bad_role[0] = std::byte{9};
  EXPECT_FALSE(decode_register(bad_role).ok());
}

TEST(MalformedTest, AssignMustCoverTheModelContiguously) {
  AssignInfo a{0, 1, 2, 100, {{0, 40, "x"}, {50, 100, "y"}}};
  EXPECT_FALSE(decode_assign(encode_assign(a)).ok());
  a.shards[1].key_begin = 40;
  a.num_params = 120;
  EXPECT_FALSE(decode_assign(encode_assign(a)).ok());
  a.num_params = 100;
  EXPECT_TRUE(decode_assign(encode_assign(a)).ok());
  Bytes many;
  put_le<uint32_t>(many, 0);
  put_le<uint32_t>(many, 1);
  put_le<uint32_t>(many, 1);
  put_le<uint64_t>(many, 1);
  put_le<uint32_t>(many, 0xFFFFFFFF);  // shard count
  EXPECT_FALSE(decode_assign(many).ok());
}

// Every single-byte corruption of a valid message decodes or fails cleanly.
TEST(MalformedTest, EveryByteFlipIsHandled) {
  const auto good = good_push();
  int rejected = 0;
  for (size_t frame = 0; frame < 3; ++frame) {
    for (size_t i = 0; i < good[frame].size(); ++i) {
      for (uint8_t mask : {0x01, 0x80, 0xFF}) {
        auto f = good;
        f[frame][i] ^= static_cast<std::byte>(mask);
        if (!decode_push_frames(f).ok()) ++rejected;
      }
    }
  }
  EXPECT_GT(rejected, 100);
}

}  // namespace
}  // namespace sps::protocol
