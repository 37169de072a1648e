// CPU sparsifiers and error feedback on flat float buffers.
//
// Semantics (docs/kernels.md): exact top-k selects the k entries of largest
// |acc|, ties broken by the smaller index, so every backend selects the same
// set; output indices are ascending and values are acc at those indices,
// bit for bit. Non-finite input is refused with an error and changes no
// state. Nothing here knows about sockets, processes or configs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "common/status.h"

namespace sps::kernels {

enum class Method { kDense, kTopK };
enum class ErrorFeedbackMode {
  kNone,  // plain compressed SGD: what is not sent is dropped
  kEf,    // classic error feedback: what is not sent waits in the residual
};

// (index, value) pairs with strictly increasing indices.
struct SparseVector {
  std::vector<uint32_t> indices;
  std::vector<float> values;
  size_t size() const { return indices.size(); }
  void clear() {
    indices.clear();
    values.clear();
  }
};

// k = max(1, floor(ratio * n)) for n > 0, capped at n; 0 for n = 0.
size_t k_from_ratio(double ratio, size_t n);

// Exact top-k of |acc| (ties: smaller index first). k >= n selects all.
// O(n): one pass to copy magnitudes, nth_element to find the k-th largest,
// one pass to collect in index order. `scratch` is reused across calls to
// avoid allocation on the hot path.
// REQUIRES: every acc[i] is finite (callers validate).
void topk_select(std::span<const float> acc, size_t k, SparseVector& out, std::vector<float>& scratch);

// Owns one worker's residual and applies the fused error-feedback step:
//   acc = residual + scale * grad;  sel = select(acc);  residual = acc - sent
// Not thread-safe; one instance per worker (or per tensor).
class ErrorFeedbackCompressor {
 public:
  // REQUIRES: k <= n (Method::kDense ignores k).
  ErrorFeedbackCompressor(size_t n, Method method, ErrorFeedbackMode mode, size_t k);
  ErrorFeedbackCompressor(const ErrorFeedbackCompressor&) = delete;
  ErrorFeedbackCompressor& operator=(const ErrorFeedbackCompressor&) = delete;

  // Runs one step. Fails with kInvalidArgument (and leaves the residual as
  // it was) when grad has the wrong size or any acc entry is NaN or Inf.
  Status compress(std::span<const float> grad, float scale, SparseVector& out);

  std::span<const float> residual() const { return residual_; }
  size_t size() const { return residual_.size(); }
  size_t k() const { return k_; }
  // Squared L2 norm of the residual after the last step (0 with kNone).
  double residual_norm_sq() const;

 private:
  Method method_;
  ErrorFeedbackMode mode_;
  size_t k_;
  std::vector<float> residual_;
  std::vector<float> acc_;  // scratch; swapped with residual_ on success
  std::vector<float> magnitude_scratch_;  // |acc| for the k-th-largest search
};

}  // namespace sps::kernels
