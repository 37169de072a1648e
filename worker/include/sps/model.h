// The sps model interface: what a worker trains.
//
// A model owns no parameters. It declares its parameter tensors (names and
// shapes); sps concatenates them, in order, into one flat float vector that
// the servers hold. Each step the worker hands the model the parameters it
// pulled and a buffer for the gradient. Everything here is plain C++; a model
// may use any library inside (BLAS, CUDA, LibTorch).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "sps/export.h"

namespace sps {

// Every failure of the public API is an sps::Error whose message says what
// went wrong and, for configuration, which key in which file.
class SPS_API Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// One parameter tensor: a name (for logs and per-tensor compression) and a
// shape (row-major); its size is the product of the shape.
struct TensorSpec {
  std::string name;
  std::vector<size_t> shape;
  size_t size() const {
    size_t n = 1;
    for (size_t d : shape) n *= d;
    return n;
  }
};

// Total number of parameters of a tensor list.
inline size_t num_params(const std::vector<TensorSpec>& tensors) {
  size_t n = 0;
  for (const auto& t : tensors) n += t.size();
  return n;
}

// A mini-batch: `rows` examples of `cols` features (row-major floats) with
// class labels (classification) or float targets (regression); a dataset
// fills the one it has.
struct Batch {
  size_t rows = 0;
  size_t cols = 0;
  std::vector<float> x;
  std::vector<int32_t> labels;
  std::vector<float> targets;
};

class Dataset;

struct Evaluation {
  double loss = 0;      // mean loss over the examples
  double accuracy = 0;  // fraction classified correctly; NaN when the model has no notion of it
  size_t examples = 0;
};

// Where the parameter and gradient buffers a model is handed live.
enum class Memory { kHost, kCuda };

class SPS_API Model {
 public:
  virtual ~Model();

  // The parameter tensors, in the order they are laid out in the flat vector.
  virtual std::vector<TensorSpec> tensors() const = 0;

  // Writes initial parameters; deterministic in `seed`. Called on worker 0
  // only, whose values every worker then pulls.
  virtual void init(std::span<float> params, uint64_t seed) = 0;

  // Returns the batch's mean loss and writes d(loss)/d(params) into `grad`
  // (all of it: sps does not zero it first). Both spans have num_params()
  // entries. Deterministic for equal inputs.
  virtual double loss_and_gradient(std::span<const float> params, const Batch& batch, std::span<float> grad) = 0;

  // Loss (and accuracy, for classifiers) of `params` over a whole dataset.
  // The default averages loss_and_gradient over batches of 256 and reports
  // accuracy as NaN.
  virtual Evaluation evaluate(std::span<const float> params, const Dataset& data);

  // Whether hessian_diag() gives an estimate. compression.error_feedback:
  // hessian_diag is refused for models without one.
  virtual bool provides_hessian_diag() const { return false; }
  // An estimate of the diagonal of the loss Hessian at `params` on `batch`
  // (Hessian-aided error compensation); returns false when there is none.
  virtual bool hessian_diag(std::span<const float> params, const Batch& batch, std::span<float> out);

  // Whether hessian_vector() is available (compression.error_feedback:
  // hessian, the full Hessian-aided compensation).
  virtual bool provides_hessian_vector() const { return false; }
  // out = H v, with H the loss Hessian at `params` on `batch`; returns false
  // when the model has no Hessian-vector product.
  virtual bool hessian_vector(std::span<const float> params, const Batch& batch, std::span<const float> v,
                              std::span<float> out);

  // Where params/grad live. Models computing on a GPU return kCuda.
  virtual Memory memory() const { return Memory::kHost; }
};

}  // namespace sps
