#include "worker/worker.h"

#include <cmath>
#include <cstdio>
#include <fstream>
#include <thread>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "common/jsonl.h"
#include "common/process.h"
#include "kernels/sparsify.h"
#include "worker/client.h"
#include "worker/compression.h"
#include "worker/logreg.h"

namespace sps::worker {

Result<std::unique_ptr<Model>> make_model(const config::Config& cfg, const Dataset& train) {
  switch (cfg.model.name) {
    case config::ModelKind::kLogReg:
      return std::unique_ptr<Model>(
          std::make_unique<LogisticRegression>(train.cols, train.num_classes, cfg.training.l2, cfg.model.init_std));
  }
  return invalid_argument("unknown model");
}

Status load_data(const config::Config& cfg, Dataset& train, Dataset& test) {
  SPS_ASSIGN_OR_RETURN(train, load_fashion_mnist(cfg.data.path, true, static_cast<size_t>(cfg.data.train_limit)));
  SPS_ASSIGN_OR_RETURN(test, load_fashion_mnist(cfg.data.path, false, static_cast<size_t>(cfg.data.test_limit)));
  return {};
}

double Worker::straggle_seconds(uint32_t rank, double work_seconds) const {
  double s = 0;
  if (rank < cfg_.workers.delay_ms.size()) s += cfg_.workers.delay_ms[rank] / 1000.0;
  if (rank < cfg_.workers.slowdown.size()) s += (cfg_.workers.slowdown[rank] - 1.0) * work_seconds;
  return s;
}

Worker::Worker(config::Config cfg, int requested_rank) : cfg_(std::move(cfg)), requested_rank_(requested_rank) {}

Status Worker::train(zmq::context_t& ctx) {
  Stopwatch wall;
  Dataset train_set, test_set;
  SPS_RETURN_IF_ERROR(load_data(cfg_, train_set, test_set));
  SPS_ASSIGN_OR_RETURN(auto model, make_model(cfg_, train_set));
  const size_t n = model->num_params();

  PsClient client(cfg_, ctx);
  SPS_RETURN_IF_ERROR(client.register_worker(n, requested_rank_));
  // From here on the scheduler knows us: tell it why we stop, so the job
  // ends with our reason instead of waiting for a heartbeat timeout.
  Status s = run_registered(client, *model, train_set, test_set, wall);
  if (!s.ok()) client.report_error(s.to_string());
  return s;
}

Status Worker::run_registered(PsClient& client, Model& model_ref, const Dataset& train_set, const Dataset& test_set,
                              const Stopwatch& wall) {
  Model* model = &model_ref;
  const size_t n = model->num_params();
  const uint32_t rank = client.rank();
  const uint32_t world = client.assignment().num_workers;
  SPS_ASSIGN_OR_RETURN(auto log, JsonlWriter::open(fmt::format("{}/worker-{}.jsonl", cfg_.run_folder(), rank)));
  log.write({{"event", "assign"}, {"rank", rank}, {"workers", world}, {"num_params", n},
             {"config", config::to_json(cfg_)}});

  std::vector<float> params(n), grad(n);
  if (rank == 0) {
    model->init(params, static_cast<uint64_t>(cfg_.training.seed));
    SPS_RETURN_IF_ERROR(client.init_params(params));
  }
  SPS_RETURN_IF_ERROR(client.start_barrier());

  const auto& cc = cfg_.compression;
  SPS_ASSIGN_OR_RETURN(auto compression, CompressionStage::create(cfg_, *model, rank));
  const size_t k = compression->k();
  const auto wire_values = value_format(cfg_);
  BatchSampler sampler(train_set.rows, rank, world, static_cast<uint64_t>(cfg_.training.seed));
  std::vector<uint32_t> ids;
  Batch batch;
  kernels::SparseVector sel;

  const int64_t steps = cfg_.training.steps;
  const int64_t progress_every = std::max<int64_t>(1, steps / cfg_.run.progress_lines);
  double loss = NAN, loss_window = 0;
  int64_t window = 0;
  Stopwatch train_clock;
  if (rank == 0 && cfg_.run.progress)
    spdlog::info("training: {} workers, {} parameters, {} steps, {} (k = {}), error feedback {}, {}", world, n,
                 steps, config::to_string(cc.method), k, config::to_string(cc.error_feedback),
                 config::consistency_name(cfg_.consistency));
  for (int64_t step = 0; step < steps; ++step) {
    const auto clock = static_cast<uint64_t>(step);
    SPS_ASSIGN_OR_RETURN(const uint64_t version, client.pull(clock, params));
    const double pull_wait = client.last_pull_wait_seconds();
    Stopwatch sw;
    sampler.next(static_cast<size_t>(cfg_.training.batch_size), ids);
    make_batch(train_set, ids, batch);
    loss = model->loss_and_gradient(params, batch, grad);
    const double compute_s = sw.seconds();
    sw.reset();
    // lr-scaled error feedback takes this step's lr from the schedule.
    SPS_RETURN_IF_ERROR(compression->compress(params, batch, grad, step, sel)
                            .with_context(fmt::format("worker {} step {}", rank, step)));
    const double select_s = sw.seconds();
    sw.reset();
    const auto before = client.counters();  // copy: the deltas below are per step
    if (cc.method == config::CompressionMethod::kDense) {
      SPS_RETURN_IF_ERROR(client.push_dense(clock, sel.values, wire_values));
    } else {
      SPS_RETURN_IF_ERROR(client.push_sparse(clock, sel, wire_values));
    }
    const auto& after = client.counters();
    const double work_s = compute_s + select_s + sw.seconds();
    const double delay_s = straggle_seconds(rank, work_s);
    if (delay_s > 0) std::this_thread::sleep_for(std::chrono::duration<double>(delay_s));
    log.write({{"step", step},
               {"clock", clock},
               {"version", version},
               {"loss", loss},
               {"nnz", sel.size()},
               {"threshold", compression->last_stats().threshold},
               {"fallback", compression->last_stats().fallback},
               {"bytes_pushed", after.bytes_pushed - before.bytes_pushed},
               {"bytes_pulled", after.bytes_pulled - before.bytes_pulled},
               {"compute_s", compute_s},
               {"select_s", select_s},
               {"push_s", sw.seconds()},
               {"pull_wait_s", pull_wait},
               {"delay_s", delay_s}});
    if (rank == 0 && cfg_.training.eval_every > 0 && step % cfg_.training.eval_every == 0) {
      // Evaluate the parameters this step pulled: what the job has reached by now.
      const double at = train_clock.seconds();
      const Evaluation te = model->evaluate(params, test_set);
      log.write({{"event", "eval"}, {"step", step}, {"train_seconds", at}, {"test_accuracy", te.accuracy},
                 {"test_loss", te.loss}});
    }
    loss_window += loss;
    ++window;
    if (rank == 0 && cfg_.run.progress && ((step + 1) % progress_every == 0 || step + 1 == steps)) {
      const double elapsed = train_clock.seconds();
      spdlog::info("step {:>6}/{} ({:3.0f}%)  loss {:.4f}  pushed {:.1f} KiB/step ({:.1f}x less than dense)  "
                   "{:.0f} steps/s",
                   step + 1, steps, 100.0 * double(step + 1) / double(steps), loss_window / double(window),
                   double(after.bytes_pushed) / 1024.0 / double(step + 1),
                   after.bytes_pushed > 0 ? double(after.bytes_pushed_dense_equivalent) / double(after.bytes_pushed) : 0.0,
                   double(step + 1) / std::max(elapsed, 1e-9));
      loss_window = 0;
      window = 0;
    }
  }

  protocol::DoneReport report;
  report.steps = static_cast<uint64_t>(steps);
  report.last_batch_loss = loss;
  report.train_loss = NAN;
  report.test_accuracy = NAN;
  if (rank == 0) {
    SPS_ASSIGN_OR_RETURN(const uint64_t final_version, client.pull(static_cast<uint64_t>(steps), params));
    const Evaluation tr = model->evaluate(params, train_set);
    const Evaluation te = model->evaluate(params, test_set);
    report.train_loss = tr.loss;
    report.test_accuracy = te.accuracy;
    log.write({{"event", "eval"}, {"version", final_version}, {"train_loss", tr.loss}, {"train_accuracy", tr.accuracy},
               {"test_loss", te.loss}, {"test_accuracy", te.accuracy}});
    if (cfg_.run.progress)
      spdlog::info("final model: train loss {:.4f}, train accuracy {:.4f}, test accuracy {:.4f}", tr.loss,
                   tr.accuracy, te.accuracy);
    if (cfg_.run.save_params) {
      std::ofstream f(cfg_.run_folder() + "/params.f32", std::ios::binary | std::ios::trunc);
      f.write(reinterpret_cast<const char*>(params.data()), static_cast<std::streamsize>(params.size() * sizeof(float)));
      if (!f) return unavailable("cannot write params.f32");
    }
  }
  const auto& c = client.counters();
  report.bytes_pushed = c.bytes_pushed;
  report.bytes_pushed_dense_equivalent = c.bytes_pushed_dense_equivalent;
  report.bytes_pulled = c.bytes_pulled;
  report.nnz_pushed = c.nnz_pushed;
  report.wall_seconds = wall.seconds();
  log.write({{"event", "done"}, {"steps", steps}, {"bytes_pushed", c.bytes_pushed},
             {"bytes_pushed_dense_equivalent", c.bytes_pushed_dense_equivalent}, {"bytes_pulled", c.bytes_pulled},
             {"nnz_pushed", c.nnz_pushed}, {"residual_norm", std::sqrt(compression->residual_norm_sq())}, {"hessian_clamped", compression->hessian_clamped()}});
  return client.finish(report);
}

}  // namespace sps::worker
