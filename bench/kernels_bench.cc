// Selection and apply cost against baselines measured in the same run.
//
//   BM_FusedPass/n           baseline A: one fused pass r = r + s*g (read g, read r,
//                            write r) — the bandwidth bound of an error-feedback step
//   BM_NthElementEf/n/pm     baseline B: the straightforward EF + top-k
//                            (acc = r + s*g; nth_element on |acc|; gather; zero)
//   BM_Ef<Method>/n/pm       the sps compressor step for each method
//                            (pm = ratio in per mille: 1 = 0.1 %, 10 = 1 %)
//   BM_EfTopK<Format>/n/pm   top-k with f16 or scaled values (int8, qsgd, sign, onebit; buckets of 512)
//   BM_EfDense[<Format>]/n   dense pushes, f32 or every value quantised
//   BM_ValueCoding/n/t       encode + decode (with validation) of a dense push's
//                            values: t = 1 f32, 2 f16, 3 bf16 (protocol ValueType)
//   BM_ScatterAdd/n/pm       baseline for apply: a plain scatter-add of 4 x k entries
//   BM_ShardApply/n/pm       the server's BSP apply of 4 workers' k-entry pushes
//                            (decoded in place, as the server holds them)
//   BM_ShardApplyAsync/n/pm  the same pushes applied on arrival (ssp/asp)
//   BM_ShardApplyAsyncFillingLog/n/pm  the same on a fresh shard, while its
//                            change log (for sparse pulls) fills up: a job's
//                            first n / 2 pushed keys (compare with the above)
//   BM_ShardApply[Async]2Threads/n/pm  the same with a shard of 2 threads
//                            (cluster.server_threads: 2)
//   BM_ShardApplyRule/n/pm/r BM_ShardApply with the optimizer a job config names:
//                            r = 0 sgd (gradient pushes), 1 sgd + momentum 0.9,
//                            2 adagrad, 3 lazy adam, 4 adam
//   BM_ShardPublish/n/pm/c   compressed pulls (downlink topk, pm per mille of the
//                            shard): one publish, owed = x - x_hat over the shard,
//                            top-k of it, x_hat[S] = x[S] (compare with BM_FusedPass);
//                            every key owes, f32 values (c = 0) or f16 (c = 1,
//                            x_hat[S] = round(x[S])); or k/2 keys owe (c = 2);
//                            or a sparse push changed k/2 keys since the last
//                            publish (SGD's usual case): the publish reads
//                            only those (c = 3), or passes over the whole
//                            shard as before (c = 4, the same result); the
//                            same two with f16 values (c = 5, 6); pm = 100:
//                            c = 3, 4 only (n/20 keys, near the n/8 limit)
//   BM_Gather/n/pm, BM_Scatter/n/pm  baselines for a sparse pull of k keys:
//                            plain loops reading or writing the parameters
//   BM_ShardGather/n/pm      the server's gather for that pull answer
//   BM_ScatterAhead/n/pm     the worker's scatter of it (keys kKeysAhead ahead);
//                            ...HugePages: into parameters on huge pages, as
//                            the worker holds them
//   BM_IndexCoding/n/pm/e    encode + decode (with validation) of one push of a
//                            top-k index set: e = 1 raw u32, 2 delta varint,
//                            3 bitmap; counters: index bytes per key, message bytes
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <span>
#include <vector>

#include "common/huge_pages.h"
#include "common/scattered_keys.h"
#include "kernels/cpu_compressor.h"
#include "kernels/sparsify.h"
#include "scheduler/consistency.h"
#include "protocol/message.h"
#include "server/shard.h"

namespace {

using sps::kernels::Method;

std::vector<float> gaussian(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

size_t k_of(const benchmark::State& state) {
  return sps::kernels::k_from_ratio(static_cast<double>(state.range(1)) / 1000.0,
                                    static_cast<size_t>(state.range(0)));
}

void BM_FusedPass(benchmark::State& state) {
  const auto g = gaussian(static_cast<size_t>(state.range(0)), 1);
  std::vector<float> r(g.size(), 0.0f);
  for (auto _ : state) {
    for (size_t i = 0; i < g.size(); ++i) r[i] = r[i] + 0.01f * g[i];
    benchmark::DoNotOptimize(r.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * state.range(0) * 12);
}

void BM_NthElementEf(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  const size_t k = k_of(state);
  const auto g = gaussian(n, 2);
  std::vector<float> r(n, 0.0f), mag(n);
  std::vector<uint32_t> idx(k);
  std::vector<float> val(k);
  for (auto _ : state) {
    for (size_t i = 0; i < n; ++i) {
      r[i] = r[i] + 0.01f * g[i];
      mag[i] = std::fabs(r[i]);
    }
    std::nth_element(mag.begin(), mag.begin() + static_cast<std::ptrdiff_t>(k - 1), mag.end(), std::greater<float>());
    const float t = mag[k - 1];
    size_t j = 0;
    for (size_t i = 0; i < n && j < k; ++i) {
      if (std::fabs(r[i]) >= t) {
        idx[j] = static_cast<uint32_t>(i);
        val[j++] = r[i];
        r[i] = 0.0f;
      }
    }
    benchmark::DoNotOptimize(val.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * state.range(0) * 12);
}

// A stream of distinct gradients, like successive training steps (built
// once per n and shared by every case).
const std::vector<std::vector<float>>& gradient_stream(size_t n) {
  static std::map<size_t, std::vector<std::vector<float>>> streams;
  auto& s = streams[n];
  if (s.empty())
    for (uint32_t i = 0; i < 4; ++i) s.push_back(gaussian(n, 100 + i));
  return s;
}

constexpr float kLr = 0.01f;
constexpr int kWarmupSteps = 16;

// The steady state of error feedback on i.i.d. gradients: an entry last
// sent `age` steps ago holds the sum of `age` gradients, with ages spread
// over the ~1/rho steps between sends.
std::vector<float> steady_state_residual(size_t n, size_t k, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> age(0.0f, static_cast<float>(n) / static_cast<float>(k));
  std::vector<float> r(n);
  for (auto& x : r) x = kLr * std::sqrt(age(rng)) * normal(rng);
  return r;
}

// Runs the compressor on the gradient stream from a steady state (the
// residual above, then kWarmupSteps untimed steps), so the threshold a step
// needs is what it is in training, not the all-zero start. The hard threshold gets
// lambda calibrated the way docs/kernels.md recommends: the k-th largest
// |acc| of a top-k run at the same ratio after the warm-up.
void run_compressor(benchmark::State& state, Method m, int threads = 1, sps::ValueFormat values = sps::ValueFormat::kF32) {
  const size_t n = static_cast<size_t>(state.range(0));
  const auto& grads = gradient_stream(n);
  sps::kernels::CompressorOptions o;
  o.selection.method = m;
  o.selection.k = k_of(state);
  o.selection.seed = 1;
  o.threads = threads;
  o.values = values;
  o.qsgd_levels = 16;
  uint64_t step = 0;
  sps::kernels::SparseVector out;
  std::vector<float> residual = steady_state_residual(n, o.selection.k, 7);
  if (m == Method::kThreshold) {
    sps::kernels::CompressorOptions po = o;
    po.selection.method = Method::kTopK;
    sps::kernels::CpuCompressor topk(n, po);
    (void)topk.set_residual(residual);
    for (; step < kWarmupSteps; ++step) (void)topk.compress(grads[step % grads.size()], kLr, out, step);
    o.selection.lambda = static_cast<float>(topk.last_stats().threshold);
    residual = topk.residual();
  }
  sps::kernels::CpuCompressor c(n, o);
  (void)c.set_residual(residual);
  for (int i = 0; i < kWarmupSteps; ++i, ++step) (void)c.compress(grads[step % grads.size()], kLr, out, step);
  const uint64_t predicted_before = c.predicted_steps();
  size_t nnz = 0, candidates = 0;
  int64_t timed = 0;
  for (auto _ : state) {
    if (!c.compress(grads[step % grads.size()], kLr, out, step).ok()) state.SkipWithError("compress failed");
    ++step;
    ++timed;
    nnz += out.size();
    candidates += c.last_stats().candidates;
    benchmark::DoNotOptimize(out.indices.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * state.range(0) * 12);
  const double steps_k = static_cast<double>(timed) * static_cast<double>(o.selection.k);
  state.counters["nnz_per_k"] = static_cast<double>(nnz) / steps_k;
  state.counters["cand_per_k"] = static_cast<double>(candidates) / steps_k;
  // Steps whose first-pass candidates sufficed (no second pass over n).
  state.counters["predicted"] =
      static_cast<double>(c.predicted_steps() - predicted_before) / static_cast<double>(timed);
}

void BM_EfTopK(benchmark::State& s) { run_compressor(s, Method::kTopK); }
void BM_EfThreshold(benchmark::State& s) { run_compressor(s, Method::kThreshold); }
void BM_EfGaussianK(benchmark::State& s) { run_compressor(s, Method::kGaussianK); }
void BM_EfRandomK(benchmark::State& s) { run_compressor(s, Method::kRandomK); }
void BM_EfSampled(benchmark::State& s) { run_compressor(s, Method::kSampled); }
void BM_EfTopK2Threads(benchmark::State& s) { run_compressor(s, Method::kTopK, 2); }
void BM_EfThreshold2Threads(benchmark::State& s) { run_compressor(s, Method::kThreshold, 2); }
// Scaled values (buckets of 512): one more pass over the k selected values.
void BM_EfTopKF16(benchmark::State& s) { run_compressor(s, Method::kTopK, 1, sps::ValueFormat::kF16); }
void BM_EfTopKInt8(benchmark::State& s) { run_compressor(s, Method::kTopK, 1, sps::ValueFormat::kInt8); }
void BM_EfTopKQsgd(benchmark::State& s) { run_compressor(s, Method::kTopK, 1, sps::ValueFormat::kQsgd); }
void BM_EfTopKSign(benchmark::State& s) { run_compressor(s, Method::kTopK, 1, sps::ValueFormat::kSign); }
void BM_EfTopKOneBit(benchmark::State& s) { run_compressor(s, Method::kTopK, 1, sps::ValueFormat::kOneBit); }
// Dense pushes: every value quantised (EF-signSGD is dense + sign).
void BM_EfDense(benchmark::State& s) { run_compressor(s, Method::kDense); }
void BM_EfDenseF16(benchmark::State& s) { run_compressor(s, Method::kDense, 1, sps::ValueFormat::kF16); }
void BM_EfDenseBF16(benchmark::State& s) { run_compressor(s, Method::kDense, 1, sps::ValueFormat::kBF16); }
void BM_EfDenseInt8(benchmark::State& s) { run_compressor(s, Method::kDense, 1, sps::ValueFormat::kInt8); }
void BM_EfDenseQsgd(benchmark::State& s) { run_compressor(s, Method::kDense, 1, sps::ValueFormat::kQsgd); }
void BM_EfDenseSign(benchmark::State& s) { run_compressor(s, Method::kDense, 1, sps::ValueFormat::kSign); }
void BM_EfDenseOneBit(benchmark::State& s) { run_compressor(s, Method::kDense, 1, sps::ValueFormat::kOneBit); }

std::vector<uint32_t> sorted_keys(size_t n, size_t k, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint32_t> keys(k);
  for (size_t i = 0; i < k; ++i) keys[i] = static_cast<uint32_t>(i * (n / k) + rng() % (n / k));
  return keys;
}

void BM_ScatterAdd(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  const size_t k = k_of(state);
  std::vector<float> params(n, 0.0f);
  std::vector<std::vector<uint32_t>> keys;
  for (uint32_t w = 0; w < 4; ++w) keys.push_back(sorted_keys(n, k, w));
  const std::vector<float> values(k, 0.5f);
  for (auto _ : state) {
    for (const auto& kw : keys)
      for (size_t i = 0; i < k; ++i) params[kw[i]] -= 0.25f * values[i];
    benchmark::DoNotOptimize(params.data());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()) * 4 * static_cast<int64_t>(k));
}

// Rounds of 4 k-key pushes after which a shard's change log (n / 2 keys)
// is full and evicts as it logs: the steady state of a job. The timed loops
// start there; BM_ShardApplyAsyncFillingLog times the rounds before it.
// The header of a k-key push (raw u32 keys, decoded in place) into a shard of n.
sps::protocol::Header raw_push_header(size_t n, size_t k) {
  sps::protocol::Header h;
  h.type = sps::protocol::MessageType::kPush;
  h.index_encoding = sps::protocol::IndexEncoding::kRawU32;
  h.key_end = static_cast<uint32_t>(n);
  h.nnz = static_cast<uint32_t>(k);
  return h;
}

size_t rounds_to_fill_the_change_log(size_t n, size_t k) { return n / 2 / (4 * std::max<size_t>(k, 1)) + 1; }

void run_shard_apply(benchmark::State& state, int threads,
                     sps::server::Optimizer optimizer = sps::server::Optimizer::plain(1.0f)) {
  const size_t n = static_cast<size_t>(state.range(0));
  const size_t k = k_of(state);
  sps::server::Shard shard(0, static_cast<uint32_t>(n), 4, std::move(optimizer),
                           std::make_unique<sps::scheduler::BspPolicy>(), threads);
  std::vector<std::vector<uint32_t>> keys;
  for (uint32_t w = 0; w < 4; ++w) keys.push_back(sorted_keys(n, k, w));
  const std::vector<float> values(k, 0.5f);
  const sps::protocol::Header h = raw_push_header(n, k);
  uint64_t clock = 0;
  auto round = [&] {
    for (uint32_t w = 0; w < 4; ++w)
      if (!shard.add_push(w, clock, clock, sps::protocol::DataView(h, keys[w], values), nullptr).ok())
        state.SkipWithError("push refused");
    if (shard.apply_ready() != 1) state.SkipWithError("no apply");
    (void)shard.take_handled();
    ++clock;
  };
  for (size_t i = 0; i < rounds_to_fill_the_change_log(n, k); ++i) round();
  for (auto _ : state) round();
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()) * 4 * static_cast<int64_t>(k));
}

// The same pushes applied on arrival (ssp/asp): one optimizer pass per push.
void run_shard_apply_async(benchmark::State& state, int threads) {
  const size_t n = static_cast<size_t>(state.range(0));
  const size_t k = k_of(state);
  sps::server::Shard shard(0, static_cast<uint32_t>(n), 4, sps::server::Optimizer::plain(1.0f),
                           std::make_unique<sps::scheduler::AspPolicy>(), threads);
  std::vector<std::vector<uint32_t>> keys;
  for (uint32_t w = 0; w < 4; ++w) keys.push_back(sorted_keys(n, k, w));
  const std::vector<float> values(k, 0.5f);
  const sps::protocol::Header h = raw_push_header(n, k);
  uint64_t clock = 0;
  auto round = [&] {
    for (uint32_t w = 0; w < 4; ++w)
      if (!shard.add_push(w, clock, shard.version(), sps::protocol::DataView(h, keys[w], values), nullptr).ok())
        state.SkipWithError("push refused");
    (void)shard.take_handled();
    ++clock;
  };
  for (size_t i = 0; i < rounds_to_fill_the_change_log(n, k); ++i) round();
  for (auto _ : state) round();
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()) * 4 * static_cast<int64_t>(k));
}

// The first pushes a shard takes, while its change log is still filling
// (it holds n / 2 keys): up to 12 rounds of 4 pushes, on a fresh shard each
// iteration (made and dropped outside the timing).
void BM_ShardApplyAsyncFillingLog(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  const size_t k = k_of(state);
  const size_t rounds = std::max<size_t>(1, std::min<size_t>(12, n / 2 / (4 * k)));
  std::vector<std::vector<uint32_t>> keys;
  for (uint32_t w = 0; w < 4; ++w) keys.push_back(sorted_keys(n, k, w));
  const std::vector<float> values(k, 0.5f);
  const sps::protocol::Header h = raw_push_header(n, k);
  for (auto _ : state) {
    state.PauseTiming();
    auto shard = std::make_unique<sps::server::Shard>(0, static_cast<uint32_t>(n), 4, sps::server::Optimizer::plain(1.0f),
                                                      std::make_unique<sps::scheduler::AspPolicy>());
    state.ResumeTiming();
    for (uint64_t clock = 0; clock < rounds; ++clock) {
      for (uint32_t w = 0; w < 4; ++w)
        if (!shard->add_push(w, clock, shard->version(), sps::protocol::DataView(h, keys[w], values), nullptr).ok())
          state.SkipWithError("push refused");
      (void)shard->take_handled();
    }
    state.PauseTiming();
    shard.reset();
    state.ResumeTiming();
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * rounds * 4 * k));
}

// A sparse pull of k changed keys (one push's worth, ascending; at 1 % of
// 25M about 400 bytes apart, a cache miss each). Baselines: the plain loops.
void BM_Gather(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  const std::vector<uint32_t> keys = sorted_keys(n, k_of(state), 7);
  const std::vector<float> params(n, 0.5f);
  std::vector<float> out(keys.size());
  for (auto _ : state) {
    for (size_t i = 0; i < keys.size(); ++i) out[i] = params[keys[i]];
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * keys.size()));
}

// The server's gather for that answer (Shard::gather, keys kKeysAhead ahead).
void BM_ShardGather(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  const std::vector<uint32_t> keys = sorted_keys(n, k_of(state), 7);
  sps::server::Shard shard(0, static_cast<uint32_t>(n), 1, sps::server::Optimizer::plain(1.0f),
                           std::make_unique<sps::scheduler::BspPolicy>());
  std::vector<float> out;
  for (auto _ : state) {
    shard.gather(keys, out);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * keys.size()));
}

void BM_Scatter(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  const std::vector<uint32_t> keys = sorted_keys(n, k_of(state), 7);
  std::vector<float> params(n, 0.0f);
  const std::vector<float> values(keys.size(), 0.5f);
  for (auto _ : state) {
    for (size_t i = 0; i < keys.size(); ++i) params[keys[i]] = values[i];
    benchmark::DoNotOptimize(params.data());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * keys.size()));
}

// The worker's scatter of that answer into its parameters (PsClient::pull),
// on 4 KiB pages and, as the worker keeps them, on huge pages.
template <class Params>
void run_scatter_ahead(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  const std::vector<uint32_t> keys = sorted_keys(n, k_of(state), 7);
  Params params(n, 0.0f);
  const std::vector<float> values(keys.size(), 0.5f);
  float* const x = params.data();
  for (auto _ : state) {
    sps::for_scattered_keys<sps::Access::kWrite>(x, 0, keys.data(), 0, keys.size(),
                                                 [&](size_t i) { x[keys[i]] = values[i]; });
    benchmark::DoNotOptimize(params.data());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * keys.size()));
}
void BM_ScatterAhead(benchmark::State& s) { run_scatter_ahead<std::vector<float>>(s); }
void BM_ScatterAheadHugePages(benchmark::State& s) { run_scatter_ahead<sps::HugePageVector<float>>(s); }

void BM_ShardApply(benchmark::State& s) { run_shard_apply(s, 1); }
void BM_ShardApply2Threads(benchmark::State& s) { run_shard_apply(s, 2); }
void BM_ShardApplyAsync(benchmark::State& s) { run_shard_apply_async(s, 1); }
void BM_ShardApplyRule(benchmark::State& s) {
  sps::config::Config cfg;
  cfg.compression.scale = sps::config::Scale::kOne;
  cfg.training.lr = 0.001;
  switch (s.range(2)) {
    case 1: cfg.optimizer.momentum = 0.9; break;
    case 2: cfg.optimizer.name = sps::config::OptimizerName::kAdagrad; break;
    case 3:
      cfg.optimizer.name = sps::config::OptimizerName::kAdam;
      cfg.optimizer.lazy = true;
      break;
    case 4: cfg.optimizer.name = sps::config::OptimizerName::kAdam; break;
    default: break;
  }
  run_shard_apply(s, 1, sps::server::Optimizer::from_config(cfg, static_cast<uint32_t>(s.range(0))));
}
void BM_ShardApplyAsync2Threads(benchmark::State& s) { run_shard_apply_async(s, 2); }

void BM_ShardPublish(benchmark::State& s) {
  const auto n = static_cast<uint32_t>(s.range(0));
  const int64_t scenario = s.range(2);
  sps::server::Shard shard(0, n, 1, sps::server::Optimizer::plain(1.0f), std::make_unique<sps::scheduler::BspPolicy>());
  sps::kernels::SelectionParams top;
  top.method = Method::kTopK;
  top.k = k_of(s);
  if (!shard.enable_downlink(top, scenario == 1 || scenario >= 5 ? sps::ValueFormat::kF16 : sps::ValueFormat::kF32).ok()) {
    s.SkipWithError("enable_downlink failed");
    return;
  }
  const std::vector<float> before = gaussian(n, 3);
  shard.set_params(before);
  if (scenario >= 3) {
    // Each iteration: (untimed) a push of k/2 keys is applied, then the
    // publish that the next pull runs.
    shard.set_publish_incremental(scenario == 3 || scenario == 5);
    const size_t stride = std::max<size_t>(1, 2 * n / std::max<size_t>(top.k, 1));
    std::vector<uint32_t> keys;
    for (size_t j = stride / 2; j < n; j += stride) keys.push_back(static_cast<uint32_t>(j));
    // +v and -v in turn, so x keeps its scale however many iterations run
    // (with f16 values a drifting x would round ever more keys to their old
    // value, and the two scenarios would publish different counts).
    const std::vector<float> values = gaussian(keys.size(), 5, 0.01f);
    std::vector<float> negated(values);
    for (float& v : negated) v = -v;
    size_t published = 0;
    uint64_t clock = 0;
    for (auto _ : s) {
      s.PauseTiming();
      if (!shard.add_push(0, clock, shard.version(), keys, clock % 2 == 0 ? values : negated).ok() ||
          shard.apply_ready() != 1) {
        s.SkipWithError("push failed");
        return;
      }
      ++clock;
      s.ResumeTiming();
      published += shard.publish().nnz;
    }
    s.counters["keys"] = static_cast<double>(published) / static_cast<double>(std::max<int64_t>(s.iterations(), 1));
    return;
  }
  // One dense update: version 1, x = before - g.
  std::vector<uint32_t> all(n);
  for (uint32_t j = 0; j < n; ++j) all[j] = j;
  (void)shard.add_push(0, 0, 0, all, gaussian(n, 4, 0.01f));
  shard.apply_ready();
  // The copy each iteration publishes from (same work every iteration):
  // scenarios 0 and 1 a copy from before the update, so every key owes a
  // bell-shaped amount and top-k selects; scenario 2 a copy that owes on
  // k/2 keys only, sent without a selection (SGD's usual case).
  std::vector<float> copy = before;
  if (scenario == 2) {
    copy.assign(shard.params().begin(), shard.params().end());
    const size_t stride = std::max<size_t>(1, 2 * n / std::max<size_t>(top.k, 1));
    for (size_t j = 0; j < n; j += stride) copy[j] = before[j];
  }
  size_t published = 0;
  for (auto _ : s) {
    s.PauseTiming();
    if (!shard.restore_published(copy, 0).ok()) {
      s.SkipWithError("restore_published failed");
      return;
    }
    s.ResumeTiming();
    published += shard.publish().nnz;
  }
  s.counters["keys"] = static_cast<double>(published) / static_cast<double>(std::max<int64_t>(s.iterations(), 1));
  s.SetBytesProcessed(static_cast<int64_t>(s.iterations()) * s.range(0) * 12);
}

// The index set top-k selects from i.i.d. data: each key independently with
// probability k/n (geometric gaps).
std::vector<uint32_t> topk_like_keys(size_t n, size_t k, uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::geometric_distribution<uint32_t> gap(static_cast<double>(k) / static_cast<double>(n));
  std::vector<uint32_t> keys;
  for (uint64_t key = gap(rng); key < n; key += 1 + uint64_t{gap(rng)}) keys.push_back(static_cast<uint32_t>(key));
  return keys;
}

namespace p = sps::protocol;

// encode_data + decode_message + decode_data (with full validation) of one
// message; false, with the error set on `state`, when the round trip fails.
bool coding_round_trip(benchmark::State& state, const p::Header& h, std::span<const uint32_t> keys,
                       std::span<const float> values, p::ValueType type, p::FramePool& pool, p::DecodeScratch& scratch,
                       size_t* index_bytes = nullptr, size_t* message_bytes = nullptr) {
  const auto m = p::encode_data(h, keys, values, type, &pool);
  const std::vector<p::ByteSpan> frames = {m.header, m.frame1, m.frame2};
  auto view = p::decode_message(frames);
  if (!view.ok()) {
    state.SkipWithError("header refused");
    return false;
  }
  auto data = p::decode_data(*view, 0, h.key_end, scratch);
  if (!data.ok() || data->size() != values.size()) {
    state.SkipWithError("round trip failed");
    return false;
  }
  benchmark::DoNotOptimize(data->keys().data());
  benchmark::DoNotOptimize(data->values().data());
  if (index_bytes != nullptr) *index_bytes = m.frame1.size();
  if (message_bytes != nullptr) *message_bytes = m.total_bytes();
  return true;
}

void BM_IndexCoding(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  const auto keys = topk_like_keys(n, k_of(state), 7);
  const std::vector<float> values(keys.size(), 0.5f);
  p::Header h;
  h.type = p::MessageType::kPush;
  h.index_encoding = static_cast<p::IndexEncoding>(state.range(2));
  h.key_end = static_cast<uint32_t>(n);
  p::FramePool pool;
  p::DecodeScratch scratch;
  size_t index_bytes = 0;
  size_t message_bytes = 0;
  for (auto _ : state)
    if (!coding_round_trip(state, h, keys, values, p::ValueType::kF32, pool, scratch, &index_bytes, &message_bytes))
      break;
  state.counters["index_bytes_per_key"] = static_cast<double>(index_bytes) / static_cast<double>(keys.size());
  state.counters["message_bytes"] = static_cast<double>(message_bytes);
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()) * static_cast<int64_t>(keys.size()));
}

// A dense push of gradient-like values (the f32 row is the memcpy-and-check
// baseline the half formats are compared with).
void BM_ValueCoding(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  const auto type = static_cast<p::ValueType>(state.range(1));
  const auto values = gaussian(n, 9, 0.01f);
  p::Header h;
  h.type = p::MessageType::kPush;
  h.index_encoding = p::IndexEncoding::kNone;
  h.key_end = static_cast<uint32_t>(n);
  p::FramePool pool;
  p::DecodeScratch scratch;
  bool warm = false;  // the first round faults the pool's frame and the scratch in: untimed
  for (auto _ : state) {
    if (!warm) {
      state.PauseTiming();
      warm = coding_round_trip(state, h, {}, values, type, pool, scratch);
      state.ResumeTiming();
      if (!warm) break;
    }
    if (!coding_round_trip(state, h, {}, values, type, pool, scratch)) break;
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()) * static_cast<int64_t>(n));
}

void coding_sizes(benchmark::internal::Benchmark* b) {
  for (int64_t n : {1'000'000, 25'000'000})
    for (int64_t permille : {1, 10, 100})
      for (int64_t e : {1, 2, 3}) b->Args({n, permille, e});
  b->Unit(benchmark::kMillisecond);
}

void sizes(benchmark::internal::Benchmark* b) {
  for (int64_t n : {1'000'000, 25'000'000})
    for (int64_t permille : {1, 10}) b->Args({n, permille});
  b->Unit(benchmark::kMillisecond);
}

}  // namespace

BENCHMARK(BM_FusedPass)->Arg(1'000'000)->Arg(25'000'000)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_NthElementEf)->Apply(sizes);
BENCHMARK(BM_EfTopK)->Apply(sizes);
BENCHMARK(BM_EfThreshold)->Apply(sizes);
BENCHMARK(BM_EfGaussianK)->Apply(sizes);
BENCHMARK(BM_EfRandomK)->Apply(sizes);
BENCHMARK(BM_EfSampled)->Apply(sizes);
BENCHMARK(BM_EfTopK2Threads)->Apply(sizes);
BENCHMARK(BM_EfThreshold2Threads)->Apply(sizes);
BENCHMARK(BM_EfTopKF16)->Apply(sizes);
BENCHMARK(BM_EfTopKInt8)->Apply(sizes);
BENCHMARK(BM_EfTopKQsgd)->Apply(sizes);
BENCHMARK(BM_EfTopKSign)->Apply(sizes);
BENCHMARK(BM_EfTopKOneBit)->Apply(sizes);
BENCHMARK(BM_EfDense)->Args({1'000'000, 1000})->Args({25'000'000, 1000})->Unit(benchmark::kMillisecond);
BENCHMARK(BM_EfDenseF16)->Args({1'000'000, 1000})->Args({25'000'000, 1000})->Unit(benchmark::kMillisecond);
BENCHMARK(BM_EfDenseBF16)->Args({1'000'000, 1000})->Args({25'000'000, 1000})->Unit(benchmark::kMillisecond);
BENCHMARK(BM_EfDenseInt8)->Args({1'000'000, 1000})->Args({25'000'000, 1000})->Unit(benchmark::kMillisecond);
BENCHMARK(BM_EfDenseQsgd)->Args({1'000'000, 1000})->Args({25'000'000, 1000})->Unit(benchmark::kMillisecond);
BENCHMARK(BM_EfDenseSign)->Args({1'000'000, 1000})->Args({25'000'000, 1000})->Unit(benchmark::kMillisecond);
BENCHMARK(BM_EfDenseOneBit)->Args({1'000'000, 1000})->Args({25'000'000, 1000})->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ScatterAdd)->Apply(sizes);
BENCHMARK(BM_ShardApply)->Apply(sizes);
BENCHMARK(BM_ShardApplyAsync)->Apply(sizes);
BENCHMARK(BM_ShardApplyRule)
    ->ArgsProduct({{1'000'000, 25'000'000}, {1, 10}, {0, 1, 2, 3, 4}})
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ShardApplyAsyncFillingLog)->Apply(sizes)->UseRealTime();
BENCHMARK(BM_ShardApply2Threads)->Apply(sizes)->UseRealTime();
BENCHMARK(BM_ShardApplyAsync2Threads)->Apply(sizes)->UseRealTime();
BENCHMARK(BM_ShardPublish)->Apply([](benchmark::internal::Benchmark* b) {
  for (int64_t n : {1'000'000, 25'000'000})
    for (int64_t permille : {1, 10})
      for (int64_t scenario : {0, 1, 2, 3, 4, 5, 6}) b->Args({n, permille, scenario});
  // Near the tracking limit (n/8): pushes of n/20 keys.
  for (int64_t n : {1'000'000, 25'000'000})
    for (int64_t scenario : {3, 4}) b->Args({n, 100, scenario});
  b->Unit(benchmark::kMillisecond);
});
BENCHMARK(BM_Gather)->Apply(sizes);
BENCHMARK(BM_ShardGather)->Apply(sizes);
BENCHMARK(BM_Scatter)->Apply(sizes);
BENCHMARK(BM_ScatterAhead)->Apply(sizes);
BENCHMARK(BM_ScatterAheadHugePages)->Apply(sizes);
BENCHMARK(BM_IndexCoding)->Apply(coding_sizes);
BENCHMARK(BM_ValueCoding)
    ->ArgsProduct({{1'000'000, 25'000'000}, {1, 2, 3}})
    ->Unit(benchmark::kMillisecond);
BENCHMARK_MAIN();
