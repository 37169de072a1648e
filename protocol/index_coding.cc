#include "protocol/index_coding.h"

#include <bit>
#include <cstring>

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

size_t encode_delta_varint(std::span<const uint32_t> keys, uint32_t key_begin, std::byte* out) {
  auto* p = reinterpret_cast<uint8_t*>(out);
  uint32_t next = key_begin;  // the smallest key the next entry may hold
  for (uint32_t k : keys) {
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
      continue;
    }
    while (v >= 0x80) {
      *p++ = static_cast<uint8_t>((v & 0x7F) | 0x80);
      v >>= 7;
    }
    *p++ = static_cast<uint8_t>(v);
  }
  return static_cast<size_t>(p - reinterpret_cast<uint8_t*>(out));
}

void encode_bitmap(std::span<const uint32_t> keys, uint32_t key_begin, uint64_t range, std::byte* out) {
  if (range == 0) return;  // an empty frame (its storage may be null)
  std::memset(out, 0, bitmap_bytes(range));
  for (uint32_t k : keys) {
    const uint32_t j = k - key_begin;
    out[j >> 3] |= static_cast<std::byte>(1u << (j & 7));
  }
}

Status decode_delta_varint(ByteSpan frame, uint32_t nnz, uint32_t key_begin, uint32_t key_end, uint32_t* out) {
  const auto* p = reinterpret_cast<const uint8_t*>(frame.data());
  const uint8_t* const end = p + frame.size();
  uint64_t next = key_begin;
  for (uint32_t i = 0; i < nnz; ++i) {
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
