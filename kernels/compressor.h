// The error-feedback compressor behind one interface for every backend.
//
// One step (docs/kernels.md has the exact arithmetic):
//   g'   = clip(g)                               (when clip_norm > 0)
//   u    = momentum * u + g'                     (DGC momentum correction; u = g' when off)
//   acc  = A(residual) + scale * u               A = 0 (none), I (ef), 1 - clamp(gamma * h, 0, 1) (hessian_diag)
//   S    = select(acc);  sent = quantise(acc[S])   (scaled formats: one scale over acc[S])
//   residual = acc - sent;  u[S] = 0            (momentum-factor masking)
// A backend owns its buffers (residual, momentum, scratch) and reuses them
// across steps. Non-finite input fails the step and changes no state.
// undo_send() puts a refused selection back into the residual.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"
#include "kernels/sparsify.h"
#include "common/value_format.h"

namespace sps::kernels {

enum class Backend { kCpu, kCuda };
std::string backend_name(Backend b);

struct CompressorOptions {
  SelectionParams selection;
  ErrorFeedbackMode error_feedback = ErrorFeedbackMode::kEf;
  // DGC momentum correction with momentum-factor masking (0 = off).
  float momentum = 0.0f;
  // Local gradient clipping: g is scaled by min(1, clip_norm / ||g||) (0 = off).
  float clip_norm = 0.0f;
  // Wire format of the sent values; the rounding error stays in the residual.
  // Scaled formats compute one scale over each step's selected values.
  ValueFormat values = ValueFormat::kF32;
  // qsgd: the number of levels s (1..127).
  int qsgd_levels = 64;
  // Scaled formats: one scale per this many consecutive selected values
  // (QSGD's buckets; 0 = one scale over the whole selection).
  size_t quant_bucket = 512;
  // CPU worker threads for the passes over n (1 = the calling thread only).
  int threads = 1;
  // CUDA device ordinal (CUDA backend only).
  int device = 0;
};

class Compressor {
 public:
  virtual ~Compressor() = default;

  // Runs step `step` on a host gradient. Fails with kInvalidArgument (and
  // leaves every buffer as it was) when grad has the wrong size or any acc
  // entry is NaN or Inf; the message names the first bad index.
  virtual Status compress(std::span<const float> grad, float scale, SparseVector& out, uint64_t step) = 0;
  // The same on `n` floats of device memory (a GPU worker's gradient): only
  // the selection comes back to the host. The CUDA backend only; the CPU
  // backend fails with kFailedPrecondition.
  virtual Status compress_device(const float* grad, size_t n, float scale, SparseVector& out, uint64_t step);

  // The diagonal Hessian estimate h (n entries, copied) and the step size
  // gamma used by hessian_diag: A = 1 - clamp(gamma * h_j, 0, 1). Returns
  // how many entries were clamped. Fails on a size mismatch or when the
  // compressor is not in hessian_diag mode.
  virtual Result<size_t> set_hessian_diag(std::span<const float> h, float gamma) = 0;
  // Changes k (sparsity warm-up) for the next steps; capped at n.
  virtual void set_k(size_t k) = 0;

  virtual size_t size() const = 0;
  virtual std::vector<float> residual() const = 0;  // a host copy
  virtual Status set_residual(std::span<const float> residual) = 0;
  // residual *= factor (error feedback on lr-scaled updates after the lr
  // changed: the residual then owes its updates at the new lr). A finite
  // factor > 0; fails, changing nothing, otherwise or when a product would
  // overflow. A no-op with error_feedback none. This default goes through
  // a host copy; the CPU backend scales in place.
  virtual Status scale_residual(float factor);
  // Undoes a send that was not applied (a server refused the push as too
  // stale): adds `values` back into the residual at `indices`, so for those
  // entries the residual holds acc again, as if nothing had been selected.
  // Takes what compress() returned, or any part of it: indices strictly
  // increasing and < size(), values finite. Fails with kInvalidArgument,
  // changing nothing, otherwise (or when a sum would overflow). A no-op
  // with error_feedback none: there is no residual to keep them in.
  // Momentum-factor masking is not undone (those entries' momentum
  // restarts, as after a send).
  virtual Status undo_send(std::span<const uint32_t> indices, std::span<const float> values) = 0;
  virtual std::vector<float> momentum() const = 0;  // a host copy (empty when momentum is off)
  // Restores DGC's momentum buffer u (a snapshot): n finite entries.
  // Fails with kFailedPrecondition when momentum is off, kInvalidArgument
  // on a size mismatch or a non-finite entry; changes nothing then.
  virtual Status set_momentum(std::span<const float> momentum) = 0;
  virtual const SelectionStats& last_stats() const = 0;
  // Squared L2 norm of the residual after the last step (0 with kNone).
  virtual double residual_norm_sq() const = 0;
  virtual Backend backend() const = 0;
};

// undo_send's argument check, shared by the backends: equal lengths,
// indices strictly increasing and < n, values finite.
Status check_undo_send(size_t n, std::span<const uint32_t> indices, std::span<const float> values);
// set_momentum's argument check, shared by the backends.
Status check_set_momentum(size_t n, float momentum_factor, std::span<const float> momentum);

// Makes a compressor for n entries. Fails with a clear message when the
// options are inconsistent (e.g. unbiased random-k with error feedback) or
// the backend is unavailable (CUDA not built, or no device).
Result<std::unique_ptr<Compressor>> make_compressor(Backend backend, size_t n, const CompressorOptions& options);

}  // namespace sps::kernels
