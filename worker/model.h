// Model: what a worker trains. A model owns no parameters: it declares how
// many it has (one flat float vector), initialises them, and computes the
// mean loss and its gradient for a batch into a buffer it is handed.
// Implementations must be deterministic for a given input (the tests compare
// a distributed run with a single-process one bit for bit).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "worker/dataset.h"

namespace sps::worker {

struct Evaluation {
  double loss = 0;      // mean loss over the examples
  double accuracy = 0;  // fraction classified correctly
  size_t examples = 0;
};

class Model {
 public:
  virtual ~Model() = default;
  virtual size_t num_params() const = 0;
  // Writes initial parameters (deterministic in `seed`).
  virtual void init(std::span<float> params, uint64_t seed) const = 0;
  // Returns the batch's mean loss; writes d(loss)/d(params) into `grad`.
  // REQUIRES: params.size() == grad.size() == num_params().
  virtual double loss_and_gradient(std::span<const float> params, const Batch& batch, std::span<float> grad) const = 0;
  virtual Evaluation evaluate(std::span<const float> params, const Dataset& data) const = 0;

  // Named slices of the flat parameter vector, in order and covering it
  // (compression.scope: per_tensor selects within each one). Default: one.
  struct Tensor {
    std::string name;
    size_t offset = 0;
    size_t size = 0;
  };
  virtual std::vector<Tensor> tensors() const { return {{"params", 0, num_params()}}; }
  // Whether hessian_diag() gives an estimate (error_feedback: hessian_diag
  // is refused for models without one).
  virtual bool provides_hessian_diag() const { return false; }
  // An estimate of the diagonal of the loss Hessian at `params` on `batch`,
  // for Hessian-aided error compensation; false when the model has none.
  virtual bool hessian_diag(std::span<const float> /*params*/, const Batch& /*batch*/,
                            std::span<float> /*out*/) const {
    return false;
  }
};

}  // namespace sps::worker
