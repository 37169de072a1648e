// Selection primitives on flat float buffers, shared by the backends
// (kernels/cpu_compressor.h runs the whole error-feedback step).
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
#include "common/value_format.h"

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
  kHessianDiag,  // Hessian-aided: the residual is first multiplied by 1 - clamp(gamma * h, 0, 1)
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

// (index, value) pairs with strictly increasing indices. With a scaled
// value format (int8, sign, qsgd) every value is level * scale, and
// scale_runs says which scale: runs of consecutive values in order, their
// counts summing to values.size() (empty for the other formats).
struct SparseVector {
  std::vector<uint32_t> indices;
  std::vector<float> values;
  std::vector<ScaleRun> scale_runs;
  size_t size() const { return indices.size(); }
  void clear() {
    indices.clear();
    values.clear();
    scale_runs.clear();
  }
};

// What one compress() step did, for logs.
struct SelectionStats {
  size_t nnz = 0;
  double threshold = 0;  // the magnitude threshold used (topk: the k-th largest |acc|)
  int rounds = 0;        // gaussiank, sampled: counting rounds
  bool fallback = false;  // gaussiank: the estimate failed and exact top-k was used
  // CPU: whether the candidates collected in the first pass (at a threshold
  // predicted from the previous step) sufficed, so no second pass over n ran.
  bool predicted = false;
  size_t candidates = 0;  // CPU: entries collected in the first pass
  float value_scale = 0;  // scaled value formats: the first bucket's scale (0 otherwise)
  float value_negative_scale = 0;  // onebit: the first bucket's negative scale
};

// k = max(1, floor(ratio * n)) for n > 0, capped at n; 0 for n = 0.
size_t k_from_ratio(double ratio, size_t n);

// topk_select's magnitude buckets: |x| bits >> this (8 exponent bits and 3
// mantissa bits: each bucket spans 1/8 of an octave).
constexpr int kTopKBucketShift = 20;

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

// Random-k's draw for one step: k distinct indices in [0, n), ascending,
// from Floyd's algorithm on a generator seeded by (seed, step) only, so
// every backend and every rerun draws the same set. `bitmap` is scratch
// (n bits, left all zero). k >= n gives every index.
void randomk_indices(size_t n, size_t k, uint64_t seed, uint64_t step, std::vector<uint32_t>& out,
                     std::vector<uint32_t>& bitmap);

// Where DGC's sampled threshold looks (ALGORITHMS.md 2.5): every `stride`-th
// index from `start` (random, seeded by (seed, step)).
struct SampleLayout {
  size_t start = 0;
  size_t stride = 1;
};
SampleLayout sampled_layout(size_t n, size_t k, uint64_t seed, uint64_t step);

// The two-sided normal quantile z with P(|X| > z) = p for X ~ N(0, 1).
double normal_two_sided_quantile(double p);

}  // namespace sps::kernels
