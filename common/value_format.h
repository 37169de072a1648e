// Value formats for sent entries and their conversions. Header-only C++17
// with host+device qualifiers under nvcc, so the CPU and CUDA backends round
// with the very same code (round to nearest, ties to even; finite input
// saturates at the format's largest finite value instead of becoming Inf).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SPS_HOST_DEVICE __host__ __device__
#else
#define SPS_HOST_DEVICE
#endif

namespace sps {

enum class ValueFormat : uint8_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

SPS_HOST_DEVICE inline uint32_t float_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}
SPS_HOST_DEVICE inline float bits_float(uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

SPS_HOST_DEVICE inline uint16_t f32_to_f16(float x) {
  const uint32_t b = float_bits(x);
  const auto sign = static_cast<uint16_t>((b >> 16) & 0x8000u);
  uint32_t a = b & 0x7FFFFFFFu;
  // 65520 is the first magnitude that rounds to Inf (halfway above 65504).
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7BFFu);
  if (a < 0x38800000u) {
    // Below 2^-14: a half subnormal. Adding 0.5 puts the value's 2^-24
    // units in the low mantissa bits, rounded to even by the FPU.
    const float f = bits_float(a) + bits_float(0x3F000000u);
    return static_cast<uint16_t>(sign | (float_bits(f) - 0x3F000000u));
  }
  const uint32_t mantissa_odd = (a >> 13) & 1u;
  a += (static_cast<uint32_t>(15 - 127) << 23) + 0xFFFu + mantissa_odd;
  return static_cast<uint16_t>(sign | (a >> 13));
}

SPS_HOST_DEVICE inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  const uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0) {
    const float f = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // m * 2^-24, exact
    return bits_float(float_bits(f) | sign);
  }
  if (exponent == 31) return bits_float(sign | 0x7F800000u | (mantissa << 13));
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

SPS_HOST_DEVICE inline uint16_t f32_to_bf16(float x) {
  const uint32_t b = float_bits(x);
  const uint32_t rounded = b + 0x7FFFu + ((b >> 16) & 1u);
  if ((rounded & 0x7F800000u) == 0x7F800000u) return static_cast<uint16_t>(((b >> 16) & 0x8000u) | 0x7F7Fu);
  return static_cast<uint16_t>(rounded >> 16);
}

SPS_HOST_DEVICE inline float bf16_to_f32(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// x after a round trip through `format` (what the receiver will see).
SPS_HOST_DEVICE inline float quantise(float x, ValueFormat format) {
  switch (format) {
    case ValueFormat::kF16: return f16_to_f32(f32_to_f16(x));
    case ValueFormat::kBF16: return bf16_to_f32(f32_to_bf16(x));
    default: return x;
  }
}

inline int value_bytes(ValueFormat format) { return format == ValueFormat::kF32 ? 4 : 2; }
inline const char* value_format_name(ValueFormat format) {
  switch (format) {
    case ValueFormat::kF16: return "f16";
    case ValueFormat::kBF16: return "bf16";
    default: return "f32";
  }
}

}  // namespace sps
