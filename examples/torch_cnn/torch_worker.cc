// A worker program whose model is a LibTorch CNN: two 5x5 convolutions with
// max-pooling and a linear classifier (5,994 parameters), registered as
// "torch_cnn". Autograd computes the gradient; sps compresses and ships it.
#include <sps/torch_model.h>
#include <sps/worker.h>

#include <torch/torch.h>

struct CnnImpl : torch::nn::Module {
  CnnImpl()
      : conv1(register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 8, 5)))),
        conv2(register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(8, 16, 5)))),
        fc(register_module("fc", torch::nn::Linear(16 * 4 * 4, 10))) {}

  torch::Tensor forward(torch::Tensor x) {
    x = torch::max_pool2d(torch::relu(conv1->forward(x)), 2);  // 28 -> 24 -> 12
    x = torch::max_pool2d(torch::relu(conv2->forward(x)), 2);  // 12 -> 8 -> 4
    return fc->forward(x.flatten(1));
  }

  torch::nn::Conv2d conv1, conv2;
  torch::nn::Linear fc;
};
TORCH_MODULE(Cnn);

int main(int argc, char** argv) {
  sps::Registry registry = sps::builtin_registry();
  registry.add_model("torch_cnn", [](const sps::Context& ctx) {
    // Several workers share a machine: one intra-op thread each unless told otherwise.
    torch::set_num_threads(static_cast<int>(ctx.option("torch_threads", int64_t{1})));
    torch::manual_seed(static_cast<uint64_t>(ctx.integer("training.seed")));
    return std::make_unique<sps::TorchModel>(torch::nn::AnyModule(Cnn()), std::vector<int64_t>{1, 28, 28});
  });
  return sps::worker_main(argc, argv, registry);
}
