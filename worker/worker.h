// Worker: the training loop of one worker process.
//
//   pull(clock) -> gradient on a mini-batch -> error feedback + selection
//   -> push(clock) -> clock + 1
//
// then rank 0 evaluates the final model and every worker reports to the
// scheduler. One JSON line per step goes to <run>/worker-<rank>.jsonl.
#pragma once

#include <memory>
#include <string>

#include <zmq.hpp>

#include "common/process.h"
#include "common/status.h"
#include "config/config.h"
#include "worker/dataset.h"
#include "worker/model.h"

namespace sps::worker {

class PsClient;

// Builds the model a config names; `train` supplies feature/class counts.
Result<std::unique_ptr<Model>> make_model(const config::Config& cfg, const Dataset& train);

// Loads the training and test sets a config names.
Status load_data(const config::Config& cfg, Dataset& train, Dataset& test);

class Worker {
 public:
  // `requested_rank` >= 0 asks the scheduler for that worker rank.
  explicit Worker(config::Config cfg, int requested_rank = -1);
  // Runs the whole job for this worker; returns the first error.
  Status train(zmq::context_t& ctx);

 private:
  // Seconds a straggling rank sleeps after a step whose own work took `work_seconds`.
  double straggle_seconds(uint32_t rank, double work_seconds) const;
  Status run_registered(PsClient& client, Model& model, const Dataset& train_set, const Dataset& test_set,
                        const Stopwatch& wall);
  config::Config cfg_;
  int requested_rank_;
};

}  // namespace sps::worker
