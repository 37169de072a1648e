// sps::Worker: the training loop of one worker process, on top of PsClient
// (the job's sockets) and CompressionStage (error feedback and selection).
//
//   pull(clock) -> gradient on a mini-batch -> error feedback + selection
//   -> push(clock) -> clock + 1
//
// then worker 0 evaluates the final model and every worker reports to the
// scheduler. One JSON line per step goes to <run>/worker-<rank>.jsonl.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <set>
#include <thread>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <zmq.hpp>

#include "common/huge_pages.h"
#include "common/jsonl.h"
#include "common/snapshot.h"
#include "common/process.h"
#include "kernels/sparsify.h"
#include "sps/worker.h"
#include "worker/client.h"
#include "worker/compression.h"
#include "worker/context_access.h"
#include "worker/dataset.h"
#include "worker/device_mirror.h"

namespace sps {

struct Worker::Impl {
  config::Config cfg;
  int requested_rank = -1;
  zmq::context_t ctx{1};
  std::unique_ptr<worker::PsClient> client;
  Model* model = nullptr;
  size_t n = 0;
  std::unique_ptr<worker::CompressionStage> compression;
  JsonlWriter log;
  // What the last pull wrote; on huge pages, since a sparse pull scatters
  // over all of it.
  HugePageVector<float> params;
  // workers.gradient_delay d > 0: the last d + 1 pulls (step s in slot
  // s % (d + 1)) and their versions; gradients use the one of step k - d.
  std::vector<HugePageVector<float>> delayed;
  std::vector<uint64_t> delayed_version;
  // GPU models: the parameters and gradient in device memory.
  std::unique_ptr<worker::DeviceMirror> device;
  worker::PullChanges changes;
  kernels::SparseVector sel;  // the last push's selection, until the next compress
  int64_t last_push_step = -1;
  // consistency.max_push_staleness: shard pushes refused, and their values.
  uint64_t pushes_refused = 0;
  uint64_t values_refused = 0;
  Batch no_batch;
  int64_t step = 0;
  int64_t first_step = 0;  // > 0 when resumed from a snapshot or rejoined
  uint64_t version = 0;
  bool finished = false;
  double last_loss = NAN;
  double loss_window = 0;
  int64_t window = 0;
  Stopwatch wall;
  Stopwatch train_clock;
  Stopwatch since_pull;
  double pull_wait = 0;

  // A failed Status as an exception; reporting() tells the scheduler.
  void check(const Status& s) {
    if (!s.ok()) fail(s.to_string());
  }
  [[noreturn]] void fail(const std::string& what) { throw Error(what); }
  // Runs `body`; an exception it throws is reported to the scheduler first
  // (once registered), then passed on.
  template <class F>
  auto reporting(F&& body) -> decltype(body()) {
    try {
      return body();
    } catch (const std::exception& e) {
      if (client && !finished) {
        client->report_error(e.what());
        finished = true;
      }
      throw;
    }
  }
  bool connected() const { return compression != nullptr; }
  // The parameters as the model reads them: device memory for GPU models.
  std::span<const float> model_params() {
    return device ? std::span<const float>(device->params()) : std::span<const float>(params);
  }
  // The slot of the pull this step's gradient is computed on: step
  // max(k - d, first pulled step).
  size_t delayed_slot() const {
    const auto d = static_cast<int64_t>(cfg.workers.gradient_delay);
    return static_cast<size_t>(std::max(step - d, first_step) % (d + 1));
  }
  // The parameters this step's gradient is computed on: the current ones,
  // or with workers.gradient_delay d those pulled d steps ago.
  std::span<const float> gradient_params() {
    return delayed.empty() ? model_params() : std::span<const float>(delayed[delayed_slot()]);
  }
  uint64_t gradient_version() const { return delayed.empty() ? version : delayed_version[delayed_slot()]; }
  void require_connected(const char* call) const {
    if (!connected()) throw Error(fmt::format("Worker::{}: call connect(model) first", call));
  }
  double straggle_seconds(uint32_t rank, double work_seconds) const {
    double s = 0;
    if (rank < cfg.workers.delay_ms.size()) s += cfg.workers.delay_ms[rank] / 1000.0;
    if (rank < cfg.workers.slowdown.size()) s += (cfg.workers.slowdown[rank] - 1.0) * work_seconds;
    return s;
  }
  void pull_into_params();
  // After a pull for `pull_clock`: the shards that refused this worker's
  // push for pull_clock - 1 as too stale get its values back into the
  // residual (sel still holds that push).
  void take_back_refused(uint64_t pull_clock);
  // acc of this step = the new residual + what was selected; its update =
  // acc - the residual before the step (scale * g and whatever the
  // compressor adds to it: what Alistarh et al.'s xi is measured against).
  // Without error feedback nothing of acc is kept, so it is rebuilt from the
  // gradient: scale * g (`grad`, host memory).
  void dump_acc(uint32_t rank, const std::vector<float>& residual_before, std::span<const float> grad) {
    std::vector<float> acc;
    if (cfg.compression.error_feedback == config::ErrorFeedback::kNone) {
      const auto scale = static_cast<float>(
          cfg.compression.scale == config::Scale::kLr ? config::learning_rate(cfg, step) : 1.0);
      acc.resize(grad.size());
      for (size_t i = 0; i < grad.size(); ++i) acc[i] = scale * grad[i];
    } else {
      acc = compression->residual();
      if (sel.indices.empty() && sel.values.size() == acc.size()) {  // dense: everything was sent
        for (size_t i = 0; i < acc.size(); ++i) acc[i] += sel.values[i];
      } else {
        for (size_t i = 0; i < sel.indices.size(); ++i) acc[sel.indices[i]] += sel.values[i];
      }
    }
    std::vector<float> update = acc;
    if (residual_before.size() == update.size())
      for (size_t i = 0; i < update.size(); ++i) update[i] -= residual_before[i];
    for (const auto& [name, values] : {std::pair{"acc", &acc}, std::pair{"update", &update}}) {
      const std::string path = fmt::format("{}/{}-w{}-s{}.f32", cfg.run_folder(), name, rank, step);
      std::ofstream f(path, std::ios::binary | std::ios::trunc);
      f.write(reinterpret_cast<const char*>(values->data()),
              static_cast<std::streamsize>(values->size() * sizeof(float)));
      if (!f) fail("cannot write " + path);
    }
  }
  void push(std::span<const float> grad, double loss, const Batch* batch);
  // checkpoint.interval: the residual and step after every interval-th push;
  // checkpoint.every_seconds: after the push before each step the scheduler named.
  void snapshot_if_due(uint32_t rank);
  std::set<int64_t> snapshot_at;  // steps the scheduler named, not reached yet
  // checkpoint.resume: the step (and residual) to start from.
  void resume(uint32_t rank);
};

void Worker::Impl::snapshot_if_due(uint32_t rank) {
  for (const uint64_t s : client->take_snapshot_steps()) {
    if (static_cast<int64_t>(s) >= step) {
      snapshot_at.insert(static_cast<int64_t>(s));
    } else {  // the scheduler's lead was too short: that step's snapshot is incomplete, the next one is not
      spdlog::warn("worker {}: the snapshot at step {} was named at step {}: skipped", rank, s, step);
      log.write({{"event", "snapshot_missed"}, {"step", s}, {"at_step", step}});
    }
  }
  const bool named = snapshot_at.erase(step) > 0;
  const int64_t every = cfg.checkpoint.interval;
  const bool due = named || (every > 0 && step % every == 0);
  if (!due || !cfg.checkpoint.workers || step >= cfg.training.steps) return;
  Stopwatch sw;
  SnapshotWriter snap;
  snap.add_u64("rank", rank);
  snap.add_u64("step", static_cast<uint64_t>(step));
  snap.add_u64("num_params", n);
  snap.add_f32("residual", compression->residual());
  // DGC's momentum buffer: without it a resumed worker would restart
  // momentum correction from zero and diverge from an uninterrupted run.
  if (cfg.compression.momentum_correction != 0.0) snap.add_f32("momentum", compression->momentum());
  // hessian_diag: the estimate and its step, so h is refreshed at the same
  // steps (on the same parameters) as in an uninterrupted run.
  if (compression->hessian_step() >= 0) {
    snap.add_f32("hessian", compression->hessian_estimate());
    snap.add_u64("hessian_step", static_cast<uint64_t>(compression->hessian_step()));
  }
  const std::string dir = cfg.checkpoint_dir();
  const std::string path = snapshot_path(dir, static_cast<uint64_t>(step), "worker", rank);
  // A failed snapshot costs the resume point, not the run.
  if (const Status s = snap.write_atomic(path); !s.ok()) {
    spdlog::error("worker {}: snapshot at step {} failed: {}", rank, step, s.message());
    log.write({{"event", "snapshot_failed"}, {"step", step}, {"error", s.message()}});
    return;
  }
  prune_snapshots(dir, "worker", rank, cfg.checkpoint.keep);
  log.write({{"event", "snapshot"}, {"step", step}, {"bytes", snap.bytes()}, {"seconds", sw.seconds()}, {"file", path}});
}

void Worker::Impl::resume(uint32_t rank) {
  const std::string dir = cfg.checkpoint_dir();
  const auto& a = client->assignment();
  auto point = find_resume_point(dir, a.num_servers, a.num_workers);
  check(point.status());
  for (const auto& s : point->skipped) spdlog::warn("worker {}: skipped a snapshot: {}", rank, s);
  step = static_cast<int64_t>(point->step);
  first_step = step;
  const std::string path = snapshot_path(dir, point->step, "worker", rank);
  std::string source = "none (no residual snapshot: it starts at zero)";
  if (std::filesystem::exists(path)) {
    auto snap = Snapshot::read(path);
    check(snap.status());
    auto residual = snap->f32("residual");
    check(residual.status());
    if (residual->size() != n)
      fail(fmt::format("{} holds a residual of {} entries but the model has {} parameters", path, residual->size(), n));
    check(compression->set_residual(*residual).with_context(path));
    if (cfg.compression.momentum_correction != 0.0) {
      if (snap->has("momentum")) {
        auto momentum = snap->f32("momentum");
        check(momentum.status());
        check(compression->set_momentum(*momentum).with_context(path));
      } else {
        spdlog::warn("worker {}: {} holds no momentum buffer (written without momentum correction); "
                     "compression.momentum_correction restarts from zero",
                     rank, path);
      }
    }
    if (snap->has("hessian") && cfg.compression.error_feedback == config::ErrorFeedback::kHessianDiag) {
      auto h = snap->f32("hessian");
      auto h_step = snap->u64("hessian_step");
      check(h.status());
      check(h_step.status());
      check(compression->restore_hessian(*h, static_cast<int64_t>(*h_step)).with_context(path));
    }
    source = path;
  }
  log.write({{"event", "resume"}, {"step", step}, {"residual", source}, {"skipped", point->skipped}});
  if (rank == 0 && cfg.run.progress)
    spdlog::info("resuming at step {} of {} (snapshots in {})", step, cfg.training.steps, dir);
}

namespace {

// "42 s", "3 min 07 s", "2 h 05 min": a time left, as a person reads it.
std::string human_duration(double seconds) {
  const auto s = static_cast<int64_t>(std::llround(std::max(0.0, seconds)));
  if (s < 60) return fmt::format("{} s", s);
  if (s < 3600) return fmt::format("{} min {:02} s", s / 60, s % 60);
  return fmt::format("{} h {:02} min", s / 3600, s % 3600 / 60);
}

// A dataset seen through the worker: every batch drawn first keeps the
// scheduler connection alive, so evaluating a model for longer than
// cluster.heartbeat_timeout_ms does not get the worker declared dead.
class KeepAliveDataset final : public Dataset {
 public:
  KeepAliveDataset(const Dataset& data, worker::PsClient& client) : data_(data), client_(client) {}
  size_t size() const override { return data_.size(); }
  size_t features() const override { return data_.features(); }
  size_t classes() const override { return data_.classes(); }
  void batch(std::span<const uint32_t> ids, Batch& out) const override {
    client_.keep_alive();
    data_.batch(ids, out);
  }

 private:
  const Dataset& data_;
  worker::PsClient& client_;
};

}  // namespace

Worker::Worker(WorkerOptions options) : impl_(std::make_unique<Impl>()) {
  auto cfg = config::load(options.config_file, options.overrides);
  if (!cfg.ok()) throw Error("config error: " + cfg.status().message());
  impl_->cfg = std::move(cfg).value();
  impl_->requested_rank = options.rank;
}

Worker::~Worker() {
  if (impl_ && impl_->client && !impl_->finished) {
    impl_->client->report_error(
        fmt::format("worker stopped at step {} of {} without finish()", impl_->step, impl_->cfg.training.steps));
  }
}

Context Worker::context() const { return ContextAccess::make(impl_->cfg); }

uint32_t Worker::rank() const {
  impl_->require_connected("rank");
  return impl_->client->rank();
}
uint32_t Worker::num_workers() const {
  impl_->require_connected("num_workers");
  return impl_->client->assignment().num_workers;
}
int64_t Worker::steps() const { return impl_->cfg.training.steps; }
int64_t Worker::step() const { return impl_->step; }

void Worker::connect(Model& model) {
  impl_->reporting([&] { connect_impl(model); });
}

void Worker::connect_impl(Model& model) {
  Impl& w = *impl_;
  if (w.client) throw Error("Worker::connect: already connected (one model per Worker)");
  w.model = &model;
  w.n = num_params(model.tensors());
  if (w.n == 0) throw Error("the model declares no parameters (Model::tensors() is empty)");
  if (w.n > std::numeric_limits<uint32_t>::max())
    throw Error(fmt::format("the model has {} parameters; sps keys are 32-bit", w.n));
  if (w.cfg.cluster.scheduler_port == 0)
    throw Error("cluster.scheduler_port is 0: start workers with sps-launch, or pass the scheduler's port with "
                "--set cluster.scheduler_port=N");
  w.client = std::make_unique<worker::PsClient>(w.cfg, w.ctx);
  {
    const Status s = w.client->register_worker(w.n, w.requested_rank);
    if (!s.ok()) {
      w.client.reset();  // not registered: nobody to tell
      throw Error(s.to_string());
    }
  }
  const uint32_t rank = w.client->rank();
  // A worker replacing a dead one joins the running job: the servers hold
  // the parameters, and its residual starts at zero (what the dead process
  // had not sent is lost; a snapshot's residual is older than what that
  // process sent since, so it is not used).
  const bool rejoining = w.client->rejoining();
  const bool resuming = w.cfg.checkpoint.resume && !rejoining;
  auto log = JsonlWriter::open(fmt::format("{}/worker-{}.jsonl", w.cfg.run_folder(), rank), resuming || rejoining);
  w.check(log.status());
  w.log = std::move(log).value();
  const uint32_t world = w.client->assignment().num_workers;
  w.log.write({{"event", "assign"}, {"rank", rank}, {"workers", world}, {"num_params", w.n},
               {"config", config::to_json(w.cfg)}});
  w.params.assign(w.n, 0.0f);
  if (w.cfg.workers.gradient_delay > 0) {
    if (model.memory() == Memory::kCuda)
      throw Error("workers.gradient_delay is for host models; this model keeps its parameters on the GPU");
    const auto slots = static_cast<size_t>(w.cfg.workers.gradient_delay) + 1;
    w.delayed.assign(slots, HugePageVector<float>());
    w.delayed_version.assign(slots, 0);
  }
  if (model.memory() == Memory::kCuda) {
    auto mirror = worker::DeviceMirror::create(w.n);
    w.check(mirror.status());
    w.device = std::move(mirror).value();
  }
  if (rank == 0 && !resuming && !rejoining) {  // a resumed job's servers load their parameters
    if (w.device) {
      model.init(w.device->params(), static_cast<uint64_t>(w.cfg.training.seed));
      w.check(w.device->download_params(w.params));
    } else {
      model.init(w.params, static_cast<uint64_t>(w.cfg.training.seed));
    }
    w.check(w.client->init_params(w.params));
  }
  auto stage = worker::CompressionStage::create(w.cfg, model, rank);
  w.check(stage.status());
  w.compression = std::move(stage).value();
  if (resuming) w.resume(rank);
  w.check(w.client->start_barrier());
  if (rejoining) {
    w.step = static_cast<int64_t>(w.client->start_clock());
    w.first_step = w.step;
    w.log.write({{"event", "rejoin"}, {"step", w.step}});
    spdlog::info("worker {}: a new process in the place of the dead worker {}; joins the running job at step {} of {} "
                 "with a zero residual",
                 rank, rank, w.step, w.cfg.training.steps);
  }
  const auto& cc = w.cfg.compression;
  if (rank == 0 && w.cfg.run.progress)
    spdlog::info("training: {} workers, {} parameters, {} steps, {} (k = {}), error feedback {}, {}, servers apply {}{}",
                 world, w.n, w.cfg.training.steps, config::to_string(cc.method), w.compression->k(),
                 config::to_string(cc.error_feedback), config::consistency_name(w.cfg.consistency),
                 config::optimizer_name(w.cfg.optimizer),
                 w.cfg.downlink.method == config::CompressionMethod::kDense
                     ? std::string()
                     : ", pulls " + config::downlink_name(w.cfg.downlink));
  w.train_clock.reset();
}

void Worker::Impl::take_back_refused(uint64_t pull_clock) {
  const auto& refused = client->refused_shards();
  if (refused.empty()) return;
  const uint32_t rank = client->rank();
  if (last_push_step < 0 || static_cast<uint64_t>(last_push_step) + 1 != pull_clock) {
    // Only after a restart of this worker alone: that push's selection is gone.
    spdlog::warn("worker {}: {} server(s) refused the push for clock {}, sent before this process started; its values "
                 "are lost",
                 rank, refused.size(), pull_clock - 1);
    for (uint32_t s : refused)
      log.write({{"event", "push_refused"}, {"clock", pull_clock - 1}, {"shard", s}, {"restored", false}});
    return;
  }
  const bool dense = sel.indices.empty() && sel.values.size() == n;
  std::vector<uint32_t> all_keys;
  for (uint32_t s : refused) {
    const auto& shard = client->assignment().shards[s];
    std::span<const uint32_t> keys;
    std::span<const float> values;
    if (dense) {
      all_keys.resize(shard.key_end - shard.key_begin);
      for (uint32_t k = shard.key_begin; k < shard.key_end; ++k) all_keys[k - shard.key_begin] = k;
      keys = all_keys;
      values = std::span<const float>(sel.values).subspan(shard.key_begin, all_keys.size());
    } else {
      // The selection is sorted: the shard's pairs are one run.
      const auto first = std::lower_bound(sel.indices.begin(), sel.indices.end(), shard.key_begin);
      const auto last = std::lower_bound(first, sel.indices.end(), shard.key_end);
      const auto offset = static_cast<size_t>(first - sel.indices.begin());
      keys = std::span<const uint32_t>(sel.indices.data() + offset, static_cast<size_t>(last - first));
      values = std::span<const float>(sel.values).subspan(offset, keys.size());
    }
    auto kept = compression->undo_send(keys, values);
    check(kept.status().with_context(fmt::format("worker {}: putting back the push for clock {} that server {} refused",
                                                 rank, last_push_step, s)));
    ++pushes_refused;
    values_refused += keys.size();
    log.write({{"event", "push_refused"}, {"clock", last_push_step}, {"shard", s}, {"nnz", keys.size()},
               {"restored", *kept}});
  }
}

void Worker::Impl::pull_into_params() {
  auto v = client->pull(static_cast<uint64_t>(step), params, device ? &changes : nullptr);
  check(v.status());
  take_back_refused(static_cast<uint64_t>(step));
  if (device) check(device->update(params, changes));
  version = v.value();
  if (!delayed.empty()) {
    const size_t slot = static_cast<size_t>(step % static_cast<int64_t>(delayed.size()));
    delayed[slot] = params;
    delayed_version[slot] = version;
  }
  pull_wait = client->last_pull_wait_seconds();
  since_pull.reset();
}

uint64_t Worker::pull(std::span<float> params) {
  Impl& w = *impl_;
  w.require_connected("pull");
  if (params.size() != w.n)
    throw Error(fmt::format("Worker::pull: the buffer holds {} floats, the model has {} parameters", params.size(), w.n));
  w.reporting([&] {
    w.pull_into_params();
    if (w.device) w.check(w.device->copy_params_to(params.data()));
  });
  if (!w.device) {
    const auto p = w.gradient_params();
    std::copy(p.begin(), p.end(), params.begin());
  }
  return w.gradient_version();
}

void Worker::push(std::span<const float> grad, double loss, const Batch* batch) {
  impl_->require_connected("push");
  impl_->reporting([&] { impl_->push(grad, loss, batch); });
}

void Worker::Impl::push(std::span<const float> grad, double loss, const Batch* batch) {
  if (grad.size() != n)
    throw Error(fmt::format("Worker::push: the gradient has {} floats, the model has {} parameters", grad.size(), n));
  if (step >= cfg.training.steps)
    throw Error(fmt::format("Worker::push: all {} steps are done; call finish()", cfg.training.steps));
  const auto& cc = cfg.compression;
  if (batch == nullptr && (cc.error_feedback == config::ErrorFeedback::kHessianDiag ||
                           cc.error_feedback == config::ErrorFeedback::kHessian))
    throw Error("compression.error_feedback: hessian_diag and hessian ask the model for Hessian information on the "
                "batch; pass the batch to Worker::push");
  const uint32_t rank = client->rank();
  const double compute_s = since_pull.seconds();
  const bool dump = std::find(cfg.run.dump_acc_steps.begin(), cfg.run.dump_acc_steps.end(), step) !=
                    cfg.run.dump_acc_steps.end();
  const std::vector<float> residual_before = dump ? compression->residual() : std::vector<float>{};
  Stopwatch sw;
  // lr-scaled error feedback takes this step's lr from the schedule.
  check(compression->compress(params, batch ? *batch : no_batch, grad, step, sel, /*grad_on_device=*/device != nullptr)
            .with_context(fmt::format("worker {} step {}", rank, step)));
  const double select_s = sw.seconds();
  // The compressor refuses a non-finite acc, but a finite one can still
  // overflow on its way to the wire (f16 rounding, random-k's n/k scaling).
  // A server drops such a push as malformed, and the job would wait for it
  // forever: stop here instead, saying why.
  for (size_t j = 0; j < sel.values.size(); ++j) {
    if (std::isfinite(sel.values[j])) continue;
    const size_t index = sel.indices.empty() ? j : sel.indices[j];
    fail(fmt::format("worker {} step {}: the value to send for parameter {} is {} after compression (values: {}{}); "
                     "it overflowed the wire format, refusing to push it (the training has likely diverged: lower "
                     "training.lr)",
                     rank, step, index, sel.values[j], value_format_name(worker::value_format(cfg)),
                     cc.method == config::CompressionMethod::kRandomK && cc.randomk_unbiased ? ", scaled by n/k" : ""));
  }
  if (dump && device && cc.error_feedback == config::ErrorFeedback::kNone) {
    spdlog::warn("worker {} step {}: run.dump_acc_steps: without error feedback acc is rebuilt from the gradient, "
                 "which is in GPU memory here; nothing dumped",
                 rank, step);
  } else if (dump) {
    dump_acc(rank, residual_before, grad);
  }
  sw.reset();
  const auto clock = static_cast<uint64_t>(step);
  const auto before = client->counters();  // copy: the deltas below are per step
  const auto wire_values = worker::value_format(cfg);
  if (cc.method == config::CompressionMethod::kDense) {
    check(client->push_dense(clock, sel.values, wire_values, sel.scale_runs));
  } else {
    check(client->push_sparse(clock, sel, wire_values));
  }
  const auto& after = client->counters();
  const double push_s = sw.seconds();
  const double delay_s = straggle_seconds(rank, compute_s + select_s + push_s);
  if (delay_s > 0) std::this_thread::sleep_for(std::chrono::duration<double>(delay_s));
  nlohmann::json line = {{"step", step},
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
             {"push_s", push_s},
             {"pull_wait_s", pull_wait},
             {"delay_s", delay_s}};
  if (!delayed.empty()) line["gradient_version"] = gradient_version();
  if (cfg.run.log_residual_every > 0 && step % cfg.run.log_residual_every == 0)
    line["residual_norm"] = std::sqrt(compression->residual_norm_sq());
  log.write(std::move(line));
  last_push_step = step;
  last_loss = loss;
  client->note_batch_loss(loss);
  loss_window += loss;
  ++window;
  ++step;
  snapshot_if_due(rank);
  const int64_t steps = cfg.training.steps;
  const int64_t progress_every = std::max<int64_t>(1, steps / cfg.run.progress_lines);
  if (rank == 0 && cfg.run.progress && (step % progress_every == 0 || step == steps)) {
    const double elapsed = train_clock.seconds();
    const double rate = double(step - first_step) / std::max(elapsed, 1e-9);
    spdlog::info("step {:>6}/{} ({:3.0f}%)  loss {:.4f}  pushed {:.1f} KiB/step ({:.1f}x less than dense)  "
                 "{:.0f} steps/s{}",
                 step, steps, 100.0 * double(step) / double(steps), loss_window / double(window),
                 double(after.bytes_pushed) / 1024.0 / double(step - first_step),
                 after.bytes_pushed > 0 ? double(after.bytes_pushed_dense_equivalent) / double(after.bytes_pushed)
                                        : 0.0,
                 rate, step < steps ? "  eta " + human_duration(double(steps - step) / rate) : std::string());
    loss_window = 0;
    window = 0;
  }
}

TrainResult Worker::finish(const Dataset* train_set, const Dataset* test_set) {
  impl_->require_connected("finish");
  if (impl_->finished) throw Error("Worker::finish: already finished");
  return impl_->reporting([&] { return finish_impl(train_set, test_set); });
}

TrainResult Worker::finish_impl(const Dataset* train_set, const Dataset* test_set) {
  Impl& w = *impl_;
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  TrainResult result;
  result.steps = w.step;
  result.last_batch_loss = w.last_loss;
  result.train = {kNaN, kNaN, 0};
  result.test = {kNaN, kNaN, 0};
  protocol::DoneReport report;
  report.steps = static_cast<uint64_t>(w.step);
  report.last_batch_loss = w.last_loss;
  report.train_loss = NAN;
  report.test_accuracy = NAN;
  if (w.client->rank() == 0) {
    // With compressed pulls the final model is the servers' own parameters,
    // not the published copy the workers trained on.
    const bool exact = w.cfg.downlink.method != config::CompressionMethod::kDense;
    auto v = w.client->pull(static_cast<uint64_t>(w.step), w.params, w.device ? &w.changes : nullptr, exact);
    w.check(v.status());
    w.take_back_refused(static_cast<uint64_t>(w.step));
    if (w.device) w.check(w.device->update(w.params, w.changes));
    const std::span<const float> model_params = w.model_params();
    nlohmann::json line = {{"event", "eval"}, {"version", v.value()}};
    try {
      if (train_set != nullptr) {
        result.train = w.model->evaluate(model_params, KeepAliveDataset(*train_set, *w.client));
        line["train_loss"] = result.train.loss;
        line["train_accuracy"] = result.train.accuracy;
      }
      if (test_set != nullptr) {
        result.test = w.model->evaluate(model_params, KeepAliveDataset(*test_set, *w.client));
        line["test_loss"] = result.test.loss;
        line["test_accuracy"] = result.test.accuracy;
      }
    } catch (const std::exception& e) {
      w.fail(fmt::format("evaluating the final model: {}", e.what()));
    }
    report.train_loss = result.train.loss;
    report.test_accuracy = result.test.accuracy;
    w.log.write(std::move(line));
    if (w.cfg.run.progress)
      spdlog::info("final model: train loss {:.4f}, train accuracy {:.4f}, test accuracy {:.4f}", result.train.loss,
                   result.train.accuracy, result.test.accuracy);
    if (w.cfg.run.save_params) {
      std::ofstream f(w.cfg.run_folder() + "/params.f32", std::ios::binary | std::ios::trunc);
      f.write(reinterpret_cast<const char*>(w.params.data()),
              static_cast<std::streamsize>(w.params.size() * sizeof(float)));
      if (!f) w.fail("cannot write " + w.cfg.run_folder() + "/params.f32");
    }
  }
  const auto& c = w.client->counters();
  report.bytes_pushed = c.bytes_pushed;
  report.bytes_pushed_dense_equivalent = c.bytes_pushed_dense_equivalent;
  report.bytes_pulled = c.bytes_pulled;
  report.nnz_pushed = c.nnz_pushed;
  report.wall_seconds = w.wall.seconds();
  w.log.write({{"event", "done"},
               {"steps", w.step},
               {"bytes_pushed", c.bytes_pushed},
               {"bytes_pushed_dense_equivalent", c.bytes_pushed_dense_equivalent},
               {"bytes_pulled", c.bytes_pulled},
               {"nnz_pushed", c.nnz_pushed},
               {"pushes_resent", c.pushes_resent},
               {"bytes_resent", c.bytes_resent},
               {"residual_norm", std::sqrt(w.compression->residual_norm_sq())},
               {"pushes_refused", w.pushes_refused},
               {"values_refused", w.values_refused},
               {"hessian_clamped", w.compression->hessian_clamped()}});
  result.bytes_pushed = c.bytes_pushed;
  result.bytes_pulled = c.bytes_pulled;
  result.wall_seconds = report.wall_seconds;
  w.finished = true;  // from here the scheduler hears from finish() itself
  const Status s = w.client->finish(report);
  if (!s.ok()) throw Error(s.to_string());
  return result;
}

TrainResult Worker::train(Model& model, const Dataset& train_set, const Dataset* test_set) {
  connect(model);
  return impl_->reporting([&] { return train_loop(model, train_set, test_set); });
}

TrainResult Worker::train_loop(Model& model, const Dataset& train_set, const Dataset* test_set) {
  Impl& w = *impl_;
  if (train_set.size() == 0) w.fail("the training set is empty");
  if (train_set.size() < num_workers())
    w.fail(fmt::format("the training set has {} examples for {} workers", train_set.size(), num_workers()));
  const uint32_t rank = w.client->rank();
  worker::BatchSampler sampler(train_set.size(), rank, num_workers(), static_cast<uint64_t>(w.cfg.training.seed));
  std::vector<uint32_t> ids;
  std::vector<float> host_grad(w.device ? 0 : w.n);
  const std::span<float> grad = w.device ? w.device->grad() : std::span<float>(host_grad);
  Batch batch;
  // A resumed worker draws the batches it would have drawn from here on.
  for (int64_t s = 0; s < w.step; ++s) sampler.next(static_cast<size_t>(w.cfg.training.batch_size), ids);
  while (w.step < w.cfg.training.steps) {
    w.pull_into_params();
    double loss = 0;
    try {
      sampler.next(static_cast<size_t>(w.cfg.training.batch_size), ids);
      train_set.batch(ids, batch);
      loss = model.loss_and_gradient(w.gradient_params(), batch, grad);
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      throw Error(fmt::format("worker {} step {}: the model failed: {}", rank, w.step, e.what()));
    }
    const int64_t step = w.step;
    w.push(grad, loss, &batch);
    if (rank == 0 && test_set != nullptr && w.cfg.training.eval_every > 0 && step % w.cfg.training.eval_every == 0) {
      // Evaluate the parameters this step pulled: what the job has reached by now.
      const double at = w.train_clock.seconds();
      const Evaluation te = model.evaluate(w.model_params(), KeepAliveDataset(*test_set, *w.client));
      w.log.write({{"event", "eval"}, {"step", step}, {"train_seconds", at}, {"test_accuracy", te.accuracy},
                   {"test_loss", te.loss}});
    }
  }
  return finish_impl(&train_set, test_set);
}

TrainResult Worker::run(const Registry& registry) {
  const Context plain = context();
  std::unique_ptr<Dataset> train_set, test_set;
  std::unique_ptr<Model> model;
  const auto& cfg = impl_->cfg;
  train_set = registry.make_dataset(cfg.data.name, plain, Split::kTrain);
  test_set = registry.make_dataset(cfg.data.name, plain, Split::kTest);
  const Context with_data = ContextAccess::make(cfg, train_set.get());
  model = registry.make_model(cfg.model.name, with_data);
  for (const auto& name : with_data.unread_options())
    spdlog::warn("model.options.{} is set but model '{}' does not read it", name, cfg.model.name);
  return train(*model, *train_set, test_set.get());
}

}  // namespace sps
