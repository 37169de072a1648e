// MlpDevice: forward and backward of the MLP on cuBLAS + small kernels.
//
// Row-major matrices are handed to column-major cuBLAS as their transposes:
// a row-major (r x c) matrix is a column-major (c x r) one with ld = c. So
// Y = X W^T becomes Y^T = op_T(W^T) X^T, and so on (see each call).
#include "worker/cuda/mlp_device.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>

namespace sps::worker::cuda {
namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("MLP on the GPU: ") + what + ": " + cudaGetErrorString(e));
}
void check(cublasStatus_t e, const char* what) {
  if (e != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(std::string("MLP on the GPU: ") + what + ": cuBLAS status " +
                             std::to_string(static_cast<int>(e)));
}

constexpr unsigned kThreads = 256;
unsigned blocks(size_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

// out[r, o] = bias[o]
__global__ void broadcast_bias(float* out, const float* bias, size_t rows, size_t cols) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < rows * cols) out[i] = bias[i % cols];
}

__global__ void relu(float* x, size_t n) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] = fmaxf(x[i], 0.0f);
}

// One thread per row: softmax of the logits into probs, the row's loss, and
// (when delta is given) d(mean loss)/d(logits).
__global__ void softmax_xent(const float* logits, const int32_t* labels, size_t rows, size_t classes, float* probs,
                             float* row_loss, float* delta) {
  const size_t r = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const float* z = logits + r * classes;
  float* p = probs + r * classes;
  float top = z[0];
  for (size_t c = 1; c < classes; ++c) top = fmaxf(top, z[c]);
  double sum = 0;
  for (size_t c = 0; c < classes; ++c) {
    p[c] = expf(z[c] - top);
    sum += p[c];
  }
  const float inv = static_cast<float>(1.0 / sum);
  for (size_t c = 0; c < classes; ++c) p[c] *= inv;
  const int32_t y = labels[r];
  row_loss[r] = -logf(fmaxf(p[y], 1e-30f));
  if (delta != nullptr) {
    const float scale = 1.0f / static_cast<float>(rows);
    for (size_t c = 0; c < classes; ++c)
      delta[r * classes + c] = (p[c] - (static_cast<int32_t>(c) == y ? 1.0f : 0.0f)) * scale;
  }
}

// gb[o] = sum_r delta[r, o]
__global__ void column_sums(const float* delta, size_t rows, size_t cols, float* out) {
  const size_t o = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (o >= cols) return;
  float s = 0;
  for (size_t r = 0; r < rows; ++r) s += delta[r * cols + o];
  out[o] = s;
}

// delta[i] = 0 where the ReLU was off
__global__ void relu_backward(float* delta, const float* act, size_t n) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n && act[i] <= 0.0f) delta[i] = 0.0f;
}

// A device buffer that grows (never shrinks) to what a batch needs.
template <class T>
struct Scratch {
  T* ptr = nullptr;
  size_t capacity = 0;
  Scratch() = default;
  Scratch(Scratch&& o) noexcept : ptr(std::exchange(o.ptr, nullptr)), capacity(std::exchange(o.capacity, 0)) {}
  Scratch& operator=(Scratch&& o) noexcept {
    std::swap(ptr, o.ptr);
    std::swap(capacity, o.capacity);
    return *this;
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() {
    if (ptr) cudaFree(ptr);
  }
  T* get(size_t n) {
    if (n > capacity) {
      if (ptr) cudaFree(ptr);
      ptr = nullptr;
      check(cudaMalloc(&ptr, n * sizeof(T)), "allocate scratch");
      capacity = n;
    }
    return ptr;
  }
};

}  // namespace

struct MlpDevice::State {
  std::vector<size_t> widths;
  std::vector<size_t> weight_offset, bias_offset;
  size_t n = 0;
  float l2 = 0;
  int device = 0;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  Scratch<float> x, probs, row_loss, delta, delta_prev;
  Scratch<int32_t> labels;
  std::vector<Scratch<float>> acts;
  std::vector<float> host_loss, host_probs;

  ~State() {
    if (blas) cublasDestroy(blas);
    if (stream) cudaStreamDestroy(stream);
  }

  // Copies the batch in and runs the forward pass; probs and row_loss hold
  // the results, delta the output gradient when `backward`.
  void forward(const float* params, const float* host_x, const int32_t* host_labels, size_t rows, bool backward) {
    const size_t layers = widths.size() - 1, classes = widths.back();
    check(cudaMemcpyAsync(x.get(rows * widths[0]), host_x, rows * widths[0] * sizeof(float), cudaMemcpyHostToDevice,
                          stream),
          "copy the batch");
    check(cudaMemcpyAsync(labels.get(rows), host_labels, rows * sizeof(int32_t), cudaMemcpyHostToDevice, stream),
          "copy the labels");
    const float one = 1.0f;
    const float* in = x.ptr;
    for (size_t l = 0; l < layers; ++l) {
      const size_t fan_in = widths[l], fan_out = widths[l + 1];
      float* out = acts[l].get(rows * fan_out);
      broadcast_bias<<<blocks(rows * fan_out), kThreads, 0, stream>>>(out, params + bias_offset[l], rows, fan_out);
      // Y (rows x out) += X (rows x in) W^T:  Y^T = op_T(W^T) X^T
      check(cublasSgemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(fan_out), static_cast<int>(rows),
                        static_cast<int>(fan_in), &one, params + weight_offset[l], static_cast<int>(fan_in), in,
                        static_cast<int>(fan_in), &one, out, static_cast<int>(fan_out)),
            "forward product");
      if (l + 1 < layers) relu<<<blocks(rows * fan_out), kThreads, 0, stream>>>(out, rows * fan_out);
      in = out;
    }
    softmax_xent<<<blocks(rows), kThreads, 0, stream>>>(in, labels.ptr, rows, classes, probs.get(rows * classes),
                                                        row_loss.get(rows),
                                                        backward ? delta.get(rows * classes) : nullptr);
    check(cudaGetLastError(), "forward kernels");
  }

  double batch_loss(size_t rows) {
    host_loss.resize(rows);
    check(cudaMemcpyAsync(host_loss.data(), row_loss.ptr, rows * sizeof(float), cudaMemcpyDeviceToHost, stream),
          "copy the losses");
    check(cudaStreamSynchronize(stream), "synchronize");
    double loss = 0;
    for (float v : host_loss) loss += v;
    return loss;
  }
};

MlpDevice::MlpDevice(std::vector<size_t> widths, float l2, int device) : state_(new State) {
  State& s = *state_;
  if (widths.size() < 2) throw std::invalid_argument("MLP on the GPU: needs at least an input and an output width");
  s.widths = std::move(widths);
  s.l2 = l2;
  s.device = device;
  for (size_t l = 0; l + 1 < s.widths.size(); ++l) {
    s.weight_offset.push_back(s.n);
    s.n += s.widths[l + 1] * s.widths[l];
    s.bias_offset.push_back(s.n);
    s.n += s.widths[l + 1];
  }
  s.acts.resize(s.widths.size() - 1);
  check(cudaSetDevice(device), "select the device");
  check(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking), "create a stream");
  check(cublasCreate(&s.blas), "create a cuBLAS handle");
  check(cublasSetStream(s.blas, s.stream), "set the cuBLAS stream");
  // Results must not depend on the run: no split-K atomics.
  check(cublasSetAtomicsMode(s.blas, CUBLAS_ATOMICS_NOT_ALLOWED), "disallow atomics");
}

MlpDevice::~MlpDevice() = default;

size_t MlpDevice::num_params() const { return state_->n; }

void MlpDevice::upload(float* device_params, const float* host, size_t n) {
  State& s = *state_;
  check(cudaSetDevice(s.device), "select the device");
  check(cudaMemcpyAsync(device_params, host, n * sizeof(float), cudaMemcpyHostToDevice, s.stream),
        "copy the parameters");
  check(cudaStreamSynchronize(s.stream), "synchronize");
}

double MlpDevice::loss_and_gradient(const float* params, const float* x, const int32_t* labels, size_t rows,
                                    float* grad) {
  State& s = *state_;
  check(cudaSetDevice(s.device), "select the device");
  const size_t layers = s.widths.size() - 1;
  s.forward(params, x, labels, rows, /*backward=*/true);
  const float one = 1.0f, zero = 0.0f;
  for (size_t l = layers; l-- > 0;) {
    const size_t fan_in = s.widths[l], fan_out = s.widths[l + 1];
    const float* in = l == 0 ? s.x.ptr : s.acts[l - 1].ptr;
    float* gw = grad + s.weight_offset[l];
    // gW (out x in) = delta^T A:  gW^T (in x out) = A^T delta = (A^T as stored) op_T(delta^T as stored)
    check(cublasSgemm(s.blas, CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(fan_in), static_cast<int>(fan_out),
                      static_cast<int>(rows), &one, in, static_cast<int>(fan_in), s.delta.ptr,
                      static_cast<int>(fan_out), &zero, gw, static_cast<int>(fan_in)),
          "weight gradient");
    column_sums<<<blocks(fan_out), kThreads, 0, s.stream>>>(s.delta.ptr, rows, fan_out, grad + s.bias_offset[l]);
    if (l == 0) break;
    // dA (rows x in) = delta W:  dA^T = W^T delta^T, both as stored
    float* prev = s.delta_prev.get(rows * fan_in);
    check(cublasSgemm(s.blas, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(fan_in), static_cast<int>(rows),
                      static_cast<int>(fan_out), &one, params + s.weight_offset[l], static_cast<int>(fan_in),
                      s.delta.ptr, static_cast<int>(fan_out), &zero, prev, static_cast<int>(fan_in)),
          "input gradient");
    relu_backward<<<blocks(rows * fan_in), kThreads, 0, s.stream>>>(prev, s.acts[l - 1].ptr, rows * fan_in);
    std::swap(s.delta, s.delta_prev);
  }
  check(cudaGetLastError(), "backward kernels");
  double loss = s.batch_loss(rows) / static_cast<double>(rows);
  if (s.l2 > 0) {
    for (size_t l = 0; l < layers; ++l) {
      const int count = static_cast<int>(s.widths[l + 1] * s.widths[l]);
      const float* w = params + s.weight_offset[l];
      float reg = 0;
      check(cublasSdot(s.blas, count, w, 1, w, 1, &reg), "weight norm");  // host pointer mode: waits
      loss += 0.5 * s.l2 * reg;
      check(cublasSaxpy(s.blas, count, &s.l2, w, 1, grad + s.weight_offset[l], 1), "weight decay");
    }
  }
  check(cudaStreamSynchronize(s.stream), "synchronize");  // grad complete on return
  return loss;
}

double MlpDevice::evaluate_batch(const float* params, const float* x, const int32_t* labels, size_t rows,
                                 size_t& correct) {
  State& s = *state_;
  check(cudaSetDevice(s.device), "select the device");
  const size_t classes = s.widths.back();
  s.forward(params, x, labels, rows, /*backward=*/false);
  s.host_probs.resize(rows * classes);
  check(cudaMemcpyAsync(s.host_probs.data(), s.probs.ptr, rows * classes * sizeof(float), cudaMemcpyDeviceToHost,
                        s.stream),
        "copy the probabilities");
  const double loss = s.batch_loss(rows);  // synchronises
  for (size_t r = 0; r < rows; ++r) {
    const float* p = s.host_probs.data() + r * classes;
    correct += static_cast<size_t>(std::max_element(p, p + classes) - p) == static_cast<size_t>(labels[r]) ? 1 : 0;
  }
  return loss;
}

}  // namespace sps::worker::cuda
