// sps::TorchModel: a LibTorch module as an sps model (header-only; include
// it only in programs that link LibTorch, e.g. find_package(Torch)).
//
//   torch::manual_seed(1);
//   auto net = std::make_shared<MyNetImpl>();            // any module with forward(Tensor)
//   sps::TorchModel model(torch::nn::AnyModule(net), {1, 28, 28});
//
// The module's parameters, in named_parameters() order, become the sps
// tensors (float32, CPU). Each step the pulled parameters are written into
// the module, forward + autograd produce the gradient, and it is copied into
// sps's buffer. init() hands sps the module's own initial values, so the job
// starts where LibTorch's initialisers put the module on worker 0.
// Loss: cross-entropy on the module's logits for labelled batches, mean
// squared error for batches with targets, or a loss function you pass.
#pragma once

#include <torch/torch.h>

#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "sps/dataset.h"
#include "sps/model.h"

namespace sps {

class TorchModel : public Model {
 public:
  // (module output, batch as tensors x and y) -> scalar loss.
  using LossFn = std::function<torch::Tensor(const torch::Tensor& output, const torch::Tensor& y)>;

  // `example_shape`: the shape of one example (Batch::cols must equal its
  // product); batches reach forward() as {rows, example_shape...}.
  TorchModel(torch::nn::AnyModule module, std::vector<int64_t> example_shape, LossFn loss = nullptr)
      : module_(std::move(module)), shape_(std::move(example_shape)), loss_(std::move(loss)) {
    for (const auto& p : module_.ptr()->named_parameters()) {
      if (p.value().scalar_type() != torch::kFloat32 || !p.value().device().is_cpu())
        throw Error("TorchModel: parameter " + p.key() + " is not a float32 CPU tensor");
      params_.push_back(p.value());
      TensorSpec spec{p.key(), {}};
      for (int64_t d : p.value().sizes()) spec.shape.push_back(static_cast<size_t>(d));
      if (p.value().dim() == 0) spec.shape.push_back(1);
      specs_.push_back(std::move(spec));
    }
    if (params_.empty()) throw Error("TorchModel: the module has no parameters");
  }

  std::vector<TensorSpec> tensors() const override { return specs_; }

  void init(std::span<float> params, uint64_t /*seed*/) override {
    size_t at = 0;
    for (const auto& p : params_) {
      const auto v = p.detach().contiguous();
      std::memcpy(params.data() + at, v.data_ptr<float>(), static_cast<size_t>(v.numel()) * sizeof(float));
      at += static_cast<size_t>(v.numel());
    }
  }

  double loss_and_gradient(std::span<const float> params, const Batch& batch, std::span<float> grad) override {
    load(params);
    module_.ptr()->train();
    module_.ptr()->zero_grad();
    const torch::Tensor loss = compute_loss(batch);
    loss.backward();
    size_t at = 0;
    for (const auto& p : params_) {
      const auto count = static_cast<size_t>(p.numel());
      if (p.grad().defined()) {
        const auto g = p.grad().contiguous();
        std::memcpy(grad.data() + at, g.data_ptr<float>(), count * sizeof(float));
      } else {
        std::fill_n(grad.data() + at, count, 0.0f);  // a parameter the loss does not reach
      }
      at += count;
    }
    return loss.item<double>();
  }

  Evaluation evaluate(std::span<const float> params, const Dataset& data) override {
    load(params);
    torch::NoGradGuard no_grad;
    module_.ptr()->eval();
    Evaluation e;
    e.examples = data.size();
    double loss = 0;
    size_t correct = 0;
    bool labelled = false;
    std::vector<uint32_t> ids;
    Batch batch;
    for (size_t begin = 0; begin < data.size(); begin += 500) {
      const size_t end = std::min(data.size(), begin + 500);
      ids.resize(end - begin);
      for (size_t i = begin; i < end; ++i) ids[i - begin] = static_cast<uint32_t>(i);
      data.batch(ids, batch);
      const torch::Tensor out = module_.forward(inputs(batch));
      loss += loss_of(out, batch).item<double>() * static_cast<double>(batch.rows);
      if (!batch.labels.empty()) {
        labelled = true;
        correct += static_cast<size_t>((out.argmax(1) == labels(batch)).sum().item<int64_t>());
      }
    }
    module_.ptr()->train();
    e.loss = e.examples > 0 ? loss / static_cast<double>(e.examples) : 0.0;
    e.accuracy = labelled && e.examples > 0 ? static_cast<double>(correct) / static_cast<double>(e.examples)
                                            : std::numeric_limits<double>::quiet_NaN();
    return e;
  }

  // Writes flat parameters (e.g. the final pulled model) into the module.
  void load(std::span<const float> params) {
    torch::NoGradGuard no_grad;
    size_t at = 0;
    for (auto& p : params_) {
      p.copy_(torch::from_blob(const_cast<float*>(params.data() + at), p.sizes(), torch::kFloat32));
      at += static_cast<size_t>(p.numel());
    }
  }

  torch::nn::AnyModule& module() { return module_; }

 private:
  torch::Tensor inputs(const Batch& batch) const {
    std::vector<int64_t> shape{static_cast<int64_t>(batch.rows)};
    shape.insert(shape.end(), shape_.begin(), shape_.end());
    return torch::from_blob(const_cast<float*>(batch.x.data()), shape, torch::kFloat32);
  }
  static torch::Tensor labels(const Batch& batch) {
    return torch::from_blob(const_cast<int32_t*>(batch.labels.data()), {static_cast<int64_t>(batch.rows)},
                            torch::kInt32)
        .to(torch::kInt64);
  }
  torch::Tensor loss_of(const torch::Tensor& out, const Batch& batch) const {
    if (!batch.labels.empty()) {
      const torch::Tensor y = labels(batch);
      return loss_ ? loss_(out, y) : torch::nn::functional::cross_entropy(out, y);
    }
    const torch::Tensor y =
        torch::from_blob(const_cast<float*>(batch.targets.data()), {static_cast<int64_t>(batch.rows)}, torch::kFloat32);
    return loss_ ? loss_(out, y) : torch::mse_loss(out.reshape({static_cast<int64_t>(batch.rows)}), y);
  }
  torch::Tensor compute_loss(const Batch& batch) {
    int64_t per_example = 1;
    for (int64_t d : shape_) per_example *= d;
    if (static_cast<int64_t>(batch.cols) != per_example)
      throw Error("TorchModel: batches have " + std::to_string(batch.cols) + " features, the example shape holds " +
                  std::to_string(per_example));
    return loss_of(module_.forward(inputs(batch)), batch);
  }

  torch::nn::AnyModule module_;
  std::vector<int64_t> shape_;
  LossFn loss_;
  std::vector<torch::Tensor> params_;
  std::vector<TensorSpec> specs_;
};

}  // namespace sps
