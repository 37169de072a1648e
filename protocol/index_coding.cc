#include "protocol/index_coding.h"

#include <array>
#include <bit>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SPS_HAVE_SSSE3_VARINT 1
#endif

#include <fmt/format.h>

namespace sps::protocol {

const char* index_encoding_name(IndexEncoding e) {
  switch (e) {
    case IndexEncoding::kNone: return "dense";
    case IndexEncoding::kRawU32: return "raw_u32";
    case IndexEncoding::kDeltaVarint: return "delta_varint";
    case IndexEncoding::kBitmap: return "bitmap";
  }
  return "unknown";
}

IndexEncoding choose_index_encoding(uint64_t nnz, uint64_t range) {
  if (nnz == 0) return IndexEncoding::kRawU32;  // an empty frame either way
  if (bitmap_bytes(range) < nnz) return IndexEncoding::kBitmap;
  // A varint takes 4 bytes from gaps of 2^21 on; at such sparsity raw is as small.
  if (range / nnz >= (uint64_t{1} << 21)) return IndexEncoding::kRawU32;
  return IndexEncoding::kDeltaVarint;
}

void encode_bitmap(std::span<const uint32_t> keys, uint32_t key_begin, uint64_t range, std::byte* out) {
  if (range == 0) return;  // an empty frame (its storage may be null)
  std::memset(out, 0, bitmap_bytes(range));
  for (uint32_t k : keys) {
    const uint32_t j = k - key_begin;
    out[j >> 3] |= static_cast<std::byte>(1u << (j & 7));
  }
}

namespace {

#if defined(SPS_HAVE_SSSE3_VARINT)
// Groups of one- and two-byte varints, eight bytes at a time (the common
// case: top-k gaps at 0.1-1 % density need one or two bytes). The eight
// continuation bits of the next eight bytes index a table that says how
// many whole varints of one or two bytes they start with, how many bytes
// those take, and the byte shuffle that puts each varint's bytes into a
// 16-bit lane; a varint of three or more bytes, or one cut by the window,
// ends the group. Keys then come out of a prefix sum of (gap + 1).
struct ShortVarintGroup {
  alignas(16) std::array<uint8_t, 16> shuffle;  // byte j of a 16-bit lane pair; 0x80 = zero
  uint8_t count;                                // whole varints in the group
  uint8_t bytes;                                // bytes they take
};

constexpr std::array<ShortVarintGroup, 256> kShortVarintGroups = [] {
  std::array<ShortVarintGroup, 256> table{};
  for (uint32_t mask = 0; mask < 256; ++mask) {
    ShortVarintGroup g{};
    g.shuffle.fill(0x80);
    uint32_t pos = 0;
    while (pos < 8) {
      const bool more = ((mask >> pos) & 1u) != 0;
      if (!more) {  // one byte
        g.shuffle[2 * g.count] = static_cast<uint8_t>(pos);
        ++g.count;
        pos += 1;
        continue;
      }
      if (pos + 1 >= 8 || ((mask >> (pos + 1)) & 1u) != 0) break;  // cut by the window, or 3+ bytes
      g.shuffle[2 * g.count] = static_cast<uint8_t>(pos);
      g.shuffle[2 * g.count + 1] = static_cast<uint8_t>(pos + 1);
      ++g.count;
      pos += 2;
    }
    g.bytes = static_cast<uint8_t>(pos);
    table[mask] = g;
  }
  return table;
}();

bool have_ssse3() {
  static const bool yes = __builtin_cpu_supports("ssse3");
  return yes;
}

// Decodes one group at p (8 readable bytes) into out[0..8) (8 writable
// keys; only the first `count` are meaningful) with keys starting above
// `next` - 1. Returns the number of keys decoded (0: the group starts with
// a long varint, or its last key reaches key_end; the caller decodes one
// key the careful way), advancing p and next.
__attribute__((target("ssse3"))) uint32_t decode_short_group(const uint8_t*& p, uint64_t& next, uint64_t key_end,
                                                              uint32_t* out) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const auto mask = static_cast<uint32_t>(_mm_movemask_epi8(bytes)) & 0xFFu;
  const ShortVarintGroup& g = kShortVarintGroups[mask];
  if (g.count == 0) return 0;
  const __m128i lanes = _mm_shuffle_epi8(bytes, _mm_load_si128(reinterpret_cast<const __m128i*>(g.shuffle.data())));
  // Each 16-bit lane holds a varint's low byte and (or zero) its high byte:
  // gap = (lo & 0x7F) | (hi & 0x7F) << 7; plus one for the step past the
  // previous key.
  const __m128i gaps = _mm_or_si128(_mm_and_si128(lanes, _mm_set1_epi16(0x7F)),
                                    _mm_srli_epi16(_mm_and_si128(lanes, _mm_set1_epi16(0x7F00)), 1));
  const __m128i steps = _mm_add_epi16(gaps, _mm_set1_epi16(1));
  // Inclusive prefix sums in 32 bits (8 steps of at most 2^14 overflow 16).
  __m128i lo = _mm_unpacklo_epi16(steps, _mm_setzero_si128());
  __m128i hi = _mm_unpackhi_epi16(steps, _mm_setzero_si128());
  lo = _mm_add_epi32(lo, _mm_slli_si128(lo, 4));
  lo = _mm_add_epi32(lo, _mm_slli_si128(lo, 8));
  hi = _mm_add_epi32(hi, _mm_slli_si128(hi, 4));
  hi = _mm_add_epi32(hi, _mm_slli_si128(hi, 8));
  hi = _mm_add_epi32(hi, _mm_shuffle_epi32(lo, 0xFF));
  alignas(16) uint32_t sums[8];
  _mm_store_si128(reinterpret_cast<__m128i*>(sums), lo);
  _mm_store_si128(reinterpret_cast<__m128i*>(sums + 4), hi);
  // Keys ascend, so the last one bounds them all; next - 1 + sums[i] is
  // computed in 64 bits, so nothing wraps before this check.
  const uint64_t last = next - 1 + sums[g.count - 1];
  if (last >= key_end) return 0;
  const __m128i base = _mm_set1_epi32(static_cast<int>(static_cast<uint32_t>(next - 1)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_add_epi32(lo, base));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 4), _mm_add_epi32(hi, base));
  p += g.bytes;
  next = last + 1;
  return g.count;
}

// The encoder's side: eight keys whose gaps are all below 2^14 become
// eight one- or two-byte varints with one shuffle. Indexed by which of the
// eight gaps need a second byte: the bytes to keep of the eight 16-bit
// lanes (low byte always, high byte when it is needed), in order.
struct ShortVarintPack {
  alignas(16) std::array<uint8_t, 16> shuffle;  // 0x80 = unused
  uint8_t bytes;
};

constexpr std::array<ShortVarintPack, 256> kShortVarintPacks = [] {
  std::array<ShortVarintPack, 256> table{};
  for (uint32_t two = 0; two < 256; ++two) {
    ShortVarintPack pk{};
    pk.shuffle.fill(0x80);
    uint8_t out = 0;
    for (uint32_t lane = 0; lane < 8; ++lane) {
      pk.shuffle[out++] = static_cast<uint8_t>(2 * lane);
      if (((two >> lane) & 1u) != 0) pk.shuffle[out++] = static_cast<uint8_t>(2 * lane + 1);
    }
    pk.bytes = out;
    table[two] = pk;
  }
  return table;
}();

// Encodes keys[0..8) after `prev` (the previous key, or key_begin - 1) when
// every gap is below 2^14, writing 16 bytes at p (room for them is the
// caller's) and returning how many of them are the varints; 0 when a gap
// is too large (nothing written that counts).
__attribute__((target("ssse3"))) uint32_t encode_short_group(const uint32_t* keys, uint32_t prev, uint8_t* p) {
  const __m128i k0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(keys));
  const __m128i k1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(keys + 4));
  const __m128i before0 = _mm_alignr_epi8(k0, _mm_set1_epi32(static_cast<int>(prev)), 12);
  const __m128i before1 = _mm_alignr_epi8(k1, k0, 12);
  const __m128i one = _mm_set1_epi32(1);
  const __m128i g0 = _mm_sub_epi32(_mm_sub_epi32(k0, before0), one);
  const __m128i g1 = _mm_sub_epi32(_mm_sub_epi32(k1, before1), one);
  // Any gap of 2^14 or more (as unsigned) sets a bit above the low 14.
  const __m128i high = _mm_or_si128(_mm_srli_epi32(g0, 14), _mm_srli_epi32(g1, 14));
  if (_mm_movemask_epi8(_mm_cmpeq_epi32(high, _mm_setzero_si128())) != 0xFFFF) return 0;
  const __m128i gaps = _mm_packs_epi32(g0, g1);  // eight 16-bit gaps < 2^14
  const __m128i needs_two = _mm_cmpgt_epi16(gaps, _mm_set1_epi16(0x7F));
  // Lane = low 7 bits | continuation bit (when two bytes) | (gap >> 7) << 8.
  const __m128i low = _mm_or_si128(_mm_and_si128(gaps, _mm_set1_epi16(0x7F)),
                                   _mm_and_si128(needs_two, _mm_set1_epi16(0x80)));
  const __m128i lanes = _mm_or_si128(low, _mm_slli_epi16(_mm_srli_epi16(gaps, 7), 8));
  const auto two = static_cast<uint32_t>(_mm_movemask_epi8(_mm_packs_epi16(needs_two, _mm_setzero_si128()))) & 0xFFu;
  const ShortVarintPack& pk = kShortVarintPacks[two];
  const __m128i packed = _mm_shuffle_epi8(lanes, _mm_load_si128(reinterpret_cast<const __m128i*>(pk.shuffle.data())));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  return pk.bytes;
}
#endif

}  // namespace

size_t encode_delta_varint(std::span<const uint32_t> keys, uint32_t key_begin, std::byte* out) {
  auto* p = reinterpret_cast<uint8_t*>(out);
  uint32_t next = key_begin;  // the smallest key the next entry may hold
  auto encode_one = [&](uint32_t k) {
    uint32_t v = k - next;
    next = k + 1;
    if (v < (1u << 14)) {
      // One or two bytes, without a data-dependent branch (top-k gaps
      // straddle 128 at about 1 % density). Writing the second byte when
      // unused is safe: the buffer holds 5 bytes per key and the next key
      // overwrites it.
      const uint32_t two = v >> 7 != 0 ? 1u : 0u;
      p[0] = static_cast<uint8_t>((v & 0x7F) | (two << 7));
      p[1] = static_cast<uint8_t>(v >> 7);
      p += 1 + two;
      return;
    }
    while (v >= 0x80) {
      *p++ = static_cast<uint8_t>((v & 0x7F) | 0x80);
      v >>= 7;
    }
    *p++ = static_cast<uint8_t>(v);
  };
  size_t i = 0;
#if defined(SPS_HAVE_SSSE3_VARINT)
  // Eight keys at a time where their gaps are short; a group with a long
  // gap goes one key at a time. A group writes 16 bytes and eight keys may
  // take 40, so the buffer always has room for them.
  if (have_ssse3()) {
    while (i + 8 <= keys.size()) {
      const uint32_t bytes = encode_short_group(keys.data() + i, next - 1, p);
      if (bytes > 0) {
        p += bytes;
        next = keys[i + 7] + 1;
        i += 8;
        continue;
      }
      for (const size_t group_end = i + 8; i < group_end; ++i) encode_one(keys[i]);
    }
  }
#endif
  for (; i < keys.size(); ++i) encode_one(keys[i]);
  return static_cast<size_t>(p - reinterpret_cast<uint8_t*>(out));
}

Status decode_delta_varint(ByteSpan frame, uint32_t nnz, uint32_t key_begin, uint32_t key_end, uint32_t* out) {
  const auto* p = reinterpret_cast<const uint8_t*>(frame.data());
  const uint8_t* const end = p + frame.size();
  uint64_t next = key_begin;
#if defined(SPS_HAVE_SSSE3_VARINT)
  const bool groups = have_ssse3();
#endif
  for (uint32_t i = 0; i < nnz;) {
#if defined(SPS_HAVE_SSSE3_VARINT)
    if (groups && nnz - i >= 8 && end - p >= 8) {
      const uint32_t decoded = decode_short_group(p, next, key_end, out + i);
      if (decoded > 0) {
        i += decoded;
        continue;
      }
    }
#endif
    uint64_t v;
    if (end - p >= 2 && (p[0] & p[1] & 0x80) == 0) {
      // One or two bytes, decoded without a data-dependent branch; p[1] is
      // the next varint's first byte when p[0] stands alone.
      const uint32_t two = p[0] >> 7;
      v = (p[0] & 0x7Fu) | ((p[1] & 0x7Fu & (0u - two)) << 7);
      p += 1 + two;
    } else {
      v = 0;
      int shift = 0;
      while (true) {
        if (p == end) return malformed(fmt::format("index frame: varint {} of {} is truncated", i, nnz));
        const uint8_t b = *p++;
        if (shift == 28 && b > 0x0F) return malformed(fmt::format("index frame: varint {} exceeds 32 bits", i));
        v |= uint64_t{b & 0x7Fu} << shift;
        if (b < 0x80) break;
        shift += 7;
      }
    }
    const uint64_t key = next + v;
    if (key >= key_end)
      return out_of_range(fmt::format("index frame: key {} at entry {} is outside [{}, {})", key, i, key_begin, key_end));
    out[i] = static_cast<uint32_t>(key);
    next = key + 1;
    ++i;
  }
  if (p != end) return malformed(fmt::format("index frame has {} bytes after its {} keys", end - p, nnz));
  return {};
}

Status decode_bitmap(ByteSpan frame, uint32_t nnz, uint32_t key_begin, uint32_t key_end, uint32_t* out) {
  const uint64_t range = uint64_t{key_end} - key_begin;
  if (frame.size() != bitmap_bytes(range))
    return malformed(fmt::format("bitmap index frame is {} bytes for a range of {} keys", frame.size(), range));
  const auto* bytes = reinterpret_cast<const uint8_t*>(frame.data());
  if (range % 8 != 0 && (bytes[frame.size() - 1] >> (range % 8)) != 0)
    return malformed("bitmap index frame sets bits past the key range");
  uint32_t count = 0;
  size_t pos = 0;
  for (; pos + 8 <= frame.size(); pos += 8) {
    uint64_t w;
    std::memcpy(&w, bytes + pos, 8);
    if constexpr (std::endian::native == std::endian::big) w = __builtin_bswap64(w);
    if (count + static_cast<uint32_t>(std::popcount(w)) > nnz) break;
    while (w != 0) {
      out[count++] = key_begin + static_cast<uint32_t>(pos * 8 + std::countr_zero(w));
      w &= w - 1;
    }
  }
  for (; pos < frame.size(); ++pos) {
    for (uint32_t b = bytes[pos]; b != 0; b &= b - 1) {
      if (count == nnz) return malformed(fmt::format("bitmap index frame marks more than nnz = {} keys", nnz));
      out[count++] = key_begin + static_cast<uint32_t>(pos * 8 + std::countr_zero(b));
    }
  }
  if (count != nnz) return malformed(fmt::format("bitmap index frame marks {} keys, the header says {}", count, nnz));
  return {};
}

}  // namespace sps::protocol
