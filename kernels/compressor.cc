#include "kernels/compressor.h"

#include <cmath>

#include <fmt/format.h>

#include "kernels/backend.h"
#include "kernels/cpu_compressor.h"
#include "sps/build_config.h"
#if SPS_HAVE_CUDA
#include "kernels/cuda_compressor.h"
#endif

namespace sps::kernels {

std::string backend_name(Backend b) { return b == Backend::kCuda ? "cuda" : "cpu"; }

Status Compressor::compress_device(const float* /*grad*/, size_t /*n*/, float /*scale*/, SparseVector& out,
                                   uint64_t /*step*/) {
  out.clear();
  return failed_precondition(fmt::format("the {} compressor reads host memory only; a gradient in device memory "
                                         "needs compression.backend: cuda",
                                         backend_name(backend())));
}

Status Compressor::scale_residual(float factor) {
  if (!(factor > 0.0f) || !std::isfinite(factor))
    return invalid_argument(fmt::format("scale_residual: the factor must be finite and > 0, got {}", factor));
  std::vector<float> r = residual();
  if (r.empty()) return {};
  for (float& x : r) {
    x *= factor;
    if (!std::isfinite(x))
      return invalid_argument(fmt::format("scale_residual: the residual overflows when scaled by {}", factor));
  }
  return set_residual(r);
}

Status check_undo_send(size_t n, std::span<const uint32_t> indices, std::span<const float> values) {
  if (indices.size() != values.size())
    return invalid_argument(fmt::format("undo_send: {} indices but {} values", indices.size(), values.size()));
  for (size_t j = 0; j < indices.size(); ++j) {
    if (indices[j] >= n) return invalid_argument(fmt::format("undo_send: index {} is outside [0, {})", indices[j], n));
    if (j > 0 && indices[j] <= indices[j - 1])
      return invalid_argument(fmt::format("undo_send: indices are not strictly increasing at position {}", j));
    if (!std::isfinite(values[j]))
      return invalid_argument(fmt::format("undo_send: the value for index {} is {}", indices[j], values[j]));
  }
  return {};
}

Status check_set_momentum(size_t n, float momentum_factor, std::span<const float> momentum) {
  if (momentum_factor == 0.0f) return failed_precondition("set_momentum: momentum correction is off");
  if (momentum.size() != n)
    return invalid_argument(fmt::format("set_momentum: {} entries, expected {}", momentum.size(), n));
  for (size_t i = 0; i < momentum.size(); ++i)
    if (!std::isfinite(momentum[i]))
      return invalid_argument(fmt::format("set_momentum: entry {} is {}", i, momentum[i]));
  return {};
}

Result<std::unique_ptr<Compressor>> make_compressor(Backend backend, size_t n, const CompressorOptions& options) {
  const auto& p = options.selection;
  if (p.method == Method::kRandomK && p.randomk_unbiased && options.error_feedback != ErrorFeedbackMode::kNone)
    return invalid_argument("unbiased random-k (values scaled by n/k) cannot be combined with error feedback");
  if (options.momentum < 0.0f || options.momentum >= 1.0f)
    return invalid_argument(fmt::format("momentum must be in [0, 1), got {}", options.momentum));
  if (options.clip_norm < 0.0f) return invalid_argument(fmt::format("clip_norm must be >= 0, got {}", options.clip_norm));
  if (p.method == Method::kThreshold && !(p.lambda >= 0.0f))
    return invalid_argument(fmt::format("threshold lambda must be >= 0, got {}", p.lambda));
  if (options.values == ValueFormat::kQsgd && (options.qsgd_levels < 1 || options.qsgd_levels > kMaxQuantLevel))
    return invalid_argument(
        fmt::format("qsgd levels must be in [1, {}], got {}", kMaxQuantLevel, options.qsgd_levels));
  if (n > UINT32_MAX) return invalid_argument(fmt::format("{} entries exceed the 32-bit index space", n));
  if (backend == Backend::kCpu) return std::unique_ptr<Compressor>(std::make_unique<CpuCompressor>(n, options));
#if SPS_HAVE_CUDA
  return make_cuda_compressor(n, options);
#else
  return unavailable("the CUDA backend was not built (configure with -DSPS_CUDA=ON on a machine with nvcc)");
#endif
}

}  // namespace sps::kernels
