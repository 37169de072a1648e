// A worker program with a training loop of its own, written against the
// public API only (it links libsps, nothing internal): least squares with
// its own batch order, through Worker::connect / pull / push / finish.
// Usage: sps-test-own-loop-worker --rank N [--config FILE] [--set key=value]...
#include <cstdio>
#include <cstring>
#include <sps/worker.h>

int main(int argc, char** argv) {
  sps::WorkerOptions options;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--rank") == 0) options.rank = std::atoi(argv[i + 1]);
    if (std::strcmp(argv[i], "--config") == 0) options.config_file = argv[i + 1];
    if (std::strcmp(argv[i], "--set") == 0) options.overrides.push_back(argv[i + 1]);
  }
  try {
    sps::Worker worker(options);
    const sps::Registry registry = sps::builtin_registry();
    const sps::Context context = worker.context();
    const auto train = registry.make_dataset("least_squares", context, sps::Split::kTrain);
    const auto model = registry.make_model("least_squares", context.with_train(train.get()));
    worker.connect(*model);
    const size_t n = sps::num_params(model->tensors());
    const size_t batch_size = static_cast<size_t>(context.integer("training.batch_size"));
    std::vector<float> params(n), grad(n);
    std::vector<uint32_t> ids(batch_size);
    sps::Batch batch;
    for (int64_t s = worker.step(); s < worker.steps(); ++s) {  // step() > 0 after --resume
      worker.pull(params);
      // Round-robin over the data, each worker its own stretch.
      for (size_t i = 0; i < batch_size; ++i)
        ids[i] = static_cast<uint32_t>((static_cast<size_t>(s) * worker.num_workers() + worker.rank()) * batch_size + i) %
                 static_cast<uint32_t>(train->size());
      train->batch(ids, batch);
      const double loss = model->loss_and_gradient(params, batch, grad);
      worker.push(grad, loss, &batch);
    }
    const sps::TrainResult result = worker.finish(train.get());
    std::printf("own loop: %lld steps, final train loss %.6f\n", static_cast<long long>(result.steps),
                result.train.loss);
    return 0;
  } catch (const sps::Error& e) {
    std::fprintf(stderr, "own loop worker: %s\n", e.what());
    return 1;
  }
}
