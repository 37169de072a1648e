// The sps worker runtime: train a model against a running sps job.
//
//   sps::Worker worker({.config_file = "job.yaml"});
//   worker.train(model, train_data, &test_data);      // the whole loop
//
// or, with a loop of your own:
//
//   worker.connect(model);
//   for (int64_t s = 0; s < worker.steps(); ++s) {
//     worker.pull(params);                  // waits as the consistency mode requires
//     double loss = ... gradient into grad ...;
//     worker.push(grad, loss);              // error feedback, selection, send
//   }
//   worker.finish();
//
// A job is started by sps-launch (or a cluster launcher) from one config;
// each worker process is a program like sps-worker, which is nothing but
// `return sps::worker_main(argc, argv, sps::builtin_registry());`.
// Register your own models and datasets by name in a Registry and call
// worker_main with it, and a config can say `model.name: my_model`.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "sps/dataset.h"
#include "sps/export.h"
#include "sps/model.h"

namespace sps {

// Read-only view of the job's configuration, for model and dataset
// factories. Keys are the config's dotted paths (docs/config.md), e.g.
// "training.l2" or "data.path"; free-form model settings live under
// "model.options.<name>". Reading a key that is missing or of another type
// throws sps::Error naming the key.
class SPS_API Context {
 public:
  ~Context();
  Context(const Context&);
  Context& operator=(const Context&) = delete;

  int64_t integer(const std::string& key) const;
  double real(const std::string& key) const;
  bool boolean(const std::string& key) const;
  std::string string(const std::string& key) const;
  std::vector<double> reals(const std::string& key) const;

  // model.options.<name>, or `fallback` when the config does not set it.
  int64_t option(const std::string& name, int64_t fallback) const;
  double option(const std::string& name, double fallback) const;
  std::string option(const std::string& name, const std::string& fallback) const;
  // Names under model.options that no factory asked for yet (for warnings).
  std::vector<std::string> unread_options() const;

  // The training set, when a model is being built (features, classes).
  const Dataset* train() const { return train_; }
  // This context with `train` as its training set (to build a model from a
  // registry in a loop of your own).
  Context with_train(const Dataset* train) const { return Context(impl_, train); }

 private:
  friend struct ContextAccess;  // how the runtime builds one from a loaded config
  struct Impl;
  Context(std::shared_ptr<const Impl> impl, const Dataset* train);
  std::shared_ptr<const Impl> impl_;
  const Dataset* train_ = nullptr;
};

// Models and datasets by name. No global registry: build one, add to it,
// hand it to worker_main / Worker::run.
class SPS_API Registry {
 public:
  using ModelFactory = std::function<std::unique_ptr<Model>(const Context&)>;
  using DatasetFactory = std::function<std::unique_ptr<Dataset>(const Context&, Split)>;

  // Names are lower-case identifiers ([a-z][a-z0-9_]*); adding a name twice
  // throws.
  Registry& add_model(const std::string& name, ModelFactory factory);
  Registry& add_dataset(const std::string& name, DatasetFactory factory);

  bool has_model(const std::string& name) const { return models_.count(name) != 0; }
  bool has_dataset(const std::string& name) const { return datasets_.count(name) != 0; }
  std::vector<std::string> model_names() const;
  std::vector<std::string> dataset_names() const;

  // Throws sps::Error listing the registered names when `name` is unknown.
  std::unique_ptr<Model> make_model(const std::string& name, const Context& context) const;
  std::unique_ptr<Dataset> make_dataset(const std::string& name, const Context& context, Split split) const;

 private:
  std::map<std::string, ModelFactory> models_;
  std::map<std::string, DatasetFactory> datasets_;
};

// A registry holding the built-in models (logreg, least_squares, mlp) and
// datasets (fashion_mnist, least_squares); see docs/worker-api.md.
SPS_API Registry builtin_registry();

struct WorkerOptions {
  // Job config (YAML); empty = every key at its default.
  std::string config_file{};
  // "key.path=value" overrides applied after the file, in order.
  std::vector<std::string> overrides{};
  // Ask the scheduler for this worker rank; -1 = any free rank.
  int rank = -1;
};

// What a finished run reports. The evaluations are filled on worker 0 only
// (it evaluates the final model); elsewhere they are NaN.
struct TrainResult {
  int64_t steps = 0;
  double last_batch_loss = 0;
  Evaluation train;
  Evaluation test;
  uint64_t bytes_pushed = 0;
  uint64_t bytes_pulled = 0;
  double wall_seconds = 0;
};

class SPS_API Worker {
 public:
  // Loads and validates the config; throws sps::Error ("job.yaml:12:3:
  // training.lr: ...") when it is bad.
  explicit Worker(WorkerOptions options);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // The config, for factories and your own code.
  Context context() const;

  // Builds model.name and data.name from `registry` and runs train().
  TrainResult run(const Registry& registry);
  // The whole loop for this worker: connect, then steps x (pull, batch,
  // loss_and_gradient, push), then finish(train, test). Progress goes to the
  // log; one JSON line per step to <run>/worker-<rank>.jsonl.
  TrainResult train(Model& model, const Dataset& train, const Dataset* test = nullptr);

  // --- your own loop ---
  // Registers with the job's scheduler, lets worker 0 write model.init()
  // into the servers and waits until every worker is ready.
  void connect(Model& model);
  uint32_t rank() const;         // after connect()
  uint32_t num_workers() const;  // after connect()
  int64_t steps() const;         // training.steps
  int64_t step() const;          // pushes done so far
  // Writes the current parameters into `params` (num_params entries),
  // waiting as long as the consistency mode requires; returns the version.
  // With workers.gradient_delay d it writes (and versions) the parameters
  // pulled d steps earlier, those this step's gradient is to be taken on.
  uint64_t pull(std::span<float> params);
  // Error feedback, selection and push of one step's gradient; `loss` is
  // logged. `batch` is needed only by compression.error_feedback:
  // hessian_diag (it asks the model for its Hessian diagonal on it).
  void push(std::span<const float> grad, double loss, const Batch* batch = nullptr);
  // Ends this worker's part of the job (worker 0 first pulls the final model
  // and evaluates it on the datasets given) and waits for the job to end.
  TrainResult finish(const Dataset* train = nullptr, const Dataset* test = nullptr);

 private:
  void connect_impl(Model& model);
  TrainResult train_loop(Model& model, const Dataset& train, const Dataset* test);
  TrainResult finish_impl(const Dataset* train, const Dataset* test);
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The whole worker program: parses --config, --set, --rank, --print-config
// and --help, runs model.name/data.name from `registry`, and returns the
// process exit status (0 done, 1 failed, 2 bad usage or config).
SPS_API int worker_main(int argc, char** argv, const Registry& registry);

// The command line of worker_main without the run, for a program that
// drives its own Worker (a loop of its own, a language binding): parses
// argv, answers --help, --list-models (the names in `registry`) and
// --print-config, checks the config (model.name and data.name must be in
// `registry`) and sets the process up as worker_main does (log format and
// level, cluster.keep_freed_memory). It does not install signal handlers.
struct WorkerCommandLine {
  std::optional<WorkerOptions> options;  // construct a Worker with these...
  int exit_code = 0;                     // ...or, when empty, exit now with this status
};
SPS_API WorkerCommandLine parse_worker_command_line(int argc, char** argv, const Registry& registry);

}  // namespace sps
