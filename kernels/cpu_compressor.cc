#include "kernels/cpu_compressor.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <string_view>
#include <thread>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <fmt/format.h>

#include "common/half_floats.h"
#include "common/thread_pool.h"

namespace sps::kernels {
namespace {

inline uint32_t magnitude_bits(float x) { return std::bit_cast<uint32_t>(x) & 0x7FFFFFFFu; }
// 1 when the exponent is all ones (Inf or NaN), else 0; branch-free.
inline uint32_t non_finite(uint32_t m) { return ((m & 0x7F800000u) + 0x00800000u) >> 31; }
// Bits no magnitude reaches: collect no candidates.
constexpr uint32_t kNoCandidates = 0xFFFFFFFFu;
// Rank histograms (fill_histogram) have buckets of 1/256 of an octave.
constexpr int kRankShift = 15;

// The first pass works in lanes of 16 (vectorisable) inside blocks of 256,
// whose moments fold into doubles; threads split n at multiples of
// kChunkAlign, so every sum is formed in the same order for any thread count.
constexpr size_t kLanes = 16;
constexpr size_t kBlock = 256;
constexpr size_t kChunkAlign = size_t{1} << 16;
constexpr size_t kCandidatePad = 16;

// Writes 16 floats to dst (16-byte aligned). On x86 with streaming stores:
// acc is written once and read back only at a few indices, so bypassing the
// cache saves reading every destination line first (a quarter of the
// traffic of the pass).
inline void store_lanes(float* dst, const float* lanes) {
#if defined(__SSE2__)
  for (size_t j = 0; j < kLanes; j += 4) _mm_stream_ps(dst + j, _mm_load_ps(lanes + j));
#else
  std::memcpy(dst, lanes, kLanes * sizeof(float));
#endif
}

struct PassArgs {
  const float* r;
  const float* g;
  const float* c;
  const float* u;
  float* u_next;
  float* acc;
  uint32_t* ci;
  uint32_t* cv;
  float grad_factor, scale, momentum;
  uint32_t candidate_bits;
  size_t begin, end;  // entries
  size_t out_begin;   // where this chunk's candidates go
};
struct PassResult {
  size_t candidates;
  uint32_t non_finite;
  double sum, sum_sq;
};

namespace pass_baseline {
#include "kernels/cpu_pass.inc"
#include "kernels/cpu_quantise.inc"
}  // namespace pass_baseline

// The same pass for AVX2 machines (chosen at run time): 256-bit arithmetic
// and a branch-free compress-store of the candidates, so their cost no
// longer depends on how many lanes hold one.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SPS_HAVE_AVX2_PASS 1
#pragma GCC push_options
#pragma GCC target("avx2,popcnt")
#define SPS_PASS_AVX2 1
namespace pass_avx2 {
#include "kernels/cpu_pass.inc"
#include "kernels/cpu_quantise.inc"
}  // namespace pass_avx2
#undef SPS_PASS_AVX2
#pragma GCC pop_options
#endif

bool use_avx2_pass() {
#if defined(SPS_HAVE_AVX2_PASS)
  // SPS_CPU_PASS=baseline forces the portable pass (for comparisons).
  const char* forced = std::getenv("SPS_CPU_PASS");
  if (forced != nullptr && std::string_view(forced) == "baseline") return false;
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
#else
  return false;
#endif
}

// A histogram of count magnitudes (bits) in 1/256-octave buckets.
template <class Magnitude>
void fill_histogram(size_t count, Magnitude magnitude, std::vector<uint32_t>& histogram) {
  histogram.assign(size_t{1} << (31 - kRankShift), 0u);
  for (size_t j = 0; j < count; ++j) ++histogram[magnitude(j) >> kRankShift];
}

// The bucket holding the rank-th largest, and how many lie in the buckets
// above it. REQUIRES: 0 < rank <= the histogram's total.
std::pair<size_t, size_t> bucket_of_rank(const std::vector<uint32_t>& histogram, size_t rank) {
  size_t seen = 0;
  size_t b = histogram.size() - 1;
  while (seen + histogram[b] < rank) seen += histogram[b--];  // terminates: the counts sum to >= rank
  return {b, seen};
}

// The rank-th largest (1-based) of count magnitudes (bits), exactly, given
// their histogram (fill_histogram): an exact select runs inside the bucket
// holding the rank only. `greater` (optional) gets how many are strictly
// larger. REQUIRES: 0 < rank <= count.
template <class Magnitude>
uint32_t rank_in_histogram(size_t count, size_t rank, Magnitude magnitude, const std::vector<uint32_t>& histogram,
                           std::vector<uint32_t>& bucket, size_t* greater) {
  const auto [b, seen] = bucket_of_rank(histogram, rank);
  bucket.clear();
  for (size_t j = 0; j < count; ++j) {
    const uint32_t m = magnitude(j);
    if ((m >> kRankShift) == b) bucket.push_back(m);
  }
  const auto nth = bucket.begin() + static_cast<std::ptrdiff_t>(rank - seen - 1);
  std::nth_element(bucket.begin(), nth, bucket.end(), std::greater<uint32_t>());
  const uint32_t t = *nth;
  if (greater != nullptr) {
    size_t above = seen;
    for (auto it = bucket.begin(); it != nth; ++it) above += (*it > t) ? 1 : 0;
    *greater = above;
  }
  return t;
}

// Bucket sums run in kSumLanes interleaved partial sums (lane l takes the
// entries j = l mod kSumLanes, in index order), added in lane order at the
// end: a fixed order, so a scale is the same on every run, and the lanes'
// additions overlap, where one running sum was a chain of one dependent
// add per value (about 1.3 ns each).
constexpr size_t kSumLanes = 8;

template <class T, class Term, class Combine>
T lane_reduce(const float* values, size_t count, Term term, Combine combine) {
  T lane[kSumLanes] = {};
  size_t j = 0;
  for (; j + kSumLanes <= count; j += kSumLanes)
    for (size_t l = 0; l < kSumLanes; ++l) lane[l] = combine(lane[l], term(values[j + l]));
  for (size_t l = 0; j < count; ++j, ++l) lane[l] = combine(lane[l], term(values[j]));
  T total = lane[0];
  for (size_t l = 1; l < kSumLanes; ++l) total = combine(total, lane[l]);
  return total;
}

template <class Term>
double lane_sum(const float* values, size_t count, Term term) {
  return lane_reduce<double>(values, count, term, [](double a, double b) { return a + b; });
}

// One bucket's scale(s) from its values (times `factor`: random-k's n/k, or
// 1), with only the sums the format needs.
ScaleRun bucket_scale(ValueFormat format, const float* values, size_t count, float factor, int levels) {
  const auto c = static_cast<uint32_t>(count);
  const auto m = static_cast<double>(count);
  switch (format) {
    case ValueFormat::kOneBit: {
      // One pass, lanes as in lane_reduce. Branch-free (signs are coin
      // flips): each side's sum also gets the other side's values times 0,
      // and adding a zero changes no sum.
      double pos[kSumLanes] = {}, neg[kSumLanes] = {}, non_negatives[kSumLanes] = {};
      auto add = [&](size_t l, float x) {
        const double v = x * factor;
        const double non_negative = static_cast<double>(!(v < 0.0));
        pos[l] += v * non_negative;
        neg[l] -= v * (1.0 - non_negative);
        non_negatives[l] += non_negative;
      };
      size_t j = 0;
      for (; j + kSumLanes <= count; j += kSumLanes)
        for (size_t l = 0; l < kSumLanes; ++l) add(l, values[j + l]);
      for (size_t l = 0; j < count; ++j, ++l) add(l, values[j]);
      double sum_pos = pos[0], sum_neg = neg[0], count_pos = non_negatives[0];
      for (size_t l = 1; l < kSumLanes; ++l) {
        sum_pos += pos[l];
        sum_neg += neg[l];
        count_pos += non_negatives[l];
      }
      const OneBitScales s = onebit_scales(sum_pos, count_pos, sum_neg, m - count_pos);
      return {c, s.positive, s.negative};
    }
    case ValueFormat::kSign: {
      const double sum_abs = lane_sum(values, count, [&](float x) { return double{std::fabs(x * factor)}; });
      return {c, value_scale_of(format, 0.0f, sum_abs, 0.0, m, levels)};
    }
    case ValueFormat::kQsgd: {
      const double sum_sq = lane_sum(values, count, [&](float x) {
        const float v = x * factor;
        return static_cast<double>(v) * v;
      });
      return {c, value_scale_of(format, 0.0f, 0.0, sum_sq, m, levels)};
    }
    default: {  // int8: a maximum, the same in any order
      const float max_abs = lane_reduce<float>(
          values, count, [&](float x) { return std::fabs(x * factor); }, [](float a, float b) { return a < b ? b : a; });
      return {c, value_scale_of(format, max_abs, 0.0, 0.0, m, levels)};
    }
  }
}

}  // namespace

struct CpuCompressor::Chunk {
  size_t begin = 0, end = 0;
  size_t out_begin = 0;   // candidates are written at cand_*[out_begin ..)
  size_t candidates = 0;
  uint32_t non_finite = 0;
  double sum = 0, sum_sq = 0;
};

CpuCompressor::CpuCompressor(size_t n, SelectionParams params, ErrorFeedbackMode mode)
    : CpuCompressor(n, CompressorOptions{.selection = params, .error_feedback = mode}) {}

CpuCompressor::CpuCompressor(size_t n, const CompressorOptions& options)
    : options_(options), n_(n), residual_(n, 0.0f), acc_(n, 0.0f) {
  auto& p = options_.selection;
  if (p.method == Method::kDense) p.k = n;
  p.k = std::min(p.k, n);
  if (options_.momentum != 0.0f) {
    momentum_.assign(n, 0.0f);
    momentum_next_.assign(n, 0.0f);
  }
  if (options_.error_feedback == ErrorFeedbackMode::kHessianDiag) hessian_factor_.assign(n, 1.0f);
  int threads = options_.threads > 0 ? options_.threads : static_cast<int>(std::thread::hardware_concurrency());
  threads = std::max(1, std::min<int>(threads, static_cast<int>((n + kChunkAlign - 1) / kChunkAlign)));
  chunks_.resize(static_cast<size_t>(threads));
  const size_t units = (n + kChunkAlign - 1) / kChunkAlign;
  for (size_t t = 0; t < chunks_.size(); ++t) {
    chunks_[t].begin = std::min(n, units * t / chunks_.size() * kChunkAlign);
    chunks_[t].end = std::min(n, units * (t + 1) / chunks_.size() * kChunkAlign);
    // The AVX2 pass stores 8 lanes past its last candidate: a gap of
    // kCandidatePad between the chunks' regions keeps them apart.
    chunks_[t].out_begin = chunks_[t].begin + kCandidatePad * t;
  }
  // new[] without () leaves the memory untouched, so unused pages cost nothing.
  cand_index_.reset(new uint32_t[n + kCandidatePad * (chunks_.size() + 1)]);
  cand_value_.reset(new uint32_t[n + kCandidatePad * (chunks_.size() + 1)]);
  avx2_pass_ = use_avx2_pass();
  if (threads > 1) pool_ = std::make_unique<ThreadPool>(threads);
}

CpuCompressor::~CpuCompressor() = default;

void CpuCompressor::set_k(size_t k) {
  if (options_.selection.method == Method::kDense) return;
  options_.selection.k = std::min(k, n_);
}

Result<size_t> CpuCompressor::set_hessian_diag(std::span<const float> h, float gamma) {
  if (options_.error_feedback != ErrorFeedbackMode::kHessianDiag)
    return failed_precondition("set_hessian_diag needs error_feedback: hessian_diag");
  if (h.size() != n_) return invalid_argument(fmt::format("Hessian diagonal has {} entries, expected {}", h.size(), n_));
  size_t clamped = 0;
  for (size_t i = 0; i < n_; ++i) {
    float t = gamma * h[i];
    if (!(t >= 0.0f)) {  // negative (or NaN): no compensation beyond classic EF
      t = 0.0f;
      ++clamped;
    } else if (t > 1.0f) {
      t = 1.0f;
      ++clamped;
    }
    hessian_factor_[i] = 1.0f - t;
  }
  return clamped;
}

Status CpuCompressor::set_residual(std::span<const float> residual) {
  if (residual.size() != n_)
    return invalid_argument(fmt::format("residual has {} entries, expected {}", residual.size(), n_));
  std::copy(residual.begin(), residual.end(), residual_.begin());
  return {};
}

Status CpuCompressor::set_momentum(std::span<const float> momentum) {
  SPS_RETURN_IF_ERROR(check_set_momentum(n_, options_.momentum, momentum));
  std::copy(momentum.begin(), momentum.end(), momentum_.begin());
  return {};
}

Status CpuCompressor::scale_residual(float factor) {
  if (!(factor > 0.0f) || !std::isfinite(factor))
    return invalid_argument(fmt::format("scale_residual: the factor must be finite and > 0, got {}", factor));
  if (options_.error_feedback == ErrorFeedbackMode::kNone) return {};
  // Checked first, so a failure changes nothing.
  for (float x : residual_)
    if (!std::isfinite(x * factor))
      return invalid_argument(fmt::format("scale_residual: the residual overflows when scaled by {}", factor));
  for (float& x : residual_) x *= factor;
  return {};
}

Status CpuCompressor::undo_send(std::span<const uint32_t> indices, std::span<const float> values) {
  SPS_RETURN_IF_ERROR(check_undo_send(n_, indices, values));
  if (options_.error_feedback == ErrorFeedbackMode::kNone) return {};
  // Checked before anything is written, so a failure changes nothing.
  for (size_t j = 0; j < indices.size(); ++j)
    if (!std::isfinite(residual_[indices[j]] + values[j]))
      return invalid_argument(
          fmt::format("undo_send: residual + value at index {} is not finite; nothing was changed", indices[j]));
  for (size_t j = 0; j < indices.size(); ++j) residual_[indices[j]] += values[j];
  return {};
}

double CpuCompressor::residual_norm_sq() const {
  if (options_.error_feedback == ErrorFeedbackMode::kNone) return 0.0;
  double s = 0;
  for (float r : residual_) s += double{r} * r;
  return s;
}

uint32_t CpuCompressor::predicted_candidate_bits() const {
  const Method m = options_.selection.method;
  if (m == Method::kThreshold) return magnitude_bits(options_.selection.lambda);
  if ((m == Method::kTopK || m == Method::kGaussianK) && options_.selection.k < n_) return next_cand_bits_;
  return kNoCandidates;
}

void CpuCompressor::first_pass(std::span<const float> grad, float grad_factor, float scale, uint32_t candidate_bits) {
  const ErrorFeedbackMode mode = options_.error_feedback;
  const bool with_momentum = !momentum_.empty();
  const bool with_moments = options_.selection.method == Method::kGaussianK;  // gaussiank only
  const bool avx2 = avx2_pass_;
  auto run_chunk = [&](Chunk& chunk, auto mode_tag, auto momentum_tag, auto moments_tag) {
    constexpr int kMode = decltype(mode_tag)::value;
    constexpr bool kMomentum = decltype(momentum_tag)::value;
    constexpr bool kMoments = decltype(moments_tag)::value;
    const PassArgs args{residual_.data(),
                        grad.data(),
                        hessian_factor_.data(),
                        momentum_.data(),
                        momentum_next_.data(),
                        acc_.data(),
                        cand_index_.get(),
                        cand_value_.get(),
                        grad_factor,
                        scale,
                        options_.momentum,
                        candidate_bits,
                        chunk.begin,
                        chunk.end,
                        chunk.out_begin};
    PassResult result{};
#if defined(SPS_HAVE_AVX2_PASS)
    if (avx2) {
      result = pass_avx2::run_pass<kMode, kMomentum, kMoments>(args);
    } else {
      result = pass_baseline::run_pass<kMode, kMomentum, kMoments>(args);
    }
#else
    (void)avx2;
    result = pass_baseline::run_pass<kMode, kMomentum, kMoments>(args);
#endif
    chunk.candidates = result.candidates;
    chunk.non_finite = result.non_finite;
    chunk.sum = result.sum;
    chunk.sum_sq = result.sum_sq;
  };
  auto dispatch = [&](Chunk& chunk) {
    using F = std::false_type;
    using T = std::true_type;
    auto by_mode = [&](auto mode_tag) {
      if (with_momentum) {
        return with_moments ? run_chunk(chunk, mode_tag, T{}, T{}) : run_chunk(chunk, mode_tag, T{}, F{});
      }
      return with_moments ? run_chunk(chunk, mode_tag, F{}, T{}) : run_chunk(chunk, mode_tag, F{}, F{});
    };
    switch (mode) {
      case ErrorFeedbackMode::kNone: return by_mode(std::integral_constant<int, 0>{});
      case ErrorFeedbackMode::kEf: return by_mode(std::integral_constant<int, 1>{});
      case ErrorFeedbackMode::kHessianDiag: return by_mode(std::integral_constant<int, 2>{});
    }
  };
  if (pool_) {
    pool_->run([&](int t) { dispatch(chunks_[static_cast<size_t>(t)]); });
  } else {
    for (auto& chunk : chunks_) dispatch(chunk);
  }

  // Join the chunks' candidates (each chunk wrote from its own begin).
  cand_count_ = 0;
  sum_ = sum_sq_ = 0;
  for (const auto& chunk : chunks_) {
    if (chunk.out_begin != cand_count_ && chunk.candidates > 0) {
      std::memmove(cand_index_.get() + cand_count_, cand_index_.get() + chunk.out_begin, chunk.candidates * 4);
      std::memmove(cand_value_.get() + cand_count_, cand_value_.get() + chunk.out_begin, chunk.candidates * 4);
    }
    cand_count_ += chunk.candidates;
    sum_ += chunk.sum;
    sum_sq_ += chunk.sum_sq;
  }
  cand_bits_ = candidate_bits;
  cand_zeroed_ = candidate_bits != kNoCandidates;
  cand_histogram_valid_ = false;
}

Status CpuCompressor::compress(std::span<const float> grad, float scale, SparseVector& out, uint64_t step) {
  if (grad.size() != n_)
    return invalid_argument(fmt::format("gradient has {} entries, the model has {}", grad.size(), n_));
  out.clear();
  stats_ = {};
  float grad_factor = 1.0f;
  if (options_.clip_norm > 0) {
    double sq = 0;
    for (float x : grad) sq += double{x} * x;
    const double norm = std::sqrt(sq);
    if (norm > options_.clip_norm) grad_factor = static_cast<float>(options_.clip_norm / norm);
  }

  uint32_t candidate_bits = predicted_candidate_bits();
  if (options_.selection.method == Method::kSampled && options_.selection.k > 0 && options_.selection.k < n_) {
    // DGC's sample is taken first, straight from the inputs (the same
    // arithmetic as the pass), so the pass can collect candidates for it.
    const SampleLayout layout = sampled_layout(n_, options_.selection.k, options_.selection.seed, step);
    auto& sample = topk_.magnitudes;
    sample.clear();
    const float m = options_.momentum;
    // Scattered reads (one cache line per entry): fetch 16 entries ahead.
    const size_t ahead = 16 * layout.stride;
    for (size_t i = layout.start; i < n_; i += layout.stride) {
      if (i + ahead < n_) {
        __builtin_prefetch(grad.data() + i + ahead);
        __builtin_prefetch(residual_.data() + i + ahead);
      }
      float x = grad[i] * grad_factor;
      if (!momentum_.empty()) x = m * momentum_[i] + x;
      float a = scale * x;
      if (options_.error_feedback == ErrorFeedbackMode::kEf) a = residual_[i] + scale * x;
      if (options_.error_feedback == ErrorFeedbackMode::kHessianDiag) a = hessian_factor_[i] * residual_[i] + scale * x;
      sample.push_back(magnitude_bits(a));
    }
    const double rho = static_cast<double>(options_.selection.k) / static_cast<double>(n_);
    const size_t top = std::max<size_t>(1, static_cast<size_t>(std::ceil(rho * static_cast<double>(sample.size()))));
    auto sampled_magnitude = [&](size_t j) { return sample[j]; };
    fill_histogram(sample.size(), sampled_magnitude, rank_histogram_);
    stats_.threshold = std::bit_cast<float>(
        rank_in_histogram(sample.size(), top, sampled_magnitude, rank_histogram_, topk_.boundary, nullptr));
    // Usually the first round stands; after steps that lowered it, collect
    // as far down as they went.
    candidate_bits = magnitude_bits(static_cast<float>(stats_.threshold) * sampled_margin_);
  }

  first_pass(grad, grad_factor, scale, candidate_bits);
  stats_.candidates = cand_count_;
  sel_.clear();
  sel_all_ = false;
  from_candidates_ = false;
  bool bad = false;
  for (const auto& c : chunks_) bad = bad || c.non_finite != 0;
  if (bad) {
    restore_candidates();
    size_t i = 0;
    while (i < n_ && std::isfinite(acc_[i])) ++i;
    return invalid_argument(fmt::format(
        "non-finite value at index {} (gradient {}, residual {}); refusing to compress it", i,
        i < n_ ? grad[i] : 0.0f, i < n_ ? residual_[i] : 0.0f));
  }

  bool dense = false;
  switch (options_.selection.method) {
    case Method::kDense:
      out.indices.resize(n_);
      std::iota(out.indices.begin(), out.indices.end(), 0u);
      // acc becomes the values without a copy; the buffer acc gets back is
      // zero-filled, which is already the f32 residual (all was sent).
      out.values.swap(acc_);
      acc_.resize(n_);
      dense = true;
      break;
    case Method::kTopK: select_topk(out); break;
    case Method::kThreshold: select_threshold(out); break;
    case Method::kGaussianK: select_gaussiank(out); break;
    case Method::kRandomK:
      randomk_indices(n_, options_.selection.k, options_.selection.seed, step, out.indices, random_bitmap_);
      out.values.resize(out.indices.size());
      for (size_t j = 0; j < out.indices.size(); ++j) out.values[j] = acc_[out.indices[j]];
      break;
    case Method::kSampled:
      if (options_.selection.k >= n_) {
        out.indices.resize(n_);
        std::iota(out.indices.begin(), out.indices.end(), 0u);
        out.values.assign(acc_.begin(), acc_.end());
      } else if (options_.selection.k > 0) {
        select_sampled(out);
      }
      break;
  }
  if (cand_zeroed_ && !from_candidates_) restore_candidates();  // e.g. k = 0: nothing selected
  stats_.nnz = out.size();
  if (stats_.predicted) {
    ++predicted_steps_;
  } else if (cand_bits_ != kNoCandidates) {
    ++fallback_steps_;
  }

  // What is sent, after optional unbiased scaling and value rounding; the
  // rounding error stays in the residual. Momentum masking zeroes u at S.
  const bool keep_residual = options_.error_feedback != ErrorFeedbackMode::kNone;
  const ValueFormat format = options_.values;
  const bool unbiased = options_.selection.method == Method::kRandomK && options_.selection.randomk_unbiased &&
                        options_.selection.k > 0;
  const float factor =
      unbiased ? static_cast<float>(static_cast<double>(n_) / static_cast<double>(options_.selection.k)) : 1.0f;
  // Scaled formats: one scale per bucket of quant_bucket consecutive
  // selected values (after the n/k scaling), or one over them all.
  const size_t m = out.values.size();
  const size_t bucket = is_scaled(format) && options_.quant_bucket > 0 ? options_.quant_bucket : std::max<size_t>(m, 1);
  if (is_scaled(format)) {
    for (size_t b = 0; b < m; b += bucket)
      out.scale_runs.push_back(
          bucket_scale(format, out.values.data() + b, std::min(m, b + bucket) - b, factor, options_.qsgd_levels));
  }
  stats_.value_scale = out.scale_runs.empty() ? 0.0f : out.scale_runs[0].scale;
  stats_.value_negative_scale = out.scale_runs.empty() ? 0.0f : out.scale_runs[0].negative_scale;
  const uint64_t seed = options_.selection.seed;
  // Entry j of the selection (index i) as sent; j ascends, so the bucket
  // (and its scale) is looked up once per bucket.
  size_t bucket_end = 0;
  float value_scale = 0.0f, negative_scale = 0.0f;
  auto send = [&](float v, size_t j, uint32_t i) {
    if (!is_scaled(format)) return quantise(v, format);
    if (j >= bucket_end) {
      value_scale = out.scale_runs[j / bucket].scale;
      negative_scale = out.scale_runs[j / bucket].negative_scale;
      bucket_end = (j / bucket + 1) * bucket;
    }
    if (format == ValueFormat::kOneBit) return onebit_sent(v < 0.0f, value_scale, negative_scale);
    const uint32_t random = format == ValueFormat::kQsgd ? quant_random24(seed, step, i) : 0u;
    return dequantise(quant_level(v, format, value_scale, random), value_scale);
  };
  if (dense) {
    // acc is all zeros; the residual is what rounding lost (nothing in f32).
    if (is_scaled(format)) {
      for (size_t r = 0; r < out.scale_runs.size(); ++r) {
        float* const values = out.values.data() + r * bucket;
        const size_t count = out.scale_runs[r].count;
        float* const lost = keep_residual ? acc_.data() + r * bucket : nullptr;
#if defined(SPS_HAVE_AVX2_PASS)
        if (avx2_pass_) {
          if (keep_residual)
            pass_avx2::quantise_bucket<true>(format, out.scale_runs[r], values, lost, count, seed, step, r * bucket);
          else
            pass_avx2::quantise_bucket<false>(format, out.scale_runs[r], values, lost, count, seed, step, r * bucket);
          continue;
        }
#endif
        if (keep_residual)
          pass_baseline::quantise_bucket<true>(format, out.scale_runs[r], values, lost, count, seed, step, r * bucket);
        else
          pass_baseline::quantise_bucket<false>(format, out.scale_runs[r], values, lost, count, seed, step, r * bucket);
      }
    } else if (format != ValueFormat::kF32) {
      round_to_half(format, out.values.data(), keep_residual ? acc_.data() : nullptr, m);
    }
    if (!momentum_next_.empty()) std::fill(momentum_next_.begin(), momentum_next_.end(), 0.0f);
  } else if (cand_zeroed_) {
    // acc holds 0 at every candidate. The selected ones' residual is
    // v - sent (0 for f32), kept in the candidate list; then every
    // candidate's value goes back in one ascending sweep. For the hard
    // threshold in f32 (all candidates sent, residual 0) nothing is written.
    uint32_t* cv = cand_value_.get();
    for (size_t j = 0; j < out.indices.size(); ++j) {
      const size_t p = sel_all_ ? j : sel_[j];
      const float v = out.values[j];
      const float sent = send(v, j, out.indices[j]);
      out.values[j] = sent;
      cv[p] = std::bit_cast<uint32_t>(v - sent);
    }
    if (keep_residual && format == ValueFormat::kF32) {
      // The sent ones already hold their residual, 0: write the others only.
      if (!sel_all_) restore_unselected();
    } else if (keep_residual) {
      restore_candidates();
    }
    cand_zeroed_ = false;
    if (!momentum_next_.empty())
      for (uint32_t i : out.indices) momentum_next_[i] = 0.0f;
  } else {
    for (size_t j = 0; j < out.indices.size(); ++j) {
      const uint32_t i = out.indices[j];
      const float v = unbiased ? out.values[j] * factor : out.values[j];
      const float sent = send(v, j, i);
      out.values[j] = sent;
      if (keep_residual) acc_[i] = acc_[i] - sent;
      if (!momentum_next_.empty()) momentum_next_[i] = 0.0f;
    }
  }
  if (keep_residual) residual_.swap(acc_);
  if (!momentum_.empty()) momentum_.swap(momentum_next_);
  return {};
}

void CpuCompressor::restore_candidates() {
  if (!cand_zeroed_) return;
  const uint32_t* ci = cand_index_.get();
  const uint32_t* cv = cand_value_.get();
  float* acc = acc_.data();
  for (size_t j = 0; j < cand_count_; ++j) acc[ci[j]] = std::bit_cast<float>(cv[j]);
  cand_zeroed_ = false;
}

void CpuCompressor::restore_unselected() {
  const uint32_t* ci = cand_index_.get();
  const uint32_t* cv = cand_value_.get();
  float* acc = acc_.data();
  size_t next = 0;
  for (size_t s = 0; s <= sel_.size(); ++s) {
    const size_t stop = s < sel_.size() ? sel_[s] : cand_count_;
    for (size_t j = next; j < stop; ++j) acc[ci[j]] = std::bit_cast<float>(cv[j]);
    next = stop + 1;
  }
}

void CpuCompressor::emit_selected(SparseVector& out) {
  from_candidates_ = true;
  const uint32_t* ci = cand_index_.get();
  const uint32_t* cv = cand_value_.get();
  const size_t count = sel_all_ ? cand_count_ : sel_.size();
  out.indices.resize(count);
  out.values.resize(count);
  for (size_t j = 0; j < count; ++j) {
    const size_t p = sel_all_ ? j : sel_[j];
    out.indices[j] = ci[p];
    out.values[j] = std::bit_cast<float>(cv[p]);
  }
}

void CpuCompressor::recollect(uint32_t bits) {
  restore_candidates();
  size_t count = 0;
  for (size_t i = 0; i < n_; ++i) {
    const uint32_t v = std::bit_cast<uint32_t>(acc_[i]);
    cand_index_[count] = static_cast<uint32_t>(i);
    cand_value_[count] = v;
    count += (v & 0x7FFFFFFFu) >= bits ? 1 : 0;
  }
  cand_count_ = count;
  cand_bits_ = bits;
  cand_histogram_valid_ = false;
}

void CpuCompressor::candidates_at_least(uint32_t bits, std::vector<uint32_t>& positions) const {
  positions.resize(cand_count_);
  const uint32_t* cv = cand_value_.get();
  size_t count = 0;
  for (size_t j = 0; j < cand_count_; ++j) {
    positions[count] = static_cast<uint32_t>(j);
    count += (cv[j] & 0x7FFFFFFFu) >= bits ? 1 : 0;
  }
  positions.resize(count);
}

size_t CpuCompressor::count_candidates_at_least(uint32_t bits) const {
  const uint32_t* cv = cand_value_.get();
  size_t count = 0;
  for (size_t j = 0; j < cand_count_; ++j) count += (cv[j] & 0x7FFFFFFFu) >= bits ? 1 : 0;
  return count;
}

std::pair<size_t, size_t> CpuCompressor::count_bounds(uint32_t bits) {
  const auto& h = candidate_histogram();
  const size_t b = bits >> kRankShift;
  if (b >= h.size()) return {0, 0};  // bits above every finite magnitude's bucket
  size_t above = 0;
  for (size_t j = h.size(); --j > b;) above += h[j];
  const bool edge = (bits & ((1u << kRankShift) - 1)) == 0;
  return edge ? std::pair{above + h[b], above + h[b]} : std::pair{above, above + h[b]};
}

const std::vector<uint32_t>& CpuCompressor::candidate_histogram() {
  if (!cand_histogram_valid_) {
    const uint32_t* cv = cand_value_.get();
    fill_histogram(cand_count_, [&](size_t j) { return cv[j] & 0x7FFFFFFFu; }, cand_histogram_);
    cand_histogram_valid_ = true;
  }
  return cand_histogram_;
}

uint32_t CpuCompressor::keep_largest(size_t keep, std::vector<uint32_t>& kept) {
  const uint32_t* cv = cand_value_.get();
  const size_t count = cand_count_;
  kept.clear();
  if (keep >= count) {
    uint32_t low = UINT32_MAX;
    kept.resize(count);
    for (size_t j = 0; j < count; ++j) {
      kept[j] = static_cast<uint32_t>(j);
      low = std::min(low, cv[j] & 0x7FFFFFFFu);
    }
    return low;
  }
  size_t greater = 0;
  const uint32_t t = candidate_rank(keep, &greater);
  size_t ties_left = keep - greater;
  kept.resize(keep);
  size_t o = 0;
  for (size_t j = 0; j < count; ++j) {
    const uint32_t m = cv[j] & 0x7FFFFFFFu;
    // Branch-free (bitwise, not ||): whether a candidate is kept is a coin
    // flip, and a branch would mispredict on half of them.
    const size_t tie = static_cast<size_t>(m == t) & static_cast<size_t>(ties_left != 0);
    kept[o] = static_cast<uint32_t>(j);
    o += static_cast<size_t>(m > t) | tie;
    ties_left -= tie;
    if (o == keep) break;
  }
  return t;
}

uint32_t CpuCompressor::candidate_rank(size_t rank, size_t* greater) {
  const uint32_t* cv = cand_value_.get();
  return rank_in_histogram(
      cand_count_, rank, [&](size_t j) { return cv[j] & 0x7FFFFFFFu; }, candidate_histogram(), topk_.boundary,
      greater);
}

uint32_t CpuCompressor::candidate_rank_floor(size_t rank) {
  return static_cast<uint32_t>(bucket_of_rank(candidate_histogram(), rank).first) << kRankShift;
}

void CpuCompressor::select_topk(SparseVector& out) {
  const size_t k = options_.selection.k;
  if (k == 0) return;
  const auto spare_count = static_cast<size_t>(spare_ * static_cast<double>(k));
  uint32_t low = 0;
  if (candidates_valid() && cand_count_ >= k) {
    // Every entry at or above the k-th largest magnitude is a candidate, so
    // the top-k of the candidates (ties to the smaller index) is the answer.
    stats_.predicted = true;
    low = keep_largest(k, sel_);
    emit_selected(out);
    // Next time collect about spare_ * k: the magnitude of that rank now
    // (thresholds drift slowly between steps).
    next_cand_bits_ = cand_count_ > spare_count && spare_count > k ? candidate_rank_floor(spare_count)
                                                                   : cand_bits_;
    spare_ = std::max(1.25, spare_ * 0.9);
  } else {
    if (candidates_valid()) spare_ = std::min(8.0, spare_ * 2.0);
    restore_candidates();
    topk_select(acc_, k, out, topk_);
    low = UINT32_MAX;
    for (float v : out.values) low = std::min(low, magnitude_bits(v));
    next_cand_bits_ = bits_at_rank(std::max(k, spare_count));
  }
  stats_.threshold = out.size() > 0 ? std::bit_cast<float>(low) : 0.0;
}

uint32_t CpuCompressor::bits_at_rank(size_t rank) const {
  // From topk_select's magnitude histogram: the lower edge of the bucket
  // holding the rank-th largest, so at least `rank` entries lie at or above.
  const auto& h = topk_.histogram;
  if (h.empty()) return kNoCandidates;
  size_t seen = 0;
  for (size_t b = h.size(); b-- > 0;) {
    seen += h[b];
    if (seen >= rank) return static_cast<uint32_t>(b) << kTopKBucketShift;
  }
  return 0;
}

void CpuCompressor::select_threshold(SparseVector& out) {
  // The candidates are exactly { |acc| >= lambda }, in index order.
  stats_.predicted = true;
  stats_.threshold = options_.selection.lambda;
  const size_t cap = options_.selection.max_nnz;
  if (cap > 0 && cand_count_ > cap) {
    stats_.threshold = std::bit_cast<float>(keep_largest(cap, sel_));
  } else {
    sel_all_ = true;
  }
  emit_selected(out);
}

// More than 4k/3 candidates settle "too many" without a scan; a margin over
// that absorbs the threshold's drift between steps. Every unsent candidate
// is written back to the residual, so the margin costs a random write each.
constexpr double kGaussianKSpareFloor = 1.5;

void CpuCompressor::select_gaussiank(SparseVector& out) {
  // Shi et al.'s estimate, then the sps correction (docs/kernels.md): up to
  // 4 rounds, recounting after every adjustment; too many -> the exact top
  // ceil(4k/3); too few after 4 rounds -> exact top-k.
  //
  // A count at t only decides "< 2k/3", "> 4k/3" or "in the band". Counts
  // above the candidate threshold come from the candidates; below it, every
  // candidate passes, so when there are more than 4k/3 candidates the
  // answer is "too many" without looking at acc. The next step collects
  // about spare_ * k candidates (spare_ >= kGaussianKSpareFloor, doubled
  // after a miss) so that this is the usual case.
  const size_t n = n_;
  const size_t k_int = options_.selection.k;
  if (k_int == 0) return;
  if (k_int >= n) {
    restore_candidates();
    out.indices.resize(n);
    std::iota(out.indices.begin(), out.indices.end(), 0u);
    out.values.assign(acc_.begin(), acc_.end());
    return;
  }
  const double k = static_cast<double>(k_int);
  const auto cap = static_cast<size_t>(std::ceil(4.0 * k / 3.0));
  const double mean = sum_ / static_cast<double>(n);
  const double var = n > 1 ? std::max(0.0, (sum_sq_ - sum_ * mean) / static_cast<double>(n - 1)) : 0.0;
  const double ratio = k / static_cast<double>(n);
  double thr = mean + std::sqrt(var) * normal_two_sided_quantile(ratio);
  bool full_pass = false;
  // |acc| > t is magnitude bits > bits(t), i.e. >= bits(t) + 1, for t >= 0.
  auto above_bits = [](float t) { return std::bit_cast<uint32_t>(t) + 1; };
  auto covered = [&](float t) { return t >= 0 && candidates_valid() && above_bits(t) >= cand_bits_; };
  // Counts only decide below / in / above the band: the histogram's bounds
  // settle most without a scan.
  auto band = [&](size_t c) {
    const auto cd = static_cast<double>(c);
    return cd < 2.0 * k / 3.0 ? -1 : (cd > 4.0 * k / 3.0 ? 1 : 0);
  };
  auto count = [&](double td) -> size_t {
    const auto t = static_cast<float>(td);
    if (covered(t)) {
      const auto [low, high] = count_bounds(above_bits(t));
      return band(low) == band(high) ? low : count_candidates_at_least(above_bits(t));
    }
    // Every candidate passes: a lower bound that settles "too many".
    if (candidates_valid() && band(cand_count_) > 0) return cand_count_;
    restore_candidates();
    full_pass = true;
    size_t c = 0;
    for (float a : acc_) c += (std::fabs(a) > t) ? 1 : 0;
    return c;
  };
  size_t c = count(thr);
  int rounds = 1;
  while (rounds < 4 && band(c) != 0) {
    thr *= band(c) < 0 ? 0.5 : 1.5;
    c = count(thr);
    ++rounds;
  }
  stats_.rounds = rounds;
  stats_.threshold = thr;
  const auto tf = static_cast<float>(thr);
  if (band(c) < 0) {
    // Far from Gaussian (e.g. a spike at zero with a heavy tail: sigma is
    // dominated by the tail and the estimate stays far too high). Accepting
    // would send almost nothing while the residual grows, so fall back to
    // the exact top-k: the band [2k/3, 4k/3] always holds.
    stats_.fallback = true;
    uint32_t low = UINT32_MAX;
    if (candidates_valid() && cand_count_ >= k_int) {
      low = keep_largest(k_int, sel_);
      emit_selected(out);
    } else {
      restore_candidates();
      full_pass = true;
      topk_select(acc_, k_int, out, topk_);
      for (float v : out.values) low = std::min(low, magnitude_bits(v));
    }
    stats_.threshold = out.size() > 0 ? std::bit_cast<float>(low) : 0.0;
  } else if (covered(tf)) {
    candidates_at_least(above_bits(tf), positions_);
    if (positions_.size() > cap) {
      // positions_ holds every candidate at or above a magnitude, more than
      // cap of them: its top cap are all the candidates' top cap.
      keep_largest(cap, sel_);
    } else {
      sel_.swap(positions_);
    }
    emit_selected(out);
  } else if (tf >= 0 && candidates_valid() && cand_count_ >= cap) {
    // Everything above tf includes every candidate, at least cap of them:
    // its top cap are the candidates' top cap.
    keep_largest(cap, sel_);
    emit_selected(out);
  } else {
    recollect(tf >= 0 ? above_bits(tf) : 0);
    full_pass = true;
    if (cand_count_ > cap) {
      keep_largest(cap, sel_);
    } else {
      sel_all_ = true;
    }
    emit_selected(out);
  }
  stats_.predicted = !full_pass;
  // Next step: collect about spare_ * k, or below this step's threshold
  // when the candidates were too few to tell.
  spare_ = full_pass ? std::min(8.0, spare_ * 2.0) : std::max(kGaussianKSpareFloor, spare_ * 0.9);
  const auto spare_count = static_cast<size_t>(spare_ * k);
  if (!full_pass && cand_count_ >= spare_count && spare_count > 0) {
    next_cand_bits_ = candidate_rank_floor(spare_count);
  } else if (!full_pass) {
    next_cand_bits_ = magnitude_bits(std::bit_cast<float>(cand_bits_) * 0.95f);
  } else {
    const double low = stats_.fallback ? stats_.threshold : thr;
    next_cand_bits_ = magnitude_bits(static_cast<float>(low * 0.8));
  }
}

void CpuCompressor::select_sampled(SparseVector& out) {
  // DGC's sampled threshold (ALGORITHMS.md 2.5), the sample taken before the
  // pass: lower it by 0.8x while too few pass (at most 10 rounds), cut too
  // many to the exact top-k (> 1.3k) or to the first k in index order.
  // Counts at or above the candidate threshold come from the candidates;
  // below it every candidate passes, which settles "not too few" when there
  // are at least 0.8k of them.
  const size_t k = options_.selection.k;
  const double kd = static_cast<double>(k);
  const float first = static_cast<float>(stats_.threshold);
  float thr = first;
  int rounds = 0;
  bool full_pass = false;
  size_t c = 0;
  while (true) {
    ++rounds;
    const uint32_t tb = magnitude_bits(thr);
    if (candidates_valid() && tb >= cand_bits_) {
      // Only "fewer than 0.8k" matters: the histogram's bounds settle most.
      const auto [low, high] = count_bounds(tb);
      const bool settled = (static_cast<double>(low) < 0.8 * kd) == (static_cast<double>(high) < 0.8 * kd);
      c = settled ? low : count_candidates_at_least(tb);
    } else if (candidates_valid() && static_cast<double>(cand_count_) >= 0.8 * kd) {
      c = cand_count_;  // a lower bound, enough to stop lowering
    } else {
      restore_candidates();
      full_pass = true;
      c = 0;
      for (float a : acc_) c += magnitude_bits(a) >= tb ? 1 : 0;
    }
    if (static_cast<double>(c) < 0.8 * kd && rounds < 10 && thr > 0) {
      thr *= 0.8f;
      continue;
    }
    break;
  }
  stats_.rounds = rounds;
  stats_.threshold = thr;
  const uint32_t tb = magnitude_bits(thr);
  if (candidates_valid() && tb >= cand_bits_) {
    candidates_at_least(tb, positions_);
    if (static_cast<double>(positions_.size()) > 1.3 * kd) {
      keep_largest(k, sel_);  // as in gaussiank: the candidates' top k
    } else {
      positions_.resize(std::min(k, positions_.size()));
      sel_.swap(positions_);
    }
  } else if (candidates_valid() && static_cast<double>(cand_count_) > 1.3 * kd) {
    // More than 1.3k pass (every candidate does): their top k are the
    // candidates' top k.
    keep_largest(k, sel_);
  } else {
    recollect(tb);
    full_pass = true;
    if (static_cast<double>(cand_count_) > 1.3 * kd) {
      keep_largest(k, sel_);
    } else {
      sel_.resize(std::min(k, cand_count_));
      std::iota(sel_.begin(), sel_.end(), 0u);
    }
  }
  emit_selected(out);
  stats_.predicted = !full_pass;
  // Next step collects from as far below its sampled threshold as this one
  // went (creeping back up while the first round stands).
  const float needed = first > 0 ? thr / first : 1.0f;
  sampled_margin_ = std::min(needed, std::min(1.0f, sampled_margin_ * 1.05f));
}

}  // namespace sps::kernels
