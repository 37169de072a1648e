// Bulk conversions between float and the 16-bit value formats (f16, bf16),
// bit for bit the per-value f32_to_f16 / f16_to_f32 / f32_to_bf16 /
// bf16_to_f32 of value_format.h: round to nearest even, and magnitudes past
// the 16-bit range (non-finite ones too) saturate to the largest finite value.
// Dense f16 pushes convert every parameter twice per step (the compressor's
// rounding, the encoder) and once more at the server, so these use F16C and
// AVX2 where the CPU has them (checked once, at run time).
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/value_format.h"

namespace sps {

// n values to n 16-bit codes, little-endian, at `out` (any alignment).
void encode_f16(const float* in, size_t n, std::byte* out);
void encode_bf16(const float* in, size_t n, std::byte* out);
// n little-endian 16-bit codes at `in` (any alignment) to n floats.
void decode_f16(const std::byte* in, size_t n, float* out);
void decode_bf16(const std::byte* in, size_t n, float* out);

// values[i] <- quantise(values[i], format) for format f16 or bf16 (what the
// receiver will see); when `residual` is not null, residual[i] <- what the
// rounding lost (the old value minus the new one).
// REQUIRES: format is kF16 or kBF16.
void round_to_half(ValueFormat format, float* values, float* residual, size_t n);

// Whether the vector paths above are in use on this CPU (for benchmarks).
bool half_floats_vectorised();

}  // namespace sps
