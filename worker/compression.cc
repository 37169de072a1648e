#include "worker/compression.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

namespace sps::worker {

kernels::SelectionParams selection_params(const config::Config& cfg, size_t n, uint32_t rank) {
  const auto& cc = cfg.compression;
  kernels::SelectionParams p;
  switch (cc.method) {
    case config::CompressionMethod::kDense: p.method = kernels::Method::kDense; break;
    case config::CompressionMethod::kTopK: p.method = kernels::Method::kTopK; break;
    case config::CompressionMethod::kThreshold: p.method = kernels::Method::kThreshold; break;
    case config::CompressionMethod::kGaussianK: p.method = kernels::Method::kGaussianK; break;
    case config::CompressionMethod::kRandomK: p.method = kernels::Method::kRandomK; break;
    case config::CompressionMethod::kSampled: p.method = kernels::Method::kSampled; break;
  }
  p.k = cc.method == config::CompressionMethod::kDense
            ? n
            : (cc.k > 0 ? std::min<size_t>(n, static_cast<size_t>(cc.k)) : kernels::k_from_ratio(cc.ratio, n));
  p.lambda = static_cast<float>(cc.lambda);
  p.max_nnz = static_cast<size_t>(cc.max_nnz);
  p.randomk_unbiased = cc.randomk_unbiased;
  // Each worker draws its own random-k indices, reproducibly.
  p.seed = static_cast<uint64_t>(cfg.training.seed) * 1000003u + rank;
  return p;
}

ValueFormat value_format(const config::Config& cfg) {
  switch (cfg.compression.values) {
    case config::ValueFormatName::kF16: return ValueFormat::kF16;
    case config::ValueFormatName::kBF16: return ValueFormat::kBF16;
    case config::ValueFormatName::kInt8: return ValueFormat::kInt8;
    case config::ValueFormatName::kSign: return ValueFormat::kSign;
    case config::ValueFormatName::kQsgd: return ValueFormat::kQsgd;
    case config::ValueFormatName::kOneBit: return ValueFormat::kOneBit;
    default: return ValueFormat::kF32;
  }
}

kernels::CompressorOptions compressor_options(const config::Config& cfg, size_t n, uint32_t rank) {
  const auto& cc = cfg.compression;
  kernels::CompressorOptions o;
  o.selection = selection_params(cfg, n, rank);
  switch (cc.error_feedback) {
    case config::ErrorFeedback::kNone: o.error_feedback = kernels::ErrorFeedbackMode::kNone; break;
    case config::ErrorFeedback::kEf: o.error_feedback = kernels::ErrorFeedbackMode::kEf; break;
    case config::ErrorFeedback::kHessianDiag: o.error_feedback = kernels::ErrorFeedbackMode::kHessianDiag; break;
    // Full Hessian-aided compensation is classic error feedback on a
    // corrected gradient (CompressionStage::compress).
    case config::ErrorFeedback::kHessian: o.error_feedback = kernels::ErrorFeedbackMode::kEf; break;
  }
  o.momentum = static_cast<float>(cc.momentum_correction);
  o.clip_norm = static_cast<float>(cc.clip_norm);
  o.values = value_format(cfg);
  o.qsgd_levels = static_cast<int>(cc.qsgd_levels);
  o.quant_bucket = static_cast<size_t>(cc.quant_bucket);
  o.threads = static_cast<int>(cc.threads);
  return o;
}

Result<std::unique_ptr<CompressionStage>> CompressionStage::create(const config::Config& cfg, sps::Model& model,
                                                                    uint32_t rank) {
  std::unique_ptr<CompressionStage> stage(new CompressionStage(cfg, model));
  const auto specs = model.tensors();
  const size_t n = sps::num_params(specs);
  if (n == 0) return invalid_argument("the model declares no parameters");
  if (cfg.compression.scope == config::CompressionScope::kPerTensor) {
    size_t offset = 0;
    for (const auto& t : specs) {
      if (t.size() == 0)
        return invalid_argument(fmt::format("compression.scope: per_tensor: model tensor '{}' is empty", t.name));
      stage->tensors_.push_back({t.name, offset, t.size()});
      offset += t.size();
    }
  } else {
    stage->tensors_ = {{"params", 0, n}};
  }
  const auto backend =
      cfg.compression.backend == config::BackendName::kCuda ? kernels::Backend::kCuda : kernels::Backend::kCpu;
  for (size_t i = 0; i < stage->tensors_.size(); ++i) {
    const auto& t = stage->tensors_[i];
    // Each tensor draws its own random-k indices.
    auto options = compressor_options(cfg, t.size, rank * 131u + static_cast<uint32_t>(i));
    if (stage->tensors_.size() == 1) options = compressor_options(cfg, t.size, rank);
    auto c = kernels::make_compressor(backend, t.size, options);
    if (!c.ok()) return c.status().with_context(fmt::format("compression (tensor {})", t.name));
    stage->compressors_.push_back(std::move(c).value());
    if (t.size > stage->tensors_[stage->largest_].size) stage->largest_ = i;
  }
  if (model.memory() == sps::Memory::kCuda) {
    if (backend != kernels::Backend::kCuda)
      return invalid_argument("compression.backend: a GPU model's gradient stays in device memory; set "
                              "compression.backend: cuda");
    if (cfg.compression.error_feedback == config::ErrorFeedback::kHessianDiag ||
        cfg.compression.error_feedback == config::ErrorFeedback::kHessian)
      return invalid_argument("compression.error_feedback: hessian_diag and hessian take host-memory Hessian "
                              "information, which GPU models do not provide in this version; use ef");
  }
  if (cfg.compression.error_feedback == config::ErrorFeedback::kHessian && !model.provides_hessian_vector())
    return invalid_argument(
        "compression.error_feedback: hessian needs the model's Hessian-vector product, which this model does not "
        "provide (the built-in least_squares does); use hessian_diag or ef");
  if (cfg.compression.error_feedback == config::ErrorFeedback::kHessianDiag) {
    stage->hessian_.assign(n, 0.0f);
    if (!model.provides_hessian_diag())
      return invalid_argument(
          "compression.error_feedback: hessian_diag needs a Hessian-diagonal estimate, which this model does not "
          "provide; use ef");
  }
  return stage;
}

size_t CompressionStage::k_at(int64_t step, size_t tensor_size) const {
  const auto& cc = cfg_.compression;
  if (cc.warmup_steps <= 0 || step >= cc.warmup_steps || cc.k > 0 || cc.warmup_ratio <= cc.ratio)
    return selection_params(cfg_, tensor_size, 0).k;
  // DGC-style exponential warm-up: warmup_ratio at step 0, ratio at the end.
  const double f = static_cast<double>(step) / static_cast<double>(cc.warmup_steps);
  const double ratio = cc.warmup_ratio * std::pow(cc.ratio / cc.warmup_ratio, f);
  return kernels::k_from_ratio(ratio, tensor_size);
}

size_t CompressionStage::k() const {
  size_t k = 0;
  for (const auto& t : tensors_) k += selection_params(cfg_, t.size, 0).k;
  return k;
}

Status CompressionStage::compress(std::span<const float> params, const Batch& batch, std::span<const float> grad,
                                  int64_t step, kernels::SparseVector& out, bool grad_on_device) {
  const auto& cc = cfg_.compression;
  const float lr = static_cast<float>(config::learning_rate(cfg_, step));
  const float scale = cc.scale == config::Scale::kLr ? lr : 1.0f;
  if (cc.rescale_residual && cc.scale == config::Scale::kLr && cc.error_feedback != config::ErrorFeedback::kNone &&
      step > 0) {
    // The residual holds updates at lr(step - 1) (also after a resume: the
    // schedule is a function of the step).
    const auto before = static_cast<float>(config::learning_rate(cfg_, step - 1));
    if (before > 0.0f && lr > 0.0f && before != lr) {
      for (size_t i = 0; i < tensors_.size(); ++i)
        SPS_RETURN_IF_ERROR(compressors_[i]->scale_residual(lr / before).with_context(
            fmt::format("tensor {}: compression.rescale_residual at step {}", tensors_[i].name, step)));
    }
  }
  if (!hessian_.empty()) {
    const bool due = hessian_step_ < 0 || step - hessian_step_ >= cc.hessian_every;
    if (due) {
      if (!model_.hessian_diag(params, batch, hessian_))
        return failed_precondition("the model stopped providing a Hessian-diagonal estimate");
      hessian_step_ = step;
    }
    // gamma is the step size: A = 1 - clamp(lr * h, 0, 1).
    if (due || lr != hessian_gamma_) {
      hessian_gamma_ = lr;
      hessian_clamped_ = 0;
      for (size_t i = 0; i < tensors_.size(); ++i) {
        const auto& t = tensors_[i];
        SPS_ASSIGN_OR_RETURN(const size_t clamped, compressors_[i]->set_hessian_diag(
                                                       std::span<const float>(hessian_).subspan(t.offset, t.size), lr));
        hessian_clamped_ += clamped;
      }
    }
  }
  if (cc.error_feedback == config::ErrorFeedback::kHessian) {
    // acc = r - lr H r + scale g  =  r + scale (g - (lr / scale) H r):
    // classic error feedback on a corrected gradient.
    const std::vector<float> r = residual();
    corrected_.resize(grad.size());
    if (!model_.hessian_vector(params, batch, r, corrected_))
      return failed_precondition("the model stopped providing a Hessian-vector product");
    const float c = lr / scale;
    for (size_t i = 0; i < grad.size(); ++i) corrected_[i] = grad[i] - c * corrected_[i];
    grad = corrected_;
  }
  const bool uses_k = cc.method != config::CompressionMethod::kDense && cc.method != config::CompressionMethod::kThreshold;
  out.clear();
  stats_ = {};
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const auto& t = tensors_[i];
    auto& c = *compressors_[i];
    if (uses_k && cc.warmup_steps > 0 && step <= cc.warmup_steps) c.set_k(k_at(step, t.size));
    auto& part = tensors_.size() == 1 ? out : part_;
    const Status s = grad_on_device
                         ? c.compress_device(grad.data() + t.offset, t.size, scale, part, static_cast<uint64_t>(step))
                         : c.compress(grad.subspan(t.offset, t.size), scale, part, static_cast<uint64_t>(step));
    SPS_RETURN_IF_ERROR(s.with_context(fmt::format("tensor {}", t.name)));
    if (tensors_.size() > 1) {
      for (uint32_t idx : part.indices) out.indices.push_back(idx + static_cast<uint32_t>(t.offset));
      out.values.insert(out.values.end(), part.values.begin(), part.values.end());
      out.scale_runs.insert(out.scale_runs.end(), part.scale_runs.begin(), part.scale_runs.end());
    }
    const auto& st = c.last_stats();
    stats_.nnz += st.nnz;
    stats_.rounds = std::max(stats_.rounds, st.rounds);
    stats_.fallback = stats_.fallback || st.fallback;
    if (i == largest_) stats_.threshold = st.threshold;
  }
  return {};
}

std::vector<float> CompressionStage::residual() const {
  std::vector<float> out;
  for (size_t i = 0; i < tensors_.size(); ++i) {
    auto r = compressors_[i]->residual();
    r.resize(tensors_[i].size, 0.0f);  // no error feedback: no residual
    out.insert(out.end(), r.begin(), r.end());
  }
  return out;
}

Status CompressionStage::set_per_tensor(std::span<const float> whole, const char* what, bool kept,
                                        Status (kernels::Compressor::*set)(std::span<const float>)) {
  const size_t n = tensors_.empty() ? 0 : tensors_.back().offset + tensors_.back().size;
  if (whole.size() != n) return invalid_argument(fmt::format("{} has {} entries, the model {}", what, whole.size(), n));
  if (!kept) return {};
  for (size_t i = 0; i < tensors_.size(); ++i)
    SPS_RETURN_IF_ERROR((compressors_[i].get()->*set)(whole.subspan(tensors_[i].offset, tensors_[i].size)));
  return {};
}

Status CompressionStage::set_residual(std::span<const float> residual) {
  return set_per_tensor(residual, "the residual", cfg_.compression.error_feedback != config::ErrorFeedback::kNone,
                        &kernels::Compressor::set_residual);
}

std::vector<float> CompressionStage::momentum() const {
  std::vector<float> out;
  if (cfg_.compression.momentum_correction == 0.0) return out;
  for (const auto& c : compressors_) {
    const auto u = c->momentum();
    out.insert(out.end(), u.begin(), u.end());
  }
  return out;
}

Status CompressionStage::set_momentum(std::span<const float> momentum) {
  return set_per_tensor(momentum, "the momentum buffer", cfg_.compression.momentum_correction != 0.0,
                        &kernels::Compressor::set_momentum);
}

Status CompressionStage::restore_hessian(std::span<const float> h, int64_t step) {
  if (hessian_.empty()) return failed_precondition("restore_hessian: error_feedback is not hessian_diag");
  if (h.size() != hessian_.size())
    return invalid_argument(fmt::format("the Hessian estimate has {} entries, the model {}", h.size(), hessian_.size()));
  if (step < 0) return invalid_argument(fmt::format("the Hessian estimate's step is {}", step));
  std::copy(h.begin(), h.end(), hessian_.begin());
  hessian_step_ = step;
  hessian_gamma_ = -1;  // hand it to the compressors at the next step
  return {};
}

Result<bool> CompressionStage::undo_send(std::span<const uint32_t> indices, std::span<const float> values) {
  if (indices.size() != values.size())
    return invalid_argument(fmt::format("undo_send: {} indices but {} values", indices.size(), values.size()));
  if (cfg_.compression.error_feedback == config::ErrorFeedback::kNone) return false;
  std::vector<uint32_t> local;
  size_t pos = 0;
  for (size_t i = 0; i < tensors_.size() && pos < indices.size(); ++i) {
    const auto& t = tensors_[i];
    const size_t begin = pos;
    while (pos < indices.size() && indices[pos] < t.offset + t.size) ++pos;
    if (pos == begin) continue;
    local.resize(pos - begin);
    for (size_t j = begin; j < pos; ++j) local[j - begin] = indices[j] - static_cast<uint32_t>(t.offset);
    SPS_RETURN_IF_ERROR(compressors_[i]->undo_send(local, values.subspan(begin, pos - begin))
                            .with_context(fmt::format("tensor {}", t.name)));
  }
  if (pos != indices.size())
    return invalid_argument(fmt::format("undo_send: index {} is outside the model", indices[pos]));
  return true;
}

double CompressionStage::residual_norm_sq() const {
  double s = 0;
  for (const auto& c : compressors_) s += c->residual_norm_sq();
  return s;
}

}  // namespace sps::worker
