// A worker program with a model of its own: a multiclass linear SVM
// (Crammer-Singer hinge loss) on Fashion-MNIST, registered as "linear_svm"
// next to the built-ins, so a job config can say `model.name: linear_svm`.
#include <sps/worker.h>

#include <algorithm>
#include <memory>
#include <numeric>
#include <vector>

class LinearSvm final : public sps::Model {
 public:
  LinearSvm(size_t features, size_t classes, double margin) : d_(features), c_(classes), margin_(margin) {}

  std::vector<sps::TensorSpec> tensors() const override { return {{"weights", {c_, d_}}}; }

  void init(std::span<float> params, uint64_t /*seed*/) override { std::ranges::fill(params, 0.0f); }

  // loss = mean over the batch of max(0, margin + max_{c != y} s_c - s_y), s = W x
  double loss_and_gradient(std::span<const float> w, const sps::Batch& batch, std::span<float> grad) override {
    std::ranges::fill(grad, 0.0f);
    double loss = 0;
    for (size_t r = 0; r < batch.rows; ++r) {
      const float* x = &batch.x[r * d_];
      const std::vector<float> score = scores(w, x);
      const auto y = static_cast<size_t>(batch.labels[r]);
      size_t rival = y == 0 ? 1 : 0;
      for (size_t c = 0; c < c_; ++c)
        if (c != y && score[c] > score[rival]) rival = c;
      const double hinge = margin_ + score[rival] - score[y];
      if (hinge <= 0) continue;
      loss += hinge;
      const float step = 1.0f / static_cast<float>(batch.rows);
      for (size_t j = 0; j < d_; ++j) {
        grad[rival * d_ + j] += step * x[j];
        grad[y * d_ + j] -= step * x[j];
      }
    }
    return loss / static_cast<double>(batch.rows);
  }

  // Accuracy as well as loss (the default evaluate reports the loss only).
  sps::Evaluation evaluate(std::span<const float> w, const sps::Dataset& data) override {
    sps::Evaluation e = Model::evaluate(w, data);
    sps::Batch batch;
    size_t correct = 0;
    for (uint32_t i = 0; i < data.size(); ++i) {
      data.batch({&i, 1}, batch);
      const std::vector<float> s = scores(w, batch.x.data());
      correct += std::ranges::max_element(s) - s.begin() == batch.labels[0];
    }
    e.accuracy = static_cast<double>(correct) / static_cast<double>(data.size());
    return e;
  }

 private:
  std::vector<float> scores(std::span<const float> w, const float* x) const {
    std::vector<float> s(c_);
    for (size_t c = 0; c < c_; ++c) s[c] = static_cast<float>(std::inner_product(x, x + d_, &w[c * d_], 0.0));
    return s;
  }
  size_t d_, c_;
  double margin_;
};

int main(int argc, char** argv) {
  sps::Registry registry = sps::builtin_registry();  // logreg, mlp, ... and fashion_mnist
  registry.add_model("linear_svm", [](const sps::Context& ctx) {
    // model.options.margin in the job config, 1 when unset.
    return std::make_unique<LinearSvm>(ctx.train()->features(), ctx.train()->classes(), ctx.option("margin", 1.0));
  });
  return sps::worker_main(argc, argv, registry);  // --config, --set, --rank, --help, like sps-worker
}
