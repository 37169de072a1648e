// Standalone GPU check of the CUDA MLP (worker/cuda/mlp_device.cu) and of
// DeviceArray (kernels/cuda/device_array.cu): the MLP's loss and gradient
// against a double-precision host implementation of the same network, and a
// scatter/upload/download round trip. Exit 0 when everything agrees.
// Built by bench/gpu/CMakeLists.txt (scripts/gpu-check).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "kernels/cuda/device_array.h"
#include "worker/cuda/mlp_device.h"

namespace {

// Mean softmax cross-entropy of a ReLU MLP and its gradient, in doubles.
double host_loss_and_gradient(const std::vector<size_t>& w, const std::vector<float>& p, const std::vector<float>& x,
                              const std::vector<int32_t>& y, size_t rows, std::vector<double>& grad) {
  const size_t layers = w.size() - 1;
  std::vector<size_t> wo, bo;
  size_t n = 0;
  for (size_t l = 0; l < layers; ++l) {
    wo.push_back(n);
    n += w[l + 1] * w[l];
    bo.push_back(n);
    n += w[l + 1];
  }
  grad.assign(n, 0.0);
  std::vector<std::vector<double>> act(layers + 1);
  act[0].assign(x.begin(), x.end());
  for (size_t l = 0; l < layers; ++l) {
    act[l + 1].assign(rows * w[l + 1], 0.0);
    for (size_t r = 0; r < rows; ++r)
      for (size_t o = 0; o < w[l + 1]; ++o) {
        double z = p[bo[l] + o];
        for (size_t i = 0; i < w[l]; ++i) z += double{p[wo[l] + o * w[l] + i]} * act[l][r * w[l] + i];
        act[l + 1][r * w[l + 1] + o] = (l + 1 < layers) ? std::max(z, 0.0) : z;
      }
  }
  const size_t c = w.back();
  std::vector<double> delta(rows * c);
  double loss = 0;
  for (size_t r = 0; r < rows; ++r) {
    const double* z = &act[layers][r * c];
    const double top = *std::max_element(z, z + c);
    double sum = 0;
    for (size_t k = 0; k < c; ++k) sum += std::exp(z[k] - top);
    for (size_t k = 0; k < c; ++k) {
      const double pk = std::exp(z[k] - top) / sum;
      if (static_cast<int32_t>(k) == y[r]) loss -= std::log(pk);
      delta[r * c + k] = (pk - (static_cast<int32_t>(k) == y[r] ? 1.0 : 0.0)) / static_cast<double>(rows);
    }
  }
  for (size_t l = layers; l-- > 0;) {
    std::vector<double> prev(rows * w[l], 0.0);
    for (size_t r = 0; r < rows; ++r)
      for (size_t o = 0; o < w[l + 1]; ++o) {
        const double d = delta[r * w[l + 1] + o];
        grad[bo[l] + o] += d;
        for (size_t i = 0; i < w[l]; ++i) {
          grad[wo[l] + o * w[l] + i] += d * act[l][r * w[l] + i];
          prev[r * w[l] + i] += d * p[wo[l] + o * w[l] + i];
        }
      }
    if (l == 0) break;
    for (size_t i = 0; i < prev.size(); ++i)
      if (act[l][i] <= 0) prev[i] = 0;
    delta.swap(prev);
  }
  return loss / static_cast<double>(rows);
}

bool check_mlp() {
  const std::vector<size_t> widths{20, 16, 12, 5};
  const size_t rows = 33;
  sps::worker::cuda::MlpDevice mlp(widths, 0.0f, 0);
  const size_t n = mlp.num_params();
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 0.3f);
  std::vector<float> params(n), x(rows * widths[0]);
  for (auto& v : params) v = normal(rng);
  for (auto& v : x) v = std::fabs(normal(rng));
  std::vector<int32_t> y(rows);
  for (auto& v : y) v = static_cast<int32_t>(rng() % widths.back());
  float *d_params = nullptr, *d_grad = nullptr;
  cudaMalloc(&d_params, n * sizeof(float));
  cudaMalloc(&d_grad, n * sizeof(float));
  mlp.upload(d_params, params.data(), n);
  const double loss = mlp.loss_and_gradient(d_params, x.data(), y.data(), rows, d_grad);
  std::vector<float> grad(n);
  cudaMemcpy(grad.data(), d_grad, n * sizeof(float), cudaMemcpyDeviceToHost);
  std::vector<double> want;
  const double want_loss = host_loss_and_gradient(widths, params, x, y, rows, want);
  double worst = 0;
  for (size_t i = 0; i < n; ++i) worst = std::max(worst, std::fabs(grad[i] - want[i]) / (1e-3 + std::fabs(want[i])));
  size_t correct = 0;
  const double eval_loss = mlp.evaluate_batch(d_params, x.data(), y.data(), rows, correct) / rows;
  cudaFree(d_params);
  cudaFree(d_grad);
  const bool ok = std::fabs(loss - want_loss) < 1e-4 * std::max(1.0, want_loss) && worst < 1e-3 &&
                  std::fabs(eval_loss - want_loss) < 1e-4 * std::max(1.0, want_loss);
  std::printf("%s  mlp 20-16-12-5, %zu rows: loss %.6f (host %.6f), eval loss %.6f, worst relative gradient error %.2e\n",
              ok ? "ok  " : "FAIL", rows, loss, want_loss, eval_loss, worst);
  return ok;
}

bool check_device_array() {
  const size_t n = 100000;
  auto made = sps::kernels::cuda::DeviceArray::create(n, 0);
  if (!made.ok()) {
    std::printf("FAIL  DeviceArray::create: %s\n", made.status().message().c_str());
    return false;
  }
  auto& a = *made.value();
  std::vector<float> host(n), back(n);
  for (size_t i = 0; i < n; ++i) host[i] = static_cast<float>(i) * 0.5f;
  bool ok = a.upload(0, host.data(), n).ok();
  std::vector<uint32_t> keys;
  std::vector<float> values;
  for (uint32_t k = 3; k < n; k += 997) {
    keys.push_back(k);
    values.push_back(-static_cast<float>(k));
    host[k] = -static_cast<float>(k);
  }
  ok = ok && a.scatter(keys.data(), values.data(), keys.size()).ok();
  ok = ok && a.upload(10, host.data() + 10, 5).ok();
  ok = ok && a.download(0, back.data(), n).ok();
  ok = ok && back == host && !a.scatter(std::vector<uint32_t>{static_cast<uint32_t>(n)}.data(), values.data(), 1).ok();
  std::printf("%s  DeviceArray upload/scatter/download round trip over %zu floats (%zu scattered)\n",
              ok ? "ok  " : "FAIL", n, keys.size());
  return ok;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device\n");
    return 2;
  }
  bool ok = true;
  try {
    ok = check_mlp() && ok;
  } catch (const std::exception& e) {
    std::printf("FAIL  mlp: %s\n", e.what());
    ok = false;
  }
  ok = check_device_array() && ok;
  return ok ? 0 : 1;
}
