// The GPU side of MlpCuda in plain C++17 (no CUDA types, no sps API types):
// nvcc compiles the .cu against this header, and worker/mlp_cuda.cc (C++20)
// adapts it to sps::Model. Failures throw std::runtime_error.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace sps::worker::cuda {

class MlpDevice {
 public:
  // `widths` = {inputs, hidden..., classes}; the layout is the CPU MLP's.
  MlpDevice(std::vector<size_t> widths, float l2, int device);
  ~MlpDevice();
  MlpDevice(const MlpDevice&) = delete;
  MlpDevice& operator=(const MlpDevice&) = delete;

  size_t num_params() const;
  // device_params[0, n) = host[0, n).
  void upload(float* device_params, const float* host, size_t n);
  // params and grad in device memory; x (rows x inputs) and labels in host
  // memory. Returns the mean loss; grad is complete on return.
  double loss_and_gradient(const float* params, const float* x, const int32_t* labels, size_t rows, float* grad);
  // Summed loss over the rows; adds the correctly classified rows to `correct`.
  double evaluate_batch(const float* params, const float* x, const int32_t* labels, size_t rows, size_t& correct);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace sps::worker::cuda
