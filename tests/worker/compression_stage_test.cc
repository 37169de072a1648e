// The worker's compression stage over a multi-tensor model: a refused push
// (or one shard's part of it) goes back into the right tensors' residuals.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <random>

#include "config/config.h"
#include "worker/compression.h"
#include "worker/mlp.h"

namespace sps::worker {
namespace {

std::vector<float> random_vector(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

TEST(CompressionStageTest, UndoSendPutsEachTensorsPartBack) {
  for (const char* scope : {"global", "per_tensor"}) {
    auto cfg = config::load("", {std::string("compression.scope=") + scope, "compression.method=topk",
                                 "compression.ratio=0.05", "compression.error_feedback=ef"});
    ASSERT_TRUE(cfg.ok()) << cfg.status().to_string();
    Mlp model({20, 16, 8, 4});
    const size_t n = model.num_params();
    auto stage = CompressionStage::create(*cfg, model, 0);
    ASSERT_TRUE(stage.ok()) << stage.status().to_string();
    std::vector<float> params(n, 0.0f);
    Batch batch;
    kernels::SparseVector sel;
    ASSERT_TRUE((*stage)->compress(params, batch, random_vector(n, 1), 0, sel).ok());
    ASSERT_TRUE((*stage)->compress(params, batch, random_vector(n, 2), 1, sel).ok());
    const auto before = (*stage)->residual();
    // One "shard": the keys from a quarter to three quarters of the model,
    // which cuts across tensors.
    const auto lo = static_cast<uint32_t>(n / 4), hi = static_cast<uint32_t>(3 * n / 4);
    std::vector<uint32_t> keys;
    std::vector<float> values;
    for (size_t j = 0; j < sel.size(); ++j) {
      if (sel.indices[j] < lo || sel.indices[j] >= hi) continue;
      keys.push_back(sel.indices[j]);
      values.push_back(sel.values[j]);
    }
    ASSERT_GT(keys.size(), 2u) << scope;
    auto kept = (*stage)->undo_send(keys, values);
    ASSERT_TRUE(kept.ok()) << kept.status().to_string();
    EXPECT_TRUE(*kept);
    std::vector<float> want = before;
    for (size_t j = 0; j < keys.size(); ++j) want[keys[j]] += values[j];
    const auto after = (*stage)->residual();
    for (size_t i = 0; i < n; ++i)
      ASSERT_EQ(std::bit_cast<uint32_t>(after[i]), std::bit_cast<uint32_t>(want[i])) << scope << " index " << i;
    // Out of the model, or out of order: refused.
    EXPECT_FALSE((*stage)->undo_send(std::vector<uint32_t>{static_cast<uint32_t>(n)}, std::vector<float>{1.0f}).ok());
    EXPECT_FALSE((*stage)->undo_send(std::vector<uint32_t>{hi, lo}, std::vector<float>{1.0f, 1.0f}).ok());
  }
  auto none = config::load("", {"compression.error_feedback=none"});
  ASSERT_TRUE(none.ok());
  Mlp model({20, 16, 8, 4});
  auto stage = CompressionStage::create(*none, model, 0);
  ASSERT_TRUE(stage.ok());
  auto kept = (*stage)->undo_send(std::vector<uint32_t>{3}, std::vector<float>{1.0f});
  ASSERT_TRUE(kept.ok());
  EXPECT_FALSE(*kept) << "without error feedback the values are lost, and the caller is told";
}

// Scaled values: one scale run per tensor that selected anything, in key
// order, each the tensor's own scale; slicing them at a shard cut keeps
// every value with its scale.
// compression.rescale_residual: after a step decay of the lr (here 0.5 ->
// 0.05 at step 2), the residual left at the old lr is scaled by 0.1 before
// the new step's lr-scaled gradient joins it; steps with an unchanged lr
// are untouched, and without the option nothing is scaled.
TEST(CompressionStageTest, RescaleResidualFollowsTheLrSchedule) {
  for (bool rescale : {false, true}) {
    auto cfg = config::load("", {"compression.method=topk", "compression.ratio=0.05", "compression.error_feedback=ef",
                                 "compression.scope=per_tensor", "training.lr=0.5", "optimizer.lr_schedule=step",
                                 "optimizer.step_every=2", "optimizer.step_gamma=0.1",
                                 std::string("compression.rescale_residual=") + (rescale ? "true" : "false")});
    ASSERT_TRUE(cfg.ok()) << cfg.status().to_string();
    Mlp model({20, 16, 8, 4});
    const size_t n = model.num_params();
    auto stage = CompressionStage::create(*cfg, model, 0);
    ASSERT_TRUE(stage.ok()) << stage.status().to_string();
    std::vector<float> params(n, 0.0f);
    Batch batch;
    kernels::SparseVector sel;
    auto zero_grad = std::vector<float>(n, 0.0f);
    ASSERT_TRUE((*stage)->compress(params, batch, random_vector(n, 1), 0, sel).ok());
    const auto after0 = (*stage)->residual();
    // Step 1 has the same lr, and a zero gradient: top-k moves k entries of
    // the residual out, nothing is scaled.
    ASSERT_TRUE((*stage)->compress(params, batch, zero_grad, 1, sel).ok());
    auto after1 = (*stage)->residual();
    for (size_t j = 0; j < sel.size(); ++j) after1[sel.indices[j]] += sel.values[j];
    EXPECT_EQ(after1, after0) << "step 1: acc = residual + 0.5 * 0";
    const auto r1 = (*stage)->residual();
    // Step 2: lr 0.05. acc = (rescale ? 0.1 r : r) + 0.05 * 0.
    ASSERT_TRUE((*stage)->compress(params, batch, zero_grad, 2, sel).ok());
    auto acc2 = (*stage)->residual();
    for (size_t j = 0; j < sel.size(); ++j) acc2[sel.indices[j]] += sel.values[j];
    const float factor = static_cast<float>(0.05) / static_cast<float>(0.5);
    for (size_t i = 0; i < n; ++i)
      ASSERT_EQ(acc2[i], rescale ? r1[i] * factor : r1[i]) << "rescale " << rescale << " index " << i;
  }
}

TEST(CompressionStageTest, PerTensorScaledValuesCarryOneRunPerTensor) {
  auto cfg = config::load("", {"compression.scope=per_tensor", "compression.method=topk", "compression.ratio=0.05",
                               "compression.values=int8", "compression.scale=1"});
  ASSERT_TRUE(cfg.ok()) << cfg.status().to_string();
  Mlp model({20, 16, 8, 4});
  const auto specs = model.tensors();
  const size_t n = model.num_params();
  auto stage = CompressionStage::create(*cfg, model, 0);
  ASSERT_TRUE(stage.ok()) << stage.status().to_string();
  std::vector<float> params(n, 0.0f);
  Batch batch;
  kernels::SparseVector sel;
  const auto g = random_vector(n, 3);
  ASSERT_TRUE((*stage)->compress(params, batch, g, 0, sel).ok());
  ASSERT_EQ(sel.scale_runs.size(), specs.size());
  size_t pos = 0, offset = 0;
  for (size_t t = 0; t < specs.size(); ++t) {
    const auto& run = sel.scale_runs[t];
    float max_abs = 0;
    for (size_t j = pos; j < pos + run.count; ++j) {
      ASSERT_GE(sel.indices[j], offset) << "run " << t << " holds tensor " << t << "'s keys only";
      ASSERT_LT(sel.indices[j], offset + specs[t].size());
      max_abs = std::max(max_abs, std::fabs(g[sel.indices[j]]));
    }
    EXPECT_EQ(run.scale, max_abs / 127.0f) << "tensor " << t;
    pos += run.count;
    offset += specs[t].size();
  }
  EXPECT_EQ(pos, sel.size());
  // A shard cut in the middle of the selection.
  std::vector<ScaleRun> part;
  const size_t cut_lo = sel.size() / 3, cut_hi = 2 * sel.size() / 3;
  slice_runs(sel.scale_runs, cut_lo, cut_hi, part);
  size_t counted = 0, at = cut_lo;
  for (const auto& r : part) {
    ASSERT_GT(r.count, 0u);
    // Every value in this piece has its own tensor's scale.
    size_t p = 0, t = 0;
    while (p + sel.scale_runs[t].count <= at) p += sel.scale_runs[t++].count;
    EXPECT_EQ(r.scale, sel.scale_runs[t].scale);
    counted += r.count;
    at += r.count;
  }
  EXPECT_EQ(counted, cut_hi - cut_lo);
}

// Shards slice a push's runs in ascending ranges through one cursor; the
// pieces are those of slicing each range from the start, empty ranges and
// ranges inside one run included.
TEST(CompressionStageTest, SlicingRunsThroughACursorGivesTheSamePieces) {
  const std::vector<ScaleRun> runs = {{5, 1.0f, 0.5f}, {1, 2.0f, 0.0f}, {7, 3.0f, 3.5f}, {2, 4.0f, 1.0f}};
  const std::vector<std::vector<size_t>> cuts = {
      {0, 15}, {0, 5, 6, 13, 15}, {0, 2, 3, 3, 9, 15}, {0, 0, 1, 14, 15, 15}, {0, 6, 6, 6, 15}};
  for (const auto& c : cuts) {
    RunCursor at;
    size_t covered = 0;
    for (size_t i = 0; i + 1 < c.size(); ++i) {
      std::vector<ScaleRun> fresh, walked;
      slice_runs(runs, c[i], c[i + 1], fresh);
      slice_runs(runs, c[i], c[i + 1], walked, at);
      ASSERT_EQ(walked.size(), fresh.size()) << "range " << c[i] << ".." << c[i + 1];
      for (size_t r = 0; r < fresh.size(); ++r) {
        EXPECT_EQ(walked[r].count, fresh[r].count);
        EXPECT_EQ(walked[r].scale, fresh[r].scale);
        EXPECT_EQ(walked[r].negative_scale, fresh[r].negative_scale);
        covered += walked[r].count;
      }
    }
    EXPECT_EQ(covered, 15u);
  }
  std::vector<ScaleRun> piece;
  slice_runs(runs, 5, 13, piece);
  ASSERT_EQ(piece.size(), 2u);
  EXPECT_EQ(piece[0].count, 1u);
  EXPECT_EQ(piece[1].count, 7u);
  EXPECT_EQ(piece[1].negative_scale, 3.5f);
}

}  // namespace
}  // namespace sps::worker
