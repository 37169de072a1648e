#include "worker/mlp.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "common/status.h"
#include "worker/least_squares.h"

namespace sps::worker {

Mlp::Mlp(std::vector<size_t> widths, double l2, double init_std, int blas_threads)
    : widths_(std::move(widths)), l2_(static_cast<float>(l2)), init_std_(init_std) {
  SPS_CHECK(widths_.size() >= 2);
  for (size_t l = 0; l + 1 < widths_.size(); ++l) {
    weight_offset_.push_back(num_params_);
    num_params_ += widths_[l + 1] * widths_[l];
    bias_offset_.push_back(num_params_);
    num_params_ += widths_[l + 1];
  }
  acts_.resize(widths_.size() - 1);
  if (blas_threads > 0) openblas_set_num_threads(blas_threads);
}

std::vector<TensorSpec> mlp_tensors(const std::vector<size_t>& widths) {
  std::vector<TensorSpec> t;
  for (size_t l = 0; l + 1 < widths.size(); ++l) {
    const std::string name = "fc" + std::to_string(l + 1);
    t.push_back({name + ".weight", {widths[l + 1], widths[l]}});
    t.push_back({name + ".bias", {widths[l + 1]}});
  }
  return t;
}

size_t mlp_num_params(const std::vector<size_t>& widths) { return num_params(mlp_tensors(widths)); }

void mlp_init(const std::vector<size_t>& widths, double init_std, uint64_t seed, std::span<float> params) {
  SPS_CHECK(params.size() == mlp_num_params(widths));
  std::fill(params.begin(), params.end(), 0.0f);
  std::mt19937_64 rng(seed);
  size_t offset = 0;
  for (size_t l = 0; l + 1 < widths.size(); ++l) {
    const double std = init_std > 0 ? init_std : std::sqrt(2.0 / static_cast<double>(widths[l]));
    float* w = params.data() + offset;
    for (size_t i = 0; i < widths[l + 1] * widths[l]; ++i)
      w[i] = static_cast<float>(std * normal_draw(rng));
    offset += widths[l + 1] * widths[l] + widths[l + 1];
  }
}

std::vector<TensorSpec> Mlp::tensors() const { return mlp_tensors(widths_); }

void Mlp::init(std::span<float> params, uint64_t seed) { mlp_init(widths_, init_std_, seed, params); }

void Mlp::forward(std::span<const float> params, const float* x, size_t rows) {
  const float* in = x;
  const size_t layers = widths_.size() - 1;
  for (size_t l = 0; l < layers; ++l) {
    const size_t fan_in = widths_[l], fan_out = widths_[l + 1];
    auto& out = acts_[l];
    out.resize(rows * fan_out);
    const float* w = params.data() + weight_offset_[l];
    const float* b = params.data() + bias_offset_[l];
    for (size_t r = 0; r < rows; ++r) std::copy_n(b, fan_out, out.data() + r * fan_out);
    // out (rows x fan_out) += in (rows x fan_in) * w^T (fan_in x fan_out)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows), static_cast<int>(fan_out),
                static_cast<int>(fan_in), 1.0f, in, static_cast<int>(fan_in), w, static_cast<int>(fan_in), 1.0f,
                out.data(), static_cast<int>(fan_out));
    if (l + 1 < layers)
      for (float& v : out) v = std::max(v, 0.0f);
    in = out.data();
  }
  // Softmax of the logits, row by row.
  const size_t classes = widths_.back();
  probs_.resize(rows * classes);
  const auto& logits = acts_.back();
  for (size_t r = 0; r < rows; ++r) {
    const float* z = logits.data() + r * classes;
    float* p = probs_.data() + r * classes;
    const float top = *std::max_element(z, z + classes);
    double sum = 0;
    for (size_t c = 0; c < classes; ++c) {
      p[c] = std::exp(z[c] - top);
      sum += p[c];
    }
    const auto inv = static_cast<float>(1.0 / sum);
    for (size_t c = 0; c < classes; ++c) p[c] *= inv;
  }
}

double Mlp::loss_and_gradient(std::span<const float> params, const Batch& batch, std::span<float> grad) {
  SPS_CHECK(params.size() == num_params_ && grad.size() == num_params_ && batch.cols == widths_[0] &&
            batch.labels.size() == batch.rows && batch.rows > 0);
  const size_t rows = batch.rows, classes = widths_.back(), layers = widths_.size() - 1;
  forward(params, batch.x.data(), rows);
  double loss = 0;
  delta_.resize(rows * classes);
  const float inv_rows = 1.0f / static_cast<float>(rows);
  for (size_t r = 0; r < rows; ++r) {
    const auto y = static_cast<size_t>(batch.labels[r]);
    SPS_CHECK(y < classes);
    const float* p = probs_.data() + r * classes;
    loss -= std::log(std::max(double{p[y]}, 1e-30));
    for (size_t c = 0; c < classes; ++c) delta_[r * classes + c] = (p[c] - (c == y ? 1.0f : 0.0f)) * inv_rows;
  }
  loss /= static_cast<double>(rows);
  // Backward: delta_ holds d(loss)/d(pre-activation) of layer l.
  for (size_t l = layers; l-- > 0;) {
    const size_t fan_in = widths_[l], fan_out = widths_[l + 1];
    const float* in = l == 0 ? batch.x.data() : acts_[l - 1].data();
    float* gw = grad.data() + weight_offset_[l];
    float* gb = grad.data() + bias_offset_[l];
    // gw (fan_out x fan_in) = delta^T (fan_out x rows) * in (rows x fan_in)
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, static_cast<int>(fan_out), static_cast<int>(fan_in),
                static_cast<int>(rows), 1.0f, delta_.data(), static_cast<int>(fan_out), in, static_cast<int>(fan_in),
                0.0f, gw, static_cast<int>(fan_in));
    std::fill_n(gb, fan_out, 0.0f);
    for (size_t r = 0; r < rows; ++r)
      for (size_t o = 0; o < fan_out; ++o) gb[o] += delta_[r * fan_out + o];
    if (l == 0) break;
    // delta_prev (rows x fan_in) = delta (rows x fan_out) * w (fan_out x fan_in), masked by ReLU.
    const float* w = params.data() + weight_offset_[l];
    delta_prev_.resize(rows * fan_in);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(rows), static_cast<int>(fan_in),
                static_cast<int>(fan_out), 1.0f, delta_.data(), static_cast<int>(fan_out), w, static_cast<int>(fan_in),
                0.0f, delta_prev_.data(), static_cast<int>(fan_in));
    const auto& act = acts_[l - 1];
    for (size_t i = 0; i < delta_prev_.size(); ++i)
      if (act[i] <= 0.0f) delta_prev_[i] = 0.0f;
    delta_.swap(delta_prev_);
  }
  if (l2_ > 0) {
    double reg = 0;
    for (size_t l = 0; l < layers; ++l) {
      const size_t count = widths_[l + 1] * widths_[l];
      const float* w = params.data() + weight_offset_[l];
      float* gw = grad.data() + weight_offset_[l];
      for (size_t i = 0; i < count; ++i) {
        reg += double{w[i]} * w[i];
        gw[i] += l2_ * w[i];
      }
    }
    loss += 0.5 * l2_ * reg;
  }
  return loss;
}

Evaluation Mlp::evaluate(std::span<const float> params, const Dataset& data) {
  SPS_CHECK(params.size() == num_params_ && data.features() == widths_[0]);
  const size_t classes = widths_.back();
  std::vector<uint32_t> ids;
  Batch batch;
  double loss = 0;
  size_t correct = 0;
  constexpr size_t kChunk = 1000;
  for (size_t begin = 0; begin < data.size(); begin += kChunk) {
    const size_t end = std::min(data.size(), begin + kChunk);
    ids.resize(end - begin);
    for (size_t i = begin; i < end; ++i) ids[i - begin] = static_cast<uint32_t>(i);
    data.batch(ids, batch);
    forward(params, batch.x.data(), batch.rows);
    for (size_t r = 0; r < batch.rows; ++r) {
      const float* p = probs_.data() + r * classes;
      const auto y = static_cast<size_t>(batch.labels[r]);
      loss -= std::log(std::max(double{p[y]}, 1e-30));
      correct += static_cast<size_t>(std::max_element(p, p + classes) - p) == y ? 1 : 0;
    }
  }
  Evaluation e;
  e.examples = data.size();
  e.loss = e.examples > 0 ? loss / static_cast<double>(e.examples) : 0.0;
  e.accuracy = e.examples > 0 ? static_cast<double>(correct) / static_cast<double>(e.examples) : 0.0;
  return e;
}

}  // namespace sps::worker
