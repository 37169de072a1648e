// sps-grad end to end: the real binary on real files, checked against the
// library it wraps.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <tuple>

#include <nlohmann/json.hpp>

#include "kernels/grad_file.h"
#include "kernels/sparsify.h"

namespace sps::kernels {
namespace {

// One folder per test process: CTest runs the tests of this file in
// parallel, and they must not share out.txt or their inputs.
std::string dir() {
  const auto d = std::filesystem::path(::testing::TempDir()) / ("sps-grad-test-" + std::to_string(getpid()));
  std::filesystem::create_directories(d);
  return d.string();
}

// Runs sps-grad with `args`; returns (exit status, stdout+stderr).
std::pair<int, std::string> grad(const std::string& args) {
  const std::string out = dir() + "/out.txt";
  const int rc = std::system((std::string(SPS_BIN_DIR) + "/sps-grad " + args + " > " + out + " 2>&1").c_str());
  std::ifstream f(out);
  std::stringstream ss;
  ss << f.rdbuf();
  return {WEXITSTATUS(rc), ss.str()};
}

std::vector<float> random_vector(size_t n) {
  std::mt19937 rng(8);
  std::normal_distribution<float> normal;
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

std::vector<uint32_t> read_u32(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::vector<char> b((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<uint32_t> out(b.size() / 4);
  std::memcpy(out.data(), b.data(), out.size() * 4);
  return out;
}

TEST(GradToolTest, SelectMatchesTheLibraryAndWritesItsFiles) {
  const auto g = random_vector(50000);
  const std::string in = dir() + "/g.f32";
  ASSERT_TRUE(save_f32(in, g).ok());
  auto [rc, out] = grad("select " + in + " --method topk --ratio 0.001 --indices " + dir() + "/i.u32 --values " +
                        dir() + "/v.f32 --error-feedback ef --residual-out " + dir() + "/r.f32 --json --repeat 3");
  ASSERT_EQ(rc, 0) << out;
  const auto j = nlohmann::json::parse(out);
  EXPECT_EQ(j["method"], "topk");
  EXPECT_EQ(j["n"], 50000);
  EXPECT_EQ(j["k_requested"], 50);
  EXPECT_EQ(j["nnz"], 50);
  EXPECT_EQ(j["repeat"], 3);
  for (const char* key : {"threshold", "residual_norm", "seconds"}) EXPECT_TRUE(j.contains(key)) << key;
  SparseVector want;
  TopKScratch scratch;
  topk_select(g, 50, want, scratch);
  EXPECT_EQ(read_u32(dir() + "/i.u32"), want.indices);
  auto values = load_f32(dir() + "/v.f32");
  ASSERT_TRUE(values.ok());
  EXPECT_EQ(*values, want.values);
  auto residual = load_f32(dir() + "/r.f32");
  ASSERT_TRUE(residual.ok());
  for (size_t i = 0; i < want.size(); ++i) (*residual)[want.indices[i]] = want.values[i];
  EXPECT_EQ(*residual, g);  // residual + sent == acc
}

TEST(GradToolTest, ScaledValueFormatsReportTheirScale) {
  const auto g = random_vector(20000);
  const std::string in = dir() + "/gs.f32";
  ASSERT_TRUE(save_f32(in, g).ok());
  auto [rc, out] = grad("select " + in + " --method topk --k 100 --value-format int8 --values " + dir() +
                        "/vs.f32 --error-feedback ef --residual-out " + dir() + "/rs.f32 --json");
  ASSERT_EQ(rc, 0) << out;
  const auto j = nlohmann::json::parse(out);
  EXPECT_EQ(j["value_format"], "int8");
  SparseVector want;
  TopKScratch scratch;
  topk_select(g, 100, want, scratch);
  float max_abs = 0;
  for (float v : want.values) max_abs = std::max(max_abs, std::fabs(v));
  const float scale = max_abs / 127.0f;
  EXPECT_EQ(j["value_scale"].get<float>(), scale);
  auto values = load_f32(dir() + "/vs.f32");
  auto residual = load_f32(dir() + "/rs.f32");
  ASSERT_TRUE(values.ok() && residual.ok());
  ASSERT_EQ(values->size(), 100u);
  for (size_t i = 0; i < 100; ++i) {
    const float level = std::nearbyint((*values)[i] / scale);
    EXPECT_EQ((*values)[i], level * scale) << i;
    EXPECT_EQ((*residual)[want.indices[i]] + (*values)[i], want.values[i]) << i;  // the rounding stays behind
  }
  std::tie(rc, out) = grad("select " + in + " --value-format qsgd --qsgd-levels 300");
  EXPECT_NE(rc, 0) << "levels above 127 are refused: " << out;

  // onebit reports both scales: the means of each side of the selection.
  std::tie(rc, out) = grad("select " + in + " --method topk --k 100 --value-format onebit --quant-bucket 0 --values " +
                           dir() + "/vo.f32 --json");
  ASSERT_EQ(rc, 0) << out;
  const auto o = nlohmann::json::parse(out);
  EXPECT_EQ(o["value_format"], "onebit");
  double sum_pos = 0, sum_neg = 0;
  int count_pos = 0;
  for (float v : want.values) {
    if (v < 0) {
      sum_neg -= v;
    } else {
      sum_pos += v;
      ++count_pos;
    }
  }
  ASSERT_GT(count_pos, 0);
  ASSERT_LT(count_pos, 100);
  // The compressor adds in another order (lanes): equal to a rounding.
  EXPECT_FLOAT_EQ(o["value_scale"].get<float>(), static_cast<float>(sum_pos / count_pos));
  EXPECT_FLOAT_EQ(o["value_negative_scale"].get<float>(), static_cast<float>(sum_neg / (100 - count_pos)));
  values = load_f32(dir() + "/vo.f32");
  ASSERT_TRUE(values.ok());
  for (size_t i = 0; i < 100; ++i)
    EXPECT_EQ((*values)[i], want.values[i] < 0 ? -o["value_negative_scale"].get<float>() : o["value_scale"].get<float>());
}

TEST(GradToolTest, ResidualIsFedIn) {
  const std::vector<float> g = {1, 0, 0, 0};
  const std::vector<float> r = {0, 0, 5, 0};
  ASSERT_TRUE(save_f32(dir() + "/g4.f32", g).ok());
  ASSERT_TRUE(save_f32(dir() + "/r4.f32", r).ok());
  auto [rc, out] = grad("select " + dir() + "/g4.f32 --k 1 --error-feedback ef --residual " + dir() +
                        "/r4.f32 --indices " + dir() + "/i4.u32 --json");
  ASSERT_EQ(rc, 0) << out;
  EXPECT_EQ(read_u32(dir() + "/i4.u32"), std::vector<uint32_t>{2});
}

TEST(GradToolTest, StatsRecogniseANormalShapeAndReadNpy) {
  const auto g = random_vector(100000);
  const std::string npy = dir() + "/g.npy";
  {
    std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (100000,), }";
    header.append(128 - 10 - header.size() - 1, ' ');  // pad: 10 + header is a multiple of 64
    header += '\n';
    std::ofstream f(npy, std::ios::binary);
    f.write("\x93NUMPY\x01\x00", 8);
    const char len[2] = {static_cast<char>(header.size()), static_cast<char>(header.size() >> 8)};
    f.write(len, 2);
    f.write(header.data(), static_cast<std::streamsize>(header.size()));
    f.write(reinterpret_cast<const char*>(g.data()), static_cast<std::streamsize>(g.size() * 4));
  }
  auto [rc, out] = grad("stats " + npy + " --json");
  ASSERT_EQ(rc, 0) << out;
  const auto j = nlohmann::json::parse(out);
  EXPECT_EQ(j["n"], 100000);
  EXPECT_NEAR(j["std"].get<double>(), 1.0, 0.02);
  EXPECT_NEAR(j["excess_kurtosis"].get<double>(), 0.0, 0.1);
  EXPECT_LT(j["ks_distance_to_normal"].get<double>(), 0.01);
  EXPECT_NEAR(j["within_1_2_3_sigma"][1].get<double>(), 0.954, 0.01);
  // Heavy tails are told apart.
  std::mt19937 rng(3);
  std::cauchy_distribution<float> cauchy;
  std::vector<float> heavy(100000);
  for (auto& x : heavy) x = cauchy(rng);
  ASSERT_TRUE(save_f32(dir() + "/heavy.f32", heavy).ok());
  auto [rc2, out2] = grad("stats " + dir() + "/heavy.f32 --json");
  ASSERT_EQ(rc2, 0);
  EXPECT_GT(nlohmann::json::parse(out2)["excess_kurtosis"].get<double>(), 10.0);
}

TEST(GradToolTest, XiOfTwoWorkersByHand) {
  // k = 1. Worker 0 selects 3 at index 0, worker 1 selects 2 at index 1; the
  // mean of their acc is [1.5, 1, 0, 1], whose top-1 is 1.5 at index 0. So
  // TopK(mean) - mean TopK = [1.5, 0, 0, 0] - [1.5, 1, 0, 0], of norm 1,
  // divided by the norm of the mean update.
  const std::string d = dir();
  ASSERT_TRUE(save_f32(d + "/a0.f32", {3, 0, 0, 1}).ok());
  ASSERT_TRUE(save_f32(d + "/a1.f32", {0, 2, 0, 1}).ok());
  ASSERT_TRUE(save_f32(d + "/u0.f32", {1, 1, 1, 1}).ok());
  ASSERT_TRUE(save_f32(d + "/u1.f32", {1, 1, 2, 0}).ok());
  auto [rc, out] = grad("xi " + d + "/a0.f32 " + d + "/a1.f32 --updates " + d + "/u0.f32 " + d + "/u1.f32 --k 1 --json");
  ASSERT_EQ(rc, 0) << out;
  const auto j = nlohmann::json::parse(out);
  EXPECT_EQ(j["k"], 1);
  EXPECT_EQ(j["workers"], 2);
  EXPECT_NEAR(j["gap_norm"].get<double>(), 1.0, 1e-12);
  // Mean update [1, 1, 1.5, 0.5]: norm sqrt(1 + 1 + 2.25 + 0.25) = sqrt(4.5).
  EXPECT_NEAR(j["update_norm"].get<double>(), std::sqrt(4.5), 1e-12);
  EXPECT_NEAR(j["xi"].get<double>(), 1.0 / std::sqrt(4.5), 1e-12);
  // Errors: (10 - 9) / 10 and (5 - 4) / 5, averaged.
  EXPECT_NEAR(j["compression_error"].get<double>(), 0.15, 1e-12);
  EXPECT_NEAR(j["compression_error_bound"].get<double>(), 0.75, 1e-12);
  EXPECT_NEAR(j["union_over_k"].get<double>(), 2.0, 1e-12);
  EXPECT_NEAR(j["global_topk_covered"].get<double>(), 1.0, 1e-12);
  // Workers that agree have xi = 0.
  std::tie(rc, out) = grad("xi " + d + "/a0.f32 " + d + "/a0.f32 --updates " + d + "/u0.f32 " + d + "/u1.f32 --k 1");
  ASSERT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("= 0 / 2.121 = 0\n"), std::string::npos) << out;
  // Mismatched inputs are named.
  std::tie(rc, out) = grad("xi " + d + "/a0.f32 " + d + "/a1.f32 --updates " + d + "/u0.f32 --k 1");
  EXPECT_EQ(rc, 1);
  EXPECT_NE(out.find("2 acc files but 1 --updates files"), std::string::npos) << out;
  ASSERT_TRUE(save_f32(d + "/short.f32", {1, 2}).ok());
  std::tie(rc, out) = grad("xi " + d + "/a0.f32 " + d + "/short.f32 --updates " + d + "/u0.f32 " + d + "/u1.f32");
  EXPECT_EQ(rc, 1);
  EXPECT_NE(out.find("short.f32 holds 2 values"), std::string::npos) << out;
}

TEST(GradToolTest, BadInputIsAClearError) {
  {
    std::ofstream f(dir() + "/odd.f32", std::ios::binary);
    f.write("abc", 3);
  }
  auto [rc, out] = grad("select " + dir() + "/odd.f32");
  EXPECT_EQ(rc, 1);
  EXPECT_NE(out.find("not a whole number of float32"), std::string::npos) << out;
  std::tie(rc, out) = grad("stats " + dir() + "/missing.f32");
  EXPECT_EQ(rc, 1);
  EXPECT_NE(out.find("cannot open"), std::string::npos) << out;
  ASSERT_TRUE(save_f32(dir() + "/nan.f32", {1.0f, NAN, 2.0f}).ok());
  std::tie(rc, out) = grad("select " + dir() + "/nan.f32 --k 1");
  EXPECT_EQ(rc, 1);
  EXPECT_NE(out.find("index 1"), std::string::npos) << out;
  std::tie(rc, out) = grad("select " + dir() + "/nan.f32 --method threshold");
  EXPECT_EQ(rc, 1);
  EXPECT_NE(out.find("--lambda"), std::string::npos) << out;
  std::tie(rc, out) = grad("--help");
  EXPECT_EQ(rc, 0);
  EXPECT_NE(out.find("select"), std::string::npos);
}

}  // namespace
}  // namespace sps::kernels
