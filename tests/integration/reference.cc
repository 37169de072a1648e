#include "tests/integration/reference.h"

#include <algorithm>
#include <memory>

#include "kernels/sparsify.h"
#include "scheduler/consistency.h"
#include "server/shard.h"
#include "sps/worker.h"
#include "worker/compression.h"
#include "worker/context_access.h"
#include "worker/dataset.h"

namespace sps::testing {

Result<ReferenceResult> run_reference(const config::Config& cfg) {
  // The same registry and factories the worker programs use.
  const Registry registry = builtin_registry();
  std::unique_ptr<Dataset> train_set, test_set;
  std::unique_ptr<Model> model;
  try {
    const Context plain = ContextAccess::make(cfg);
    train_set = registry.make_dataset(cfg.data.name, plain, Split::kTrain);
    test_set = registry.make_dataset(cfg.data.name, plain, Split::kTest);
    model = registry.make_model(cfg.model.name, ContextAccess::make(cfg, train_set.get()));
  } catch (const Error& e) {
    return invalid_argument(e.what());
  }
  const Dataset& train = *train_set;
  const Dataset& test = *test_set;
  const size_t n = num_params(model->tensors());
  const auto W = static_cast<uint32_t>(cfg.cluster.num_workers);
  const auto S = static_cast<uint32_t>(cfg.cluster.num_servers);

  std::vector<float> params(n);
  model->init(params, static_cast<uint64_t>(cfg.training.seed));
  std::vector<server::Shard> shards;
  for (uint32_t s = 0; s < S; ++s) {
    const auto b = static_cast<uint32_t>(n * s / S), e = static_cast<uint32_t>(n * (s + 1) / S);
    shards.emplace_back(b, e, W, server::Optimizer::from_config(cfg, e - b), scheduler::make_policy(cfg.consistency));
    if (cfg.downlink.method != config::CompressionMethod::kDense)
      SPS_RETURN_IF_ERROR(shards.back().enable_downlink(server::Shard::downlink_selection(cfg.downlink, e - b),
                                                                 server::Shard::downlink_values(cfg.downlink)));
    shards.back().set_params(std::span<const float>(params).subspan(b, e - b));
  }
  std::vector<std::unique_ptr<worker::CompressionStage>> compressors;
  std::vector<worker::BatchSampler> samplers;
  for (uint32_t w = 0; w < W; ++w) {
    SPS_ASSIGN_OR_RETURN(auto stage, worker::CompressionStage::create(cfg, *model, w));
    compressors.push_back(std::move(stage));
    samplers.emplace_back(train.size(), w, W, static_cast<uint64_t>(cfg.training.seed));
  }
  std::vector<float> grad(n);
  std::vector<uint32_t> ids;
  Batch batch;
  kernels::SparseVector sel;
  // workers.gradient_delay d: gradients on the parameters of step k - d.
  const int64_t d = cfg.workers.gradient_delay;
  std::vector<std::vector<float>> history(static_cast<size_t>(d) + 1);
  for (int64_t step = 0; step < cfg.training.steps; ++step) {
    // What the workers pull: with compressed pulls, the published copy.
    for (auto& sh : shards) {
      sh.publish();
      std::copy(sh.pulled_params().begin(), sh.pulled_params().end(), params.begin() + sh.key_begin());
    }
    history[static_cast<size_t>(step % (d + 1))] = params;
    const std::vector<float>& grad_params = history[static_cast<size_t>(std::max<int64_t>(step - d, 0) % (d + 1))];
    for (uint32_t w = 0; w < W; ++w) {
      samplers[w].next(static_cast<size_t>(cfg.training.batch_size), ids);
      train.batch(ids, batch);
      model->loss_and_gradient(grad_params, batch, grad);
      SPS_RETURN_IF_ERROR(compressors[w]->compress(params, batch, grad, step, sel));
      size_t pos = 0;
      for (auto& sh : shards) {
        const size_t begin = pos;
        while (pos < sel.size() && sel.indices[pos] < sh.key_end()) ++pos;
        SPS_RETURN_IF_ERROR(sh.add_push(w, static_cast<uint64_t>(step), static_cast<uint64_t>(step),
                                        std::span(sel.indices).subspan(begin, pos - begin),
                                        std::span(sel.values).subspan(begin, pos - begin)));
      }
    }
    for (auto& sh : shards) {
      if (sh.apply_ready() != 1) return internal_error("reference shard did not apply exactly one clock");
    }
  }
  // The final model is the servers' own parameters (worker 0's last pull is exact).
  for (auto& sh : shards) std::copy(sh.params().begin(), sh.params().end(), params.begin() + sh.key_begin());
  ReferenceResult r;
  r.train_loss = model->evaluate(params, train).loss;
  r.test_accuracy = model->evaluate(params, test).accuracy;
  r.params = std::move(params);
  return r;
}

}  // namespace sps::testing
