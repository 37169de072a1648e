// The CPU backend of the error-feedback compressor (always built).
//
// Speed (docs/kernels.md, docs/benchmarks.md): the first pass reads the
// gradient and the residual once, writes acc once, and on the way collects
// "candidates": the entries with |acc| at or above a threshold predicted
// from the previous step (exactly lambda for the hard threshold), with
// their values, and writes 0 into acc in their place. When the candidates
// provably contain the answer, selection works on them alone and nothing
// else touches n: the sent values come from the candidate list, and only
// the candidates that were not sent are written back into acc (none for
// the hard threshold). Otherwise the candidates are put back and a full
// pass runs. Results never depend on the prediction, nor on the thread
// count.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <utility>
#include <vector>

#include "kernels/compressor.h"

namespace sps {
class ThreadPool;
}  // namespace sps

namespace sps::kernels {

class CpuCompressor final : public Compressor {
 public:
  CpuCompressor(size_t n, const CompressorOptions& options);
  // Shorthand for the common case.
  CpuCompressor(size_t n, SelectionParams params, ErrorFeedbackMode mode);
  ~CpuCompressor() override;
  CpuCompressor(const CpuCompressor&) = delete;
  CpuCompressor& operator=(const CpuCompressor&) = delete;

  Status compress(std::span<const float> grad, float scale, SparseVector& out, uint64_t step) override;
  Result<size_t> set_hessian_diag(std::span<const float> h, float gamma) override;
  void set_k(size_t k) override;
  size_t size() const override { return residual_.size(); }
  std::vector<float> residual() const override { return residual_; }
  Status set_residual(std::span<const float> residual) override;
  Status scale_residual(float factor) override;
  Status undo_send(std::span<const uint32_t> indices, std::span<const float> values) override;
  std::vector<float> momentum() const override { return momentum_; }
  Status set_momentum(std::span<const float> momentum) override;
  const SelectionStats& last_stats() const override { return stats_; }
  double residual_norm_sq() const override;
  Backend backend() const override { return Backend::kCpu; }

  std::span<const float> residual_view() const { return residual_; }
  const SelectionParams& params() const { return options_.selection; }
  // Steps whose candidates sufficed / that needed the fallback pass.
  uint64_t predicted_steps() const { return predicted_steps_; }
  uint64_t fallback_steps() const { return fallback_steps_; }
  // Whether the first pass runs its AVX2 version (x86-64 with AVX2, unless
  // the environment sets SPS_CPU_PASS=baseline); results are identical.
  bool avx2_pass() const { return avx2_pass_; }

 private:
  struct Chunk;  // one thread's share of the first pass
  void first_pass(std::span<const float> grad, float grad_factor, float scale, uint32_t candidate_bits);
  void select(uint64_t step, SparseVector& out);
  void select_topk(SparseVector& out);
  void select_threshold(SparseVector& out);
  void select_gaussiank(SparseVector& out);
  void select_sampled(SparseVector& out);
  // Positions (into the candidate list, ascending) of the `keep` largest
  // candidates, ties to the smaller index, into `kept`. Returns the
  // smallest kept magnitude bits.
  uint32_t keep_largest(size_t keep, std::vector<uint32_t>& kept);
  // Positions of the candidates whose magnitude bits are >= `bits`.
  void candidates_at_least(uint32_t bits, std::vector<uint32_t>& positions) const;
  size_t count_candidates_at_least(uint32_t bits) const;
  // Bounds on count_candidates_at_least(bits) from the histogram alone:
  // equal when `bits` is a bucket edge.
  std::pair<size_t, size_t> count_bounds(uint32_t bits);
  // Puts the candidates' values back into acc (before any pass over acc).
  void restore_candidates();
  // The same for the candidates not in sel_ only.
  void restore_unselected();
  // Out from the selected candidate positions (sel_, or all of them).
  void emit_selected(SparseVector& out);
  // Replaces the candidates by every entry of acc at or above `bits`.
  void recollect(uint32_t bits);
  bool candidates_valid() const { return cand_bits_ != kNoCandidateBits; }
  uint32_t predicted_candidate_bits() const;
  uint32_t bits_at_rank(size_t rank) const;
  // The candidates' magnitude histogram (1/256-octave buckets), built on
  // first use after the candidates change, so the counts and ranks of one
  // step share one scan over them.
  const std::vector<uint32_t>& candidate_histogram();
  // The rank-th largest (1-based) candidate magnitude bits; `greater`
  // (optional) gets how many are strictly larger. REQUIRES: 0 < rank <= count.
  uint32_t candidate_rank(size_t rank, size_t* greater);
  // The lower edge of the histogram bucket holding the rank-th largest
  // candidate: at least `rank` candidates lie at or above it.
  uint32_t candidate_rank_floor(size_t rank);

  static constexpr uint32_t kNoCandidateBits = 0xFFFFFFFFu;

  CompressorOptions options_;
  size_t n_ = 0;
  std::vector<float> residual_;
  std::vector<float> acc_;        // scratch; becomes the residual on success
  std::vector<float> momentum_;   // DGC u (empty when momentum is off)
  std::vector<float> momentum_next_;
  std::vector<float> hessian_factor_;  // 1 - clamp(gamma * h, 0, 1)
  // Candidates: indices (ascending) and acc's values as bits; capacity n
  // plus a pad per thread (the AVX2 pass stores past its last candidate);
  // pages are only touched as far as they are used.
  std::unique_ptr<uint32_t[]> cand_index_;
  std::unique_ptr<uint32_t[]> cand_value_;
  size_t cand_count_ = 0;
  uint32_t cand_bits_ = 0;     // every entry with |acc| bits >= this is a candidate
  bool cand_zeroed_ = false;   // acc holds 0 at every candidate (the pass took them out)
  std::vector<uint32_t> sel_;  // selected candidate positions, ascending
  bool sel_all_ = false;       // every candidate is selected (sel_ unused)
  bool from_candidates_ = false;  // this step's selection is sel_ / sel_all_
  std::vector<uint32_t> positions_;  // scratch: candidate positions above a threshold
  std::vector<uint32_t> rank_histogram_;  // the sampled threshold's histogram
  std::vector<uint32_t> cand_histogram_;
  bool cand_histogram_valid_ = false;
  std::vector<Chunk> chunks_;
  std::unique_ptr<ThreadPool> pool_;
  double sum_ = 0, sum_sq_ = 0;
  TopKScratch topk_;
  std::vector<uint32_t> random_bitmap_;  // random-k membership bits, all zero between steps
  SelectionStats stats_;
  // Prediction: collect at or above these bits next step (0xFFFFFFFF: none);
  // top-k and gaussiank aim at spare_ * k candidates.
  uint32_t next_cand_bits_ = kNoCandidateBits;
  double spare_ = 1.5;
  // sampled: collect at this fraction of the sampled threshold (lowered
  // after steps that needed lowering rounds).
  float sampled_margin_ = 1.0f;
  uint64_t predicted_steps_ = 0, fallback_steps_ = 0;
  bool avx2_pass_ = false;  // the first pass's AVX2 version (chosen at construction)
};

}  // namespace sps::kernels
