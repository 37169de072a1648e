// Selection and apply cost against one memory pass over the same data.
//
//   BM_MemoryPass/n        baseline: copy n floats once (memcpy, read + write)
//   BM_TopK/n/permille     exact top-k selection alone
//   BM_EfCompress/n/perm.  the whole worker step: acc = e + lr*g, check, top-k, residual update
//   BM_ScatterAdd/n/perm.  baseline for apply: a plain scatter-add of k entries
//   BM_ShardApply/n/perm.  the server's BSP apply of 4 workers' k-entry pushes
#include <benchmark/benchmark.h>

#include <cmath>
#include <random>
#include <vector>

#include "kernels/sparsify.h"
#include "scheduler/consistency.h"
#include "server/shard.h"

namespace {

std::vector<float> gaussian(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

void BM_MemoryPass(benchmark::State& state) {
  const auto x = gaussian(static_cast<size_t>(state.range(0)), 1);
  std::vector<float> y(x.size());
  for (auto _ : state) {
    std::copy(x.begin(), x.end(), y.begin());  // memcpy: one read + one write of n floats
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * state.range(0) * 4);
}

void BM_TopK(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  const auto x = gaussian(n, 2);
  const size_t k = sps::kernels::k_from_ratio(static_cast<double>(state.range(1)) / 1000.0, n);
  sps::kernels::SparseVector out;
  std::vector<float> scratch;
  for (auto _ : state) {
    sps::kernels::topk_select(x, k, out, scratch);
    benchmark::DoNotOptimize(out.indices.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * state.range(0) * 4);
}

void BM_EfCompress(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  const auto g = gaussian(n, 3);
  const size_t k = sps::kernels::k_from_ratio(static_cast<double>(state.range(1)) / 1000.0, n);
  sps::kernels::ErrorFeedbackCompressor c(n, sps::kernels::Method::kTopK, sps::kernels::ErrorFeedbackMode::kEf, k);
  sps::kernels::SparseVector out;
  for (auto _ : state) {
    if (!c.compress(g, 0.01f, out).ok()) state.SkipWithError("compress failed");
    benchmark::DoNotOptimize(out.indices.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * state.range(0) * 4);
}

std::vector<uint32_t> sorted_keys(size_t n, size_t k, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint32_t> keys(k);
  for (size_t i = 0; i < k; ++i) keys[i] = static_cast<uint32_t>(i * (n / k) + rng() % (n / k));
  return keys;
}

void BM_ScatterAdd(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  const size_t k = sps::kernels::k_from_ratio(static_cast<double>(state.range(1)) / 1000.0, n);
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

void BM_ShardApply(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  const size_t k = sps::kernels::k_from_ratio(static_cast<double>(state.range(1)) / 1000.0, n);
  sps::server::Shard shard(0, static_cast<uint32_t>(n), 4, sps::server::Optimizer::plain(1.0f),
                           std::make_unique<sps::scheduler::BspPolicy>());
  std::vector<std::vector<uint32_t>> keys;
  for (uint32_t w = 0; w < 4; ++w) keys.push_back(sorted_keys(n, k, w));
  const std::vector<float> values(k, 0.5f);
  uint64_t clock = 0;
  for (auto _ : state) {
    for (uint32_t w = 0; w < 4; ++w)
      if (!shard.add_push(w, clock, clock, keys[w], values).ok()) state.SkipWithError("push refused");
    if (shard.apply_ready() != 1) state.SkipWithError("no apply");
    ++clock;
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()) * 4 * static_cast<int64_t>(k));
}

void sizes(benchmark::internal::Benchmark* b) {
  for (int64_t n : {10'000, 100'000, 1'000'000, 10'000'000})
    for (int64_t permille : {1, 10}) b->Args({n, permille});
}

}  // namespace

BENCHMARK(BM_MemoryPass)->Arg(10'000)->Arg(100'000)->Arg(1'000'000)->Arg(10'000'000);
BENCHMARK(BM_TopK)->Apply(sizes);
BENCHMARK(BM_EfCompress)->Apply(sizes);
BENCHMARK(BM_ScatterAdd)->Apply(sizes);
BENCHMARK(BM_ShardApply)->Apply(sizes);
BENCHMARK_MAIN();
