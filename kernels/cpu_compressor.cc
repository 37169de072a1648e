#include "kernels/cpu_compressor.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <functional>
#include <numeric>
#include <thread>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <fmt/format.h>

#include "kernels/thread_pool.h"

namespace sps::kernels {
namespace {

inline uint32_t magnitude_bits(float x) { return std::bit_cast<uint32_t>(x) & 0x7FFFFFFFu; }
// 1 when the exponent is all ones (Inf or NaN), else 0; branch-free.
inline uint32_t non_finite(uint32_t m) { return ((m & 0x7F800000u) + 0x00800000u) >> 31; }
// Bits no magnitude reaches: collect no candidates.
constexpr uint32_t kNoCandidates = 0xFFFFFFFFu;

// The first pass works in lanes of 16 (vectorisable) inside blocks of 256,
// whose moments fold into doubles; threads split n at multiples of
// kChunkAlign, so every sum is formed in the same order for any thread count.
constexpr size_t kLanes = 16;
constexpr size_t kBlock = 256;
constexpr size_t kChunkAlign = size_t{1} << 16;

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

}  // namespace

struct CpuCompressor::Chunk {
  size_t begin = 0, end = 0;
  size_t candidates = 0;  // written at cand_*[begin ..)
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
  // new[] without () leaves the memory untouched, so unused pages cost nothing.
  cand_index_.reset(new uint32_t[n + 1]);
  cand_mag_.reset(new uint32_t[n + 1]);
  int threads = options_.threads > 0 ? options_.threads : static_cast<int>(std::thread::hardware_concurrency());
  threads = std::max(1, std::min<int>(threads, static_cast<int>((n + kChunkAlign - 1) / kChunkAlign)));
  chunks_.resize(static_cast<size_t>(threads));
  const size_t units = (n + kChunkAlign - 1) / kChunkAlign;
  for (size_t t = 0; t < chunks_.size(); ++t) {
    chunks_[t].begin = std::min(n, units * t / chunks_.size() * kChunkAlign);
    chunks_[t].end = std::min(n, units * (t + 1) / chunks_.size() * kChunkAlign);
  }
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
  auto run_chunk = [&](Chunk& chunk, auto mode_tag, auto momentum_tag, auto moments_tag) {
    constexpr int kMode = decltype(mode_tag)::value;  // 0 none, 1 ef, 2 hessian_diag
    constexpr bool kMomentum = decltype(momentum_tag)::value;
    constexpr bool kMoments = decltype(moments_tag)::value;  // gaussiank only
    // Distinct buffers: __restrict lets the compiler vectorise without
    // run-time alias checks.
    const float* __restrict r = residual_.data();
    const float* __restrict g = grad.data();
    const float* __restrict c = hessian_factor_.data();
    const float* __restrict u = momentum_.data();
    float* __restrict u_next = momentum_next_.data();
    float* __restrict acc = acc_.data();
    const float m = options_.momentum;
    auto load = [&](size_t i) -> float {
      float x = g[i] * grad_factor;  // * 1.0f when not clipping: exact
      if constexpr (kMomentum) {
        x = m * u[i] + x;
        u_next[i] = x;
      }
      if constexpr (kMode == 0) {
        return scale * x;
      } else if constexpr (kMode == 1) {
        return r[i] + scale * x;
      } else {
        return c[i] * r[i] + scale * x;
      }
    };
    uint32_t* ci = cand_index_.get();
    uint32_t* cm = cand_mag_.get();
    size_t count = chunk.begin;
    uint32_t bad = 0;
    double sum = 0, sum_sq = 0;
    for (size_t block = chunk.begin; block < chunk.end; block += kBlock) {
      const size_t block_end = std::min(chunk.end, block + kBlock);
      float lane_sum[kLanes] = {}, lane_sq[kLanes] = {};
      size_t i = block;
      for (; i + kLanes <= block_end; i += kLanes) {
        uint32_t hit = 0;
        alignas(16) float lane[kLanes];
        for (size_t j = 0; j < kLanes; ++j) {
          const float a = load(i + j);
          lane[j] = a;
          const uint32_t mag = magnitude_bits(a);
          bad |= non_finite(mag);
          hit |= mag >= candidate_bits ? 1u : 0u;
          if constexpr (kMoments) {
            lane_sum[j] += a;
            lane_sq[j] += a * a;
          }
        }
        store_lanes(acc + i, lane);
        if (hit != 0) {
          // Rare by construction: record in index order without branches.
          for (size_t j = 0; j < kLanes; ++j) {
            const uint32_t mag = magnitude_bits(lane[j]);
            ci[count] = static_cast<uint32_t>(i + j);
            cm[count] = mag;
            count += mag >= candidate_bits ? 1 : 0;
          }
        }
      }
      for (size_t j = 0; i < block_end; ++i, ++j) {
        const float a = load(i);
        acc[i] = a;
        const uint32_t mag = magnitude_bits(a);
        bad |= non_finite(mag);
        lane_sum[j] += a;
        lane_sq[j] += a * a;
        ci[count] = static_cast<uint32_t>(i);
        cm[count] = mag;
        count += mag >= candidate_bits ? 1 : 0;
      }
      if constexpr (kMoments) {
        double s = 0, sq = 0;
        for (size_t j = 0; j < kLanes; ++j) {
          s += lane_sum[j];
          sq += lane_sq[j];
        }
        sum += s;
        sum_sq += sq;
      }
    }
#if defined(__SSE2__)
    _mm_sfence();  // streaming stores are weakly ordered: publish them before acc is read
#endif
    chunk.candidates = count - chunk.begin;
    chunk.non_finite = bad;
    chunk.sum = sum;
    chunk.sum_sq = sum_sq;
  };
  const bool with_moments = options_.selection.method == Method::kGaussianK;
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
    if (chunk.begin != cand_count_ && chunk.candidates > 0) {
      std::memmove(cand_index_.get() + cand_count_, cand_index_.get() + chunk.begin, chunk.candidates * 4);
      std::memmove(cand_mag_.get() + cand_count_, cand_mag_.get() + chunk.begin, chunk.candidates * 4);
    }
    cand_count_ += chunk.candidates;
    sum_ += chunk.sum;
    sum_sq_ += chunk.sum_sq;
  }
  cand_bits_ = candidate_bits;
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
  SampleLayout layout;
  float sampled_threshold = 0;
  if (options_.selection.method == Method::kSampled && options_.selection.k > 0 && options_.selection.k < n_) {
    // DGC's sample is taken first, straight from the inputs (the same
    // arithmetic as the pass), so the pass can collect candidates for it.
    layout = sampled_layout(n_, options_.selection.k, options_.selection.seed, step);
    auto& sample = topk_.magnitudes;
    sample.clear();
    const float m = options_.momentum;
    for (size_t i = layout.start; i < n_; i += layout.stride) {
      float x = grad[i] * grad_factor;
      if (!momentum_.empty()) x = m * momentum_[i] + x;
      float a = scale * x;
      if (options_.error_feedback == ErrorFeedbackMode::kEf) a = residual_[i] + scale * x;
      if (options_.error_feedback == ErrorFeedbackMode::kHessianDiag) a = hessian_factor_[i] * residual_[i] + scale * x;
      sample.push_back(magnitude_bits(a));
    }
    const double rho = static_cast<double>(options_.selection.k) / static_cast<double>(n_);
    const size_t top = std::max<size_t>(1, static_cast<size_t>(std::ceil(rho * static_cast<double>(sample.size()))));
    std::nth_element(sample.begin(), sample.begin() + static_cast<std::ptrdiff_t>(top - 1), sample.end(),
                     std::greater<uint32_t>());
    sampled_threshold = std::bit_cast<float>(sample[top - 1]);
    // Room for one 0.8x lowering round inside the candidates (more rounds
    // count over all of acc).
    candidate_bits = magnitude_bits(sampled_threshold * 0.8f);
  }

  first_pass(grad, grad_factor, scale, candidate_bits);
  stats_.candidates = cand_count_;
  bool bad = false;
  for (const auto& c : chunks_) bad = bad || c.non_finite != 0;
  if (bad) {
    size_t i = 0;
    while (i < n_ && std::isfinite(acc_[i])) ++i;
    return invalid_argument(fmt::format(
        "non-finite value at index {} (gradient {}, residual {}); refusing to compress it", i,
        i < n_ ? grad[i] : 0.0f, i < n_ ? residual_[i] : 0.0f));
  }

  switch (options_.selection.method) {
    case Method::kDense:
      out.indices.resize(n_);
      std::iota(out.indices.begin(), out.indices.end(), 0u);
      out.values.assign(acc_.begin(), acc_.end());
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
        stats_.threshold = sampled_threshold;
        select_sampled(step, out);
      }
      break;
  }
  stats_.nnz = out.size();
  if (stats_.predicted) {
    ++predicted_steps_;
  } else if (cand_bits_ != kNoCandidates) {
    ++fallback_steps_;
  }

  // What is sent, after optional unbiased scaling and value rounding; the
  // rounding error stays in the residual. Momentum masking zeroes u at S.
  const bool keep_residual = options_.error_feedback != ErrorFeedbackMode::kNone;
  const bool unbiased = options_.selection.method == Method::kRandomK && options_.selection.randomk_unbiased &&
                        options_.selection.k > 0;
  const float factor =
      unbiased ? static_cast<float>(static_cast<double>(n_) / static_cast<double>(options_.selection.k)) : 1.0f;
  const ValueFormat format = options_.values;
  for (size_t j = 0; j < out.indices.size(); ++j) {
    const uint32_t i = out.indices[j];
    const float v = unbiased ? out.values[j] * factor : out.values[j];
    const float sent = quantise(v, format);
    out.values[j] = sent;
    if (keep_residual) acc_[i] = acc_[i] - sent;
    if (!momentum_next_.empty()) momentum_next_[i] = 0.0f;
  }
  if (keep_residual) residual_.swap(acc_);
  if (!momentum_.empty()) momentum_.swap(momentum_next_);
  return {};
}

uint32_t CpuCompressor::keep_largest_candidates(size_t keep, std::vector<uint32_t>& kept) {
  kept.clear();
  const uint32_t* ci = cand_index_.get();
  const uint32_t* cm = cand_mag_.get();
  if (keep >= cand_count_) {
    kept.assign(ci, ci + cand_count_);
    uint32_t low = UINT32_MAX;
    for (size_t j = 0; j < cand_count_; ++j) low = std::min(low, cm[j]);
    return low;
  }
  auto& mags = topk_.kept;
  mags.assign(cm, cm + cand_count_);
  const auto kth = mags.begin() + static_cast<std::ptrdiff_t>(keep - 1);
  std::nth_element(mags.begin(), kth, mags.end(), std::greater<uint32_t>());
  const uint32_t t = *kth;
  size_t greater = 0;
  for (auto it = mags.begin(); it != kth; ++it) greater += (*it > t) ? 1 : 0;
  size_t ties_left = keep - greater;
  kept.reserve(keep);
  for (size_t j = 0; j < cand_count_; ++j) {
    const uint32_t m = cm[j];
    if (m > t || (m == t && ties_left > 0)) {
      if (m == t) --ties_left;
      kept.push_back(ci[j]);
    }
  }
  return t;
}

void CpuCompressor::select_topk(SparseVector& out) {
  const size_t k = options_.selection.k;
  if (k == 0) return;
  const auto spare_count = static_cast<size_t>(spare_ * static_cast<double>(k));
  uint32_t low = 0;
  if (cand_bits_ != kNoCandidates && cand_count_ >= k) {
    // Every entry at or above the k-th largest magnitude is a candidate, so
    // the top-k of the candidates (ties to the smaller index) is the answer.
    stats_.predicted = true;
    low = keep_largest_candidates(k, kept_);
    out.indices = kept_;
    out.values.resize(out.indices.size());
    for (size_t j = 0; j < out.indices.size(); ++j) out.values[j] = acc_[out.indices[j]];
    // Next time collect about spare_ * k: the magnitude of that rank now
    // (thresholds drift slowly between steps). keep_largest_candidates left
    // the magnitudes below rank k in topk_.kept[k ..).
    auto& mags = topk_.kept;
    if (cand_count_ > spare_count && spare_count > k && mags.size() == cand_count_) {
      const auto nth = mags.begin() + static_cast<std::ptrdiff_t>(spare_count - 1);
      std::nth_element(mags.begin() + static_cast<std::ptrdiff_t>(k), nth, mags.end(), std::greater<uint32_t>());
      next_cand_bits_ = *nth;
    } else {
      next_cand_bits_ = cand_bits_;
    }
    spare_ = std::max(1.25, spare_ * 0.9);
  } else {
    if (cand_bits_ != kNoCandidates) spare_ = std::min(8.0, spare_ * 2.0);
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
    const uint32_t t = keep_largest_candidates(cap, kept_);
    out.indices = kept_;
    stats_.threshold = std::bit_cast<float>(t);
  } else {
    out.indices.assign(cand_index_.get(), cand_index_.get() + cand_count_);
  }
  out.values.resize(out.indices.size());
  for (size_t j = 0; j < out.indices.size(); ++j) out.values[j] = acc_[out.indices[j]];
}

bool CpuCompressor::covered_by_candidates(float t) const {
  // |acc| > t for t >= 0 is magnitude bits > bits(t); the candidates hold
  // every entry with bits >= cand_bits_, which covers it when bits(t) >= cand_bits_.
  return t >= 0 && cand_bits_ != kNoCandidates && std::bit_cast<uint32_t>(t) >= cand_bits_;
}

size_t CpuCompressor::count_above(float t, bool& used_candidates) const {
  if (covered_by_candidates(t)) {
    const uint32_t tb = std::bit_cast<uint32_t>(t);
    size_t c = 0;
    const uint32_t* cm = cand_mag_.get();
    for (size_t j = 0; j < cand_count_; ++j) c += cm[j] > tb ? 1 : 0;
    return c;
  }
  used_candidates = false;
  size_t c = 0;
  for (float a : acc_) c += (std::fabs(a) > t) ? 1 : 0;
  return c;
}

void CpuCompressor::select_gaussiank(SparseVector& out) {
  // Shi et al.'s estimate, then the sps correction (docs/kernels.md): up to
  // 4 rounds, recounting after every adjustment; too many -> the exact top
  // ceil(4k/3) of the candidates; too few after 4 rounds -> exact top-k.
  const size_t n = n_;
  const size_t k_int = options_.selection.k;
  if (k_int == 0) return;
  if (k_int >= n) {
    out.indices.resize(n);
    std::iota(out.indices.begin(), out.indices.end(), 0u);
    out.values.assign(acc_.begin(), acc_.end());
    return;
  }
  const double k = static_cast<double>(k_int);
  const double mean = sum_ / static_cast<double>(n);
  const double var = n > 1 ? std::max(0.0, (sum_sq_ - sum_ * mean) / static_cast<double>(n - 1)) : 0.0;
  const double ratio = k / static_cast<double>(n);
  double thr = mean + std::sqrt(var) * normal_two_sided_quantile(ratio);
  bool from_candidates = true;
  size_t c = count_above(static_cast<float>(thr), from_candidates);
  int rounds = 1;
  while (rounds < 4) {
    if (static_cast<double>(c) < 2.0 * k / 3.0) {
      thr *= 0.5;
    } else if (static_cast<double>(c) > 4.0 * k / 3.0) {
      thr *= 1.5;
    } else {
      break;
    }
    c = count_above(static_cast<float>(thr), from_candidates);
    ++rounds;
  }
  stats_.rounds = rounds;
  stats_.threshold = thr;
  if (static_cast<double>(c) < 2.0 * k / 3.0) {
    // Far from Gaussian (e.g. a spike at zero with a heavy tail: sigma is
    // dominated by the tail and the estimate stays far too high). Accepting
    // would send almost nothing while the residual grows, so fall back to
    // the exact top-k: the band [2k/3, 4k/3] always holds.
    stats_.fallback = true;
    topk_select(acc_, k_int, out, topk_);
    uint32_t low = UINT32_MAX;
    for (float v : out.values) low = std::min(low, magnitude_bits(v));
    stats_.threshold = out.size() > 0 ? std::bit_cast<float>(low) : 0.0;
    next_cand_bits_ = magnitude_bits(static_cast<float>(stats_.threshold * 0.95));
    return;
  }
  const auto tf = static_cast<float>(thr);
  auto& above = topk_.above;
  above.clear();
  const bool final_from_candidates = covered_by_candidates(tf);
  if (final_from_candidates) {
    const uint32_t tb = std::bit_cast<uint32_t>(tf);
    for (size_t j = 0; j < cand_count_; ++j)
      if (cand_mag_[j] > tb) above.push_back(cand_index_[j]);
  } else {
    for (size_t i = 0; i < n; ++i)
      if (std::fabs(acc_[i]) > tf) above.push_back(static_cast<uint32_t>(i));
  }
  stats_.predicted = from_candidates && final_from_candidates;
  // Next step: collect a little below this step's final threshold.
  next_cand_bits_ = magnitude_bits(static_cast<float>(thr * 0.95));
  const auto cap = static_cast<size_t>(std::ceil(4.0 * k / 3.0));
  if (above.size() > cap) {
    // Exact top-cap of `above`: reuse the candidate machinery on it.
    cand_count_ = above.size();
    for (size_t j = 0; j < above.size(); ++j) {
      cand_index_[j] = above[j];
      cand_mag_[j] = magnitude_bits(acc_[above[j]]);
    }
    keep_largest_candidates(cap, kept_);
    out.indices = kept_;
  } else {
    out.indices = above;
  }
  above.clear();
  out.values.resize(out.indices.size());
  for (size_t j = 0; j < out.indices.size(); ++j) out.values[j] = acc_[out.indices[j]];
}

void CpuCompressor::select_sampled(uint64_t /*step*/, SparseVector& out) {
  // DGC's sampled threshold (ALGORITHMS.md 2.5), the sample taken before the
  // pass: lower it by 0.8x while too few pass (at most 10 rounds), cut too
  // many to the exact top-k (> 1.3k) or to the first k in index order.
  const size_t k = options_.selection.k;
  float thr = static_cast<float>(stats_.threshold);
  int rounds = 0;
  auto& cand = topk_.above;
  bool from_candidates = true;
  while (true) {
    ++rounds;
    cand.clear();
    const uint32_t tb = magnitude_bits(thr);
    if (tb >= cand_bits_) {
      for (size_t j = 0; j < cand_count_; ++j)
        if (cand_mag_[j] >= tb) cand.push_back(cand_index_[j]);
    } else {
      from_candidates = false;
      for (size_t i = 0; i < n_; ++i)
        if (magnitude_bits(acc_[i]) >= tb) cand.push_back(static_cast<uint32_t>(i));
    }
    if (static_cast<double>(cand.size()) < 0.8 * static_cast<double>(k) && rounds < 10 && thr > 0) {
      thr *= 0.8f;
      continue;
    }
    break;
  }
  stats_.predicted = from_candidates;
  stats_.rounds = rounds;
  stats_.threshold = thr;
  if (static_cast<double>(cand.size()) > 1.3 * static_cast<double>(k)) {
    cand_count_ = cand.size();
    for (size_t j = 0; j < cand.size(); ++j) {
      cand_index_[j] = cand[j];
      cand_mag_[j] = magnitude_bits(acc_[cand[j]]);
    }
    keep_largest_candidates(k, kept_);
    out.indices = kept_;
  } else {
    out.indices.assign(cand.begin(), cand.begin() + static_cast<std::ptrdiff_t>(std::min(k, cand.size())));
  }
  cand.clear();
  out.values.resize(out.indices.size());
  for (size_t j = 0; j < out.indices.size(); ++j) out.values[j] = acc_[out.indices[j]];
}

}  // namespace sps::kernels
