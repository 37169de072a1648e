// The built-in models and datasets, registered through the public API like
// any user's.
#include <fmt/format.h>

#include "sps/worker.h"
#include "worker/dataset.h"
#include "worker/least_squares.h"
#include "worker/logreg.h"
#include "worker/mlp.h"
#include "sps/build_config.h"
#if SPS_HAVE_CUDA
#include "worker/mlp_cuda.h"
#endif

namespace sps {
namespace {

const Dataset& require_train(const Context& c, const char* model) {
  if (c.train() == nullptr) throw Error(fmt::format("model {}: needs the training set to size itself", model));
  return *c.train();
}

void require_cpu(const Context& c, const char* model) {
  if (c.string("model.device") != "cpu")
    throw Error(fmt::format("model.device: {} has no GPU path (the built-in GPU model is mlp); use model.device: cpu",
                            model));
}

size_t require_classes(const Dataset& d, const char* model) {
  if (d.classes() < 2)
    throw Error(fmt::format("model.name: {} is a classifier, but the dataset has no class labels (data.name)", model));
  return d.classes();
}

}  // namespace

Registry builtin_registry() {
  Registry r;
  r.add_model("logreg", [](const Context& c) -> std::unique_ptr<Model> {
    const Dataset& d = require_train(c, "logreg");
    require_cpu(c, "logreg");
    return std::make_unique<worker::LogisticRegression>(d.features(), require_classes(d, "logreg"),
                                                        c.real("training.l2"), c.real("model.init_std"));
  });
  r.add_model("mlp", [](const Context& c) -> std::unique_ptr<Model> {
    const Dataset& d = require_train(c, "mlp");
    std::vector<size_t> widths{d.features()};
    for (double h : c.reals("model.hidden")) widths.push_back(static_cast<size_t>(h));
    widths.push_back(require_classes(d, "mlp"));
    if (c.string("model.device") == "cuda") {
#if SPS_HAVE_CUDA
      return std::make_unique<worker::MlpCuda>(std::move(widths), c.real("training.l2"), c.real("model.init_std"));
#else
      throw Error("model.device: cuda needs an sps built with CUDA (-DSPS_CUDA=ON and the CUDA toolkit)");
#endif
    }
    const int64_t threads = c.option("blas_threads", int64_t{1});
    return std::make_unique<worker::Mlp>(std::move(widths), c.real("training.l2"), c.real("model.init_std"),
                                         static_cast<int>(threads));
  });
  r.add_model("least_squares", [](const Context& c) -> std::unique_ptr<Model> {
    const Dataset& d = require_train(c, "least_squares");
    require_cpu(c, "least_squares");
    if (d.classes() != 0)
      throw Error("model.name: least_squares needs real-valued targets; pair it with data.name: least_squares");
    return std::make_unique<worker::LeastSquares>(d.features(), c.real("training.l2"));
  });

  r.add_dataset("fashion_mnist", [](const Context& c, Split split) -> std::unique_ptr<Dataset> {
    const bool train = split == Split::kTrain;
    const int64_t limit = c.integer(train ? "data.train_limit" : "data.test_limit");
    auto images = worker::load_fashion_mnist(c.string("data.path"), train, static_cast<size_t>(limit));
    if (!images.ok()) throw Error("data.path: " + images.status().message());
    return std::make_unique<worker::ImageDataset>(std::move(images).value());
  });
  r.add_dataset("least_squares", [](const Context& c, Split split) -> std::unique_ptr<Dataset> {
    const auto rows = static_cast<size_t>(c.integer("data.rows"));
    return std::make_unique<worker::LeastSquaresData>(
        split == Split::kTrain ? rows : std::max<size_t>(1, rows / 4), static_cast<size_t>(c.integer("data.features")),
        c.real("data.condition"), c.real("data.noise"), static_cast<uint64_t>(c.integer("training.seed")), split,
        c.boolean("data.rotate"));
  });
  return r;
}

}  // namespace sps
