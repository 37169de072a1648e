// The MLP of worker/mlp.h computing on a GPU: the same layers, layout,
// initial values and loss, with the matrix products on cuBLAS and the
// element-wise steps as CUDA kernels. Parameters and gradient live in device
// memory (memory() == kCuda); batches arrive in host memory and are copied
// in. Built in CUDA builds only (model.device: cuda).
#pragma once

#include <memory>
#include <vector>

#include "sps/dataset.h"
#include "sps/model.h"

namespace sps::worker {

class MlpCuda final : public sps::Model {
 public:
  // Throws sps::Error when the device or cuBLAS cannot be set up.
  MlpCuda(std::vector<size_t> widths, double l2 = 0.0, double init_std = 0.0, int device = 0);
  ~MlpCuda() override;
  std::vector<TensorSpec> tensors() const override;
  void init(std::span<float> params, uint64_t seed) override;
  double loss_and_gradient(std::span<const float> params, const Batch& batch, std::span<float> grad) override;
  Evaluation evaluate(std::span<const float> params, const Dataset& data) override;
  Memory memory() const override { return Memory::kCuda; }

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace sps::worker
