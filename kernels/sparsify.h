// CPU sparsifiers and error feedback on flat float buffers.
//
// Semantics (docs/kernels.md): every method returns indices strictly
// ascending and values equal to acc at those indices, bit for bit (random-k
// may scale them by n/k when asked). Exact top-k breaks ties by the smaller
// index so every backend selects the same set. Non-finite input is refused
// with an error and changes no state. Nothing here knows about sockets,
// processes or configs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "common/status.h"

namespace sps::kernels {

enum class Method {
  kDense,      // every entry
  kTopK,       // the k entries of largest |acc| (exact; ties to the smaller index)
  kThreshold,  // every entry with |acc| >= lambda (optionally capped at max_nnz)
  kGaussianK,  // approximate top-k: threshold from mean/std, corrected toward k
  kRandomK,    // k distinct uniformly random indices (seeded per step)
  kSampled,    // DGC: threshold from a strided sample, corrected toward k; nnz <= k
};
enum class ErrorFeedbackMode {
  kNone,  // plain compressed SGD: what is not sent is dropped
  kEf,    // classic error feedback: what is not sent waits in the residual
};

// What to select; one struct for every method (fields a method does not use
// are ignored).
struct SelectionParams {
  Method method = Method::kTopK;
  size_t k = 1;                 // topk, gaussiank, randomk
  float lambda = 0.0f;          // threshold
  size_t max_nnz = 0;           // threshold cap (0 = none): keep the max_nnz largest
  bool randomk_unbiased = false;  // randomk: send (n/k) * acc[S] (use without EF)
  uint64_t seed = 0;            // randomk: indices depend on (seed, step) only
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

// What one compress() step did, for logs.
struct SelectionStats {
  size_t nnz = 0;
  double threshold = 0;  // the magnitude threshold used (topk: the k-th largest |acc|)
  int rounds = 0;        // gaussiank, sampled: counting rounds
  bool fallback = false;  // gaussiank: the estimate failed and exact top-k was used
};

// k = max(1, floor(ratio * n)) for n > 0, capped at n; 0 for n = 0.
size_t k_from_ratio(double ratio, size_t n);

// Reusable scratch for top-k selection (grown on demand, never shrunk).
struct TopKScratch {
  std::vector<uint32_t> histogram;  // magnitude-bucket counts
  std::vector<uint32_t> above;      // indices in buckets above the boundary
  std::vector<uint32_t> boundary;   // indices in the boundary bucket
  std::vector<uint32_t> kept;
  std::vector<uint32_t> magnitudes;
};

// Exact top-k of |acc| (ties: smaller index first). k >= n selects all.
// O(n): a histogram of magnitude buckets finds the bucket holding the k-th
// largest, one collecting pass, then an exact select inside that bucket only.
// REQUIRES: every acc[i] is finite (callers validate).
void topk_select(std::span<const float> acc, size_t k, SparseVector& out, TopKScratch& scratch);

// Owns one worker's residual and applies the fused error-feedback step:
//   acc = residual + scale * grad;  S = select(acc);  residual = acc - sent
// The first pass reads grad and the residual once and writes acc once, and
// gathers what the method needs (magnitude histogram, moments) on the way.
// Not thread-safe; one instance per worker (or per tensor).
class ErrorFeedbackCompressor {
 public:
  ErrorFeedbackCompressor(size_t n, SelectionParams params, ErrorFeedbackMode mode);
  ErrorFeedbackCompressor(const ErrorFeedbackCompressor&) = delete;
  ErrorFeedbackCompressor& operator=(const ErrorFeedbackCompressor&) = delete;

  // Runs step `step`. Fails with kInvalidArgument (and leaves the residual
  // as it was) when grad has the wrong size or any acc entry is NaN or Inf.
  Status compress(std::span<const float> grad, float scale, SparseVector& out, uint64_t step = 0);

  std::span<const float> residual() const { return residual_; }
  // Replaces the residual (e.g. loaded from a file). Fails on a size mismatch.
  Status set_residual(std::span<const float> residual);
  size_t size() const { return residual_.size(); }
  const SelectionParams& params() const { return params_; }
  const SelectionStats& last_stats() const { return stats_; }
  // Squared L2 norm of the residual after the last step (0 with kNone).
  double residual_norm_sq() const;

 private:
  void select_threshold(SparseVector& out);
  void select_gaussiank(double mean, double stddev, SparseVector& out);
  void select_randomk(uint64_t step, SparseVector& out);
  void select_sampled(uint64_t step, SparseVector& out);

  SelectionParams params_;
  ErrorFeedbackMode mode_;
  std::vector<float> residual_;
  std::vector<float> acc_;  // scratch; swapped with residual_ on success
  TopKScratch topk_;
  SelectionStats stats_;
};

// The two-sided normal quantile z with P(|X| > z) = p for X ~ N(0, 1).
double normal_two_sided_quantile(double p);

}  // namespace sps::kernels
