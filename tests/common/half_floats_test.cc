// The bulk f16/bf16 conversions against the per-value ones of
// value_format.h (the reference the CUDA code and the wire format share):
// every 16-bit code, every float around each rounding boundary, random
// floats, every tail length and unaligned buffers.
#include "common/half_floats.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

namespace sps {
namespace {

uint16_t code_at(const std::vector<std::byte>& bytes, size_t offset, size_t i) {
  return static_cast<uint16_t>(static_cast<unsigned>(bytes[offset + 2 * i]) |
                               (static_cast<unsigned>(bytes[offset + 2 * i + 1]) << 8));
}

// Encodes `in` one byte past an aligned address and checks every code.
void expect_encodes_like_scalar(const std::vector<float>& in, bool f16) {
  std::vector<std::byte> out(2 * in.size() + 1);
  if (f16) {
    encode_f16(in.data(), in.size(), out.data() + 1);
  } else {
    encode_bf16(in.data(), in.size(), out.data() + 1);
  }
  size_t wrong = 0;
  for (size_t i = 0; i < in.size(); ++i) {
    const uint16_t want = f16 ? f32_to_f16(in[i]) : f32_to_bf16(in[i]);
    const uint16_t got = code_at(out, 1, i);
    if (got != want && ++wrong <= 5)
      ADD_FAILURE() << (f16 ? "f16" : "bf16") << " code of float bits 0x" << std::hex << float_bits(in[i]) << ": 0x"
                    << got << ", scalar 0x" << want;
  }
  EXPECT_EQ(wrong, 0u);
}

// Every float whose bits above the lowest `low_bits` take every value, with
// the low bits at the patterns that decide rounding: exact, just above
// exact, just below the halfway point, halfway (a tie), just above it, all
// ones.
std::vector<float> rounding_boundaries(int low_bits) {
  const uint32_t half = 1u << (low_bits - 1);
  const uint32_t patterns[] = {0u, 1u, half - 1, half, half + 1, (1u << low_bits) - 1};
  std::vector<float> out;
  for (uint64_t high = 0; high < (uint64_t{1} << (32 - low_bits)); ++high)
    for (uint32_t low : patterns) out.push_back(bits_float(static_cast<uint32_t>(high << low_bits) | low));
  return out;
}

std::vector<float> random_floats(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<float> out(n);
  for (auto& x : out) x = bits_float(rng());
  return out;
}

TEST(HalfFloatsTest, KnownCodes) {
  const float in[] = {1.0f, -2.0f, 65504.0f, 65519.0f, 65520.0f, -1e30f, std::numeric_limits<float>::infinity(),
                      5.9604645e-8f, 2.9802322e-8f, 0.0f};
  std::vector<std::byte> out(2 * std::size(in));
  encode_f16(in, std::size(in), out.data());
  const uint16_t f16[] = {0x3C00, 0xC000, 0x7BFF, 0x7BFF, 0x7BFF, 0xFBFF, 0x7BFF, 0x0001, 0x0000, 0x0000};
  for (size_t i = 0; i < std::size(in); ++i) EXPECT_EQ(code_at(out, 0, i), f16[i]) << "f16 of " << in[i];
  encode_bf16(in, std::size(in), out.data());
  EXPECT_EQ(code_at(out, 0, 0), 0x3F80);
  EXPECT_EQ(code_at(out, 0, 5), 0xF14A);  // -1e30 = 0xF149F2CA: the dropped half is past a tie, so up
  EXPECT_EQ(code_at(out, 0, 6), 0x7F7F);  // Inf saturates
}

TEST(HalfFloatsTest, EncodingMatchesTheScalarFormAroundEveryRoundingBoundary) {
  expect_encodes_like_scalar(rounding_boundaries(12), /*f16=*/true);   // f16 keeps 10 of 23 mantissa bits
  expect_encodes_like_scalar(rounding_boundaries(16), /*f16=*/false);  // bf16 keeps 7
}

TEST(HalfFloatsTest, EncodingMatchesTheScalarFormOnRandomBitsAndEveryTailLength) {
  const auto in = random_floats(1 << 20, 11);
  expect_encodes_like_scalar(in, true);
  expect_encodes_like_scalar(in, false);
  for (size_t n = 0; n <= 40; ++n) {
    const std::vector<float> part(in.begin(), in.begin() + static_cast<std::ptrdiff_t>(n));
    expect_encodes_like_scalar(part, true);
    expect_encodes_like_scalar(part, false);
  }
}

TEST(HalfFloatsTest, DecodingMatchesTheScalarFormForEveryCode) {
  std::vector<std::byte> codes(2 * 65536 + 1);
  for (uint32_t c = 0; c < 65536; ++c) {
    codes[1 + 2 * c] = static_cast<std::byte>(c & 0xFF);
    codes[2 + 2 * c] = static_cast<std::byte>(c >> 8);
  }
  for (const bool f16 : {true, false}) {
    std::vector<float> out(65536);
    if (f16) {
      decode_f16(codes.data() + 1, out.size(), out.data());
    } else {
      decode_bf16(codes.data() + 1, out.size(), out.data());
    }
    for (uint32_t c = 0; c < 65536; ++c) {
      const float want = f16 ? f16_to_f32(static_cast<uint16_t>(c)) : bf16_to_f32(static_cast<uint16_t>(c));
      // NaN codes decode to a NaN (the hardware may set the quiet bit);
      // receivers refuse them either way.
      if (std::isnan(want)) {
        EXPECT_TRUE(std::isnan(out[c])) << std::hex << c;
      } else {
        ASSERT_EQ(float_bits(out[c]), float_bits(want)) << (f16 ? "f16" : "bf16") << " code 0x" << std::hex << c;
      }
    }
    for (size_t n = 0; n <= 20; ++n) {  // tails: nothing past n is written
      std::vector<float> part(n + 1, 7.0f);
      if (f16) {
        decode_f16(codes.data() + 1 + 2 * 15360, n, part.data());  // from code 0x3C00 = 1.0
      } else {
        decode_bf16(codes.data() + 1 + 2 * 16256, n, part.data());  // from code 0x3F80 = 1.0
      }
      if (n > 0) {
        EXPECT_EQ(part[0], 1.0f);
      }
      EXPECT_EQ(part[n], 7.0f);
    }
  }
}

TEST(HalfFloatsTest, RoundingKeepsWhatItLosesExactly) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  std::vector<float> in(1003);
  for (size_t i = 0; i < in.size(); ++i) in[i] = normal(rng) * std::pow(10.0f, static_cast<float>(i % 13) - 8.0f);
  in[3] = 70000.0f;  // saturates: the residual keeps the excess
  in[4] = -1e-30f;   // rounds to -0: the residual keeps all of it
  for (const ValueFormat format : {ValueFormat::kF16, ValueFormat::kBF16}) {
    std::vector<float> values = in, residual(in.size(), 99.0f), without = in;
    round_to_half(format, values.data(), residual.data(), values.size());
    round_to_half(format, without.data(), nullptr, without.size());
    for (size_t i = 0; i < in.size(); ++i) {
      const float sent = quantise(in[i], format);
      ASSERT_EQ(float_bits(values[i]), float_bits(sent)) << i;
      ASSERT_EQ(float_bits(without[i]), float_bits(sent)) << i;
      ASSERT_EQ(float_bits(residual[i]), float_bits(in[i] - sent)) << i;
    }
    if (format == ValueFormat::kF16) {
      EXPECT_EQ(values[3], 65504.0f);
      EXPECT_EQ(residual[3], 70000.0f - 65504.0f);
      EXPECT_EQ(residual[4], -1e-30f);
    }
  }
}

}  // namespace
}  // namespace sps
