// One suite for every compressor backend (CPU always; CUDA where a device
// answers, skipped with the reason elsewhere), checked against a slow,
// obvious reference of the whole error-feedback step.
#include "kernels/compressor.h"

#include <gtest/gtest.h>

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <optional>
#include <random>

#include "kernels/backend.h"
#include "kernels/cpu_compressor.h"
#include "common/value_format.h"
#if SPS_TEST_CUDA
#include "kernels/cuda/device_array.h"
#endif

namespace sps::kernels {
namespace {

uint32_t bits(float x) { return std::bit_cast<uint32_t>(x); }

// The reference: the arithmetic of compressor.h written out plainly.
struct Reference {
  CompressorOptions o;
  std::vector<float> residual, momentum, hessian_factor;
  std::vector<ScaleRun> last_scales;  // scaled formats: the bucket scales this reference computed last step
  // Scaled formats: send with these scales instead (a backend's, which may
  // sum in another order; the caller checks them against last_scales).
  std::optional<std::vector<ScaleRun>> forced_scales;
  explicit Reference(size_t n, CompressorOptions options) : o(options), residual(n, 0.0f), momentum(n, 0.0f) {
    hessian_factor.assign(n, 1.0f);
  }

  void step(const std::vector<float>& g, float scale, uint64_t step, SparseVector& out, std::vector<float>& acc) {
    const size_t n = g.size();
    float factor = 1.0f;
    if (o.clip_norm > 0) {
      double sq = 0;
      for (float x : g) sq += double{x} * x;
      if (std::sqrt(sq) > o.clip_norm) factor = static_cast<float>(o.clip_norm / std::sqrt(sq));
    }
    std::vector<float> u(n);
    acc.assign(n, 0.0f);
    for (size_t i = 0; i < n; ++i) {
      float x = g[i] * factor;
      if (o.momentum != 0.0f) x = o.momentum * momentum[i] + x;
      u[i] = x;
      switch (o.error_feedback) {
        case ErrorFeedbackMode::kNone: acc[i] = scale * x; break;
        case ErrorFeedbackMode::kEf: acc[i] = residual[i] + scale * x; break;
        case ErrorFeedbackMode::kHessianDiag: acc[i] = hessian_factor[i] * residual[i] + scale * x; break;
      }
    }
    const auto& p = o.selection;
    std::vector<uint32_t> idx;
    switch (p.method) {
      case Method::kDense:
        idx.resize(n);
        std::iota(idx.begin(), idx.end(), 0u);
        break;
      case Method::kTopK: idx = top(acc, all(n), std::min(p.k, n)); break;
      case Method::kThreshold: {
        for (uint32_t i = 0; i < n; ++i)
          if (std::fabs(acc[i]) >= p.lambda) idx.push_back(i);
        if (p.max_nnz > 0 && idx.size() > p.max_nnz) idx = top(acc, idx, p.max_nnz);
        break;
      }
      case Method::kRandomK: {
        std::vector<uint32_t> bitmap;
        randomk_indices(n, p.k, p.seed, step, idx, bitmap);
        break;
      }
      case Method::kGaussianK: idx = gaussiank(acc, p.k); break;
      case Method::kSampled: idx = sampled(acc, p.k, p.seed, step); break;
    }
    out.indices = idx;
    out.values.clear();
    out.scale_runs.clear();
    const bool unbiased = p.method == Method::kRandomK && p.randomk_unbiased;
    auto value_of = [&](uint32_t i) {
      float v = acc[i];
      if (unbiased) v = v * static_cast<float>(static_cast<double>(n) / static_cast<double>(p.k));
      return v;
    };
    // Scaled formats: a scale per bucket of selected values, summed in index order.
    last_scales.clear();
    const size_t bucket = o.quant_bucket > 0 ? o.quant_bucket : std::max<size_t>(idx.size(), 1);
    for (size_t b = 0; is_scaled(o.values) && b < idx.size(); b += bucket) {
      const size_t end = std::min(idx.size(), b + bucket);
      const auto count = static_cast<uint32_t>(end - b);
      float max_abs = 0;
      double sum_abs = 0, sum_sq = 0, sum_pos = 0, sum_neg = 0, count_pos = 0;
      for (size_t j = b; j < end; ++j) {
        const float v = value_of(idx[j]);
        max_abs = std::max(max_abs, std::fabs(v));
        sum_abs += std::fabs(v);
        sum_sq += double{v} * v;
        if (v < 0) {
          sum_neg += -v;
        } else {
          sum_pos += v;
          count_pos += 1;
        }
      }
      if (o.values == ValueFormat::kOneBit) {
        // Seide's two means, computed here without value_format.h.
        ScaleRun run{count, 0.0f, 0.0f};
        if (count_pos > 0) run.scale = static_cast<float>(sum_pos / count_pos);
        if (count_pos < count) run.negative_scale = static_cast<float>(sum_neg / (count - count_pos));
        last_scales.push_back(run);
      } else {
        last_scales.push_back(
            {count, value_scale_of(o.values, max_abs, sum_abs, sum_sq, static_cast<double>(count), o.qsgd_levels)});
      }
      const size_t r = last_scales.size() - 1;
      out.scale_runs.push_back(forced_scales && r < forced_scales->size() ? (*forced_scales)[r] : last_scales[r]);
    }
    for (size_t j = 0; j < idx.size(); ++j) {
      const uint32_t i = idx[j];
      const float v = value_of(i);
      float sent = quantise(v, o.values);
      if (o.values == ValueFormat::kOneBit) {
        const ScaleRun& run = out.scale_runs[j / bucket];
        sent = v < 0 ? -run.negative_scale : run.scale;
      } else if (is_scaled(o.values)) {
        const float value_scale = out.scale_runs[j / bucket].scale;
        const uint32_t random = o.values == ValueFormat::kQsgd ? quant_random24(p.seed, step, i) : 0u;
        sent = dequantise(quant_level(v, o.values, value_scale, random), value_scale);
      }
      out.values.push_back(sent);
      if (o.error_feedback != ErrorFeedbackMode::kNone) residual[i] = 0;  // set below
      u[i] = 0.0f;
    }
    if (o.error_feedback != ErrorFeedbackMode::kNone) {
      residual = acc;
      for (size_t j = 0; j < idx.size(); ++j) residual[idx[j]] = acc[idx[j]] - out.values[j];
    }
    if (o.momentum != 0.0f) momentum = u;
  }

  // |acc| > t (t >= 0; every entry when t < 0), ascending.
  static std::vector<uint32_t> above(const std::vector<float>& acc, float t) {
    std::vector<uint32_t> v;
    for (uint32_t i = 0; i < acc.size(); ++i)
      if (std::fabs(acc[i]) > t) v.push_back(i);
    return v;
  }

  // docs/kernels.md: Shi et al.'s estimate from mean and standard deviation,
  // up to 4 counting rounds (x0.5 / x1.5), too many -> the exact top
  // ceil(4k/3) of them, too few after 4 rounds -> the exact top-k. The
  // moments are summed as the CPU backend sums them (lanes of 16 in float
  // inside blocks of 256, blocks folded into doubles), so the threshold is
  // bit-identical.
  static std::vector<uint32_t> gaussiank(const std::vector<float>& acc, size_t k) {
    const size_t n = acc.size();
    if (k == 0) return {};
    if (k >= n) return all(n);
    double sum = 0, sum_sq = 0;
    for (size_t block = 0; block < n; block += 256) {
      float lane_sum[16] = {}, lane_sq[16] = {};
      for (size_t i = block; i < std::min(n, block + 256); ++i) {
        lane_sum[(i - block) % 16] += acc[i];
        lane_sq[(i - block) % 16] += acc[i] * acc[i];
      }
      double s = 0, sq = 0;
      for (int j = 0; j < 16; ++j) {
        s += lane_sum[j];
        sq += lane_sq[j];
      }
      sum += s;
      sum_sq += sq;
    }
    const double kd = static_cast<double>(k);
    const double mean = sum / static_cast<double>(n);
    const double var = n > 1 ? std::max(0.0, (sum_sq - sum * mean) / static_cast<double>(n - 1)) : 0.0;
    double thr = mean + std::sqrt(var) * normal_two_sided_quantile(kd / static_cast<double>(n));
    auto count = [&](double t) { return static_cast<double>(above(acc, static_cast<float>(t)).size()); };
    double c = count(thr);
    for (int rounds = 1; rounds < 4; ++rounds) {
      if (c < 2.0 * kd / 3.0) {
        thr *= 0.5;
      } else if (c > 4.0 * kd / 3.0) {
        thr *= 1.5;
      } else {
        break;
      }
      c = count(thr);
    }
    if (c < 2.0 * kd / 3.0) return top(acc, all(n), k);
    return top(acc, above(acc, static_cast<float>(thr)), static_cast<size_t>(std::ceil(4.0 * kd / 3.0)));
  }

  // ALGORITHMS.md 2.5 (DGC): the threshold from a strided sample, lowered
  // x0.8 while fewer than 0.8k pass (at most 10 rounds); more than 1.3k ->
  // the exact top-k of them, else the first k in index order.
  static std::vector<uint32_t> sampled(const std::vector<float>& acc, size_t k, uint64_t seed, uint64_t step) {
    const size_t n = acc.size();
    if (k == 0) return {};
    if (k >= n) return all(n);
    const SampleLayout layout = sampled_layout(n, k, seed, step);
    std::vector<float> sample;
    for (size_t i = layout.start; i < n; i += layout.stride) sample.push_back(std::fabs(acc[i]));
    std::sort(sample.begin(), sample.end(), std::greater<float>());
    const double rho = static_cast<double>(k) / static_cast<double>(n);
    const size_t top_count =
        std::max<size_t>(1, static_cast<size_t>(std::ceil(rho * static_cast<double>(sample.size()))));
    float thr = sample[top_count - 1];
    std::vector<uint32_t> s;
    for (int rounds = 1;; ++rounds) {
      s.clear();
      for (uint32_t i = 0; i < n; ++i)
        if (std::fabs(acc[i]) >= thr) s.push_back(i);
      if (static_cast<double>(s.size()) < 0.8 * static_cast<double>(k) && rounds < 10 && thr > 0) {
        thr *= 0.8f;
        continue;
      }
      break;
    }
    if (static_cast<double>(s.size()) > 1.3 * static_cast<double>(k)) return top(acc, s, k);
    s.resize(std::min(k, s.size()));
    return s;
  }

  static std::vector<uint32_t> all(size_t n) {
    std::vector<uint32_t> v(n);
    std::iota(v.begin(), v.end(), 0u);
    return v;
  }
  // The `keep` largest |acc| among `from` (ascending), ties to the smaller index.
  static std::vector<uint32_t> top(const std::vector<float>& acc, std::vector<uint32_t> from, size_t keep) {
    std::stable_sort(from.begin(), from.end(),
                     [&](uint32_t a, uint32_t b) { return std::fabs(acc[a]) > std::fabs(acc[b]); });
    from.resize(std::min(keep, from.size()));
    std::sort(from.begin(), from.end());
    return from;
  }
};

std::vector<float> normal(size_t n, uint32_t seed, float stddev = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

std::vector<float> heavy_tailed(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::cauchy_distribution<float> d(0.0f, 1e-3f);
  std::vector<float> v(n);
  for (auto& x : v) x = std::clamp(d(rng), -1e6f, 1e6f);
  return v;
}

// Many ties (+x/-x, a handful of magnitudes), zeros of both signs, denormals.
std::vector<float> adversarial(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  const float levels[] = {0.0f, -0.0f, 1e-40f, -1e-40f, 0.5f, -0.5f, 1.0f, -1.0f, 2.0f};
  std::vector<float> v(n);
  for (auto& x : v) x = levels[rng() % 9];
  return v;
}

// In the error-feedback steady state (many steps from one start), where the
// CPU backend's predicted candidates are used, miss and are corrected.
std::vector<std::vector<float>> gradient_mix(size_t n, uint32_t seed) {
  return {normal(n, seed), normal(n, seed + 1, 3.0f), heavy_tailed(n, seed + 2), normal(n, seed + 3, 0.2f)};
}

class CompressorTest : public ::testing::TestWithParam<Backend> {
 protected:
  std::unique_ptr<Compressor> make(size_t n, const CompressorOptions& o) {
    if (GetParam() == Backend::kCuda && !cuda_available()) return nullptr;
    auto c = make_compressor(GetParam(), n, o);
    EXPECT_TRUE(c.ok()) << c.status().to_string();
    return c.ok() ? std::move(c).value() : nullptr;
  }
  void SetUp() override {
    if (GetParam() == Backend::kCuda && !cuda_available())
      GTEST_SKIP() << "no CUDA device: " << backend_description();
  }

  // Runs `steps` steps of the backend and the reference side by side and
  // requires identical indices, values and residuals (bit for bit).
  void expect_same_as_reference(const CompressorOptions& o, const std::vector<std::vector<float>>& grads, int steps,
                                float scale = 0.1f, std::span<const float> hessian = {}, float gamma = 0) {
    const size_t n = grads[0].size();
    auto c = make(n, o);
    ASSERT_NE(c, nullptr);
    Reference ref(n, o);
    if (!hessian.empty()) {
      ASSERT_TRUE(c->set_hessian_diag(hessian, gamma).ok());
      for (size_t i = 0; i < n; ++i) ref.hessian_factor[i] = 1.0f - std::clamp(gamma * hessian[i], 0.0f, 1.0f);
    }
    SparseVector got, want;
    std::vector<float> acc;
    for (int s = 0; s < steps; ++s) {
      const auto& g = grads[static_cast<size_t>(s) % grads.size()];
      ASSERT_TRUE(c->compress(g, scale, got, static_cast<uint64_t>(s)).ok());
      ref.forced_scales.reset();
      if (is_scaled(o.values)) {
        ref.forced_scales.emplace();
        for (const auto& r : got.scale_runs) ref.forced_scales->push_back(r);
      }
      ref.step(g, scale, static_cast<uint64_t>(s), want, acc);
      ASSERT_EQ(got.indices, want.indices) << "step " << s << " n=" << n << " k=" << o.selection.k;
      if (is_scaled(o.values)) {
        // A run per bucket with the reference's counts; each scale is the
        // reference's: bit for bit for int8 (a maximum, the same in any
        // order), else within a rounding of the double sums, which both
        // backends add in another order than the reference's index order.
        ASSERT_EQ(got.scale_runs.size(), want.scale_runs.size()) << "step " << s;
        for (size_t r = 0; r < want.scale_runs.size(); ++r) {
          ASSERT_EQ(got.scale_runs[r].count, ref.last_scales[r].count) << "step " << s << " run " << r;
          const float want_scales[] = {ref.last_scales[r].scale, ref.last_scales[r].negative_scale};
          const float got_scales[] = {got.scale_runs[r].scale, got.scale_runs[r].negative_scale};
          for (int side = 0; side < (o.values == ValueFormat::kOneBit ? 2 : 1); ++side) {
            if (o.values == ValueFormat::kInt8)
              ASSERT_EQ(bits(got_scales[side]), bits(want_scales[side])) << "step " << s << " run " << r;
            else
              ASSERT_NEAR(got_scales[side], want_scales[side], 1e-6 * want_scales[side]) << "step " << s;
          }
        }
        if (!got.scale_runs.empty()) {
          EXPECT_EQ(bits(c->last_stats().value_scale), bits(got.scale_runs[0].scale));
          EXPECT_EQ(bits(c->last_stats().value_negative_scale), bits(got.scale_runs[0].negative_scale));
        }
      } else {
        ASSERT_TRUE(got.scale_runs.empty());
      }
      ASSERT_EQ(got.values.size(), want.values.size());
      for (size_t j = 0; j < want.values.size(); ++j)
        ASSERT_EQ(bits(got.values[j]), bits(want.values[j])) << "step " << s << " entry " << j;
      const auto r = c->residual();
      if (o.error_feedback != ErrorFeedbackMode::kNone) {
        for (size_t i = 0; i < n; ++i) ASSERT_EQ(bits(r[i]), bits(ref.residual[i])) << "step " << s << " residual " << i;
      }
      if (o.momentum != 0.0f) {
        const auto u = c->momentum();
        for (size_t i = 0; i < n; ++i) ASSERT_EQ(bits(u[i]), bits(ref.momentum[i])) << "step " << s << " momentum " << i;
      }
      EXPECT_EQ(c->last_stats().nnz, want.size());
    }
  }

  // An approximate method against its reference over several n and k (the
  // gradient mix, 12 steps each) and over adversarial ties.
  void expect_method_matches_reference(Method m, uint32_t grad_seed) {
    for (size_t n : {size_t{10}, size_t{4099}, size_t{100003}}) {
      for (size_t k : {size_t{1}, n / 1000 + 1, n / 100 + 1, n / 3}) {
        CompressorOptions o;
        o.selection.method = m;
        o.selection.k = k;
        o.selection.seed = 5;
        expect_same_as_reference(o, gradient_mix(n, grad_seed), 12);
      }
    }
    for (size_t k : {1, 7, 100, 999}) {
      CompressorOptions o;
      o.selection.method = m;
      o.selection.k = k;
      expect_same_as_reference(o, {adversarial(1000, 6)}, 4, 1.0f);
    }
  }
};

CompressorOptions topk_options(size_t k, ErrorFeedbackMode mode = ErrorFeedbackMode::kEf) {
  CompressorOptions o;
  o.selection.method = Method::kTopK;
  o.selection.k = k;
  o.error_feedback = mode;
  return o;
}

TEST_P(CompressorTest, TopKMatchesTheReferenceOnManyShapes) {
  // Several steps each, so the CPU backend's predicted candidates are used
  // (and sometimes miss) as in training.
  for (size_t n : {size_t{1}, size_t{5}, size_t{1000}, size_t{70000}, size_t{200003}}) {
    for (size_t k : {size_t{1}, n / 100 + 1, n / 2, n - 1 + (n == 1), n + 3}) {
      expect_same_as_reference(topk_options(k), {normal(n, 1), normal(n, 2), normal(n, 3, 5.0f)}, 6);
    }
  }
}

TEST_P(CompressorTest, TopKHeavyTailedAndAdversarialInputs) {
  expect_same_as_reference(topk_options(300), {heavy_tailed(100000, 4), heavy_tailed(100000, 5)}, 8);
  for (size_t k : {1, 7, 100, 999, 1000}) expect_same_as_reference(topk_options(k), {adversarial(1000, 6)}, 4, 1.0f);
  std::vector<float> equal(5000, 0.25f);
  expect_same_as_reference(topk_options(10), {equal}, 5, 1.0f);
  expect_same_as_reference(topk_options(10, ErrorFeedbackMode::kNone), {equal}, 2, 1.0f);
}

TEST_P(CompressorTest, TopKSelectionProperties) {
  const size_t n = 50000, k = 500;
  auto c = make(n, topk_options(k));
  ASSERT_NE(c, nullptr);
  const auto g = normal(n, 8);
  SparseVector out;
  for (int s = 0; s < 5; ++s) {
    const auto before = c->residual();
    ASSERT_TRUE(c->compress(g, 0.5f, out, static_cast<uint64_t>(s)).ok());
    ASSERT_EQ(out.size(), k);
    ASSERT_TRUE(std::is_sorted(out.indices.begin(), out.indices.end()));
    const auto after = c->residual();
    float smallest_sent = INFINITY;
    for (float v : out.values) smallest_sent = std::min(smallest_sent, std::fabs(v));
    std::vector<bool> sent(n, false);
    for (size_t j = 0; j < k; ++j) sent[out.indices[j]] = true;
    for (size_t i = 0; i < n; ++i) {
      const float acc = before[i] + 0.5f * g[i];
      if (sent[i]) {
        ASSERT_EQ(after[i], 0.0f);
      } else {
        ASSERT_EQ(bits(after[i]), bits(acc));  // residual + sent == acc exactly
        ASSERT_LE(std::fabs(acc), smallest_sent);
      }
    }
  }
}

TEST_P(CompressorTest, ThresholdWithAndWithoutCap) {
  CompressorOptions o;
  o.selection.method = Method::kThreshold;
  o.selection.lambda = 0.2f;
  expect_same_as_reference(o, {normal(30000, 9), normal(30000, 10)}, 6);
  o.selection.max_nnz = 50;
  expect_same_as_reference(o, {normal(30000, 9), normal(30000, 10)}, 6);
  o.selection.lambda = 1e30f;  // nothing passes: empty pushes, the residual keeps everything
  expect_same_as_reference(o, {normal(1000, 11)}, 3);
}

TEST_P(CompressorTest, RandomKIsReproducibleAndMatches) {
  CompressorOptions o;
  o.selection.method = Method::kRandomK;
  o.selection.k = 100;
  o.selection.seed = 42;
  expect_same_as_reference(o, {normal(10000, 12)}, 4);
  o.error_feedback = ErrorFeedbackMode::kNone;
  o.selection.randomk_unbiased = true;
  expect_same_as_reference(o, {normal(10000, 12)}, 4);
  auto a = make(10000, o), b = make(10000, o);
  SparseVector x, y;
  ASSERT_TRUE(a->compress(normal(10000, 1), 1.0f, x, 77).ok());
  ASSERT_TRUE(b->compress(normal(10000, 2), 1.0f, y, 77).ok());
  EXPECT_EQ(x.indices, y.indices);  // indices depend on (seed, step) only
  EXPECT_EQ(x.size(), 100u);
}

TEST_P(CompressorTest, DenseSendsEverything) {
  CompressorOptions o;
  o.selection.method = Method::kDense;
  expect_same_as_reference(o, {normal(777, 13)}, 2);
}

TEST_P(CompressorTest, HessianDiagCompensation) {
  const size_t n = 20000;
  auto h = normal(n, 14);
  for (auto& x : h) x = std::fabs(x) * 3.0f;  // some gamma * h beyond 1: clamped
  h[5] = -1.0f;                               // negative curvature: clamped to 0
  auto o = topk_options(200, ErrorFeedbackMode::kHessianDiag);
  expect_same_as_reference(o, {normal(n, 15), normal(n, 16)}, 5, 0.1f, h, 0.3f);
  auto c = make(n, o);
  auto clamped = c->set_hessian_diag(h, 0.3f);
  ASSERT_TRUE(clamped.ok());
  size_t want = 0;
  for (float x : h) want += (0.3f * x > 1.0f || 0.3f * x < 0.0f) ? 1 : 0;
  EXPECT_EQ(*clamped, want);
  EXPECT_GT(want, 0u);
  EXPECT_FALSE(c->set_hessian_diag(std::vector<float>(3), 0.1f).ok());
  auto plain = make(n, topk_options(10));
  EXPECT_EQ(plain->set_hessian_diag(h, 0.1f).status().code(), StatusCode::kFailedPrecondition);
}

TEST_P(CompressorTest, MomentumCorrectionWithMasking) {
  auto o = topk_options(100);
  o.momentum = 0.9f;
  expect_same_as_reference(o, {normal(20000, 17), normal(20000, 18)}, 6);
  o.error_feedback = ErrorFeedbackMode::kNone;
  expect_same_as_reference(o, {normal(20000, 17)}, 3);
}

TEST_P(CompressorTest, ClippingBoundsTheAccumulatedStep) {
  const size_t n = 10000;
  CompressorOptions o;
  o.selection.method = Method::kDense;
  o.error_feedback = ErrorFeedbackMode::kNone;
  o.clip_norm = 2.0f;
  auto c = make(n, o);
  SparseVector out;
  ASSERT_TRUE(c->compress(normal(n, 19), 1.0f, out, 0).ok());
  double sq = 0;
  for (float v : out.values) sq += double{v} * v;
  EXPECT_NEAR(std::sqrt(sq), 2.0, 1e-4);
  // Under the bound nothing changes.
  const auto small = normal(n, 20, 1e-4f);
  ASSERT_TRUE(c->compress(small, 1.0f, out, 1).ok());
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(bits(out.values[i]), bits(small[i]));
}

TEST_P(CompressorTest, HalfPrecisionValuesKeepTheRoundingErrorInTheResidual) {
  for (ValueFormat f : {ValueFormat::kF16, ValueFormat::kBF16}) {
    auto o = topk_options(300);
    o.values = f;
    expect_same_as_reference(o, {normal(30000, 21), normal(30000, 22)}, 4);
    auto c = make(30000, o);
    SparseVector out;
    const auto g = normal(30000, 23);
    ASSERT_TRUE(c->compress(g, 1.0f, out, 0).ok());
    const auto r = c->residual();
    for (size_t j = 0; j < out.size(); ++j) {
      const uint32_t i = out.indices[j];
      EXPECT_EQ(quantise(out.values[j], f), out.values[j]) << "sent values are representable";
      EXPECT_EQ(bits(r[i] + out.values[j]), bits(g[i])) << "residual + sent == acc";
    }
  }
}

TEST_P(CompressorTest, ScaledValuesMatchTheReference) {
  for (ValueFormat f : {ValueFormat::kInt8, ValueFormat::kSign, ValueFormat::kQsgd, ValueFormat::kOneBit}) {
    for (ErrorFeedbackMode mode : {ErrorFeedbackMode::kEf, ErrorFeedbackMode::kNone}) {
      for (Method m : {Method::kTopK, Method::kThreshold, Method::kDense, Method::kRandomK, Method::kGaussianK,
                       Method::kSampled}) {
        SCOPED_TRACE(std::string(value_format_name(f)) + " method " + std::to_string(static_cast<int>(m)));
        CompressorOptions o;
        o.selection.method = m;
        o.selection.k = 300;
        o.selection.lambda = 2.5f;
        o.selection.seed = 9;
        o.error_feedback = mode;
        o.values = f;
        o.qsgd_levels = 5;
        o.quant_bucket = 0;  // one scale per selection
        expect_same_as_reference(o, {normal(30000, 41), heavy_tailed(30000, 42), normal(30000, 43)}, 6, 1.0f);
        o.quant_bucket = 64;  // buckets, the last one partial (300 = 4 * 64 + 44)
        expect_same_as_reference(o, {normal(30000, 48), heavy_tailed(30000, 49)}, 3, 1.0f);
      }
    }
  }
  // Unbiased random-k's n/k scaling comes before the scale is computed.
  CompressorOptions o;
  o.selection.method = Method::kRandomK;
  o.selection.k = 50;
  o.selection.randomk_unbiased = true;
  o.error_feedback = ErrorFeedbackMode::kNone;
  o.values = ValueFormat::kQsgd;
  expect_same_as_reference(o, {normal(5000, 44)}, 4, 1.0f);
  o.values = ValueFormat::kOneBit;
  expect_same_as_reference(o, {normal(5000, 44)}, 4, 1.0f);
  // Per tensor too small to matter: a single selected entry, and all-zero input.
  for (ValueFormat f : {ValueFormat::kInt8, ValueFormat::kSign, ValueFormat::kQsgd, ValueFormat::kOneBit}) {
    auto t = topk_options(1);
    t.values = f;
    expect_same_as_reference(t, {normal(10, 45)}, 3, 1.0f);
    expect_same_as_reference(t, {std::vector<float>(64, 0.0f)}, 2, 1.0f);
    // A scale that underflows to 0 (one negative denormal among zeros):
    // every value goes out as +0 and stays in the residual.
    CompressorOptions d;
    d.selection.method = Method::kDense;
    d.values = f;
    std::vector<float> tiny(64, 0.0f);
    tiny[5] = -std::numeric_limits<float>::denorm_min();
    tiny[9] = std::numeric_limits<float>::denorm_min();
    expect_same_as_reference(d, {tiny}, 2, 1.0f);
  }
}

TEST_P(CompressorTest, ScaledValuesAreLevelsTimesTheScale) {
  const size_t n = 20000;
  for (ValueFormat f : {ValueFormat::kInt8, ValueFormat::kSign, ValueFormat::kQsgd}) {
    auto o = topk_options(2000);
    o.values = f;
    o.qsgd_levels = 16;
    o.quant_bucket = 0;
    auto c = make(n, o);
    ASSERT_NE(c, nullptr);
    SparseVector out;
    const auto g = heavy_tailed(n, 46);
    ASSERT_TRUE(c->compress(g, 1.0f, out, 0).ok());
    ASSERT_EQ(out.scale_runs.size(), 1u);
    const float scale = out.scale_runs[0].scale;
    ASSERT_GT(scale, 0.0f);
    const int max_level = f == ValueFormat::kQsgd ? 16 : f == ValueFormat::kSign ? 1 : 127;
    const auto r = c->residual();
    double sum_abs = 0;
    float max_abs = 0;
    for (size_t j = 0; j < out.size(); ++j) {
      const uint32_t i = out.indices[j];
      const int level = level_of(out.values[j], scale);
      ASSERT_LE(std::abs(level), max_level) << j;
      ASSERT_EQ(bits(dequantise(level, scale)), bits(out.values[j])) << "sent = level * scale";
      if (f == ValueFormat::kSign) {
        ASSERT_EQ(level, g[i] >= 0 ? 1 : -1);
      }
      if (f == ValueFormat::kInt8) {
        // Round to nearest: off by at most half a step, and the residual
        // holds exactly what was not sent.
        ASSERT_LE(std::fabs(g[i] - out.values[j]), 0.5f * scale * (1 + 1e-6f)) << j;
        ASSERT_EQ(bits(r[i] + out.values[j]), bits(g[i])) << "residual + sent == acc";
      }
      if (f == ValueFormat::kQsgd) {
        ASSERT_LE(std::fabs(g[i] - out.values[j]), scale * (1 + 1e-6f)) << j;
      }
      sum_abs += std::fabs(g[i]);
      max_abs = std::max(max_abs, std::fabs(g[i]));
    }
    if (f == ValueFormat::kInt8) {
      EXPECT_EQ(scale, max_abs / 127.0f);
    }
    if (f == ValueFormat::kSign) {
      EXPECT_FLOAT_EQ(scale, static_cast<float>(sum_abs / 2000.0));
    }
  }
}

// QSGD rounds stochastically so that what is sent is unbiased: averaged over
// many steps (a fresh draw each), the sent values approach acc.
TEST_P(CompressorTest, QsgdIsUnbiased) {
  const size_t n = 64;
  CompressorOptions o;
  o.selection.method = Method::kDense;
  o.selection.k = n;
  o.error_feedback = ErrorFeedbackMode::kNone;
  o.values = ValueFormat::kQsgd;
  o.qsgd_levels = 2;
  o.selection.seed = 3;
  auto c = make(n, o);
  ASSERT_NE(c, nullptr);
  const auto g = normal(n, 47);
  std::vector<double> mean(n, 0.0);
  const int steps = 4000;
  SparseVector out;
  float scale = 0;
  for (int s = 0; s < steps; ++s) {
    ASSERT_TRUE(c->compress(g, 1.0f, out, static_cast<uint64_t>(s)).ok());
    scale = out.scale_runs[0].scale;
    for (size_t i = 0; i < n; ++i) mean[i] += out.values[i] / steps;
  }
  // Each draw is off by at most one scale step; the mean of 4000 by a few
  // scale / sqrt(4000) (about 0.016 scale per standard deviation).
  for (size_t i = 0; i < n; ++i) EXPECT_NEAR(mean[i], g[i], 0.1 * scale) << i;
  // Every draw is either neighbouring level, never a biased round to nearest.
  ASSERT_TRUE(c->compress(g, 1.0f, out, 0).ok());
  SparseVector again;
  ASSERT_TRUE(c->compress(g, 1.0f, again, 0).ok());
  EXPECT_EQ(out.values, again.values) << "the draw depends on (seed, step, index) only";
}

// Seide's 1-bit: every value goes out as its sign, the non-negative ones as
// their mean and the negative ones as minus their mean |v|, so each bucket
// sends its sum unchanged (what EF-signSGD's one scale cannot do when the
// two sides differ); the residual holds the rest exactly.
TEST_P(CompressorTest, OneBitSendsEachSidesMeanAndKeepsEachBucketsSum) {
  const size_t n = 6000;
  auto o = topk_options(1000);
  o.values = ValueFormat::kOneBit;
  o.quant_bucket = 256;
  auto c = make(n, o);
  ASSERT_NE(c, nullptr);
  // Skewed: positives come from a wider distribution than negatives.
  auto g = heavy_tailed(n, 50);
  for (float& x : g)
    if (x > 0) x *= 3.0f;
  SparseVector out;
  ASSERT_TRUE(c->compress(g, 1.0f, out, 0).ok());
  ASSERT_EQ(out.size(), 1000u);
  ASSERT_EQ(out.scale_runs.size(), 4u);  // 3 * 256 + 232
  const auto r = c->residual();
  size_t j = 0;
  bool skewed = false;
  for (const ScaleRun& run : out.scale_runs) {
    double sum_acc = 0, sum_sent = 0;
    for (const size_t end = j + run.count; j < end; ++j) {
      const uint32_t i = out.indices[j];
      ASSERT_EQ(bits(out.values[j]), bits(g[i] < 0 ? -run.negative_scale : run.scale)) << j;
      ASSERT_EQ(r[i], g[i] - out.values[j]) << "residual = acc - sent, entry " << j;
      sum_acc += g[i];
      sum_sent += out.values[j];
    }
    EXPECT_NEAR(sum_sent, sum_acc, 1e-4 * std::fabs(sum_acc) + 1e-3) << "a bucket's sum goes out unchanged";
    skewed = skewed || run.scale > 1.5f * run.negative_scale;
  }
  EXPECT_EQ(j, out.size());
  EXPECT_TRUE(skewed) << "the two scales follow the two sides";
}

TEST_P(CompressorTest, NonFiniteInputIsRefusedAndChangesNothing) {
  auto o = topk_options(10);
  o.momentum = 0.5f;
  auto c = make(1000, o);
  SparseVector out;
  ASSERT_TRUE(c->compress(normal(1000, 24), 1.0f, out, 0).ok());
  const auto residual = c->residual(), momentum = c->momentum();
  for (float bad : {NAN, INFINITY, -INFINITY}) {
    auto g = normal(1000, 25);
    g[637] = bad;
    g[901] = bad;
    const Status s = c->compress(g, 1.0f, out, 1);
    ASSERT_FALSE(s.ok());
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find("index 637"), std::string::npos) << s.message();
    EXPECT_EQ(c->residual(), residual);
    EXPECT_EQ(c->momentum(), momentum);
  }
  EXPECT_TRUE(c->compress(normal(1000, 26), 1.0f, out, 1).ok());  // still usable
}

// compression.rescale_residual's primitive: residual *= factor, bit for bit
// as the float product; a bad factor or an overflow is refused and changes
// nothing; without error feedback it does nothing.
TEST_P(CompressorTest, ScaleResidualMultipliesExactlyOrChangesNothing) {
  const size_t n = 5000;
  auto c = make(n, topk_options(50, ErrorFeedbackMode::kEf));
  ASSERT_NE(c, nullptr);
  SparseVector out;
  ASSERT_TRUE(c->compress(normal(n, 60), 1.0f, out, 0).ok());
  const auto before = c->residual();
  for (float bad : {0.0f, -1.0f, NAN, INFINITY, 3e38f}) {  // entries of |r| > 1.2 overflow at 3e38
    EXPECT_EQ(c->scale_residual(bad).code(), StatusCode::kInvalidArgument) << bad;
    ASSERT_EQ(c->residual(), before) << bad;
  }
  ASSERT_TRUE(c->scale_residual(0.1f).ok());
  const auto after = c->residual();
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(bits(after[i]), bits(before[i] * 0.1f)) << "index " << i;
  auto plain = make(n, topk_options(50, ErrorFeedbackMode::kNone));
  ASSERT_TRUE(plain->compress(normal(n, 61), 1.0f, out, 0).ok());
  EXPECT_TRUE(plain->scale_residual(0.5f).ok());
}

// A worker snapshot's momentum buffer: a compressor handed another's
// residual and momentum takes the same next step, bit for bit; a bad buffer
// is refused and changes nothing; with momentum off it is refused.
TEST_P(CompressorTest, SetMomentumRestoresTheStateOfAnotherCompressor) {
  const size_t n = 6000;
  CompressorOptions o = topk_options(60, ErrorFeedbackMode::kEf);
  o.momentum = 0.9f;
  auto c = make(n, o);
  auto restored = make(n, o);
  ASSERT_NE(c, nullptr);
  SparseVector out, out_restored;
  for (uint64_t s = 0; s < 3; ++s) ASSERT_TRUE(c->compress(normal(n, 70 + s), 1.0f, out, s).ok());
  const auto u = c->momentum();
  ASSERT_EQ(u.size(), n);
  ASSERT_TRUE(restored->set_residual(c->residual()).ok());
  ASSERT_TRUE(restored->set_momentum(u).ok());
  EXPECT_EQ(restored->momentum(), u);
  ASSERT_TRUE(c->compress(normal(n, 80), 1.0f, out, 3).ok());
  ASSERT_TRUE(restored->compress(normal(n, 80), 1.0f, out_restored, 3).ok());
  EXPECT_EQ(out_restored.indices, out.indices);
  ASSERT_EQ(out_restored.values.size(), out.values.size());
  for (size_t j = 0; j < out.values.size(); ++j) ASSERT_EQ(bits(out_restored.values[j]), bits(out.values[j]));
  EXPECT_EQ(restored->momentum(), c->momentum());

  const auto before = restored->momentum();
  std::vector<float> bad(u);
  bad[4321] = NAN;
  Status st = restored->set_momentum(bad);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("entry 4321"), std::string::npos) << st.message();
  EXPECT_EQ(restored->set_momentum(std::span<const float>(u).first(n - 1)).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(restored->momentum(), before);
  auto off = make(n, topk_options(60, ErrorFeedbackMode::kEf));
  EXPECT_EQ(off->set_momentum(u).code(), StatusCode::kFailedPrecondition);
}

// A refused push: undo_send puts the sent values back, so the residual is
// acc again and the next step is the one a compressor that sent nothing
// would take (checked against a second compressor handed acc as its residual).
TEST_P(CompressorTest, UndoSendPutsARefusedSelectionBackIntoTheResidual) {
  const size_t n = 20000;
  for (ErrorFeedbackMode mode : {ErrorFeedbackMode::kEf, ErrorFeedbackMode::kHessianDiag}) {
    for (Method m : {Method::kTopK, Method::kThreshold, Method::kDense}) {
      for (ValueFormat f : {ValueFormat::kF32, ValueFormat::kF16}) {
        CompressorOptions o = topk_options(150, mode);
        o.selection.method = m;
        o.selection.lambda = 2.5f;
        o.values = f;
        const std::string what = "method " + std::to_string(static_cast<int>(m)) + " mode " +
                                 std::to_string(static_cast<int>(mode)) + " format " + std::to_string(static_cast<int>(f));
        auto c = make(n, o);
        auto fresh = make(n, o);
        ASSERT_NE(c, nullptr);
        auto h = normal(n, 40);
        for (auto& x : h) x = std::fabs(x);
        if (mode == ErrorFeedbackMode::kHessianDiag) {
          ASSERT_TRUE(c->set_hessian_diag(h, 0.2f).ok());
          ASSERT_TRUE(fresh->set_hessian_diag(h, 0.2f).ok());
        }
        SparseVector out, again, want;
        ASSERT_TRUE(c->compress(normal(n, 41), 1.0f, out, 0).ok());
        ASSERT_TRUE(c->compress(normal(n, 42), 1.0f, out, 1).ok());
        ASSERT_GT(out.values.size(), 0u) << what;
        std::vector<uint32_t> sent_indices = out.indices;
        if (sent_indices.empty()) {  // dense: every index
          sent_indices.resize(n);
          for (uint32_t i = 0; i < n; ++i) sent_indices[i] = i;
        }
        const auto before = c->residual();
        std::vector<float> acc = before;
        for (size_t j = 0; j < sent_indices.size(); ++j) acc[sent_indices[j]] += out.values[j];
        ASSERT_TRUE(c->undo_send(sent_indices, out.values).ok()) << what;
        const auto after = c->residual();
        for (size_t i = 0; i < n; ++i) ASSERT_EQ(bits(after[i]), bits(acc[i])) << what << " index " << i;
        if (f == ValueFormat::kF32 && m != Method::kDense && mode == ErrorFeedbackMode::kEf) {
          // f32: the sent entries' residual was exactly 0, so it is acc exactly.
          for (size_t j = 0; j < sent_indices.size(); ++j) ASSERT_EQ(bits(before[sent_indices[j]]), bits(0.0f));
        }
        ASSERT_TRUE(fresh->set_residual(after).ok());
        const auto g = normal(n, 43);
        ASSERT_TRUE(c->compress(g, 1.0f, again, 2).ok());
        ASSERT_TRUE(fresh->compress(g, 1.0f, want, 2).ok());
        ASSERT_EQ(again.indices, want.indices) << what;
        for (size_t j = 0; j < want.values.size(); ++j) ASSERT_EQ(bits(again.values[j]), bits(want.values[j])) << what;
        const auto r1 = c->residual(), r2 = fresh->residual();
        for (size_t i = 0; i < n; ++i) ASSERT_EQ(bits(r1[i]), bits(r2[i])) << what << " index " << i;
      }
    }
  }
}

TEST_P(CompressorTest, UndoSendOfOneShardsPartAndBadArgumentsChangeNothingElse) {
  const size_t n = 5000;
  auto c = make(n, topk_options(100));
  ASSERT_NE(c, nullptr);
  SparseVector out;
  ASSERT_TRUE(c->compress(normal(n, 44), 1.0f, out, 0).ok());
  ASSERT_EQ(out.size(), 100u);
  const auto before = c->residual();
  // Only the part below key 2500 (one shard's run of the sorted selection).
  size_t cut = 0;
  while (cut < out.size() && out.indices[cut] < 2500) ++cut;
  ASSERT_GT(cut, 0u);
  ASSERT_LT(cut, out.size());
  const std::span<const uint32_t> idx(out.indices);
  const std::span<const float> val(out.values);
  ASSERT_TRUE(c->undo_send(idx.first(cut), val.first(cut)).ok());
  auto r = c->residual();
  for (size_t j = 0; j < out.size(); ++j)
    EXPECT_EQ(bits(r[out.indices[j]]), bits(j < cut ? out.values[j] : 0.0f)) << j;
  const auto state = c->residual();
  const std::vector<uint32_t> unsorted = {7, 3}, outside = {1, static_cast<uint32_t>(n)}, repeated = {4, 4};
  const std::vector<float> two = {1.0f, 2.0f};
  EXPECT_EQ(c->undo_send(unsorted, two).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(c->undo_send(outside, two).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(c->undo_send(repeated, two).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(c->undo_send(unsorted, std::vector<float>{1.0f}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(c->undo_send(std::vector<uint32_t>{1, 2}, std::vector<float>{1.0f, NAN}).code(),
            StatusCode::kInvalidArgument);
  // A sum that overflows: refused, and the entry before it is untouched too.
  std::vector<float> big = state;
  big[10] = 3e38f;
  ASSERT_TRUE(c->set_residual(big).ok());
  const Status s = c->undo_send(std::vector<uint32_t>{5, 10}, std::vector<float>{1.0f, 3e38f});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("index 10"), std::string::npos) << s.message();
  EXPECT_EQ(c->residual(), big);
  // Without error feedback there is no residual to put anything into.
  auto none = make(n, topk_options(100, ErrorFeedbackMode::kNone));
  ASSERT_TRUE(none->compress(normal(n, 44), 1.0f, out, 0).ok());
  EXPECT_TRUE(none->undo_send(out.indices, out.values).ok());
  EXPECT_EQ(none->residual_norm_sq(), 0.0);
}

TEST_P(CompressorTest, ApproximateMethodsLandNearK) {
  const size_t n = 200000, k = 2000;
  for (Method m : {Method::kGaussianK, Method::kSampled}) {
    CompressorOptions o;
    o.selection.method = m;
    o.selection.k = k;
    o.selection.seed = 3;
    auto c = make(n, o);
    SparseVector out;
    for (int s = 0; s < 5; ++s) {
      ASSERT_TRUE(c->compress(normal(n, 30 + static_cast<uint32_t>(s)), 0.1f, out, static_cast<uint64_t>(s)).ok());
      ASSERT_TRUE(std::is_sorted(out.indices.begin(), out.indices.end()));
      if (m == Method::kGaussianK) {
        EXPECT_GE(out.size(), 2 * k / 3) << "step " << s;
        EXPECT_LE(out.size(), (4 * k + 2) / 3) << "step " << s;
      } else {
        EXPECT_LE(out.size(), k);
        EXPECT_GE(out.size(), k / 2);
      }
    }
  }
}

TEST_P(CompressorTest, SampledMatchesTheReference) {
  expect_method_matches_reference(Method::kSampled, 60);
  CompressorOptions o;
  o.selection.method = Method::kSampled;
  o.selection.k = 500;
  o.momentum = 0.9f;
  expect_same_as_reference(o, gradient_mix(50000, 70), 8);
  o.values = ValueFormat::kBF16;
  expect_same_as_reference(o, gradient_mix(50000, 70), 8);
}

// CPU only: the CUDA backend sums the moments in another order, so its
// threshold may differ in the last bits (ApproximateMethodsLandNearK checks
// its band).
TEST_P(CompressorTest, GaussianKMatchesTheReferenceOnTheCpu) {
  if (GetParam() != Backend::kCpu) GTEST_SKIP() << "exact only on the CPU backend (moments summation order)";
  expect_method_matches_reference(Method::kGaussianK, 80);
  CompressorOptions o;
  o.selection.method = Method::kGaussianK;
  o.selection.k = 500;
  o.momentum = 0.9f;
  expect_same_as_reference(o, gradient_mix(50000, 90), 8);
  o.values = ValueFormat::kF16;
  o.error_feedback = ErrorFeedbackMode::kNone;
  expect_same_as_reference(o, gradient_mix(50000, 90), 4);
}

TEST_P(CompressorTest, ThresholdFusedResidualWithFormatsAndMomentum) {
  CompressorOptions o;
  o.selection.method = Method::kThreshold;
  o.selection.lambda = 0.15f;
  for (ValueFormat f : {ValueFormat::kF32, ValueFormat::kF16}) {
    o.values = f;
    o.momentum = 0.0f;
    expect_same_as_reference(o, gradient_mix(40000, 100), 6);
    o.momentum = 0.9f;
    expect_same_as_reference(o, gradient_mix(40000, 100), 6);
  }
  o.error_feedback = ErrorFeedbackMode::kNone;
  expect_same_as_reference(o, gradient_mix(40000, 100), 3);
}

TEST_P(CompressorTest, SetKChangesTheCount) {
  auto c = make(10000, topk_options(1000));
  SparseVector out;
  ASSERT_TRUE(c->compress(normal(10000, 40), 1.0f, out, 0).ok());
  EXPECT_EQ(out.size(), 1000u);
  c->set_k(10);
  ASSERT_TRUE(c->compress(normal(10000, 41), 1.0f, out, 1).ok());
  EXPECT_EQ(out.size(), 10u);
}

INSTANTIATE_TEST_SUITE_P(Backends, CompressorTest, ::testing::Values(Backend::kCpu, Backend::kCuda),
                         [](const ::testing::TestParamInfo<Backend>& p) { return backend_name(p.param); });

TEST(CpuCompressorTest, ThreadCountDoesNotChangeResults) {
  // Chunks split at multiples of 2^16, so use several of them.
  const size_t n = 300001;
  for (Method m : {Method::kTopK, Method::kThreshold, Method::kGaussianK, Method::kSampled}) {
    CompressorOptions o;
    o.selection.method = m;
    o.selection.k = 700;
    o.selection.lambda = 0.3f;
    CompressorOptions o2 = o;
    o2.threads = 3;
    CpuCompressor one(n, o), three(n, o2);
    SparseVector a, b;
    for (int s = 0; s < 4; ++s) {
      const auto g = normal(n, 50 + static_cast<uint32_t>(s));
      ASSERT_TRUE(one.compress(g, 0.1f, a, static_cast<uint64_t>(s)).ok());
      ASSERT_TRUE(three.compress(g, 0.1f, b, static_cast<uint64_t>(s)).ok());
      ASSERT_EQ(a.indices, b.indices) << static_cast<int>(m) << " step " << s;
      ASSERT_EQ(a.values, b.values);
      ASSERT_EQ(one.residual(), three.residual());
    }
  }
}

// The AVX2 first pass (chosen at run time) and the portable one give the
// same bits for every method, error-feedback mode and option.
TEST(CpuCompressorTest, Avx2AndPortablePassesAgree) {
  const size_t n = 70001;  // not a multiple of 16: the tail path too
  std::vector<CompressorOptions> cases;
  for (Method m : {Method::kTopK, Method::kThreshold, Method::kGaussianK, Method::kSampled, Method::kRandomK,
                   Method::kDense}) {
    for (ErrorFeedbackMode mode : {ErrorFeedbackMode::kNone, ErrorFeedbackMode::kEf, ErrorFeedbackMode::kHessianDiag}) {
      CompressorOptions o;
      o.selection.method = m;
      o.selection.k = 300;
      o.selection.lambda = 0.25f;
      o.selection.seed = 9;
      o.error_feedback = mode;
      cases.push_back(o);
    }
  }
  CompressorOptions with_momentum = cases[1];
  with_momentum.momentum = 0.9f;
  with_momentum.clip_norm = 50.0f;
  cases.push_back(with_momentum);
  CompressorOptions two_threads = cases[4];
  two_threads.threads = 2;
  cases.push_back(two_threads);
  const auto hessian = normal(n, 3);
  for (const auto& o : cases) {
    ::setenv("SPS_CPU_PASS", "baseline", 1);
    CpuCompressor portable(n, o);
    ::unsetenv("SPS_CPU_PASS");
    CpuCompressor native(n, o);
    ASSERT_FALSE(portable.avx2_pass());
    if (!native.avx2_pass()) GTEST_SKIP() << "this CPU has no AVX2: only the portable pass runs";
    if (o.error_feedback == ErrorFeedbackMode::kHessianDiag) {
      ASSERT_TRUE(portable.set_hessian_diag(hessian, 0.2f).ok());
      ASSERT_TRUE(native.set_hessian_diag(hessian, 0.2f).ok());
    }
    SparseVector a, b;
    for (int s = 0; s < 6; ++s) {
      const auto g = s % 2 == 0 ? normal(n, 200 + static_cast<uint32_t>(s)) : heavy_tailed(n, 300);
      ASSERT_TRUE(portable.compress(g, 0.1f, a, static_cast<uint64_t>(s)).ok());
      ASSERT_TRUE(native.compress(g, 0.1f, b, static_cast<uint64_t>(s)).ok());
      const std::string where = fmt::format("method {} mode {} step {}", static_cast<int>(o.selection.method),
                                            static_cast<int>(o.error_feedback), s);
      ASSERT_EQ(a.indices, b.indices) << where;
      ASSERT_EQ(a.values, b.values) << where;
      ASSERT_EQ(portable.residual(), native.residual()) << where;
      ASSERT_EQ(portable.momentum(), native.momentum()) << where;
      EXPECT_EQ(portable.last_stats().candidates, native.last_stats().candidates) << where;
    }
  }
}

// compress_device: the CUDA backend gives exactly what compress gives from
// host memory; the CPU backend refuses device pointers with a clear message.
TEST_P(CompressorTest, DeviceGradientGivesTheHostResult) {
  auto o = topk_options(300);
  const size_t n = 50000;
  auto host = make(n, o);
  auto dev = make(n, o);
  ASSERT_NE(host, nullptr);
  ASSERT_NE(dev, nullptr);
  const auto g = normal(n, 11);
  SparseVector a, b;
  ASSERT_TRUE(host->compress(g, 0.5f, a, 0).ok());
  if (GetParam() == Backend::kCpu) {
    const Status s = dev->compress_device(g.data(), n, 0.5f, b, 0);
    EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
    EXPECT_NE(s.message().find("compression.backend: cuda"), std::string::npos) << s.message();
    EXPECT_TRUE(b.indices.empty());
    return;
  }
#if SPS_TEST_CUDA
  auto d = cuda::DeviceArray::create(n);
  ASSERT_TRUE(d.ok()) << d.status().to_string();
  ASSERT_TRUE(d.value()->upload(0, g.data(), n).ok());
  ASSERT_TRUE(d.value()->synchronize().ok());
  ASSERT_TRUE(dev->compress_device(d.value()->data(), n, 0.5f, b, 0).ok());
  EXPECT_EQ(a.indices, b.indices);
  EXPECT_EQ(a.values, b.values);
  EXPECT_EQ(host->residual(), dev->residual());
#endif
}

#if SPS_TEST_CUDA
TEST(DeviceArrayTest, UploadScatterDownloadRoundTrip) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device: " << backend_description();
  const size_t n = 10000;
  auto made = cuda::DeviceArray::create(n);
  ASSERT_TRUE(made.ok()) << made.status().to_string();
  auto& a = *made.value();
  std::vector<float> host(n), back(n);
  for (size_t i = 0; i < n; ++i) host[i] = static_cast<float>(i);
  ASSERT_TRUE(a.upload(0, host.data(), n).ok());
  std::vector<uint32_t> keys{0, 17, 9999};
  std::vector<float> values{-1, -2, -3};
  ASSERT_TRUE(a.scatter(keys.data(), values.data(), keys.size()).ok());
  for (size_t i = 0; i < keys.size(); ++i) host[keys[i]] = values[i];
  ASSERT_TRUE(a.download(0, back.data(), n).ok());
  EXPECT_EQ(back, host);
  const uint32_t past = n;
  EXPECT_EQ(a.scatter(&past, values.data(), 1).code(), StatusCode::kOutOfRange);
}
#endif

TEST(CompressorOptionsTest, InconsistentOptionsAreRefused) {
  CompressorOptions o;
  o.selection.method = Method::kRandomK;
  o.selection.randomk_unbiased = true;
  EXPECT_FALSE(make_compressor(Backend::kCpu, 10, o).ok());
  o = {};
  o.momentum = 1.5f;
  EXPECT_FALSE(make_compressor(Backend::kCpu, 10, o).ok());
  o = {};
  o.selection.method = Method::kThreshold;
  o.selection.lambda = -1;
  EXPECT_FALSE(make_compressor(Backend::kCpu, 10, o).ok());
  if (!cuda_available()) {
    auto c = make_compressor(Backend::kCuda, 10, CompressorOptions{});
    ASSERT_FALSE(c.ok());
    EXPECT_FALSE(c.status().message().empty());
  }
}

TEST(ValueFormatTest, HalfConversionsRoundToNearestEvenAndSaturate) {
  EXPECT_EQ(f32_to_f16(1.0f), 0x3C00);
  EXPECT_EQ(f32_to_f16(-2.0f), 0xC000);
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7BFF);
  EXPECT_EQ(f32_to_f16(65519.0f), 0x7BFF);  // rounds down to the largest finite
  EXPECT_EQ(f32_to_f16(1e9f), 0x7BFF);      // saturates instead of Inf
  EXPECT_EQ(f32_to_f16(-1e9f), 0xFBFF);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -26)), 0x0000);  // below half of it: 0
  EXPECT_EQ(f32_to_f16(std::ldexp(3.0f, -25)), 0x0002);  // 1.5 units: ties to even
  EXPECT_EQ(f32_to_f16(1.0f + std::ldexp(1.0f, -11)), 0x3C00);  // halfway: to even (down)
  EXPECT_EQ(f32_to_f16(1.0f + std::ldexp(3.0f, -11)), 0x3C02);  // halfway: to even (up)
  for (uint32_t h = 0; h < 0x7C00; ++h) {  // every finite half round-trips
    ASSERT_EQ(f32_to_f16(f16_to_f32(static_cast<uint16_t>(h))), h);
    ASSERT_EQ(f32_to_f16(f16_to_f32(static_cast<uint16_t>(h | 0x8000))), h | 0x8000);
  }
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(3.140625f)), 3.140625f);
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x3F808000u)), 0x3F80);  // tie: to even
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x3F818000u)), 0x3F82);
  EXPECT_EQ(f32_to_bf16(3.4e38f), 0x7F7F);  // would round to Inf: saturates
}

}  // namespace
}  // namespace sps::kernels
