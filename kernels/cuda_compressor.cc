// The Compressor interface over cuda::DeviceCompressor. The random choices
// (random-k's indices, the sampled method's layout) are drawn here with the
// CPU backend's functions, so both backends select from the same draws.
#include "kernels/cuda_compressor.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "kernels/cuda/device_compressor.h"
#include "kernels/cuda/ef_accumulate.h"

namespace sps::kernels {
namespace {

cuda::DeviceMethod device_method(Method m) {
  switch (m) {
    case Method::kDense: return cuda::DeviceMethod::kDense;
    case Method::kTopK: return cuda::DeviceMethod::kTopK;
    case Method::kThreshold: return cuda::DeviceMethod::kThreshold;
    case Method::kGaussianK: return cuda::DeviceMethod::kGaussianK;
    case Method::kRandomK: return cuda::DeviceMethod::kRandomK;
    case Method::kSampled: return cuda::DeviceMethod::kSampled;
  }
  return cuda::DeviceMethod::kTopK;
}

cuda::DeviceErrorFeedback device_error_feedback(ErrorFeedbackMode m) {
  switch (m) {
    case ErrorFeedbackMode::kNone: return cuda::DeviceErrorFeedback::kNone;
    case ErrorFeedbackMode::kEf: return cuda::DeviceErrorFeedback::kEf;
    case ErrorFeedbackMode::kHessianDiag: return cuda::DeviceErrorFeedback::kHessianDiag;
  }
  return cuda::DeviceErrorFeedback::kEf;
}

// Not thread-safe (one per worker or tensor), like the CPU backend.
class CudaCompressor final : public Compressor {
 public:
  CudaCompressor(size_t n, const CompressorOptions& options, std::unique_ptr<cuda::DeviceCompressor> device)
      : n_(n), options_(options), device_(std::move(device)) {}

  Status compress(std::span<const float> grad, float scale, SparseVector& out, uint64_t step) override {
    return run(grad.data(), grad.size(), /*on_device=*/false, scale, out, step);
  }
  Status compress_device(const float* grad, size_t n, float scale, SparseVector& out, uint64_t step) override {
    return run(grad, n, /*on_device=*/true, scale, out, step);
  }

  Status run(const float* grad, size_t n, bool on_device, float scale, SparseVector& out, uint64_t step) {
    out.clear();
    stats_ = {};
    if (n != n_) return invalid_argument(fmt::format("gradient has {} entries, the model has {}", n, n_));
    const SelectionParams& p = options_.selection;
    cuda::StepInputs inputs;
    inputs.step = step;
    if (p.method == Method::kRandomK) {
      randomk_indices(n_, p.k, p.seed, step, random_indices_, random_bitmap_);
      inputs.random_indices = random_indices_.data();
    } else if (p.method == Method::kSampled && p.k > 0 && p.k < n_) {
      const SampleLayout layout = sampled_layout(n_, p.k, p.seed, step);
      inputs.sample_start = layout.start;
      inputs.sample_stride = layout.stride;
    }
    cuda::DeviceStats ds;
    Status s = on_device ? device_->compress_device(grad, scale, inputs, out.indices, out.values, ds)
                         : device_->compress_host(grad, scale, inputs, out.indices, out.values, ds);
    if (!s.ok()) {
      out.clear();
      return s;
    }
    stats_.nnz = ds.nnz;
    stats_.threshold = ds.threshold;
    stats_.rounds = ds.rounds;
    stats_.fallback = ds.fallback;
    stats_.value_scale = ds.value_scale;
    stats_.value_negative_scale = ds.value_negative_scale;
    if (!ds.value_scales.empty()) {
      const size_t m = out.values.size();
      const size_t bucket = options_.quant_bucket > 0 ? options_.quant_bucket : m;
      for (size_t b = 0; b < ds.value_scales.size(); ++b)
        out.scale_runs.push_back({static_cast<uint32_t>(std::min(bucket, m - b * bucket)), ds.value_scales[b],
                                  ds.value_negative_scales.empty() ? 0.0f : ds.value_negative_scales[b]});
    }
    return {};
  }

  Result<size_t> set_hessian_diag(std::span<const float> h, float gamma) override {
    if (options_.error_feedback != ErrorFeedbackMode::kHessianDiag)
      return failed_precondition("set_hessian_diag needs error_feedback: hessian_diag");
    if (h.size() != n_)
      return invalid_argument(fmt::format("Hessian diagonal has {} entries, expected {}", h.size(), n_));
    size_t clamped = 0;
    SPS_RETURN_IF_ERROR(device_->set_hessian_diag(h.data(), gamma, clamped));
    return clamped;
  }

  void set_k(size_t k) override {
    options_.selection.k = std::min(k, n_);
    device_->set_k(options_.selection.k);
  }

  size_t size() const override { return n_; }

  // On a CUDA failure the copy is empty (the interface has no Status here).
  std::vector<float> residual() const override {
    std::vector<float> r(n_);
    if (!device_->copy_residual(r.data()).ok()) r.clear();
    return r;
  }

  Status set_residual(std::span<const float> residual) override {
    if (residual.size() != n_)
      return invalid_argument(fmt::format("residual has {} entries, expected {}", residual.size(), n_));
    return device_->set_residual(residual.data());
  }

  Status undo_send(std::span<const uint32_t> indices, std::span<const float> values) override {
    SPS_RETURN_IF_ERROR(check_undo_send(n_, indices, values));
    return device_->undo_send(indices.data(), values.data(), indices.size());
  }

  std::vector<float> momentum() const override {
    if (options_.momentum == 0.0f) return {};
    std::vector<float> u(n_);
    if (!device_->copy_momentum(u.data()).ok()) u.clear();
    return u;
  }

  Status scale_residual(float factor) override {
    if (!(factor > 0.0f) || !std::isfinite(factor))
      return invalid_argument(fmt::format("scale_residual: the factor must be finite and > 0, got {}", factor));
    return device_->scale_residual(factor);
  }

  Status set_momentum(std::span<const float> momentum) override {
    SPS_RETURN_IF_ERROR(check_set_momentum(n_, options_.momentum, momentum));
    return device_->set_momentum(momentum.data());
  }

  const SelectionStats& last_stats() const override { return stats_; }

  // Summed on the host in index order, like the CPU backend, so the two
  // agree bit for bit (costs a copy of the residual; meant for logs).
  double residual_norm_sq() const override {
    if (options_.error_feedback == ErrorFeedbackMode::kNone) return 0.0;
    const std::vector<float> r = residual();
    double s = 0;
    for (float x : r) s += double{x} * x;
    return s;
  }

  Backend backend() const override { return Backend::kCuda; }

 private:
  size_t n_;
  CompressorOptions options_;
  std::unique_ptr<cuda::DeviceCompressor> device_;
  SelectionStats stats_;
  std::vector<uint32_t> random_indices_;
  std::vector<uint32_t> random_bitmap_;
};

}  // namespace

Result<std::unique_ptr<Compressor>> make_cuda_compressor(size_t n, const CompressorOptions& options) {
  if (cuda::device_count() == 0)
    return unavailable(fmt::format("the CUDA backend was built but no device is usable ({})", cuda::probe_error()));
  const SelectionParams& p = options.selection;
  cuda::DeviceOptions d;
  d.method = device_method(p.method);
  d.k = p.method == Method::kDense ? n : std::min(p.k, n);
  d.lambda = p.lambda;
  d.max_nnz = p.max_nnz;
  d.randomk_unbiased = p.randomk_unbiased;
  d.error_feedback = device_error_feedback(options.error_feedback);
  d.momentum = options.momentum;
  d.clip_norm = options.clip_norm;
  d.values = options.values;
  d.qsgd_levels = options.qsgd_levels;
  d.quant_bucket = options.quant_bucket;
  d.seed = options.selection.seed;
  d.device = options.device;
  SPS_ASSIGN_OR_RETURN(auto device, cuda::DeviceCompressor::create(n, d));
  CompressorOptions adjusted = options;
  adjusted.selection.k = d.k;
  return std::unique_ptr<Compressor>(std::make_unique<CudaCompressor>(n, adjusted, std::move(device)));
}

}  // namespace sps::kernels
