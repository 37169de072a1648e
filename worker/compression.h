// The worker's compression stage, from the config: one compressor over the
// flat model (scope: global) or one per model tensor (scope: per_tensor),
// with the sparsity warm-up schedule and the Hessian-diagonal refresh for
// error_feedback: hessian_diag.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"
#include "config/config.h"
#include "kernels/compressor.h"
#include "kernels/sparsify.h"
#include "sps/model.h"

namespace sps::worker {

// What worker `rank` selects each step over `n` entries (k from ratio or k).
kernels::SelectionParams selection_params(const config::Config& cfg, size_t n, uint32_t rank);
kernels::CompressorOptions compressor_options(const config::Config& cfg, size_t n, uint32_t rank);
// The sent values' wire format.
ValueFormat value_format(const config::Config& cfg);

class CompressionStage {
 public:
  // Fails with a message naming the config key when the model cannot serve
  // the config (no Hessian estimate for hessian_diag) or the backend is
  // unavailable.
  static Result<std::unique_ptr<CompressionStage>> create(const config::Config& cfg, sps::Model& model,
                                                          uint32_t rank);

  // One step: refreshes the Hessian estimate when due (on `params`/`batch`),
  // applies the warm-up k, compresses `grad` into `out` (global indices,
  // ascending).
  // `grad_on_device`: grad points to device memory (a GPU model).
  Status compress(std::span<const float> params, const Batch& batch, std::span<const float> grad, int64_t step,
                  kernels::SparseVector& out, bool grad_on_device = false);

  size_t k() const;  // the configured k (after warm-up), summed over tensors
  // Last step, summed over tensors: nnz; threshold of the largest tensor.
  const kernels::SelectionStats& last_stats() const { return stats_; }
  double residual_norm_sq() const;
  // The residual over the whole model (a host copy).
  std::vector<float> residual() const;
  // Restores a residual over the whole model (a snapshot); a no-op without
  // error feedback. Fails on a size mismatch.
  Status set_residual(std::span<const float> residual);
  // DGC's momentum buffer over the whole model (empty when momentum
  // correction is off), and its restore from a snapshot: a no-op when off;
  // fails on a size mismatch or a non-finite entry.
  std::vector<float> momentum() const;
  Status set_momentum(std::span<const float> momentum);
  // A push that a server refused: puts its pairs (global indices,
  // ascending, as compress() gave them, or a contiguous part of them) back
  // into the residual. Returns false when there is no residual to keep
  // them (error_feedback: none): they are then lost.
  Result<bool> undo_send(std::span<const uint32_t> indices, std::span<const float> values);
  size_t hessian_clamped() const { return hessian_clamped_; }
  // error_feedback: hessian_diag: the current estimate h and the step it was
  // taken at (empty and -1 before the first step or in other modes), and
  // its restore from a snapshot, so a resumed worker refreshes h at the same
  // steps as an uninterrupted one. Fails on a size mismatch or a negative step.
  std::span<const float> hessian_estimate() const { return hessian_step_ < 0 ? std::span<const float>() : hessian_; }
  int64_t hessian_step() const { return hessian_step_; }
  Status restore_hessian(std::span<const float> h, int64_t step);

 private:
  // A tensor's place in the flat parameter vector.
  struct Slice {
    std::string name;
    size_t offset = 0;
    size_t size = 0;
  };
  CompressionStage(const config::Config& cfg, sps::Model& model) : cfg_(cfg), model_(model) {}
  size_t k_at(int64_t step, size_t tensor_size) const;
  // Hands each compressor its slice of a whole-model buffer through `set`
  // (after checking the size; nothing when the state is not `kept`).
  Status set_per_tensor(std::span<const float> whole, const char* what, bool kept,
                        Status (kernels::Compressor::*set)(std::span<const float>));

  const config::Config& cfg_;
  sps::Model& model_;
  std::vector<Slice> tensors_;
  std::vector<std::unique_ptr<kernels::Compressor>> compressors_;
  size_t largest_ = 0;
  std::vector<float> hessian_;
  float hessian_gamma_ = -1;
  int64_t hessian_step_ = -1;
  size_t hessian_clamped_ = 0;
  kernels::SparseVector part_;
  std::vector<float> corrected_;  // error_feedback: hessian: g - (lr / scale) H r
  kernels::SelectionStats stats_;
};

}  // namespace sps::worker
