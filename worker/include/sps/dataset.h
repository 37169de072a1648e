// The sps dataset interface: where a worker's batches come from.
//
// A dataset is a fixed, indexable set of examples. The worker samples its
// own partition (examples i with i % workers == rank), reshuffled every epoch
// from the job's seed, and asks the dataset to build each batch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "sps/export.h"
#include "sps/model.h"

namespace sps {

class SPS_API Dataset {
 public:
  virtual ~Dataset();
  // Number of examples.
  virtual size_t size() const = 0;
  // Features per example (Batch::cols).
  virtual size_t features() const = 0;
  // Number of classes for classification, 0 for regression targets.
  virtual size_t classes() const { return 0; }
  // Fills `out` with examples `ids` (each < size()), in that order.
  virtual void batch(std::span<const uint32_t> ids, Batch& out) const = 0;
};

// Which part of a dataset a factory is asked for.
enum class Split { kTrain, kTest };

}  // namespace sps
