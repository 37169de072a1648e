#include "worker/mlp_cuda.h"

#include <algorithm>
#include <stdexcept>

#include "worker/cuda/mlp_device.h"
#include "worker/mlp.h"

namespace sps::worker {

struct MlpCuda::State {
  std::vector<size_t> widths;
  double init_std = 0;
  std::unique_ptr<cuda::MlpDevice> device;
};

namespace {
// Device failures surface as sps::Error, like every API failure.
template <class F>
auto rethrow_as_error(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw Error(e.what());
  }
}
}  // namespace

MlpCuda::MlpCuda(std::vector<size_t> widths, double l2, double init_std, int device) : state_(new State) {
  state_->widths = widths;
  state_->init_std = init_std;
  state_->device = rethrow_as_error(
      [&] { return std::make_unique<cuda::MlpDevice>(std::move(widths), static_cast<float>(l2), device); });
}

MlpCuda::~MlpCuda() = default;

std::vector<TensorSpec> MlpCuda::tensors() const { return mlp_tensors(state_->widths); }

void MlpCuda::init(std::span<float> params, uint64_t seed) {
  std::vector<float> host(params.size());
  mlp_init(state_->widths, state_->init_std, seed, host);  // the CPU MLP's values
  rethrow_as_error([&] { state_->device->upload(params.data(), host.data(), host.size()); });
}

double MlpCuda::loss_and_gradient(std::span<const float> params, const Batch& batch, std::span<float> grad) {
  const size_t n = state_->device->num_params();
  if (params.size() != n || grad.size() != n || batch.cols != state_->widths.front() ||
      batch.labels.size() != batch.rows || batch.rows == 0)
    throw Error("mlp (cuda): buffer or batch sizes do not match the model");
  return rethrow_as_error([&] {
    return state_->device->loss_and_gradient(params.data(), batch.x.data(), batch.labels.data(), batch.rows,
                                             grad.data());
  });
}

Evaluation MlpCuda::evaluate(std::span<const float> params, const Dataset& data) {
  if (params.size() != state_->device->num_params() || data.features() != state_->widths.front())
    throw Error("mlp (cuda): parameter or feature count does not match the model");
  std::vector<uint32_t> ids;
  Batch batch;
  double loss = 0;
  size_t correct = 0;
  for (size_t begin = 0; begin < data.size(); begin += 1000) {
    const size_t end = std::min(data.size(), begin + 1000);
    ids.resize(end - begin);
    for (size_t i = begin; i < end; ++i) ids[i - begin] = static_cast<uint32_t>(i);
    data.batch(ids, batch);
    loss += rethrow_as_error([&] {
      return state_->device->evaluate_batch(params.data(), batch.x.data(), batch.labels.data(), batch.rows, correct);
    });
  }
  Evaluation e;
  e.examples = data.size();
  e.loss = e.examples > 0 ? loss / static_cast<double>(e.examples) : 0.0;
  e.accuracy = e.examples > 0 ? static_cast<double>(correct) / static_cast<double>(e.examples) : 0.0;
  return e;
}

}  // namespace sps::worker
