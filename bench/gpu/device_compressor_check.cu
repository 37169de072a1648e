// Standalone correctness check of cuda::DeviceCompressor for GPU machines
// without our Debian libraries (tests/ holds the gtest suites that compare
// against the CPU backend). Each case runs a few steps on the device and on
// a plain host reference of the step (compressor.h's arithmetic, written
// the obvious way: stable sort for top-k, linear scans for the rest) and
// compares indices, values, residual and momentum bit for bit. Exits 1 on
// the first mismatch, 2 without a device.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/device_compressor.h"
#include "common/value_format.h"

namespace {

using namespace sps::kernels;
using namespace sps::kernels::cuda;
using sps::Status;
using sps::bits_float;
using sps::float_bits;
using sps::ValueFormat;

uint32_t key(float x) { return float_bits(x) & 0x7FFFFFFFu; }

double quantile(double p) {
  if (p >= 1) return 0;
  if (p <= 0) return INFINITY;
  double lo = 0, hi = 40;
  for (int i = 0; i < 200; ++i) {
    const double mid = 0.5 * (lo + hi);
    if (std::erfc(mid / std::sqrt(2.0)) > p) lo = mid; else hi = mid;
  }
  return 0.5 * (lo + hi);
}

// The reference compressor: same options, host buffers.
struct Ref {
  size_t n;
  DeviceOptions o;
  std::vector<float> r, u, c;
  double threshold = 0;
  int rounds = 0;
  bool fallback = false;
  // Scaled formats: the bucket scales this reference computed, and the
  // device's, which it sends with (their sums run in another order).
  std::vector<sps::ScaleRun> value_scales, forced_scales;
  uint64_t step_number = 0;  // qsgd's draws

  Ref(size_t n_, const DeviceOptions& o_) : n(n_), o(o_), r(n_, 0.0f), u(n_, 0.0f), c(n_, 1.0f) {
    o.k = std::min(o.k, n);
  }

  // Top-k of `cand` (ascending) by |acc|, ties to the smaller index.
  std::vector<uint32_t> topk(const std::vector<float>& acc, std::vector<uint32_t> cand, size_t k) {
    if (k >= cand.size()) return cand;
    std::stable_sort(cand.begin(), cand.end(), [&](uint32_t a, uint32_t b) { return key(acc[a]) > key(acc[b]); });
    cand.resize(k);
    std::sort(cand.begin(), cand.end());
    return cand;
  }
  std::vector<uint32_t> all() const {
    std::vector<uint32_t> v(n);
    std::iota(v.begin(), v.end(), 0u);
    return v;
  }
  static float min_mag(const std::vector<float>& acc, const std::vector<uint32_t>& s) {
    uint32_t low = 0xFFFFFFFFu;
    for (uint32_t i : s) low = std::min(low, key(acc[i]));
    return s.empty() ? 0.0f : bits_float(low);
  }

  // Returns false (and the index) on non-finite input; state unchanged then.
  bool step(const std::vector<float>& g, float scale, const StepInputs& in, std::vector<uint32_t>& idx,
            std::vector<float>& val, size_t& bad) {
    const size_t k = o.k;
    float factor = 1.0f;
    if (o.clip_norm > 0) {
      double sq = 0;
      for (float x : g) sq += double{x} * x;
      const double norm = std::sqrt(sq);
      if (norm > o.clip_norm) factor = static_cast<float>(o.clip_norm / norm);
    }
    std::vector<float> acc(n), un(n);
    const bool mom = o.momentum > 0;
    for (size_t i = 0; i < n; ++i) {
      float x = g[i] * factor;
      if (mom) x = o.momentum * u[i] + x;
      un[i] = x;
      const float su = scale * x;
      if (o.error_feedback == DeviceErrorFeedback::kEf) acc[i] = r[i] + su;
      else if (o.error_feedback == DeviceErrorFeedback::kHessianDiag) acc[i] = c[i] * r[i] + su;
      else acc[i] = su;
    }
    for (bad = 0; bad < n; ++bad)
      if (!std::isfinite(acc[bad])) return false;
    threshold = 0;
    rounds = 0;
    fallback = false;
    std::vector<uint32_t> s;
    switch (o.method) {
      case DeviceMethod::kDense: s = all(); break;
      case DeviceMethod::kTopK:
        s = topk(acc, all(), k);
        threshold = min_mag(acc, s);
        break;
      case DeviceMethod::kThreshold: {
        for (size_t i = 0; i < n; ++i)
          if (key(acc[i]) >= key(o.lambda)) s.push_back(static_cast<uint32_t>(i));
        threshold = o.lambda;
        if (o.max_nnz > 0 && s.size() > o.max_nnz) {
          s = topk(acc, s, o.max_nnz);
          threshold = min_mag(acc, s);
        }
        break;
      }
      case DeviceMethod::kGaussianK: {
        if (k == 0) break;
        if (k >= n) {
          s = all();
          break;
        }
        double sum = 0, sq = 0;
        for (float a : acc) {
          sum += a;
          sq += double{a} * a;
        }
        const double mean = sum / static_cast<double>(n);
        const double var = n > 1 ? std::max(0.0, (sq - sum * mean) / static_cast<double>(n - 1)) : 0.0;
        const double kd = static_cast<double>(k);
        double thr = mean + std::sqrt(var) * quantile(kd / static_cast<double>(n));
        auto count = [&](double t) {
          s.clear();
          for (size_t i = 0; i < n; ++i)
            if (std::fabs(acc[i]) > static_cast<float>(t)) s.push_back(static_cast<uint32_t>(i));
          return s.size();
        };
        size_t cnt = count(thr);
        rounds = 1;
        while (rounds < 4) {
          if (static_cast<double>(cnt) < 2.0 * kd / 3.0) thr *= 0.5;
          else if (static_cast<double>(cnt) > 4.0 * kd / 3.0) thr *= 1.5;
          else break;
          cnt = count(thr);
          ++rounds;
        }
        threshold = thr;
        if (static_cast<double>(cnt) < 2.0 * kd / 3.0) {
          fallback = true;
          s = topk(acc, all(), k);
          threshold = min_mag(acc, s);
        } else {
          s = topk(acc, s, static_cast<size_t>(std::ceil(4.0 * kd / 3.0)));
        }
        break;
      }
      case DeviceMethod::kRandomK:
        if (k >= n) s = all();
        else s.assign(in.random_indices, in.random_indices + k);
        break;
      case DeviceMethod::kSampled: {
        if (k == 0) break;
        if (k >= n) {
          s = all();
          break;
        }
        std::vector<uint32_t> sample;
        for (size_t i = in.sample_start; i < n; i += in.sample_stride) sample.push_back(key(acc[i]));
        const double rho = static_cast<double>(k) / static_cast<double>(n);
        const size_t top = std::max<size_t>(1, static_cast<size_t>(std::ceil(rho * static_cast<double>(sample.size()))));
        std::sort(sample.begin(), sample.end(), std::greater<uint32_t>());
        float thr = bits_float(sample[top - 1]);
        while (true) {
          ++rounds;
          s.clear();
          for (size_t i = 0; i < n; ++i)
            if (std::fabs(acc[i]) >= thr) s.push_back(static_cast<uint32_t>(i));
          if (static_cast<double>(s.size()) < 0.8 * static_cast<double>(k) && rounds < 10 && thr > 0) {
            thr *= 0.8f;
            continue;
          }
          break;
        }
        threshold = thr;
        if (static_cast<double>(s.size()) > 1.3 * static_cast<double>(k)) s = topk(acc, s, k);
        else s.resize(std::min(k, s.size()));
        break;
      }
    }
    const bool unbiased = o.method == DeviceMethod::kRandomK && o.randomk_unbiased && k > 0;
    const float f = unbiased ? static_cast<float>(static_cast<double>(n) / static_cast<double>(k)) : 1.0f;
    idx = s;
    val.resize(s.size());
    // Scaled formats: a scale per bucket of selected values, in index order.
    value_scales.clear();
    const size_t bucket = o.quant_bucket > 0 ? o.quant_bucket : std::max<size_t>(s.size(), 1);
    for (size_t b = 0; sps::is_scaled(o.values) && b < s.size(); b += bucket) {
      const size_t end = std::min(s.size(), b + bucket);
      float max_abs = 0;
      double sum_abs = 0, sum_sq = 0, sum_pos = 0, sum_neg = 0, count_pos = 0;
      for (size_t j = b; j < end; ++j) {
        const float v = unbiased ? acc[s[j]] * f : acc[s[j]];
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
      const auto count = static_cast<double>(end - b);
      const sps::OneBitScales ob = sps::onebit_scales(sum_pos, count_pos, sum_neg, count - count_pos);
      value_scales.push_back(o.values == ValueFormat::kOneBit
                                 ? sps::ScaleRun{static_cast<uint32_t>(end - b), ob.positive, ob.negative}
                                 : sps::ScaleRun{static_cast<uint32_t>(end - b),
                                                 sps::value_scale_of(o.values, max_abs, sum_abs, sum_sq, count,
                                                                     o.qsgd_levels)});
    }
    const auto& used = forced_scales.size() == value_scales.size() ? forced_scales : value_scales;
    for (size_t j = 0; j < s.size(); ++j) {
      const uint32_t i = s[j];
      const float v = unbiased ? acc[i] * f : acc[i];
      if (o.values == ValueFormat::kOneBit) {
        val[j] = sps::onebit_sent(v < 0.0f, used[j / bucket].scale, used[j / bucket].negative_scale);
      } else if (sps::is_scaled(o.values)) {
        const float used_scale = used[j / bucket].scale;
        const uint32_t random =
            o.values == ValueFormat::kQsgd ? sps::quant_random24(o.seed, step_number, i) : 0u;
        val[j] = sps::dequantise(sps::quant_level(v, o.values, used_scale, random), used_scale);
      } else {
        val[j] = quantise(v, o.values);
      }
      acc[i] = acc[i] - val[j];
      un[i] = 0.0f;
    }
    if (o.error_feedback != DeviceErrorFeedback::kNone) r = acc;
    if (mom) u = un;
    return true;
  }
};

int failures = 0;
bool soft = false;  // clipping: bitwise agreement is not part of the contract

void fail(const std::string& what) {
  if (soft) {
    std::fprintf(stderr, "WARN (clipping, not required bitwise): %s\n", what.c_str());
    return;
  }
  std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  ++failures;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b, const std::string& what) {
  if (a.size() != b.size()) {
    fail(what + ": sizes " + std::to_string(a.size()) + " vs " + std::to_string(b.size()));
    return false;
  }
  for (size_t i = 0; i < a.size(); ++i)
    if (float_bits(a[i]) != float_bits(b[i])) {
      fail(what + ": first difference at " + std::to_string(i) + ": " + std::to_string(a[i]) + " vs " +
           std::to_string(b[i]));
      return false;
    }
  return true;
}

// Gradient generators: normal, or quantised to a few levels (many ties).
std::vector<float> make_grad(size_t n, std::mt19937& rng, bool ties) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> g(n);
  for (float& x : g) x = ties ? std::round(d(rng) * 2.0f) * 0.25f : d(rng);
  return g;
}

void run_case(const char* name, size_t n, DeviceOptions o, int steps, bool ties, float scale = 0.5f,
              bool hessian = false) {
  std::printf("case %-28s n=%zu\n", name, n);
  auto made = DeviceCompressor::create(n, o);
  if (!made.ok()) return fail(std::string(name) + ": create: " + made.status().message());
  auto& dev = *made;
  Ref ref(n, o);
  std::mt19937 rng(static_cast<unsigned>(n * 31 + steps));
  if (hessian) {
    std::vector<float> h(n);
    std::uniform_real_distribution<float> d(-0.5f, 3.0f);
    for (float& x : h) x = d(rng);
    const float gamma = 0.5f;
    size_t clamped = 0, ref_clamped = 0;
    const auto s = dev->set_hessian_diag(h.data(), gamma, clamped);
    if (!s.ok()) return fail(std::string(name) + ": set_hessian_diag: " + s.message());
    for (size_t i = 0; i < n; ++i) {
      float t = gamma * h[i];
      if (!(t >= 0.0f)) {
        t = 0.0f;
        ++ref_clamped;
      } else if (t > 1.0f) {
        t = 1.0f;
        ++ref_clamped;
      }
      ref.c[i] = 1.0f - t;
    }
    if (clamped != ref_clamped) return fail(std::string(name) + ": clamped count");
  }
  for (int t = 0; t < steps; ++t) {
    const std::vector<float> g = make_grad(n, rng, ties);
    StepInputs in;
    in.step = static_cast<uint64_t>(t);
    std::vector<uint32_t> rnd;
    if (o.method == DeviceMethod::kRandomK) {
      std::vector<char> taken(n, 0);
      std::uniform_int_distribution<size_t> d(0, n - 1);
      while (rnd.size() < std::min(o.k, n)) {
        const size_t i = d(rng);
        if (!taken[i]) {
          taken[i] = 1;
          rnd.push_back(static_cast<uint32_t>(i));
        }
      }
      std::sort(rnd.begin(), rnd.end());
      in.random_indices = rnd.data();
    }
    if (o.method == DeviceMethod::kSampled) {
      in.sample_stride = std::max<size_t>(1, n / 997);
      in.sample_start = static_cast<size_t>(t) % in.sample_stride;
    }
    std::vector<uint32_t> di, ri;
    std::vector<float> dv, rv;
    DeviceStats st;
    size_t bad = 0;
    const Status s = dev->compress_host(g.data(), scale, in, di, dv, st);
    ref.forced_scales.clear();
    for (size_t b = 0; b < st.value_scales.size(); ++b)
      ref.forced_scales.push_back({0, st.value_scales[b],
                                   b < st.value_negative_scales.size() ? st.value_negative_scales[b] : 0.0f});
    ref.step_number = in.step;
    const bool ok = ref.step(g, scale, in, ri, rv, bad);
    const std::string where = std::string(name) + " step " + std::to_string(t);
    if (!s.ok() || !ok) return fail(where + ": unexpected failure " + s.message());
    if (di != ri) return fail(where + ": indices differ (" + std::to_string(di.size()) + " vs " +
                              std::to_string(ri.size()) + ")");
    if (!same_bits(dv, rv, where + " values")) return;
    // Scaled formats: the device sums in another order, so its scales may
    // differ from the reference's in the last bits (int8's max is exact).
    if (sps::is_scaled(o.values)) {
      if (ref.forced_scales.size() != ref.value_scales.size())
        return fail(where + ": " + std::to_string(ref.forced_scales.size()) + " value scales, expected " +
                    std::to_string(ref.value_scales.size()));
      const bool exact = o.values == ValueFormat::kInt8;
      auto close = [&](float got, float want) {
        return exact ? got == want : std::fabs(got - want) <= 1e-6f * want;
      };
      for (size_t b = 0; b < ref.value_scales.size(); ++b)
        if (!close(ref.forced_scales[b].scale, ref.value_scales[b].scale) ||
            !close(ref.forced_scales[b].negative_scale, ref.value_scales[b].negative_scale))
          return fail(where + ": value scale of bucket " + std::to_string(b) + ": " +
                      std::to_string(ref.forced_scales[b].scale) + " vs " + std::to_string(ref.value_scales[b].scale));
      if (st.value_scale != (st.value_scales.empty() ? 0.0f : st.value_scales[0]))
        return fail(where + ": stats.value_scale is not the first bucket's");
    }
    if (st.nnz != ri.size()) return fail(where + ": stats.nnz");
    if (st.rounds != ref.rounds || st.fallback != ref.fallback) return fail(where + ": stats rounds/fallback");
    // gaussiank's threshold comes from mean/std, whose sums are ordered
    // differently on the device: equal to rounding only.
    const bool approx = o.method == DeviceMethod::kGaussianK && !ref.fallback;
    if (approx ? std::fabs(st.threshold - ref.threshold) > 1e-9 * std::fabs(ref.threshold) + 1e-300
               : st.threshold != ref.threshold)
      return fail(where + ": stats.threshold " + std::to_string(st.threshold) + " vs " + std::to_string(ref.threshold));
    std::vector<float> res(n);
    if (!dev->copy_residual(res.data()).ok()) return fail(where + ": copy_residual");
    if (!same_bits(res, ref.r, where + " residual")) return;
    if (o.momentum > 0) {
      std::vector<float> u(n);
      if (!dev->copy_momentum(u.data()).ok()) return fail(where + ": copy_momentum");
      if (!same_bits(u, ref.u, where + " momentum")) return;
    }
  }
}

void run_nonfinite(size_t n) {
  std::printf("case %-28s n=%zu\n", "non-finite refusal", n);
  DeviceOptions o;
  o.method = DeviceMethod::kTopK;
  o.k = 10;
  o.momentum = 0.5f;
  auto made = DeviceCompressor::create(n, o);
  if (!made.ok()) return fail("create: " + made.status().message());
  auto& dev = *made;
  std::mt19937 rng(7);
  std::vector<float> g = make_grad(n, rng, false);
  std::vector<uint32_t> idx;
  std::vector<float> val;
  DeviceStats st;
  if (!dev->compress_host(g.data(), 1.0f, StepInputs{}, idx, val, st).ok()) return fail("finite step failed");
  std::vector<float> r0(n), u0(n), r1(n), u1(n);
  if (!dev->copy_residual(r0.data()).ok() || !dev->copy_momentum(u0.data()).ok()) return fail("copy");
  g = make_grad(n, rng, false);
  const size_t first = n / 2 + 3;
  g[n - 2] = NAN;
  g[first] = INFINITY;
  const Status s = dev->compress_host(g.data(), 1.0f, StepInputs{}, idx, val, st);
  if (s.ok() || s.code() != sps::StatusCode::kInvalidArgument) return fail("non-finite input accepted");
  if (s.message().find("index " + std::to_string(first) + " ") == std::string::npos)
    return fail("message does not name index " + std::to_string(first) + ": " + s.message());
  if (!idx.empty() || !val.empty()) return fail("output not cleared on failure");
  if (!dev->copy_residual(r1.data()).ok() || !dev->copy_momentum(u1.data()).ok()) return fail("copy");
  if (!same_bits(r1, r0, "residual after refusal") || !same_bits(u1, u0, "momentum after refusal")) return;
  g[n - 2] = 1.0f;
  g[first] = 2.0f;
  if (!dev->compress_host(g.data(), 1.0f, StepInputs{}, idx, val, st).ok()) return fail("step after refusal failed");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && !std::strcmp(argv[1], "--help")) {
    std::printf("usage: %s\n  compares cuda::DeviceCompressor with a host reference; exit 1 on mismatch\n", argv[0]);
    return 0;
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "no CUDA device\n");
    return 2;
  }
  for (size_t n : {size_t{1000}, size_t{100003}, size_t{3000017}}) {
    DeviceOptions o;
    o.method = DeviceMethod::kTopK;
    for (size_t k : {size_t{0}, size_t{1}, size_t{7}, n / 100, n - 1, n}) {
      o.k = k;
      run_case(("topk k=" + std::to_string(k)).c_str(), n, o, 3, false);
      run_case(("topk ties k=" + std::to_string(k)).c_str(), n, o, 3, true);
    }
    o.k = n / 100;
    run_case("topk zeros (scale 0)", n, o, 2, false, 0.0f);
    o.values = ValueFormat::kF16;
    run_case("topk f16", n, o, 3, false);
    o.values = ValueFormat::kBF16;
    run_case("topk bf16 ties", n, o, 3, true);
    o.values = ValueFormat::kInt8;
    run_case("topk int8", n, o, 3, false);
    o.values = ValueFormat::kSign;
    run_case("topk sign ties", n, o, 3, true);
    o.values = ValueFormat::kQsgd;
    o.qsgd_levels = 7;
    o.seed = 11;
    run_case("topk qsgd", n, o, 3, false);
    o.values = ValueFormat::kOneBit;
    run_case("topk onebit", n, o, 3, false);
    o.quant_bucket = 0;  // one scale over the whole selection
    run_case("topk onebit one bucket", n, o, 3, false);
    o.values = ValueFormat::kQsgd;
    run_case("topk qsgd one bucket", n, o, 3, false);
    o.quant_bucket = 512;
    o.values = ValueFormat::kF32;

    DeviceOptions th;
    th.method = DeviceMethod::kThreshold;
    th.lambda = 1.5f;
    run_case("threshold", n, th, 3, false);
    th.max_nnz = n / 200 + 1;
    run_case("threshold max_nnz ties", n, th, 3, true);
    th.lambda = 1e30f;
    run_case("threshold nothing passes", n, th, 2, false);

    DeviceOptions rk;
    rk.method = DeviceMethod::kRandomK;
    rk.k = n / 50 + 1;
    run_case("randomk ef", n, rk, 3, false);
    rk.error_feedback = DeviceErrorFeedback::kNone;
    rk.randomk_unbiased = true;
    rk.values = ValueFormat::kBF16;
    run_case("randomk unbiased bf16", n, rk, 3, false);
    rk.values = ValueFormat::kQsgd;
    run_case("randomk unbiased qsgd", n, rk, 3, false);

    DeviceOptions dn;
    dn.method = DeviceMethod::kDense;
    dn.k = n;
    dn.values = ValueFormat::kF16;
    run_case("dense f16", n, dn, 2, false, 1e4f);
    dn.values = ValueFormat::kSign;
    run_case("dense sign", n, dn, 2, false);
    dn.values = ValueFormat::kOneBit;
    run_case("dense onebit", n, dn, 2, false);

    DeviceOptions gk;
    gk.method = DeviceMethod::kGaussianK;
    gk.k = n / 100 + 1;
    run_case("gaussiank", n, gk, 3, false);
    run_case("gaussiank ties (fallback?)", n, gk, 3, true);

    DeviceOptions sm;
    sm.method = DeviceMethod::kSampled;
    sm.k = n / 100 + 1;
    run_case("sampled", n, sm, 3, false);
    run_case("sampled ties", n, sm, 3, true);

    DeviceOptions mo;
    mo.method = DeviceMethod::kTopK;
    mo.k = n / 100 + 1;
    mo.momentum = 0.9f;
    mo.error_feedback = DeviceErrorFeedback::kHessianDiag;
    mo.values = ValueFormat::kF16;
    run_case("momentum+hessian+f16", n, mo, 4, false, 0.5f, true);
    mo.error_feedback = DeviceErrorFeedback::kNone;
    run_case("momentum, no ef", n, mo, 3, false);
    mo.error_feedback = DeviceErrorFeedback::kEf;
    mo.momentum = 0.0f;
    mo.clip_norm = 1.0f;  // clipping is on for every step here (||g|| >> 1)
    soft = true;
    run_case("clip", n, mo, 2, false);
    soft = false;

    run_nonfinite(n);
  }
  if (failures > 0) {
    std::printf("%d FAILED\n", failures);
    return 1;
  }
  std::printf("all cases passed\n");
  return 0;
}
