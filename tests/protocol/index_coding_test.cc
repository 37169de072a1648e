// Index codings (raw u32, delta varint, bitmap): round trips over random and
// edge-case key sets, the size rule auto-selection follows, and refusal of
// every malformed frame shape; plus the frame pool the encoders draw from.
#include <gtest/gtest.h>

#include <algorithm>
#include <optional>
#include <random>
#include <thread>

#include "protocol/message.h"

namespace sps::protocol {
namespace {

std::vector<uint32_t> random_keys(uint32_t begin, uint32_t end, double density, uint32_t seed) {
  std::mt19937 rng(seed);
  std::bernoulli_distribution pick(density);
  std::vector<uint32_t> keys;
  for (uint64_t k = begin; k < end; ++k)
    if (pick(rng)) keys.push_back(static_cast<uint32_t>(k));
  return keys;
}

Header data_header(uint32_t begin, uint32_t end, IndexEncoding e) {
  Header h;
  h.type = MessageType::kPush;
  h.key_begin = begin;
  h.key_end = end;
  h.index_encoding = e;
  return h;
}

// Encodes, then decodes through the full validation path.
Result<std::vector<uint32_t>> round_trip(const Header& h, const std::vector<uint32_t>& keys, size_t* frame_bytes = nullptr) {
  const std::vector<float> values(keys.size(), 1.0f);
  const auto m = encode_data(h, keys, values);
  if (frame_bytes != nullptr) *frame_bytes = m.frame1.size();
  const std::vector<ByteSpan> frames = {m.header, m.frame1, m.frame2};
  SPS_ASSIGN_OR_RETURN(MessageView view, decode_message(frames));
  DecodeScratch scratch;
  SPS_ASSIGN_OR_RETURN(DataView data, decode_data(view, h.key_begin, h.key_end, scratch));
  return std::vector<uint32_t>(data.keys().begin(), data.keys().end());
}

constexpr IndexEncoding kSparse[] = {IndexEncoding::kRawU32, IndexEncoding::kDeltaVarint, IndexEncoding::kBitmap};

TEST(IndexCodingTest, EveryCodingRoundTripsRandomKeySets) {
  uint32_t seed = 1;
  for (auto [begin, end] : {std::pair<uint32_t, uint32_t>{0, 1000}, {12345, 12345 + 8 * 977 + 3}, {7, 8}, {0, 0}}) {
    for (double density : {0.0, 0.001, 0.01, 0.2, 0.9, 1.0}) {
      const auto keys = random_keys(begin, end, density, seed++);
      for (IndexEncoding e : kSparse) {
        auto got = round_trip(data_header(begin, end, e), keys);
        ASSERT_TRUE(got.ok()) << index_encoding_name(e) << " [" << begin << ", " << end << ") density " << density
                              << ": " << got.status().to_string();
        EXPECT_EQ(*got, keys) << index_encoding_name(e);
      }
    }
  }
}

TEST(IndexCodingTest, ExtremeGapsAndTheTopOfTheKeySpace) {
  // Gaps of every varint length, the largest range a message may carry, and
  // the last representable key.
  const uint32_t begin = 0xFFFFFFFFu - (1u << 31);
  const uint32_t end = 0xFFFFFFFFu;
  const std::vector<uint32_t> keys = {begin, begin + 1, begin + 129, begin + 129 + 16384, begin + (1u << 30),
                                      end - 2, end - 1};
  for (IndexEncoding e : {IndexEncoding::kRawU32, IndexEncoding::kDeltaVarint}) {
    auto got = round_trip(data_header(begin, end, e), keys);
    ASSERT_TRUE(got.ok()) << got.status().to_string();
    EXPECT_EQ(*got, keys);
  }
}

TEST(IndexCodingTest, CompactCodingsShrinkTopKIndexSets) {
  // At 1 % density the mean gap is 100: one or two varint bytes per key.
  const auto keys = random_keys(0, 1'000'000, 0.01, 42);
  size_t raw = 0, varint = 0, bitmap = 0;
  ASSERT_TRUE(round_trip(data_header(0, 1'000'000, IndexEncoding::kRawU32), keys, &raw).ok());
  ASSERT_TRUE(round_trip(data_header(0, 1'000'000, IndexEncoding::kDeltaVarint), keys, &varint).ok());
  ASSERT_TRUE(round_trip(data_header(0, 1'000'000, IndexEncoding::kBitmap), keys, &bitmap).ok());
  EXPECT_GE(static_cast<double>(raw) / static_cast<double>(varint), 2.5);
  EXPECT_EQ(bitmap, 125'000u);
  EXPECT_EQ(choose_index_encoding(keys.size(), 1'000'000), IndexEncoding::kDeltaVarint);
}

TEST(IndexCodingTest, AutoSelectionIsNeverLargerThanRaw) {
  uint32_t seed = 100;
  for (double density : {1e-6, 1e-4, 0.01, 0.1, 0.125, 0.2, 0.5, 1.0}) {
    const uint32_t n = 2'000'000;
    const auto keys = random_keys(0, n, density, seed++);
    size_t sizes[4] = {};
    for (IndexEncoding e : kSparse)
      ASSERT_TRUE(round_trip(data_header(0, n, e), keys, &sizes[static_cast<int>(e)]).ok());
    const IndexEncoding chosen = choose_index_encoding(keys.size(), n);
    const size_t best = std::min({sizes[1], sizes[2], sizes[3]});
    EXPECT_LE(sizes[static_cast<int>(chosen)], sizes[1]) << "density " << density;
    // Within 5 % of the smallest of the three.
    EXPECT_LE(static_cast<double>(sizes[static_cast<int>(chosen)]), 1.05 * static_cast<double>(best) + 8)
        << "density " << density << " chose " << index_encoding_name(chosen);
  }
}

// Builds a push whose index frame is `index` (the header claims nnz keys).
Status decode_index(IndexEncoding e, uint32_t begin, uint32_t end, uint32_t nnz, Bytes index) {
  Header h = data_header(begin, end, e);
  h.value_type = ValueType::kF32;
  h.nnz = nnz;
  h.frame1_bytes = static_cast<uint32_t>(index.size());
  h.frame2_bytes = 4 * nnz;
  const Bytes header = encode_header(h);
  const Bytes values(4 * nnz, std::byte{0});
  const std::vector<ByteSpan> frames = {header, index, values};
  SPS_ASSIGN_OR_RETURN(MessageView view, decode_message(frames));
  DecodeScratch scratch;
  return decode_data(view, begin, end, scratch).status();
}

Bytes bytes(std::initializer_list<int> v) {
  Bytes out;
  for (int x : v) out.push_back(static_cast<std::byte>(x));
  return out;
}

TEST(IndexCodingTest, MalformedVarintFramesAreRefused) {
  const auto V = IndexEncoding::kDeltaVarint;
  EXPECT_TRUE(decode_index(V, 0, 1000, 2, bytes({0x05, 0x80, 0x01})).ok());  // keys 5, 134
  EXPECT_FALSE(decode_index(V, 0, 1000, 2, bytes({0x05, 0x80})).ok());       // truncated
  EXPECT_FALSE(decode_index(V, 0, 1000, 2, bytes({0x05, 0x01, 0x00})).ok());  // trailing byte
  EXPECT_FALSE(decode_index(V, 0, 1000, 2, bytes({0x05, 0x80, 0x08})).ok());  // 5 + 1 + 1024 > 1000
  EXPECT_FALSE(decode_index(V, 0, 0xFFFFFFFFu, 1, bytes({0xFF, 0xFF, 0xFF, 0xFF, 0x1F})).ok());  // 33 bits
  EXPECT_FALSE(decode_index(V, 0, 0xFFFFFFFFu, 1, bytes({0x80, 0x80, 0x80, 0x80, 0x80, 0x00})).ok());  // 6 bytes
  // Gaps that wrap past 2^32 are out of range, never a small key.
  EXPECT_FALSE(decode_index(V, 10, 0xFFFFFFFFu, 2, bytes({0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F})).ok());
  // nnz larger than the frame could hold (one byte per key at least).
  EXPECT_FALSE(decode_index(V, 0, 1000, 4, bytes({0x01, 0x01, 0x01})).ok());
}

// The obvious LEB128 encoder of the gaps minus one.
Bytes reference_varint_encode(const std::vector<uint32_t>& keys, uint32_t key_begin) {
  Bytes out;
  uint64_t next = key_begin;
  for (uint32_t k : keys) {
    uint64_t v = k - next;
    next = uint64_t{k} + 1;
    for (; v >= 0x80; v >>= 7) out.push_back(static_cast<std::byte>((v & 0x7F) | 0x80));
    out.push_back(static_cast<std::byte>(v));
  }
  return out;
}

// The obvious LEB128 decoder the fast one must agree with: keys, or nullopt
// for any frame it refuses.
std::optional<std::vector<uint32_t>> reference_varint_decode(const Bytes& frame, uint32_t nnz, uint32_t key_begin,
                                                             uint32_t key_end) {
  std::vector<uint32_t> keys;
  size_t p = 0;
  uint64_t next = key_begin;
  for (uint32_t i = 0; i < nnz; ++i) {
    uint64_t v = 0;
    for (int shift = 0;; shift += 7) {
      if (p == frame.size() || shift > 28) return std::nullopt;
      const auto b = static_cast<uint8_t>(frame[p++]);
      if (shift == 28 && b > 0x0F) return std::nullopt;
      v |= uint64_t{b & 0x7Fu} << shift;
      if (b < 0x80) break;
    }
    if (next + v >= key_end) return std::nullopt;
    keys.push_back(static_cast<uint32_t>(next + v));
    next = next + v + 1;
  }
  if (p != frame.size()) return std::nullopt;
  return keys;
}

// Varints are encoded eight keys and decoded eight bytes at a time where
// they are one or two bytes long: every mix of lengths and keys at the top
// of the key space give the bytes of the obvious encoder, and frames with
// flipped, dropped or added bytes decode exactly as one key at a time.
TEST(IndexCodingTest, VarintGroupsDecodeLikeOneKeyAtATime) {
  std::mt19937 rng(77);
  auto gap = [&](int mix) -> uint32_t {
    const uint32_t r = rng() % 100;
    if (mix == 0) return rng() % 128;                          // one byte
    if (mix == 1) return r < 70 ? rng() % 128 : rng() % 16384;  // top-k at 1 %
    if (r < 50) return rng() % 128;                             // every length
    if (r < 80) return rng() % 16384;
    if (r < 95) return rng() % (1u << 21);
    return rng() % (1u << 28);
  };
  int frames = 0, refused = 0;
  for (int round = 0; round < 400; ++round) {
    const int mix = round % 3;
    const uint32_t key_begin = round % 4 == 3 ? 0xFFFFFFFFu - (1u << 29) : static_cast<uint32_t>(rng() % 1000);
    const uint32_t nnz = 1 + rng() % 300;
    std::vector<uint32_t> keys;
    uint64_t next = key_begin;
    for (uint32_t i = 0; i < nnz; ++i) {
      next += gap(mix);
      if (next >= 0xFFFFFFFFu) break;
      keys.push_back(static_cast<uint32_t>(next));
      ++next;
    }
    const uint32_t key_end = keys.empty() ? key_begin + 1 : std::max<uint32_t>(keys.back() + 1 + rng() % 3, keys.back() + 1);
    Bytes frame(kMaxVarintBytes * keys.size());
    frame.resize(encode_delta_varint(keys, key_begin, frame.data()));
    ASSERT_EQ(frame, reference_varint_encode(keys, key_begin)) << "round " << round;
    std::vector<uint32_t> got(keys.size());
    ASSERT_TRUE(decode_delta_varint(frame, static_cast<uint32_t>(keys.size()), key_begin, key_end, got.data()).ok());
    ASSERT_EQ(got, keys) << "round " << round;
    // Damaged copies: both decoders refuse it, or both give the same keys.
    for (int damage = 0; damage < 20; ++damage) {
      Bytes bad = frame;
      uint32_t bad_nnz = static_cast<uint32_t>(keys.size());
      uint32_t bad_end = key_end;
      switch (damage % 5) {
        case 0: if (!bad.empty()) bad[rng() % bad.size()] ^= static_cast<std::byte>(1u << (rng() % 8)); break;
        case 1: if (!bad.empty()) bad.resize(bad.size() - 1 - rng() % std::min<size_t>(bad.size(), 3)); break;
        case 2: bad.push_back(static_cast<std::byte>(rng() % 256)); break;
        case 3: bad_end = key_end - std::min<uint32_t>(key_end - key_begin - 1, 1 + rng() % 200); break;
        default: bad_nnz = bad_nnz > 0 ? bad_nnz - 1 - rng() % std::min<uint32_t>(bad_nnz, 2) : 1; break;
      }
      const auto want = reference_varint_decode(bad, bad_nnz, key_begin, bad_end);
      std::vector<uint32_t> out(bad_nnz);
      const Status st = decode_delta_varint(bad, bad_nnz, key_begin, bad_end, out.data());
      ASSERT_EQ(st.ok(), want.has_value()) << "round " << round << " damage " << damage << ": " << st.to_string();
      if (want) {
        ASSERT_EQ(out, *want) << "round " << round << " damage " << damage;
      }
      ++frames;
      refused += st.ok() ? 0 : 1;
    }
  }
  // The damage must exercise both outcomes.
  EXPECT_GT(refused, frames / 10);
  EXPECT_LT(refused, frames);
}

TEST(IndexCodingTest, MalformedBitmapFramesAreRefused) {
  const auto B = IndexEncoding::kBitmap;
  EXPECT_TRUE(decode_index(B, 100, 112, 2, bytes({0x81, 0x00})).ok());   // keys 100, 107
  EXPECT_FALSE(decode_index(B, 100, 112, 3, bytes({0x81, 0x00})).ok());  // fewer bits than nnz
  EXPECT_FALSE(decode_index(B, 100, 112, 1, bytes({0x81, 0x00})).ok());  // more bits than nnz
  EXPECT_FALSE(decode_index(B, 100, 112, 3, bytes({0x81, 0x10})).ok());  // bit 12: past the range
  EXPECT_FALSE(decode_index(B, 100, 112, 2, bytes({0x81})).ok());        // frame too short
  EXPECT_FALSE(decode_index(B, 100, 112, 2, bytes({0x81, 0x00, 0x00})).ok());  // too long
  // Many words: the count check stops before writing more than nnz keys.
  Bytes full(64, std::byte{0xFF});
  EXPECT_FALSE(decode_index(B, 0, 512, 10, full).ok());
  EXPECT_TRUE(decode_index(B, 0, 512, 512, full).ok());
}

TEST(FramePoolTest, FramesReturnTheirStorageFromAnyThread) {
  FramePool pool(2);
  const std::byte* first = nullptr;
  {
    Frame f = pool.take(1000);
    first = f.data();
    std::thread([g = std::move(f)]() mutable { Frame dropped = std::move(g); }).join();
  }
  EXPECT_EQ(pool.idle(), 1u);
  Frame again = pool.take(800);  // fits in the returned buffer
  EXPECT_EQ(again.data(), first);
  EXPECT_EQ(again.size(), 800u);
  EXPECT_EQ(pool.idle(), 0u);
  Frame bigger = pool.take(5000);
  EXPECT_NE(bigger.data(), first);
  // At most max_free idle buffers are kept.
  { Frame a = pool.take(1), b = pool.take(1), c = pool.take(1); }
  EXPECT_EQ(pool.idle(), 2u);
}

}  // namespace
}  // namespace sps::protocol
