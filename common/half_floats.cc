#include "common/half_floats.h"

#include <cassert>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPS_HALF_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace sps {
namespace {

// The per-value forms: the reference, the tail of the vector loops, and the
// whole job on CPUs without F16C.
void store_code(std::byte* out, size_t i, uint16_t code) {
  out[2 * i] = static_cast<std::byte>(code & 0xFFu);
  out[2 * i + 1] = static_cast<std::byte>(code >> 8);
}
uint16_t load_code(const std::byte* in, size_t i) {
  return static_cast<uint16_t>(static_cast<unsigned>(in[2 * i]) | (static_cast<unsigned>(in[2 * i + 1]) << 8));
}

#ifdef SPS_HALF_X86

// AVX2 through the compiler's check (which includes the OS saving the
// YMM registers); F16C from CPUID leaf 1 directly, as not every compiler's
// __builtin_cpu_supports knows it.
bool cpu_has_f16c() {
  __builtin_cpu_init();
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid(1, &eax, &ebx, &ecx, &edx) == 0) return false;
  return __builtin_cpu_supports("avx2") && (ecx & bit_F16C) != 0;
}

const bool kVector = cpu_has_f16c();

// Eight floats to eight f16 codes. The hardware rounds to nearest even (half
// subnormals included) but overflows to Inf; the scalar form saturates from
// 65520 up (and for Inf and NaN), so those lanes are replaced.
__attribute__((target("avx2,f16c"))) __m128i f16_codes(__m256 x) {
  const __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
  const __m256i magnitude = _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7FFFFFFF));
  const __m256i over = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x477FEFFF));
  const __m128i over16 = _mm_packs_epi32(_mm256_castsi256_si128(over), _mm256_extracti128_si256(over, 1));
  const __m128i saturated = _mm_or_si128(_mm_and_si128(h, _mm_set1_epi16(static_cast<int16_t>(0x8000))),
                                         _mm_set1_epi16(0x7BFF));
  return _mm_blendv_epi8(h, saturated, over16);
}

// Eight floats to eight bf16 codes, one per 32-bit lane (high halves zero):
// add 0x7FFF plus the kept part's lowest bit (ties to even), keep the top
// half; a result with an all-ones exponent saturates to sign | 0x7F7F.
__attribute__((target("avx2"))) __m256i bf16_codes32(__m256 x) {
  const __m256i b = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), odd);
  const __m256i exponent_mask = _mm256_set1_epi32(0x7F800000);
  const __m256i over = _mm256_cmpeq_epi32(_mm256_and_si256(rounded, exponent_mask), exponent_mask);
  const __m256i saturated =
      _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(0x8000)), _mm256_set1_epi32(0x7F7F));
  return _mm256_blendv_epi8(_mm256_srli_epi32(rounded, 16), saturated, over);
}

// The eight 32-bit lanes' low halves, in order.
__attribute__((target("avx2"))) __m128i narrow16(__m256i v) {
  const __m256i packed = _mm256_packus_epi32(v, v);  // per 128-bit lane: a0..a3 a0..a3 | b0..b3 b0..b3
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

__attribute__((target("avx2,f16c"))) size_t encode_f16_vector(const float* in, size_t n, std::byte* out) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * i), f16_codes(_mm256_loadu_ps(in + i)));
  return i;
}

__attribute__((target("avx2"))) size_t encode_bf16_vector(const float* in, size_t n, std::byte* out) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * i), narrow16(bf16_codes32(_mm256_loadu_ps(in + i))));
  return i;
}

__attribute__((target("avx2,f16c"))) size_t decode_f16_vector(const std::byte* in, size_t n, float* out) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 2 * i))));
  return i;
}

__attribute__((target("avx2"))) size_t decode_bf16_vector(const std::byte* in, size_t n, float* out) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 2 * i)));
    _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
  }
  return i;
}

__attribute__((target("avx2,f16c"))) size_t round_f16_vector(float* values, float* residual, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(values + i);
    const __m256 sent = _mm256_cvtph_ps(f16_codes(v));
    _mm256_storeu_ps(values + i, sent);
    if (residual != nullptr) _mm256_storeu_ps(residual + i, _mm256_sub_ps(v, sent));
  }
  return i;
}

__attribute__((target("avx2"))) size_t round_bf16_vector(float* values, float* residual, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(values + i);
    const __m256 sent = _mm256_castsi256_ps(_mm256_slli_epi32(bf16_codes32(v), 16));
    _mm256_storeu_ps(values + i, sent);
    if (residual != nullptr) _mm256_storeu_ps(residual + i, _mm256_sub_ps(v, sent));
  }
  return i;
}

#else

constexpr bool kVector = false;
size_t encode_f16_vector(const float*, size_t, std::byte*) { return 0; }
size_t encode_bf16_vector(const float*, size_t, std::byte*) { return 0; }
size_t decode_f16_vector(const std::byte*, size_t, float*) { return 0; }
size_t decode_bf16_vector(const std::byte*, size_t, float*) { return 0; }
size_t round_f16_vector(float*, float*, size_t) { return 0; }
size_t round_bf16_vector(float*, float*, size_t) { return 0; }

#endif

}  // namespace

void encode_f16(const float* in, size_t n, std::byte* out) {
  for (size_t i = kVector ? encode_f16_vector(in, n, out) : 0; i < n; ++i) store_code(out, i, f32_to_f16(in[i]));
}

void encode_bf16(const float* in, size_t n, std::byte* out) {
  for (size_t i = kVector ? encode_bf16_vector(in, n, out) : 0; i < n; ++i) store_code(out, i, f32_to_bf16(in[i]));
}

void decode_f16(const std::byte* in, size_t n, float* out) {
  for (size_t i = kVector ? decode_f16_vector(in, n, out) : 0; i < n; ++i) out[i] = f16_to_f32(load_code(in, i));
}

void decode_bf16(const std::byte* in, size_t n, float* out) {
  for (size_t i = kVector ? decode_bf16_vector(in, n, out) : 0; i < n; ++i) out[i] = bf16_to_f32(load_code(in, i));
}

void round_to_half(ValueFormat format, float* values, float* residual, size_t n) {
  assert(format == ValueFormat::kF16 || format == ValueFormat::kBF16);
  size_t i = 0;
  if (kVector)
    i = format == ValueFormat::kF16 ? round_f16_vector(values, residual, n) : round_bf16_vector(values, residual, n);
  for (; i < n; ++i) {
    const float v = values[i];
    const float sent = quantise(v, format);
    values[i] = sent;
    if (residual != nullptr) residual[i] = v - sent;
  }
}

bool half_floats_vectorised() { return kVector; }

}  // namespace sps
