// Value formats for sent entries and their conversions. Header-only C++17
// with host+device qualifiers under nvcc, so the CPU and CUDA backends round
// with the very same code (round to nearest, ties to even; finite input
// saturates at the format's largest finite value instead of becoming Inf).
//
// The scaled formats (int8, sign, qsgd, onebit) send one float scale per
// run of values plus a small integer per value; the scale is computed over
// the values one compress() step selected (ALGORITHMS.md 2.6):
//   int8    scale = max|v| / 127,   sent = rint(v / scale) * scale
//   sign    scale = sum|v| / m,     sent = (v >= 0 ? +1 : -1) * scale    (EF-signSGD)
//   qsgd    scale = ||v||_2 / s,    sent = sign(v) * l * scale, l = floor(|v| / scale)
//           plus 1 with probability frac(|v| / scale) (unbiased; s <= 127 levels)
//   onebit  two scales (Seide et al.): scale = mean of the v >= 0, negative_scale
//           = mean |v| of the v < 0; sent = v >= 0 ? scale : -negative_scale
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SPS_HOST_DEVICE __host__ __device__
#else
#define SPS_HOST_DEVICE
#endif

namespace sps {

enum class ValueFormat : uint8_t { kF32 = 0, kF16 = 1, kBF16 = 2, kInt8 = 3, kSign = 4, kQsgd = 5, kOneBit = 6 };

SPS_HOST_DEVICE inline constexpr bool is_scaled(ValueFormat f) {
  return f == ValueFormat::kInt8 || f == ValueFormat::kSign || f == ValueFormat::kQsgd || f == ValueFormat::kOneBit;
}
// The largest integer level a scaled format sends (int8 on the wire).
inline constexpr int kMaxQuantLevel = 127;

// `count` consecutive sent values that share one scale (scaled formats).
struct ScaleRun {
  uint32_t count = 0;
  float scale = 0.0f;
  float negative_scale = 0.0f;  // onebit only: the magnitude sent for v < 0
};

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

// The scale of a scaled format from the selected values' max |v|, sum |v|,
// sum v^2 (sums in double) and count m; `levels` is qsgd's s.
// A norm past the float range gives an infinite scale, whose values are
// not finite: the worker then stops, naming the value (training diverged).
SPS_HOST_DEVICE inline float value_scale_of(ValueFormat format, float max_abs, double sum_abs, double sum_sq, double m,
                                         int levels) {
  switch (format) {
    case ValueFormat::kInt8: return max_abs / static_cast<float>(kMaxQuantLevel);
    case ValueFormat::kSign: return m > 0 ? static_cast<float>(sum_abs / m) : 0.0f;
    case ValueFormat::kQsgd: {
      const double s = sqrt(sum_sq) / static_cast<double>(levels);
      return s <= 3.4028234663852886e38 ? static_cast<float>(s) : bits_float(0x7F800000u);
    }
    default: return 0.0f;
  }
}

// onebit's two scales from the selected values' sums by sign (in double):
// the mean of the v >= 0 and the mean |v| of the v < 0 (0 where none).
struct OneBitScales {
  float positive = 0.0f, negative = 0.0f;
};
SPS_HOST_DEVICE inline OneBitScales onebit_scales(double sum_positive, double count_positive, double sum_negative,
                                                  double count_negative) {
  OneBitScales s;
  if (count_positive > 0) s.positive = static_cast<float>(sum_positive / count_positive);
  if (count_negative > 0) s.negative = static_cast<float>(sum_negative / count_negative);
  return s;
}

// qsgd's uniform draw for entry `index` of step `step`: 24 random bits from
// a counter-based hash (splitmix64), so every backend draws the same.
SPS_HOST_DEVICE inline uint32_t quant_random24(uint64_t seed, uint64_t step, uint64_t index) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * (step + 1) + 0xD1B54A32D192ED03ull * (index + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<uint32_t>(z >> 40);
}

// x rounded to the nearest integer, ties to even, for |x| <= 2^22: adding
// and removing 1.5 * 2^23 leaves no fraction bits (no libm call, and the
// same on host and device: nothing here contracts or reassociates).
SPS_HOST_DEVICE inline float round_small(float x) {
  const float shift = 12582912.0f;
  return (x + shift) - shift;
}

// The signed integer level v is sent as (|level| <= 127). `random24` is
// quant_random24's draw (qsgd only). A zero scale sends 0.
SPS_HOST_DEVICE inline int quant_level(float v, ValueFormat format, float scale, uint32_t random24) {
  if (!(scale > 0.0f)) return 0;
  constexpr float kMax = static_cast<float>(kMaxQuantLevel);
  switch (format) {
    case ValueFormat::kSign:
    case ValueFormat::kOneBit: return v >= 0.0f ? 1 : -1;
    case ValueFormat::kQsgd: {
      double x = static_cast<double>(fabsf(v)) / static_cast<double>(scale);
      if (x > kMax) x = kMax;
      int level = static_cast<int>(x);  // floor: x >= 0
      if (static_cast<double>(random24) * (1.0 / 16777216.0) < x - level) ++level;
      if (level > kMaxQuantLevel) level = kMaxQuantLevel;
      return v < 0.0f ? -level : level;
    }
    default: {
      float q = v / scale;
      q = q > kMax ? kMax : (q < -kMax ? -kMax : q);
      return static_cast<int>(round_small(q));
    }
  }
}

// What the receiver decodes from a level and its run's scale.
SPS_HOST_DEVICE inline float dequantise(int level, float scale) { return static_cast<float>(level) * scale; }
// onebit's sent value for a value whose sign bit is `negative` (v < 0), in
// a run with these two scales; it does not depend on either being > 0.
SPS_HOST_DEVICE inline float onebit_sent(bool negative, float scale, float negative_scale) {
  return negative ? -negative_scale : scale;
}

// The level a sent value came from (the encoder's inverse of dequantise;
// exact because |level| <= 127 and the product lost at most half an ulp).
// A value that is no level * scale gets the nearest level in [-127, 127].
inline int level_of(float sent, float scale) {
  if (!(scale > 0.0f)) return 0;
  constexpr float kMax = static_cast<float>(kMaxQuantLevel);
  float q = sent / scale;
  if (!(q >= -kMax)) q = q > 0 ? kMax : -kMax;  // also NaN
  if (q > kMax) q = kMax;
  return static_cast<int>(round_small(q));
}

// Where slice_runs left off: run `run` starts at position `pos`. Slicing
// ascending ranges through one cursor walks the runs once in all (a push
// cut into shards), instead of from the start for every range.
struct RunCursor {
  size_t run = 0, pos = 0;
};

// The runs of `runs` (covering positions 0, 1, ...) that fall in
// positions [begin, end), clipped; `out` is replaced. `at` must not be
// past `begin` (ranges ascending).
template <class Runs, class Out>
void slice_runs(const Runs& runs, size_t begin, size_t end, Out& out, RunCursor& at) {
  out.clear();
  while (at.run < runs.size() && at.pos + runs[at.run].count <= begin) at.pos += runs[at.run++].count;
  for (size_t r = at.run, pos = at.pos; r < runs.size() && pos < end; pos += runs[r++].count) {
    const size_t lo = pos > begin ? pos : begin;
    const size_t hi = pos + runs[r].count < end ? pos + runs[r].count : end;
    if (lo < hi) out.push_back(ScaleRun{static_cast<uint32_t>(hi - lo), runs[r].scale, runs[r].negative_scale});
  }
}
template <class Runs, class Out>
void slice_runs(const Runs& runs, size_t begin, size_t end, Out& out) {
  RunCursor from_start;
  slice_runs(runs, begin, end, out, from_start);
}

inline const char* value_format_name(ValueFormat format) {
  switch (format) {
    case ValueFormat::kF16: return "f16";
    case ValueFormat::kBF16: return "bf16";
    case ValueFormat::kInt8: return "int8";
    case ValueFormat::kSign: return "sign";
    case ValueFormat::kQsgd: return "qsgd";
    case ValueFormat::kOneBit: return "onebit";
    default: return "f32";
  }
}

}  // namespace sps
