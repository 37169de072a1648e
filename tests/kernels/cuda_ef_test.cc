// The CUDA accumulate step against the CPU one. Skips (with the reason)
// where the CUDA backend was not built or no device is present.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kernels/backend.h"
#if SPS_TEST_CUDA
#include "kernels/cuda/ef_accumulate.h"
#endif

namespace sps::kernels {
namespace {

TEST(CudaBackendTest, ProbeAnswers) {
  const std::string d = backend_description();
  EXPECT_EQ(d.rfind("cpu", 0), 0u) << d;
  EXPECT_EQ(cuda_built(), d.find("cuda") != std::string::npos);
  if (!cuda_built()) {
    EXPECT_FALSE(cuda_available());
  }
}

TEST(CudaBackendTest, AccumulateMatchesCpuBitForBit) {
#if SPS_TEST_CUDA
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device: " << backend_description();
  const size_t n = 1 << 20;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  std::vector<float> r(n), g(n), acc(n);
  for (size_t i = 0; i < n; ++i) {
    r[i] = normal(rng);
    g[i] = normal(rng);
  }
  g[17] = NAN;
  auto bad = cuda::ef_accumulate(r.data(), g.data(), 0.25f, acc.data(), n);
  ASSERT_TRUE(bad.ok()) << bad.status().to_string();
  EXPECT_EQ(*bad, 1u);
  for (size_t i = 0; i < n; ++i) {
    if (i == 17) continue;
    const float want = r[i] + 0.25f * g[i];
    ASSERT_EQ(acc[i], want) << i;
  }
#else
  GTEST_SKIP() << "CUDA backend not built (SPS_CUDA=OFF or no nvcc)";
#endif
}

}  // namespace
}  // namespace sps::kernels
