// The single-process reference of a BSP job: W simulated workers (same data
// partitions, samplers, model and error-feedback compressor as sps-worker)
// and S shards (the server's own Shard class), stepped in lockstep with no
// sockets. A distributed run of the same config must match it bit for bit:
// every float operation happens in the same order (shard sums go in worker
// rank order), only the transport differs.
#pragma once

#include <vector>

#include "common/status.h"
#include "config/config.h"

namespace sps::testing {

struct ReferenceResult {
  std::vector<float> params;
  double train_loss = 0;
  double test_accuracy = 0;
};

Result<ReferenceResult> run_reference(const config::Config& cfg);

}  // namespace sps::testing
