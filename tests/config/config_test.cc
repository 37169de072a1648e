#include "config/config.h"

#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

namespace sps::config {
namespace {

TEST(ConfigTest, DefaultsAreValid) {
  auto c = load("");
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_EQ(c->training.steps, 500);
  EXPECT_EQ(c->compression.method, CompressionMethod::kTopK);
  EXPECT_EQ(c->cluster.num_servers, 1);
}

TEST(ConfigTest, DemoConfigLoads) {
  auto c = load(std::string(SPS_SOURCE_DIR) + "/config/demo.yaml");
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_EQ(c->cluster.num_workers, 4);
  EXPECT_EQ(c->cluster.num_servers, 2);
  EXPECT_EQ(c->model.name, "logreg");
  EXPECT_EQ(c->compression.ratio, 0.01);
  EXPECT_EQ(c->compression.error_feedback, ErrorFeedback::kEf);
  EXPECT_EQ(c->consistency.mode, ConsistencyMode::kBsp);
  EXPECT_EQ(c->run_folder(), "runs/demo");
}

// Found by the config fuzzer: text that is not UTF-8 used to be accepted
// and then made the JSON log writer throw. It is refused, naming the key.
TEST(ConfigTest, StringsMustBeUtf8) {
  auto bad = load_from_string(std::string("run:\n  name: a\x98" "b\n"), "bad.yaml");  // a raw 0x98 byte
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("run.name: is not valid UTF-8"), std::string::npos) << bad.status().message();
  EXPECT_FALSE(load_from_string(std::string("model:\n  options: {width: \xC0\x80}\n"), "bad.yaml").ok());  // overlong
  EXPECT_FALSE(load_from_string("", "x", {std::string("model.options.w=\xE2\x82")}).ok());      // truncated
  auto good = load_from_string("run:\n  name: \"caf\u00e9-\u65e5\u672c\"\n", "good.yaml");
  ASSERT_TRUE(good.ok()) << good.status().message();
  EXPECT_NO_THROW((void)to_json(*good).dump());
}

TEST(ConfigTest, GpuModelNeedsTheCudaCompressor) {
  auto c = load_from_string("model:\n  device: cuda\n", "gpu.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("gpu.yaml: model.device: cuda"), std::string::npos) << c.status().message();
  EXPECT_NE(c.status().message().find("compression.backend: cuda"), std::string::npos);
  EXPECT_TRUE(load_from_string("model:\n  device: cuda\ncompression:\n  backend: cuda\n", "gpu.yaml").ok());
  EXPECT_FALSE(load_from_string("model:\n  device: tpu\n", "gpu.yaml").ok());
}

TEST(ConfigTest, ParsesEveryKind) {
  auto c = load_from_string(R"(
run: {name: x, progress: false}
training:
  lr: 1e-2
  steps: 10
compression:
  method: dense
  scale: 1
)",
                            "t.yaml");
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_FALSE(c->run.progress);
  EXPECT_DOUBLE_EQ(c->training.lr, 0.01);
  EXPECT_EQ(c->training.steps, 10);
  EXPECT_EQ(c->compression.method, CompressionMethod::kDense);
  EXPECT_EQ(c->compression.scale, Scale::kOne);
}

void expect_error(const std::string& yaml, const std::string& fragment, const std::vector<std::string>& sets = {}) {
  auto c = load_from_string(yaml, "job.yaml", sets);
  ASSERT_FALSE(c.ok()) << "accepted: " << yaml;
  EXPECT_NE(c.status().message().find(fragment), std::string::npos)
      << "message '" << c.status().message() << "' lacks '" << fragment << "'";
}

TEST(ConfigTest, UnknownKeyNamesFileLineAndKey) {
  expect_error("training:\n  steps: 5\n  lrr: 0.1\n", "job.yaml:3:3: unknown key 'training.lrr'");
  expect_error("trainin:\n  steps: 5\n", "job.yaml:1:1: unknown key 'trainin'");
}

TEST(ConfigTest, WrongTypesNameFileLineAndKey) {
  expect_error("training:\n  steps: many\n", "job.yaml:2:10: training.steps: expected an integer, got 'many'");
  expect_error("training:\n  lr: fast\n", "training.lr: expected a finite number");
  expect_error("run:\n  progress: sometimes\n", "run.progress: expected true or false");
  expect_error("compression:\n  method: magic\n",
               "compression.method: 'magic' is not one of: dense, topk, threshold, gaussiank, randomk, sampled");
  expect_error("training: 5\n", "training: expected a map of keys");
  expect_error("training:\n  steps: [1, 2]\n", "got <a list>");
  expect_error("- a\n- b\n", "top level must be a map");
}

TEST(ConfigTest, OutOfRangeValues) {
  expect_error("training:\n  lr: 0\n", "job.yaml:2:7: training.lr: 0 is outside (0, 1000]");
  expect_error("compression:\n  ratio: 1.5\n", "compression.ratio");
  expect_error("cluster:\n  num_workers: 0\n", "cluster.num_workers: 0 is outside [1, 4096]");
  expect_error("training:\n  lr: .nan\n", "training.lr: expected a finite number");
}

TEST(ConfigTest, CrossKeyRules) {
  expect_error("compression:\n  method: threshold\n", "compression.lambda must be > 0");
  expect_error("compression:\n  method: randomk\n  randomk_unbiased: true\n", "error_feedback: none");
  expect_error("cluster:\n  heartbeat_ms: 1000\n  heartbeat_timeout_ms: 500\n", "must exceed cluster.heartbeat_ms");
  expect_error("run:\n  name: a/b\n", "run.name");
  // Where the key was set, and why it cannot work.
  expect_error("run:\n  name: x\ncluster:\n  on_server_loss: replace\n",
               "job.yaml:4:3: cluster.on_server_loss: replace restores the dead server's shard from its newest "
               "snapshot, which needs checkpoint.interval > 0 or checkpoint.every_seconds > 0");
  auto ok = load_from_string("cluster:\n  on_server_loss: replace\ncheckpoint:\n  interval: 10\n", "job.yaml");
  EXPECT_TRUE(ok.ok()) << ok.status().message();
  ok = load_from_string("cluster:\n  on_server_loss: replace\ncheckpoint:\n  every_seconds: 600\n", "job.yaml");
  EXPECT_TRUE(ok.ok()) << ok.status().message();
  EXPECT_TRUE(ok->checkpoint.enabled());
  expect_error("checkpoint:\n  every_seconds: -1\n", "checkpoint.every_seconds");
}

TEST(ConfigTest, AdaptiveOptimizersNeedGradientPushesAndNoSgdMomentum) {
  // The error names the file, the line and the key.
  expect_error("training:\n  lr: 0.01\noptimizer:\n  name: adam\n",
               "job.yaml:4:3: optimizer.name: adam scales each gradient by its own history and applies training.lr "
               "itself; it needs gradient pushes: set compression.scale: 1");
  expect_error("optimizer:\n  name: adagrad\n", "", {"compression.scale=lr"});
  expect_error("compression:\n  scale: 1\noptimizer:\n  name: adam\n  momentum: 0.9\n",
               "job.yaml:5:3: optimizer.momentum is for sgd only, and optimizer.name is adam (adam's own momentum is "
               "optimizer.beta1): set optimizer.momentum: 0");
  expect_error("optimizer:\n  name: rmsprop\n", "optimizer.name");
  auto ok = load_from_string("compression:\n  scale: 1\noptimizer:\n  name: adam\n  beta1: 0.5\n  lazy: true\n",
                             "job.yaml");
  ASSERT_TRUE(ok.ok()) << ok.status().message();
  EXPECT_EQ(ok->optimizer.name, OptimizerName::kAdam);
  EXPECT_DOUBLE_EQ(ok->optimizer.beta1, 0.5);
  EXPECT_TRUE(ok->optimizer.lazy);
  EXPECT_TRUE(ineffective_keys(*ok).empty());
  EXPECT_EQ(optimizer_name(ok->optimizer), "adam (lazy)");
  OptimizerConfig sgd_config;
  EXPECT_EQ(optimizer_name(sgd_config), "sgd");
  sgd_config.momentum = 0.9;
  sgd_config.weight_decay = 0.0001;
  EXPECT_EQ(optimizer_name(sgd_config), "sgd (momentum 0.9, weight decay 0.0001)");
  // Adam's settings under sgd are named as having no effect.
  auto sgd = load_from_string("optimizer:\n  beta2: 0.9\n  epsilon: 0.001\n", "job.yaml");
  ASSERT_TRUE(sgd.ok()) << sgd.status().message();
  const auto w = ineffective_keys(*sgd);
  ASSERT_EQ(w.size(), 2u) << ::testing::PrintToString(w);
  EXPECT_EQ(w[0], "job.yaml:2:3: optimizer.beta2 has no effect: optimizer.name is sgd (only adam uses it)");
  EXPECT_EQ(w[1], "job.yaml:3:3: optimizer.epsilon has no effect: optimizer.name is sgd (adagrad and adam use it)");
}

TEST(ConfigTest, DownlinkKeysAreCheckedAndNamed) {
  expect_error("downlink:\n  method: threshold\n",
               "job.yaml:2:3: downlink.lambda must be > 0 for downlink.method threshold");
  expect_error("consistency:\n  sparse_pull: false\ndownlink:\n  method: topk\n",
               "job.yaml:4:3: downlink.method: topk sends each pull only the keys the server published since the "
               "worker's last one, which needs consistency.sparse_pull: true");
  expect_error("downlink:\n  method: top\n", "downlink.method");
  expect_error("downlink:\n  ratio: 0\n", "downlink.ratio");
  auto ok = load_from_string("downlink:\n  method: gaussiank\n  ratio: 0.02\n", "job.yaml");
  ASSERT_TRUE(ok.ok()) << ok.status().message();
  EXPECT_EQ(ok->downlink.method, CompressionMethod::kGaussianK);
  EXPECT_TRUE(ineffective_keys(*ok).empty());
  EXPECT_EQ(downlink_name(ok->downlink), "gaussiank (ratio 0.02)");
  EXPECT_EQ(downlink_name(DownlinkConfig{}), "dense");
  ok->downlink.k = 300;
  EXPECT_EQ(downlink_name(ok->downlink), "gaussiank (k 300 per shard)");
  auto lambda = load_from_string("downlink:\n  method: threshold\n  lambda: 0.001\n  ratio: 0.1\n", "job.yaml");
  ASSERT_TRUE(lambda.ok()) << lambda.status().message();
  EXPECT_EQ(downlink_name(lambda->downlink), "threshold (lambda 0.001)");
  const auto w = ineffective_keys(*lambda);
  ASSERT_EQ(w.size(), 1u);
  EXPECT_NE(w[0].find("job.yaml:4:3: downlink.ratio has no effect: downlink.method is threshold"), std::string::npos)
      << w[0];
  // downlink.values: only the 16-bit formats (a publish keeps no scales),
  // and only with a compressed downlink.
  expect_error("downlink:\n  method: topk\n  values: int8\n", "job.yaml:3:11: downlink.values: 'int8' is not one of: f32, f16, bf16");
  auto half = load_from_string("downlink:\n  method: topk\n  values: bf16\n", "job.yaml");
  ASSERT_TRUE(half.ok()) << half.status().message();
  EXPECT_EQ(half->downlink.values, ValueFormatName::kBF16);
  EXPECT_EQ(downlink_name(half->downlink), "topk (ratio 0.01, bf16 values)");
  EXPECT_TRUE(ineffective_keys(*half).empty());
  auto unused = load_from_string("downlink:\n  values: f16\n", "job.yaml");
  ASSERT_TRUE(unused.ok()) << unused.status().message();
  const auto u = ineffective_keys(*unused);
  ASSERT_EQ(u.size(), 1u);
  EXPECT_NE(u[0].find("job.yaml:2:3: downlink.values has no effect: downlink.method is dense"), std::string::npos)
      << u[0];
}

TEST(ConfigTest, KeysWithoutEffectAreNamedWithWhereTheyWereSet) {
  auto c = load_from_string(
      "compression:\n  values: f32\n  qsgd_levels: 16\n  quant_bucket: 256\nconsistency:\n  staleness: 3\n",
      "job.yaml", {"compression.lambda=0.5"});
  ASSERT_TRUE(c.ok()) << c.status().message();
  const auto w = ineffective_keys(*c);
  ASSERT_EQ(w.size(), 4u) << ::testing::PrintToString(w);
  EXPECT_EQ(w[0], "--set compression.lambda=0.5: compression.lambda has no effect: compression.method is topk (only "
                  "threshold uses it)");
  EXPECT_EQ(w[1], "job.yaml:3:3: compression.qsgd_levels has no effect: compression.values is f32 (only qsgd uses it)");
  EXPECT_EQ(w[2], "job.yaml:4:3: compression.quant_bucket has no effect: compression.values is f32 (int8, sign, qsgd "
                  "and onebit use it)");
  EXPECT_EQ(w[3], "job.yaml:6:3: consistency.staleness has no effect: consistency.mode is bsp (only ssp uses it)");
}

TEST(ConfigTest, KeysThatTakeEffectAndDefaultsAreNotWarnedAbout) {
  EXPECT_TRUE(ineffective_keys(*load("")).empty());
  EXPECT_TRUE(ineffective_keys(*load(std::string(SPS_SOURCE_DIR) + "/config/demo.yaml")).empty());
  auto c = load_from_string(
      "compression:\n  values: qsgd\n  qsgd_levels: 16\n  quant_bucket: 256\n  ratio: 0.02\n"
      "consistency:\n  mode: ssp\n  staleness: 3\n  max_push_staleness: 4\n",
      "job.yaml");
  ASSERT_TRUE(c.ok()) << c.status().message();
  EXPECT_TRUE(ineffective_keys(*c).empty()) << ::testing::PrintToString(ineffective_keys(*c));
  // k replaces ratio; threshold ignores both.
  auto k = load_from_string("compression:\n  ratio: 0.02\n  k: 100\n", "job.yaml");
  ASSERT_EQ(ineffective_keys(*k).size(), 1u);
  EXPECT_NE(ineffective_keys(*k)[0].find("compression.ratio has no effect: compression.k is set"), std::string::npos);
  auto t = load_from_string("compression:\n  method: threshold\n  lambda: 0.1\n  k: 100\n", "job.yaml");
  ASSERT_EQ(ineffective_keys(*t).size(), 1u);
  EXPECT_NE(ineffective_keys(*t)[0].find("compression.k has no effect: compression.method is threshold"),
            std::string::npos);
}

TEST(ConfigTest, YamlSyntaxErrorNamesTheLine) { expect_error("training:\n  steps: [1,\n", "job.yaml:"); }

TEST(ConfigTest, OverridesApplyInOrderAndAreValidated) {
  auto c = load_from_string("training:\n  lr: 0.1\n", "job.yaml",
                            {"training.lr=0.5", "cluster.num_workers=3", "training.lr=0.25", "run.name=abc"});
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_DOUBLE_EQ(c->training.lr, 0.25);
  EXPECT_EQ(c->cluster.num_workers, 3);
  EXPECT_EQ(c->run.name, "abc");
  expect_error("", "--set training.lrr=1: unknown key 'training.lrr'", {"training.lrr=1"});
  expect_error("", "--set training.steps=x: training.steps: expected an integer", {"training.steps=x"});
  expect_error("", "--set nonsense: expected key.path=value", {"nonsense"});
  expect_error("", "cluster.num_servers: 0 is outside", {"cluster.num_servers=0"});
  expect_error("", "cluster.server_threads: 257 is outside", {"cluster.server_threads=257"});
  expect_error("", "cluster.server_threads: -1 is outside", {"cluster.server_threads=-1"});
}

TEST(ConfigTest, MissingFileIsAClearError) {
  auto c = load("/nonexistent/job.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("/nonexistent/job.yaml"), std::string::npos);
}

TEST(ConfigTest, JsonHasEveryKeyAndRoundTripsThroughOverrides) {
  auto c = load_from_string("training:\n  lr: 0.3\ncompression:\n  method: dense\n", "job.yaml");
  ASSERT_TRUE(c.ok());
  const auto j = to_json(*c);
  std::vector<std::string> sets;
  for (const auto& key : all_keys()) {
    const auto dot = key.find('.');
    const auto& v = j.at(key.substr(0, dot)).at(key.substr(dot + 1));
    sets.push_back(key + "=" + (v.is_string() ? v.get<std::string>() : v.dump()));
  }
  auto again = load("", sets);
  ASSERT_TRUE(again.ok()) << again.status().to_string();
  EXPECT_EQ(to_json(*again), j);
}

TEST(ConfigTest, DocsListEveryKey) {
  std::ifstream f(std::string(SPS_SOURCE_DIR) + "/docs/config.md");
  ASSERT_TRUE(f) << "docs/config.md is missing";
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string doc = ss.str();
  for (const auto& key : all_keys())
    EXPECT_NE(doc.find("`" + key + "`"), std::string::npos) << key << " is not documented in docs/config.md";
}

}  // namespace
}  // namespace sps::config
