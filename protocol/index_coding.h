// Index frame codings for sparse data messages (docs/protocol.md). A sender
// picks per message whichever is smallest for its density
// (choose_index_encoding); receivers decode into a key array, validating as
// they go, so a hostile frame can never yield a key outside the message's
// range, an unordered key list, or more keys than the header's nnz.
//
//   raw u32        nnz little-endian u32 keys
//   delta varint   unsigned LEB128 of k0 - key_begin, then of k_i - k_{i-1} - 1
//                  (gaps minus one, so every key list is strictly increasing)
//   bitmap         ceil(range / 8) bytes; bit j (LSB first) marks key_begin + j;
//                  padding bits past the range are zero
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "common/status.h"
#include "protocol/frame.h"

namespace sps::protocol {

enum class IndexEncoding : uint8_t {
  kNone = 0,         // no index frame: dense over [key_begin, key_end)
  kRawU32 = 1,       // nnz little-endian u32 keys, strictly increasing, in range
  kDeltaVarint = 2,  // LEB128 gaps (see above)
  kBitmap = 3,       // one bit per key of the range
};
inline constexpr uint8_t kMaxIndexEncoding = 3;
const char* index_encoding_name(IndexEncoding e);

// Worst-case / exact frame sizes.
inline constexpr size_t kMaxVarintBytes = 5;
inline size_t bitmap_bytes(uint64_t range) { return static_cast<size_t>((range + 7) / 8); }

// The smallest sparse coding for nnz sorted keys spread over `range` keys:
// a bitmap once it is smaller than one byte per key, raw u32 when the mean
// gap needs more than three varint bytes, delta varint otherwise.
IndexEncoding choose_index_encoding(uint64_t nnz, uint64_t range);

// Encoders. REQUIRES: keys strictly increasing within [key_begin, key_begin + range).
// encode_delta_varint writes at most kMaxVarintBytes * keys.size() bytes and
// returns how many it wrote; encode_bitmap writes bitmap_bytes(range).
size_t encode_delta_varint(std::span<const uint32_t> keys, uint32_t key_begin, std::byte* out);
void encode_bitmap(std::span<const uint32_t> keys, uint32_t key_begin, uint64_t range, std::byte* out);

// Decoders: write exactly nnz global keys to `out` or fail (truncated or
// overlong varints, trailing bytes, a key past key_end, a wrong bit count,
// padding bits set). `out` must hold nnz keys.
Status decode_delta_varint(ByteSpan frame, uint32_t nnz, uint32_t key_begin, uint32_t key_end, uint32_t* out);
Status decode_bitmap(ByteSpan frame, uint32_t nnz, uint32_t key_begin, uint32_t key_end, uint32_t* out);

}  // namespace sps::protocol
