// Byte-exact little-endian coding helpers for the wire format.
//
// Writers append fixed-width little-endian integers to a byte vector; Reader
// walks a (begin, end) range and fails instead of over-reading. No struct is
// ever memcpy'd to the wire.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace sps::protocol {

using Bytes = std::vector<std::byte>;
using ByteSpan = std::span<const std::byte>;

template <class T>
inline void put_le(Bytes& out, T v) {
  static_assert(std::is_integral_v<T>);
  using U = std::make_unsigned_t<T>;
  U u = static_cast<U>(v);
  for (size_t i = 0; i < sizeof(T); ++i) out.push_back(static_cast<std::byte>((u >> (8 * i)) & 0xFF));
}
inline void put_f64(Bytes& out, double v) { put_le(out, std::bit_cast<uint64_t>(v)); }
inline void put_f32(Bytes& out, float v) { put_le(out, std::bit_cast<uint32_t>(v)); }

template <class T>
inline void store_le(std::byte* p, T v) {
  static_assert(std::is_integral_v<T>);
  using U = std::make_unsigned_t<T>;
  U u = static_cast<U>(v);
  for (size_t i = 0; i < sizeof(T); ++i) p[i] = static_cast<std::byte>((u >> (8 * i)) & 0xFF);
}

template <class T>
inline T load_le(const std::byte* p) {
  static_assert(std::is_integral_v<T>);
  using U = std::make_unsigned_t<T>;
  U u = 0;
  for (size_t i = 0; i < sizeof(T); ++i) u |= static_cast<U>(static_cast<U>(p[i]) << (8 * i));
  return static_cast<T>(u);
}

// Reads fields in order from a byte range; every read is bounds-checked and a
// failed read leaves the reader failed, so callers check once at the end.
class Reader {
 public:
  explicit Reader(ByteSpan bytes) : bytes_(bytes) {}

  template <class T>
  T get() {
    if (!need(sizeof(T))) return T{};
    T v = load_le<T>(bytes_.data() + pos_);
    pos_ += sizeof(T);
    return v;
  }
  double get_f64() { return std::bit_cast<double>(get<uint64_t>()); }
  // A string stored as u32 length + bytes; longer than `max_len` fails.
  std::string get_string(size_t max_len);

  bool failed() const { return failed_; }
  size_t remaining() const { return failed_ ? 0 : bytes_.size() - pos_; }
  // OK when nothing failed and every byte was consumed.
  Status finish(std::string_view what) const;

 private:
  bool need(size_t n) {
    if (failed_ || bytes_.size() - pos_ < n) {
      failed_ = true;
      return false;
    }
    return true;
  }
  ByteSpan bytes_;
  size_t pos_ = 0;
  bool failed_ = false;
};

inline void put_string(Bytes& out, std::string_view s) {
  put_le<uint32_t>(out, static_cast<uint32_t>(s.size()));
  const auto* p = reinterpret_cast<const std::byte*>(s.data());
  out.insert(out.end(), p, p + s.size());
}

}  // namespace sps::protocol
