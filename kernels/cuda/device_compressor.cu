// CUDA backend of the error-feedback compressor (contract in
// device_compressor.h, arithmetic in kernels/compressor.h).
//
// One step runs on the compressor's own stream:
//   [clip norm] -> accumulate (acc, u_new, first-finite check, and what the
//   method needs: top-11-bit magnitude histogram or moments) -> selection ->
//   commit (quantise, residual = acc - sent at S, u_new[S] = 0) -> copy out.
// acc and u_new are scratch; the residual and momentum buffers are only
// swapped with them once the whole step has succeeded.
//
// Exact top-k is a three-level radix select on the magnitude key
// (float bits & 0x7FFFFFFF orders finite magnitudes): 11 + 11 + 9 bits,
// each level a shared-memory histogram restricted to the prefix found so
// far, then a one-block scan. It yields the k-th largest key t, how many
// keys are > t and how many ties to take, all on the device; a stable
// compaction (cub::DeviceSelect::If) then takes key > t plus the first ties
// in index order, so the set is the CPU's. Counts a later launch needs stay
// on the device; the host syncs only where it must decide (bad input,
// gaussiank/sampled rounds, compaction sizes).
//
// Determinism: sums are per-block partials reduced in a fixed order (run to
// run identical); histogram atomics only add integers.
#include "kernels/cuda/device_compressor.h"

#include <cuda_runtime.h>
#include <thrust/iterator/counting_iterator.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_select.cuh>
#include <cuda/functional>
#include <string>
#include <utility>

namespace sps::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 2048;  // also the size of the per-block partials
constexpr uint32_t kNoIndex = 0xFFFFFFFFu;
constexpr uint32_t kKeyMask = 0x7FFFFFFFu;
constexpr uint32_t kNonFiniteKey = 0x7F800000u;  // keys >= this are Inf or NaN
constexpr int kBins = 2048;                       // levels 0 and 1; level 2 uses 512

// --- errors ------------------------------------------------------------------

Status cuda_error(cudaError_t e, const char* what) {
  std::string msg = std::string("CUDA ") + what + ": " + cudaGetErrorString(e);
  switch (e) {
    case cudaErrorMemoryAllocation: return resource_exhausted(std::move(msg));
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorInvalidDevice:
    case cudaErrorDevicesUnavailable:
    case cudaErrorInitializationError: return unavailable(std::move(msg));
    default: return internal_error(std::move(msg));
  }
}

Status check(cudaError_t e, const char* what) { return e == cudaSuccess ? Status() : cuda_error(e, what); }
// After a launch: configuration errors show up here, not at the launch.
Status check_launch(const char* what) { return check(cudaGetLastError(), what); }

// --- RAII over the runtime's handles (frees are not checked: never thrown) ---

class DeviceMemory {
 public:
  DeviceMemory() = default;
  ~DeviceMemory() {
    if (ptr_ != nullptr) (void)cudaFree(ptr_);
  }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  Status allocate(size_t bytes, const char* what) {
    if (bytes == 0) bytes = 4;  // a valid pointer even for n = 0
    return check(cudaMalloc(&ptr_, bytes), what);
  }
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  void swap(DeviceMemory& other) noexcept { std::swap(ptr_, other.ptr_); }

 private:
  void* ptr_ = nullptr;
};

// Makes `device` current for a scope and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    if (previous_ != device_) error_ = cudaSetDevice(device_);
  }
  ~DeviceGuard() {
    if (previous_ >= 0 && previous_ != device_) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  Status status() const { return check(error_, "cudaSetDevice"); }

 private:
  int device_;
  int previous_ = -1;
  cudaError_t error_ = cudaSuccess;
};

// --- device-side control block -------------------------------------------------

struct RadixState {
  uint32_t prefix;     // key bits found so far; after level 2 the k-th largest key t
  uint32_t remaining;  // rank still wanted inside the prefix's bucket; finally the ties to take
  uint32_t greater;    // keys above the prefix's bucket; finally #{key > t}
  uint32_t ties;       // after level 2: #{key == t} in the view
};

// Everything the host reads back, in one struct so one copy fetches it.
struct Control {
  uint32_t bad_index;  // smallest non-finite acc index (kNoIndex: none)
  uint32_t min_key;    // smallest selected magnitude key (commit)
  uint32_t clamped;    // set_hessian_diag
  float clip_factor;   // 1 when not clipping
  long long selected;  // cub::DeviceSelect's count
  RadixState radix;
  double sum;     // gaussiank: sum of acc
  double sum_sq;  // gaussiank: sum of acc^2
};

__device__ __forceinline__ uint32_t key_of(float x) { return __float_as_uint(x) & kKeyMask; }

// Which entries a radix pass looks at: list[j], or start + j * stride.
struct View {
  const uint32_t* list;
  size_t start;
  size_t stride;
  size_t m;
  __device__ __forceinline__ size_t index(size_t j) const { return list != nullptr ? list[j] : start + j * stride; }
};

// --- kernels ------------------------------------------------------------------

__global__ void reset_control_kernel(Control* c) {
  c->bad_index = kNoIndex;
  c->min_key = kNoIndex;
  c->clamped = 0;
  c->clip_factor = 1.0f;
  c->selected = 0;
  c->radix = RadixState{0, 0, 0, 0};
  c->sum = 0;
  c->sum_sq = 0;
}

// Reduces per-block double partials in a fixed order (deterministic).
__device__ void fixed_order_sum(const double* partials, int count, int stride, double* out0, double* out1,
                                bool two) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  double a = 0, b = 0;
  for (int i = static_cast<int>(threadIdx.x); i < count; i += kThreads) {
    a = __dadd_rn(a, partials[stride * i]);
    if (two) b = __dadd_rn(b, partials[stride * i + 1]);
  }
  const double sa = Reduce(temp).Sum(a);
  __syncthreads();
  const double sb = two ? Reduce(temp).Sum(b) : 0.0;
  if (threadIdx.x == 0) {
    *out0 = sa;
    if (two) *out1 = sb;
  }
}

__global__ void grad_norm_partials_kernel(const float* grad, size_t n, double* partials) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  double s = 0;
  const size_t step = static_cast<size_t>(gridDim.x) * kThreads;
  for (size_t i = blockIdx.x * static_cast<size_t>(kThreads) + threadIdx.x; i < n; i += step) {
    const double g = grad[i];
    s = __dadd_rn(s, __dmul_rn(g, g));
  }
  const double total = Reduce(temp).Sum(s);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// clip factor = (float)(clip_norm / norm) when norm > clip_norm, else 1.
__global__ void clip_factor_kernel(const double* partials, int blocks, double clip_norm, Control* c) {
  __shared__ double sum_sq;
  fixed_order_sum(partials, blocks, 1, &sum_sq, nullptr, false);
  __syncthreads();
  if (threadIdx.x == 0) {
    const double norm = __dsqrt_rn(sum_sq);
    c->clip_factor = norm > clip_norm ? __double2float_rn(__ddiv_rn(clip_norm, norm)) : 1.0f;
  }
}

__global__ void moments_kernel(const double* partials, int blocks, Control* c) {
  fixed_order_sum(partials, blocks, 2, &c->sum, &c->sum_sq, true);
}

struct AccumulateArgs {
  const float* grad;
  const float* residual;
  const float* coeff;  // hessian_diag: 1 - clamp(gamma * h, 0, 1)
  const float* u;      // momentum (read)
  float* u_new;        // momentum (scratch, written when momentum is on)
  float* acc;
  size_t n;
  float scale;
  float momentum;
  int error_feedback;  // DeviceErrorFeedback
  bool clip;
  bool use_momentum;
  Control* control;
  uint32_t* hist;     // level-0 histogram (kHist)
  double* partials;   // 2 per block (kMoments)
};

// acc = A(residual) + scale * u_new, u_new = m * u + clip(g); with the
// CPU's operation order and no contraction (the _rn intrinsics).
template <bool kHist, bool kMoments>
__global__ void __launch_bounds__(kThreads) accumulate_kernel(AccumulateArgs a) {
  __shared__ uint32_t hist[kHist ? kBins : 1];
  __shared__ uint32_t block_bad;
  if constexpr (kHist) {
    for (int b = static_cast<int>(threadIdx.x); b < kBins; b += kThreads) hist[b] = 0;
  }
  if (threadIdx.x == 0) block_bad = kNoIndex;
  __syncthreads();
  const float factor = a.clip ? a.control->clip_factor : 1.0f;
  uint32_t bad = kNoIndex;
  double s = 0, sq = 0;
  const size_t step = static_cast<size_t>(gridDim.x) * kThreads;
  for (size_t i = blockIdx.x * static_cast<size_t>(kThreads) + threadIdx.x; i < a.n; i += step) {
    float g = a.grad[i];
    if (a.clip) g = __fmul_rn(g, factor);
    float u = g;
    if (a.use_momentum) {
      u = __fadd_rn(__fmul_rn(a.momentum, a.u[i]), g);
      a.u_new[i] = u;
    }
    const float su = __fmul_rn(a.scale, u);
    float v;
    if (a.error_feedback == static_cast<int>(DeviceErrorFeedback::kEf)) {
      v = __fadd_rn(a.residual[i], su);
    } else if (a.error_feedback == static_cast<int>(DeviceErrorFeedback::kHessianDiag)) {
      v = __fadd_rn(__fmul_rn(a.coeff[i], a.residual[i]), su);
    } else {
      v = su;
    }
    a.acc[i] = v;
    const uint32_t key = key_of(v);
    if (key >= kNonFiniteKey && bad == kNoIndex) bad = static_cast<uint32_t>(i);  // i ascends per thread
    if constexpr (kHist) atomicAdd(&hist[key >> 20], 1u);
    if constexpr (kMoments) {
      const double d = v;
      s = __dadd_rn(s, d);
      sq = __dadd_rn(sq, __dmul_rn(d, d));
    }
  }
  if (bad != kNoIndex) atomicMin(&block_bad, bad);
  if constexpr (kMoments) {
    using Reduce = cub::BlockReduce<double, kThreads>;
    __shared__ typename Reduce::TempStorage temp;
    const double bs = Reduce(temp).Sum(s);
    __syncthreads();
    const double bsq = Reduce(temp).Sum(sq);
    if (threadIdx.x == 0) {
      a.partials[2 * blockIdx.x] = bs;
      a.partials[2 * blockIdx.x + 1] = bsq;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0 && block_bad != kNoIndex) atomicMin(&a.control->bad_index, block_bad);
  if constexpr (kHist) {
    for (int b = static_cast<int>(threadIdx.x); b < kBins; b += kThreads)
      if (hist[b] != 0) atomicAdd(&a.hist[b], hist[b]);
  }
}

template <int kLevel>
struct Level {
  static constexpr int kShift = kLevel == 0 ? 20 : (kLevel == 1 ? 9 : 0);
  static constexpr int kCount = kLevel == 2 ? 512 : kBins;
  static constexpr int kHigh = kLevel == 1 ? 20 : 9;  // shift of the bits already fixed
};

// Histogram of this level's bits over the view's keys that match the prefix.
template <int kLevel>
__global__ void __launch_bounds__(kThreads) radix_hist_kernel(const float* acc, View v, const Control* c,
                                                              uint32_t* out) {
  using L = Level<kLevel>;
  __shared__ uint32_t hist[L::kCount];
  for (int b = static_cast<int>(threadIdx.x); b < L::kCount; b += kThreads) hist[b] = 0;
  __syncthreads();
  const uint32_t prefix = kLevel == 0 ? 0u : c->radix.prefix;
  const size_t step = static_cast<size_t>(gridDim.x) * kThreads;
  for (size_t j = blockIdx.x * static_cast<size_t>(kThreads) + threadIdx.x; j < v.m; j += step) {
    const uint32_t key = key_of(acc[v.index(j)]);
    if (kLevel == 0 || (key >> L::kHigh) == (prefix >> L::kHigh))
      atomicAdd(&hist[(key >> L::kShift) & (L::kCount - 1)], 1u);
  }
  __syncthreads();
  for (int b = static_cast<int>(threadIdx.x); b < L::kCount; b += kThreads)
    if (hist[b] != 0) atomicAdd(&out[b], hist[b]);
}

// Finds the bucket holding the `remaining`-th largest key, walking the
// histogram from the top: each thread owns a run of buckets, a block scan
// gives the count above each run, and the one thread whose run holds the
// rank walks it. One block.
template <int kLevel>
__global__ void __launch_bounds__(kThreads) radix_scan_kernel(const uint32_t* hist, Control* c, uint32_t k) {
  using L = Level<kLevel>;
  constexpr int kPer = L::kCount / kThreads;
  using Scan = cub::BlockScan<uint32_t, kThreads>;
  __shared__ typename Scan::TempStorage temp;
  const uint32_t remaining = kLevel == 0 ? k : c->radix.remaining;
  const int first = static_cast<int>(threadIdx.x) * kPer;  // position from the top
  uint32_t local = 0;
  for (int p = first; p < first + kPer; ++p) local += hist[L::kCount - 1 - p];
  uint32_t above = 0;
  Scan(temp).ExclusiveSum(local, above);  // synchronises: every thread has read c->radix
  if (local != 0 && above < remaining && remaining <= above + local) {
    for (int p = first; p < first + kPer; ++p) {
      const auto b = static_cast<uint32_t>(L::kCount - 1 - p);
      const uint32_t count = hist[b];
      if (above + count >= remaining) {
        RadixState r = kLevel == 0 ? RadixState{0, 0, 0, 0} : c->radix;
        r.greater += above;
        r.remaining = remaining - above;
        r.prefix |= b << L::kShift;
        if (kLevel == 2) r.ties = count;
        c->radix = r;
        break;
      }
      above += count;
    }
  }
}

// The one predicate type for every compaction (one CUB instantiation per
// input iterator, so the temporary storage is sized once).
enum class PredMode : int { kKeyAtLeast, kKeyEquals, kKeyCut, kAbsGreater, kAbsAtLeast };
struct SelectPred {
  const float* acc;
  PredMode mode;
  uint32_t key;        // t or lambda's key
  float thr;           // kAbs*: compared as the CPU does, fabsf(a) vs thr in float
  const uint32_t* cut;  // kKeyCut: index of the last tie to keep (device)
  __device__ __forceinline__ bool operator()(uint32_t i) const {
    const float a = acc[i];
    const uint32_t k = key_of(a);
    switch (mode) {
      case PredMode::kKeyAtLeast: return k >= key;
      case PredMode::kKeyEquals: return k == key;
      case PredMode::kKeyCut: return k > key || (k == key && i <= *cut);
      case PredMode::kAbsGreater: return fabsf(a) > thr;
      default: return fabsf(a) >= thr;
    }
  }
};

struct CommitArgs {
  const uint32_t* list;  // nullptr: the identity (dense, all)
  size_t count;
  float* acc;    // becomes the residual (acc - sent at S) when write_residual
  float* u_new;  // momentum masking when mask_momentum
  float* values;
  float factor;  // randomk unbiased: n/k, applied before quantisation
  bool apply_factor;
  bool write_residual;
  bool mask_momentum;
  ValueFormat format;
  uint64_t seed;  // qsgd's draws depend on (seed, step, index)
  uint64_t step;
  float* scales;           // scaled formats: one per bucket of `bucket` selected values
  float* negative_scales;  // onebit: the second scale of each bucket
  size_t bucket;
  Control* control;
};

// What a scaled format's scale is made of: max |v|, sum |v|, sum v^2; for
// onebit the sums by sign instead (sum of the v >= 0, their count, sum |v|
// of the v < 0).
struct Moments {
  static constexpr int kFields = 3;  // partials per block
  double max_abs = 0, sum_abs = 0, sum_sq = 0;
  __device__ void add(double v, bool onebit) {
    if (onebit) {  // max_abs: sum of the v >= 0, sum_abs: their count, sum_sq: sum |v| of the v < 0
      if (v < 0) {
        sum_sq = __dadd_rn(sum_sq, -v);
      } else {
        max_abs = __dadd_rn(max_abs, v);
        sum_abs = __dadd_rn(sum_abs, 1.0);
      }
      return;
    }
    const double m = fabs(v);
    max_abs = fmax(max_abs, m);
    sum_abs = __dadd_rn(sum_abs, m);
    sum_sq = __dadd_rn(sum_sq, __dmul_rn(m, m));
  }
  __device__ void merge(const double* partial, bool onebit) {
    max_abs = onebit ? __dadd_rn(max_abs, partial[0]) : fmax(max_abs, partial[0]);
    sum_abs = __dadd_rn(sum_abs, partial[1]);
    sum_sq = __dadd_rn(sum_sq, partial[2]);
  }
};
using MomentsReduce = cub::BlockReduce<double, kThreads>;

// The block's moments (valid in thread 0); ends with the storage free again.
__device__ Moments block_moments(const Moments& t, bool onebit, MomentsReduce::TempStorage& temp) {
  Moments b;
  b.max_abs = onebit ? MomentsReduce(temp).Sum(t.max_abs) : MomentsReduce(temp).Reduce(t.max_abs, ::cuda::maximum<>{});
  __syncthreads();
  b.sum_abs = MomentsReduce(temp).Sum(t.sum_abs);
  __syncthreads();
  b.sum_sq = MomentsReduce(temp).Sum(t.sum_sq);
  __syncthreads();
  return b;
}

// A bucket's scale(s) from its moments, with value_format.h's formulas (the CPU's).
__device__ void store_scale(const Moments& b, ValueFormat format, int levels, size_t count, float* scale,
                            float* negative_scale) {
  if (format == ValueFormat::kOneBit) {
    const OneBitScales s = onebit_scales(b.max_abs, b.sum_abs, b.sum_sq, static_cast<double>(count) - b.sum_abs);
    *scale = s.positive;
    *negative_scale = s.negative;
    return;
  }
  *scale = value_scale_of(format, static_cast<float>(b.max_abs), b.sum_abs, b.sum_sq, static_cast<double>(count),
                          levels);
}

// Selected entry j's value as sent before quantisation (factor-scaled).
__device__ __forceinline__ double selected_value(const CommitArgs& a, size_t j) {
  const size_t i = a.list != nullptr ? a.list[j] : j;
  return a.apply_factor ? __fmul_rn(a.acc[i], a.factor) : a.acc[i];
}

// Scaled formats, one bucket, first half: per block moments of the selected
// values, Moments::kFields partials per block.
__global__ void __launch_bounds__(kThreads) value_partials_kernel(CommitArgs a, double* partials) {
  __shared__ MomentsReduce::TempStorage temp;
  const bool onebit = a.format == ValueFormat::kOneBit;
  Moments t;
  const size_t step = static_cast<size_t>(gridDim.x) * kThreads;
  for (size_t j = blockIdx.x * static_cast<size_t>(kThreads) + threadIdx.x; j < a.count; j += step)
    t.add(selected_value(a, j), onebit);
  const Moments b = block_moments(t, onebit, temp);
  if (threadIdx.x == 0) {
    double* p = partials + Moments::kFields * blockIdx.x;
    p[0] = b.max_abs;
    p[1] = b.sum_abs;
    p[2] = b.sum_sq;
  }
}

// Second half, one block: the partials in a fixed order, then the scale.
__global__ void value_scale_kernel(const double* partials, int blocks, ValueFormat format, int levels, size_t count,
                                   float* scale, float* negative_scale) {
  __shared__ MomentsReduce::TempStorage temp;
  const bool onebit = format == ValueFormat::kOneBit;
  Moments t;
  for (int i = static_cast<int>(threadIdx.x); i < blocks; i += kThreads) t.merge(partials + Moments::kFields * i, onebit);
  const Moments b = block_moments(t, onebit, temp);
  if (threadIdx.x == 0) store_scale(b, format, levels, count, scale, negative_scale);
}

// Many buckets: one block per bucket (grid-strided), a scale each.
__global__ void __launch_bounds__(kThreads) bucket_scale_kernel(CommitArgs a, int levels) {
  __shared__ MomentsReduce::TempStorage temp;
  const bool onebit = a.format == ValueFormat::kOneBit;
  const size_t buckets = (a.count + a.bucket - 1) / a.bucket;
  for (size_t bucket = blockIdx.x; bucket < buckets; bucket += gridDim.x) {
    const size_t begin = bucket * a.bucket, end = min(a.count, begin + a.bucket);
    Moments t;
    for (size_t j = begin + threadIdx.x; j < end; j += kThreads) t.add(selected_value(a, j), onebit);
    const Moments b = block_moments(t, onebit, temp);
    if (threadIdx.x == 0)
      store_scale(b, a.format, levels, end - begin, a.scales + bucket, a.negative_scales + bucket);
  }
}

__global__ void __launch_bounds__(kThreads) commit_kernel(CommitArgs a) {
  __shared__ uint32_t block_min;
  if (threadIdx.x == 0) block_min = kNoIndex;
  __syncthreads();
  uint32_t low = kNoIndex;
  const size_t step = static_cast<size_t>(gridDim.x) * kThreads;
  for (size_t j = blockIdx.x * static_cast<size_t>(kThreads) + threadIdx.x; j < a.count; j += step) {
    const size_t i = a.list != nullptr ? a.list[j] : j;
    const float v = a.acc[i];
    low = min(low, key_of(v));
    float sent = a.apply_factor ? __fmul_rn(v, a.factor) : v;
    if (a.format == ValueFormat::kOneBit) {  // value_format.h: the CPU's code
      sent = onebit_sent(sent < 0.0f, a.scales[j / a.bucket], a.negative_scales[j / a.bucket]);
    } else if (is_scaled(a.format)) {
      const float s = a.scales[j / a.bucket];
      const uint32_t random = a.format == ValueFormat::kQsgd ? quant_random24(a.seed, a.step, i) : 0u;
      sent = dequantise(quant_level(sent, a.format, s, random), s);
    } else {
      sent = quantise(sent, a.format);  // value_format.h: the CPU's rounding code
    }
    a.values[j] = sent;
    if (a.write_residual) a.acc[i] = __fsub_rn(v, sent);
    if (a.mask_momentum) a.u_new[i] = 0.0f;
  }
  atomicMin(&block_min, low);
  __syncthreads();
  if (threadIdx.x == 0 && block_min != kNoIndex) atomicMin(&a.control->min_key, block_min);
}

// c = 1 - clamp(gamma * h, 0, 1) in float with the CPU's comparisons (a NaN
// product counts as clamped to 0); counts the clamped entries.
__global__ void hessian_coeff_kernel(const float* h, float gamma, size_t n, float* coeff, Control* c) {
  __shared__ uint32_t block_clamped;
  if (threadIdx.x == 0) block_clamped = 0;
  __syncthreads();
  uint32_t clamped = 0;
  const size_t step = static_cast<size_t>(gridDim.x) * kThreads;
  for (size_t i = blockIdx.x * static_cast<size_t>(kThreads) + threadIdx.x; i < n; i += step) {
    const float p = __fmul_rn(gamma, h[i]);
    float q = p;
    if (!(p >= 0.0f)) {  // negative or NaN: no compensation beyond classic EF (as the CPU)
      q = 0.0f;
      ++clamped;
    } else if (1.0f < p) {
      q = 1.0f;
      ++clamped;
    }
    coeff[i] = __fsub_rn(1.0f, q);
  }
  if (clamped != 0) atomicAdd(&block_clamped, clamped);
  __syncthreads();
  if (threadIdx.x == 0 && block_clamped != 0) atomicAdd(&c->clamped, block_clamped);
}

// undo_send, in two launches so that nothing changes when any sum overflows.
__global__ void undo_check_kernel(const float* residual, const uint32_t* idx, const float* v, size_t m, Control* c) {
  const size_t step = static_cast<size_t>(gridDim.x) * kThreads;
  for (size_t j = blockIdx.x * static_cast<size_t>(kThreads) + threadIdx.x; j < m; j += step)
    if (!isfinite(__fadd_rn(residual[idx[j]], v[j]))) atomicMin(&c->bad_index, idx[j]);
}

__global__ void undo_add_kernel(float* residual, const uint32_t* idx, const float* v, size_t m) {
  const size_t step = static_cast<size_t>(gridDim.x) * kThreads;
  for (size_t j = blockIdx.x * static_cast<size_t>(kThreads) + threadIdx.x; j < m; j += step)
    residual[idx[j]] = __fadd_rn(residual[idx[j]], v[j]);
}

// scale_residual, in two launches likewise: the check finds the first entry
// whose product overflows, the scale runs only when there is none.
__global__ void scale_check_kernel(const float* residual, size_t n, float factor, Control* c) {
  const size_t step = static_cast<size_t>(gridDim.x) * kThreads;
  for (size_t i = blockIdx.x * static_cast<size_t>(kThreads) + threadIdx.x; i < n; i += step)
    if (!isfinite(__fmul_rn(residual[i], factor))) atomicMin(&c->bad_index, static_cast<uint32_t>(i));
}

__global__ void scale_kernel(float* residual, size_t n, float factor) {
  const size_t step = static_cast<size_t>(gridDim.x) * kThreads;
  for (size_t i = blockIdx.x * static_cast<size_t>(kThreads) + threadIdx.x; i < n; i += step)
    residual[i] = __fmul_rn(residual[i], factor);
}

__global__ void fill_kernel(float* p, size_t n, float value) {
  const size_t step = static_cast<size_t>(gridDim.x) * kThreads;
  for (size_t i = blockIdx.x * static_cast<size_t>(kThreads) + threadIdx.x; i < n; i += step) p[i] = value;
}

// The CPU's normal_two_sided_quantile (sparsify.cc), repeated here because
// .cu files cannot include sparsify.h (C++20); same code, same libm, same z.
double two_sided_quantile(double p) {
  if (p >= 1) return 0;
  if (p <= 0) return INFINITY;
  double lo = 0, hi = 40;
  for (int i = 0; i < 200; ++i) {
    const double mid = 0.5 * (lo + hi);
    if (std::erfc(mid / std::sqrt(2.0)) > p) lo = mid; else hi = mid;
  }
  return 0.5 * (lo + hi);
}

std::string format_float(double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%g", x);
  return buf;
}

// Which indices a step selected.
struct Selection {
  const uint32_t* list = nullptr;  // device; nullptr with identity
  size_t count = 0;
  bool identity = false;  // indices 0..count-1
  long long expect_selected = -1;  // the last compaction's count to verify at the end (-1: none)
};

}  // namespace

// --- state ----------------------------------------------------------------------

struct DeviceCompressor::State {
  size_t n = 0;
  DeviceOptions options;
  size_t k = 0;
  int blocks = 1;  // grid for passes over n
  cudaStream_t stream = nullptr;
  DeviceMemory residual, acc, u, u_new, coeff, grad;
  DeviceMemory cand, out, tmp_a, values;  // tmp_b aliases values (free until commit)
  DeviceMemory hist, partials, control, cub_temp;
  DeviceMemory scales;  // scaled value formats: one float per bucket, then (onebit) the negative scales
  size_t max_buckets = 1;
  size_t cub_bytes = 0;
  Control* host = nullptr;  // pinned mirror of the control block

  ~State() {
    if (host != nullptr) (void)cudaFreeHost(host);
    if (stream != nullptr) (void)cudaStreamDestroy(stream);
  }

  Control* ctl() const { return control.as<Control>(); }
  uint32_t* tmp_b() const { return values.as<uint32_t>(); }
  int grid(size_t m) const {
    return static_cast<int>(std::max<size_t>(1, std::min<size_t>((m + kThreads - 1) / kThreads, blocks)));
  }

  // n floats between host and device on the stream, waited for (the
  // residual and momentum copies in and out).
  Status copy_floats(void* dst, const void* src, cudaMemcpyKind kind, const char* what) const {
    if (n == 0) return {};
    DeviceGuard guard(options.device);
    SPS_RETURN_IF_ERROR(guard.status());
    SPS_RETURN_IF_ERROR(check(cudaMemcpyAsync(dst, src, n * sizeof(float), kind, stream), what));
    return check(cudaStreamSynchronize(stream), what);
  }

  Status fetch() {
    SPS_RETURN_IF_ERROR(check(cudaMemcpyAsync(host, ctl(), sizeof(Control), cudaMemcpyDeviceToHost, stream),
                              "copy control block"));
    return check(cudaStreamSynchronize(stream), "step");
  }

  // In: thrust::counting_iterator<uint32_t> or const uint32_t* (the two
  // instantiations whose temporary storage create() sized).
  template <class In>
  Status select(In in, size_t m, uint32_t* dst, const SelectPred& pred) {
    if (m == 0) return check(cudaMemsetAsync(&ctl()->selected, 0, sizeof(long long), stream), "memset");
    size_t bytes = cub_bytes;
    return check(cub::DeviceSelect::If(cub_temp.as<void>(), bytes, in, dst, &ctl()->selected,
                                       static_cast<int64_t>(m), pred, stream),
                 "DeviceSelect::If");
  }
  // Compaction over every index (view == nullptr) or over a list.
  Status select_view(const uint32_t* list, size_t m, uint32_t* dst, const SelectPred& pred) {
    if (list == nullptr) return select(thrust::counting_iterator<uint32_t>(0), m, dst, pred);
    return select<const uint32_t*>(list, m, dst, pred);
  }

  // Radix levels over `v` for rank k (1 <= k <= v.m); level 0's histogram is
  // already in hist when `level0_ready`. Leaves the result in control.radix.
  Status radix_select(const View& v, size_t k, bool level0_ready) {
    uint32_t* h = hist.as<uint32_t>();
    const int g = grid(v.m);
    const float* a = acc.as<float>();
    if (!level0_ready) {
      SPS_RETURN_IF_ERROR(check(cudaMemsetAsync(h, 0, 3 * kBins * sizeof(uint32_t), stream), "memset"));
      radix_hist_kernel<0><<<g, kThreads, 0, stream>>>(a, v, ctl(), h);
      SPS_RETURN_IF_ERROR(check_launch("radix_hist_kernel<0>"));
    }
    radix_scan_kernel<0><<<1, kThreads, 0, stream>>>(h, ctl(), static_cast<uint32_t>(k));
    radix_hist_kernel<1><<<g, kThreads, 0, stream>>>(a, v, ctl(), h + kBins);
    radix_scan_kernel<1><<<1, kThreads, 0, stream>>>(h + kBins, ctl(), 0);
    radix_hist_kernel<2><<<g, kThreads, 0, stream>>>(a, v, ctl(), h + 2 * kBins);
    radix_scan_kernel<2><<<1, kThreads, 0, stream>>>(h + 2 * kBins, ctl(), 0);
    return check_launch("radix select");
  }

  // After radix_select over (list, m) for k (fetched into host): writes the
  // k selected indices, ascending, to `dst`. Counts are known from the radix
  // state, so no sync is needed.
  Status extract(const uint32_t* list, size_t m, size_t k, uint32_t* dst, Selection& sel) {
    const RadixState r = host->radix;
    const float* a = acc.as<float>();
    if (static_cast<size_t>(r.greater) + r.remaining != k || r.remaining == 0 || r.remaining > r.ties)
      return internal_error("radix select state inconsistent (k " + std::to_string(k) + ", greater " +
                            std::to_string(r.greater) + ", need " + std::to_string(r.remaining) + ", ties " +
                            std::to_string(r.ties) + ")");
    if (r.remaining == r.ties) {
      SPS_RETURN_IF_ERROR(select_view(list, m, dst, SelectPred{a, PredMode::kKeyAtLeast, r.prefix, 0, nullptr}));
    } else {
      // Only some ties fit: the cut is the index of the last tie kept.
      const size_t with_ties = static_cast<size_t>(r.greater) + r.ties;
      uint32_t* ta = tmp_a.as<uint32_t>();
      uint32_t* tb = tmp_b();
      SPS_RETURN_IF_ERROR(select_view(list, m, ta, SelectPred{a, PredMode::kKeyAtLeast, r.prefix, 0, nullptr}));
      SPS_RETURN_IF_ERROR(select_view(ta, with_ties, tb, SelectPred{a, PredMode::kKeyEquals, r.prefix, 0, nullptr}));
      SPS_RETURN_IF_ERROR(
          select_view(ta, with_ties, dst, SelectPred{a, PredMode::kKeyCut, r.prefix, 0, tb + (r.remaining - 1)}));
    }
    sel.list = dst;
    sel.count = k;
    sel.expect_selected = static_cast<long long>(k);
    return {};
  }

  // Exact top-k over every index (fused level-0 histogram when ready) or a list.
  Status topk(const uint32_t* list, size_t m, size_t k, bool level0_ready, Selection& sel) {
    if (k == 0 || m == 0) {
      sel = Selection{};
      return {};
    }
    if (k >= m) {
      sel = Selection{list, m, list == nullptr, -1};
      return {};
    }
    SPS_RETURN_IF_ERROR(radix_select(View{list, 0, 1, m}, k, level0_ready));
    SPS_RETURN_IF_ERROR(fetch());
    return extract(list, m, k, out.as<uint32_t>(), sel);
  }

  Status non_finite_error(const float* d_grad) const {
    const uint32_t bad = host->bad_index;
    float g = 0, r = 0;
    // Best effort: the values only decorate the message.
    (void)cudaMemcpy(&g, d_grad + bad, sizeof g, cudaMemcpyDeviceToHost);
    (void)cudaMemcpy(&r, residual.as<float>() + bad, sizeof r, cudaMemcpyDeviceToHost);
    return invalid_argument("non-finite value at index " + std::to_string(bad) + " (gradient " + format_float(g) +
                            ", residual " + format_float(r) + "); refusing to compress it");
  }

  Status step(const float* d_grad, float scale, const StepInputs& in, std::vector<uint32_t>& indices,
              std::vector<float>& values_out, DeviceStats& stats);
  Status select_gaussiank(Selection& sel, DeviceStats& stats);
  Status select_sampled(const StepInputs& in, Selection& sel, DeviceStats& stats);
};

Status DeviceCompressor::State::step(const float* d_grad, float scale, const StepInputs& in,
                                     std::vector<uint32_t>& indices, std::vector<float>& values_out,
                                     DeviceStats& stats) {
  const DeviceMethod method = options.method;
  const bool momentum_on = options.momentum > 0.0f;
  const bool keep_residual = options.error_feedback != DeviceErrorFeedback::kNone;
  if (n == 0) return {};
  const int g = grid(n);

  reset_control_kernel<<<1, 1, 0, stream>>>(ctl());
  SPS_RETURN_IF_ERROR(check_launch("reset_control_kernel"));
  const bool fused_hist = method == DeviceMethod::kTopK && k > 0 && k < n;
  if (fused_hist)
    SPS_RETURN_IF_ERROR(
        check(cudaMemsetAsync(hist.as<uint32_t>(), 0, 3 * kBins * sizeof(uint32_t), stream), "memset"));
  const bool clip = options.clip_norm > 0.0f;
  if (clip) {
    grad_norm_partials_kernel<<<g, kThreads, 0, stream>>>(d_grad, n, partials.as<double>());
    clip_factor_kernel<<<1, kThreads, 0, stream>>>(partials.as<double>(), g, static_cast<double>(options.clip_norm),
                                                   ctl());
    SPS_RETURN_IF_ERROR(check_launch("clip norm"));
  }
  AccumulateArgs args{d_grad,
                      residual.as<float>(),
                      coeff.as<float>(),
                      u.as<float>(),
                      u_new.as<float>(),
                      acc.as<float>(),
                      n,
                      scale,
                      options.momentum,
                      static_cast<int>(options.error_feedback),
                      clip,
                      momentum_on,
                      ctl(),
                      hist.as<uint32_t>(),
                      partials.as<double>()};
  if (fused_hist) {
    accumulate_kernel<true, false><<<g, kThreads, 0, stream>>>(args);
  } else if (method == DeviceMethod::kGaussianK) {
    accumulate_kernel<false, true><<<g, kThreads, 0, stream>>>(args);
    moments_kernel<<<1, kThreads, 0, stream>>>(partials.as<double>(), g, ctl());
  } else {
    accumulate_kernel<false, false><<<g, kThreads, 0, stream>>>(args);
  }
  SPS_RETURN_IF_ERROR(check_launch("accumulate_kernel"));

  // Work that does not depend on the host's decisions goes before the first
  // sync, which also reports a non-finite entry.
  Selection sel;
  const float* a = acc.as<float>();
  if (fused_hist) SPS_RETURN_IF_ERROR(radix_select(View{nullptr, 0, 1, n}, k, true));
  if (method == DeviceMethod::kThreshold) {
    const uint32_t lambda_key = float_bits(options.lambda) & kKeyMask;
    SPS_RETURN_IF_ERROR(
        select_view(nullptr, n, cand.as<uint32_t>(), SelectPred{a, PredMode::kKeyAtLeast, lambda_key, 0, nullptr}));
  }
  SPS_RETURN_IF_ERROR(fetch());
  if (host->bad_index != kNoIndex) return non_finite_error(d_grad);

  switch (method) {
    case DeviceMethod::kDense: sel = Selection{nullptr, n, true, -1}; break;
    case DeviceMethod::kTopK:
      if (fused_hist) {
        SPS_RETURN_IF_ERROR(extract(nullptr, n, k, out.as<uint32_t>(), sel));
      } else {
        SPS_RETURN_IF_ERROR(topk(nullptr, n, k, false, sel));
      }
      break;
    case DeviceMethod::kThreshold: {
      const auto passed = static_cast<size_t>(host->selected);
      stats.threshold = options.lambda;
      if (options.max_nnz > 0 && passed > options.max_nnz) {
        // The max_nnz largest of what passed = the global top-max_nnz (all
        // others are below lambda).
        SPS_RETURN_IF_ERROR(topk(cand.as<uint32_t>(), passed, options.max_nnz, false, sel));
      } else {
        sel = Selection{cand.as<uint32_t>(), passed, false, -1};
      }
      break;
    }
    case DeviceMethod::kGaussianK: SPS_RETURN_IF_ERROR(select_gaussiank(sel, stats)); break;
    case DeviceMethod::kRandomK:
      if (k >= n) {
        sel = Selection{nullptr, n, true, -1};
      } else if (k > 0) {
        if (in.random_indices == nullptr) return invalid_argument("randomk: no indices given for the step");
        for (size_t j = 0; j < k; ++j) {
          if (in.random_indices[j] >= n || (j > 0 && in.random_indices[j] <= in.random_indices[j - 1]))
            return invalid_argument("randomk: indices must be ascending and below n (entry " + std::to_string(j) +
                                    ")");
        }
        SPS_RETURN_IF_ERROR(check(cudaMemcpyAsync(out.as<uint32_t>(), in.random_indices, k * sizeof(uint32_t),
                                                  cudaMemcpyHostToDevice, stream),
                                  "copy random indices"));
        sel = Selection{out.as<uint32_t>(), k, false, -1};
      }
      break;
    case DeviceMethod::kSampled: SPS_RETURN_IF_ERROR(select_sampled(in, sel, stats)); break;
  }

  // Commit into the scratch buffers, then copy the result out.
  const bool unbiased = method == DeviceMethod::kRandomK && options.randomk_unbiased && k > 0;
  // Scaled formats: a scale per bucket of selected values (one bucket: all).
  const size_t bucket = options.quant_bucket > 0 ? options.quant_bucket : std::max<size_t>(sel.count, 1);
  const size_t buckets = is_scaled(options.values) ? (sel.count + bucket - 1) / bucket : 0;
  stats.value_scales.resize(buckets);
  const bool onebit = options.values == ValueFormat::kOneBit;
  stats.value_negative_scales.resize(onebit ? buckets : 0);
  if (sel.count > 0) {
    CommitArgs c{sel.list,
                 sel.count,
                 acc.as<float>(),
                 u_new.as<float>(),
                 values.as<float>(),
                 unbiased ? static_cast<float>(static_cast<double>(n) / static_cast<double>(k)) : 1.0f,
                 unbiased,
                 keep_residual,
                 momentum_on,
                 options.values,
                 options.seed,
                 in.step,
                 scales.as<float>(),
                 scales.as<float>() + max_buckets,
                 bucket,
                 ctl()};
    if (is_scaled(options.values) && buckets == 1) {
      const int g = grid(sel.count);
      value_partials_kernel<<<g, kThreads, 0, stream>>>(c, partials.as<double>());
      SPS_RETURN_IF_ERROR(check_launch("value_partials_kernel"));
      value_scale_kernel<<<1, kThreads, 0, stream>>>(partials.as<double>(), g, options.values, options.qsgd_levels,
                                                     sel.count, scales.as<float>(), scales.as<float>() + max_buckets);
      SPS_RETURN_IF_ERROR(check_launch("value_scale_kernel"));
    } else if (is_scaled(options.values)) {
      const int g = static_cast<int>(std::min<size_t>(buckets, 8 * static_cast<size_t>(kMaxBlocks)));
      bucket_scale_kernel<<<g, kThreads, 0, stream>>>(c, options.qsgd_levels);
      SPS_RETURN_IF_ERROR(check_launch("bucket_scale_kernel"));
    }
    commit_kernel<<<grid(sel.count), kThreads, 0, stream>>>(c);
    SPS_RETURN_IF_ERROR(check_launch("commit_kernel"));
  }
  indices.resize(sel.count);
  values_out.resize(sel.count);
  if (sel.count > 0) {
    if (!sel.identity)
      SPS_RETURN_IF_ERROR(check(cudaMemcpyAsync(indices.data(), sel.list, sel.count * sizeof(uint32_t),
                                                cudaMemcpyDeviceToHost, stream),
                                "copy indices"));
    SPS_RETURN_IF_ERROR(check(cudaMemcpyAsync(values_out.data(), values.as<float>(), sel.count * sizeof(float),
                                              cudaMemcpyDeviceToHost, stream),
                              "copy values"));
    if (buckets > 0)
      SPS_RETURN_IF_ERROR(check(cudaMemcpyAsync(stats.value_scales.data(), scales.as<float>(), buckets * sizeof(float),
                                                cudaMemcpyDeviceToHost, stream),
                                "copy value scales"));
    if (onebit && buckets > 0)
      SPS_RETURN_IF_ERROR(check(cudaMemcpyAsync(stats.value_negative_scales.data(), scales.as<float>() + max_buckets,
                                                buckets * sizeof(float), cudaMemcpyDeviceToHost, stream),
                                "copy negative value scales"));
  }
  SPS_RETURN_IF_ERROR(fetch());
  if (sel.identity)
    for (size_t i = 0; i < sel.count; ++i) indices[i] = static_cast<uint32_t>(i);
  if (sel.expect_selected >= 0 && host->selected != sel.expect_selected)
    return internal_error("top-k compaction selected " + std::to_string(host->selected) + " entries, expected " +
                          std::to_string(sel.expect_selected));

  const bool min_threshold = method == DeviceMethod::kTopK ||
                             (method == DeviceMethod::kThreshold && sel.expect_selected >= 0) ||
                             (method == DeviceMethod::kGaussianK && stats.fallback);
  if (min_threshold) stats.threshold = sel.count > 0 ? static_cast<double>(bits_float(host->min_key)) : 0.0;
  stats.nnz = sel.count;
  stats.value_scale = stats.value_scales.empty() ? 0.0f : stats.value_scales[0];
  stats.value_negative_scale = stats.value_negative_scales.empty() ? 0.0f : stats.value_negative_scales[0];

  // Success: the scratch buffers become the state.
  if (keep_residual) residual.swap(acc);
  if (momentum_on) u.swap(u_new);
  return {};
}

Status DeviceCompressor::State::select_gaussiank(Selection& sel, DeviceStats& stats) {
  // The CPU's rules (CpuCompressor::select_gaussiank) with the counts from
  // compactions; only mean/std may round differently.
  if (k == 0) return {};
  if (k >= n) {
    sel = Selection{nullptr, n, true, -1};
    return {};
  }
  const double sum = host->sum, sum_sq = host->sum_sq;
  const double mean = n > 0 ? sum / static_cast<double>(n) : 0.0;
  const double var = n > 1 ? std::max(0.0, (sum_sq - sum * mean) / static_cast<double>(n - 1)) : 0.0;
  const double stddev = std::sqrt(var);
  const double kd = static_cast<double>(k);
  const double ratio = kd / static_cast<double>(std::max<size_t>(n, 1));
  double thr = mean + stddev * two_sided_quantile(ratio);
  const float* a = acc.as<float>();
  uint32_t* cd = cand.as<uint32_t>();
  size_t c = 0;
  auto count_above = [&](double t) -> Status {
    SPS_RETURN_IF_ERROR(
        select_view(nullptr, n, cd, SelectPred{a, PredMode::kAbsGreater, 0, static_cast<float>(t), nullptr}));
    SPS_RETURN_IF_ERROR(fetch());
    c = static_cast<size_t>(host->selected);
    return {};
  };
  SPS_RETURN_IF_ERROR(count_above(thr));
  int rounds = 1;
  while (rounds < 4) {
    if (static_cast<double>(c) < 2.0 * kd / 3.0) {
      thr *= 0.5;
    } else if (static_cast<double>(c) > 4.0 * kd / 3.0) {
      thr *= 1.5;
    } else {
      break;
    }
    SPS_RETURN_IF_ERROR(count_above(thr));
    ++rounds;
  }
  stats.rounds = rounds;
  stats.threshold = thr;
  if (static_cast<double>(c) < 2.0 * kd / 3.0) {
    stats.fallback = true;  // the exact top-k; threshold set from the selection
    return topk(nullptr, n, k, false, sel);
  }
  const auto cap = static_cast<size_t>(std::ceil(4.0 * kd / 3.0));
  if (c > cap) return topk(cd, c, cap, false, sel);
  sel = Selection{cd, c, false, -1};
  return {};
}

Status DeviceCompressor::State::select_sampled(const StepInputs& in, Selection& sel, DeviceStats& stats) {
  // The CPU's select_sampled with the host's layout (start, stride).
  if (k == 0) return {};
  if (k >= n) {
    sel = Selection{nullptr, n, true, -1};
    return {};
  }
  if (in.sample_stride == 0 || in.sample_start >= n)
    return invalid_argument("sampled: sample start " + std::to_string(in.sample_start) + " / stride " +
                            std::to_string(in.sample_stride) + " do not fit n = " + std::to_string(n));
  const size_t m = (n - 1 - in.sample_start) / in.sample_stride + 1;
  const double rho = static_cast<double>(k) / static_cast<double>(n);
  const size_t top = std::max<size_t>(1, static_cast<size_t>(std::ceil(rho * static_cast<double>(m))));
  SPS_RETURN_IF_ERROR(radix_select(View{nullptr, in.sample_start, in.sample_stride, m}, std::min(top, m), false));
  SPS_RETURN_IF_ERROR(fetch());
  float thr = bits_float(host->radix.prefix);
  const float* a = acc.as<float>();
  uint32_t* cd = cand.as<uint32_t>();
  size_t c = 0;
  int rounds = 0;
  while (true) {
    ++rounds;
    SPS_RETURN_IF_ERROR(select_view(nullptr, n, cd, SelectPred{a, PredMode::kAbsAtLeast, 0, thr, nullptr}));
    SPS_RETURN_IF_ERROR(fetch());
    c = static_cast<size_t>(host->selected);
    if (static_cast<double>(c) < 0.8 * static_cast<double>(k) && rounds < 10 && thr > 0) {
      thr *= 0.8f;
      continue;
    }
    break;
  }
  stats.rounds = rounds;
  stats.threshold = thr;
  if (static_cast<double>(c) > 1.3 * static_cast<double>(k)) return topk(cd, c, k, false, sel);
  sel = Selection{cd, std::min(k, c), false, -1};
  return {};
}

// --- public API -----------------------------------------------------------------

DeviceCompressor::DeviceCompressor(std::unique_ptr<State> state) : state_(std::move(state)) {}

DeviceCompressor::~DeviceCompressor() {
  if (state_ == nullptr) return;
  DeviceGuard guard(state_->options.device);
  state_.reset();
}

Result<std::unique_ptr<DeviceCompressor>> DeviceCompressor::create(size_t n, const DeviceOptions& options) {
  if (n > 0xFFFFFFFFull) return invalid_argument("CUDA compressor: n = " + std::to_string(n) + " exceeds 2^32 - 1");
  if (options.method == DeviceMethod::kRandomK && options.randomk_unbiased &&
      options.error_feedback != DeviceErrorFeedback::kNone)
    return invalid_argument("CUDA compressor: unbiased random-k cannot be combined with error feedback");
  int devices = 0;
  cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess) return unavailable(std::string("CUDA: no usable device: ") + cudaGetErrorString(e));
  if (options.device < 0 || options.device >= devices)
    return unavailable("CUDA: device " + std::to_string(options.device) + " requested, " + std::to_string(devices) +
                       " present");
  DeviceGuard guard(options.device);
  SPS_RETURN_IF_ERROR(guard.status());

  auto s = std::make_unique<State>();
  s->n = n;
  s->options = options;
  s->k = std::min(options.k, n);
  int sms = 0;
  SPS_RETURN_IF_ERROR(check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, options.device),
                            "cudaDeviceGetAttribute"));
  s->blocks = std::clamp(sms * 8, 1, kMaxBlocks);
  SPS_RETURN_IF_ERROR(check(cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking), "cudaStreamCreate"));

  const size_t fbytes = n * sizeof(float);
  const bool momentum_on = options.momentum > 0.0f;
  SPS_RETURN_IF_ERROR(s->residual.allocate(fbytes, "cudaMalloc residual"));
  SPS_RETURN_IF_ERROR(s->acc.allocate(fbytes, "cudaMalloc acc"));
  SPS_RETURN_IF_ERROR(s->grad.allocate(fbytes, "cudaMalloc grad"));
  SPS_RETURN_IF_ERROR(s->values.allocate(fbytes, "cudaMalloc values"));
  SPS_RETURN_IF_ERROR(s->cand.allocate(n * sizeof(uint32_t), "cudaMalloc candidates"));
  SPS_RETURN_IF_ERROR(s->out.allocate(n * sizeof(uint32_t), "cudaMalloc indices"));
  SPS_RETURN_IF_ERROR(s->tmp_a.allocate(n * sizeof(uint32_t), "cudaMalloc scratch"));
  SPS_RETURN_IF_ERROR(s->u.allocate(momentum_on ? fbytes : 0, "cudaMalloc momentum"));
  SPS_RETURN_IF_ERROR(s->u_new.allocate(momentum_on ? fbytes : 0, "cudaMalloc momentum"));
  const bool hessian = options.error_feedback == DeviceErrorFeedback::kHessianDiag;
  SPS_RETURN_IF_ERROR(s->coeff.allocate(hessian ? fbytes : 0, "cudaMalloc hessian"));
  SPS_RETURN_IF_ERROR(s->hist.allocate(3 * kBins * sizeof(uint32_t), "cudaMalloc histogram"));
  SPS_RETURN_IF_ERROR(
      s->partials.allocate(std::max(3, Moments::kFields) * kMaxBlocks * sizeof(double), "cudaMalloc partials"));
  s->max_buckets = std::max<size_t>(
      is_scaled(options.values) && options.quant_bucket > 0 ? (n + options.quant_bucket - 1) / options.quant_bucket : 1,
      1);
  SPS_RETURN_IF_ERROR(s->scales.allocate(2 * s->max_buckets * sizeof(float), "cudaMalloc scales"));
  SPS_RETURN_IF_ERROR(s->control.allocate(sizeof(Control), "cudaMalloc control"));
  SPS_RETURN_IF_ERROR(check(cudaMallocHost(&s->host, sizeof(Control)), "cudaMallocHost"));

  // CUB's temporary storage for the largest compaction, both input kinds.
  size_t bytes_iota = 0, bytes_list = 0;
  const SelectPred pred{s->acc.as<float>(), PredMode::kKeyAtLeast, 0, 0, nullptr};
  const auto items = static_cast<int64_t>(std::max<size_t>(n, 1));
  SPS_RETURN_IF_ERROR(check(cub::DeviceSelect::If(nullptr, bytes_iota, thrust::counting_iterator<uint32_t>(0),
                                                  s->out.as<uint32_t>(), &s->ctl()->selected, items, pred, s->stream),
                            "DeviceSelect::If size"));
  SPS_RETURN_IF_ERROR(check(cub::DeviceSelect::If(nullptr, bytes_list, static_cast<const uint32_t*>(s->cand.as<uint32_t>()),
                                                  s->out.as<uint32_t>(), &s->ctl()->selected, items, pred, s->stream),
                            "DeviceSelect::If size"));
  s->cub_bytes = std::max(bytes_iota, bytes_list);
  SPS_RETURN_IF_ERROR(s->cub_temp.allocate(s->cub_bytes, "cudaMalloc CUB storage"));

  // Zero state; the Hessian coefficient starts at 1 (h = 0: plain EF).
  if (n > 0) {
    SPS_RETURN_IF_ERROR(check(cudaMemsetAsync(s->residual.as<float>(), 0, fbytes, s->stream), "memset"));
    if (momentum_on) SPS_RETURN_IF_ERROR(check(cudaMemsetAsync(s->u.as<float>(), 0, fbytes, s->stream), "memset"));
    if (hessian) {
      fill_kernel<<<s->grid(n), kThreads, 0, s->stream>>>(s->coeff.as<float>(), n, 1.0f);
      SPS_RETURN_IF_ERROR(check_launch("fill_kernel"));
    }
  }
  SPS_RETURN_IF_ERROR(check(cudaStreamSynchronize(s->stream), "create"));
  return std::unique_ptr<DeviceCompressor>(new DeviceCompressor(std::move(s)));
}

Status DeviceCompressor::compress_host(const float* grad, float scale, const StepInputs& inputs,
                                       std::vector<uint32_t>& indices, std::vector<float>& values,
                                       DeviceStats& stats) {
  State& s = *state_;
  DeviceGuard guard(s.options.device);
  SPS_RETURN_IF_ERROR(guard.status());
  indices.clear();
  values.clear();
  stats = {};
  if (s.n > 0)
    SPS_RETURN_IF_ERROR(check(cudaMemcpyAsync(s.grad.as<float>(), grad, s.n * sizeof(float), cudaMemcpyHostToDevice,
                                              s.stream),
                              "copy gradient"));
  Status st = s.step(s.grad.as<float>(), scale, inputs, indices, values, stats);
  if (!st.ok()) {
    indices.clear();
    values.clear();
    stats = {};
  }
  return st;
}

Status DeviceCompressor::compress_device(const float* grad, float scale, const StepInputs& inputs,
                                         std::vector<uint32_t>& indices, std::vector<float>& values,
                                         DeviceStats& stats) {
  State& s = *state_;
  DeviceGuard guard(s.options.device);
  SPS_RETURN_IF_ERROR(guard.status());
  indices.clear();
  values.clear();
  stats = {};
  Status st = s.step(grad, scale, inputs, indices, values, stats);
  if (!st.ok()) {
    indices.clear();
    values.clear();
    stats = {};
  }
  return st;
}

Status DeviceCompressor::set_hessian_diag(const float* h, float gamma, size_t& clamped) {
  State& s = *state_;
  clamped = 0;
  if (s.options.error_feedback != DeviceErrorFeedback::kHessianDiag)
    return failed_precondition("set_hessian_diag: the compressor is not in hessian_diag mode");
  if (s.n == 0) return {};
  DeviceGuard guard(s.options.device);
  SPS_RETURN_IF_ERROR(guard.status());
  // h goes through the gradient buffer (free between steps).
  SPS_RETURN_IF_ERROR(check(
      cudaMemcpyAsync(s.grad.as<float>(), h, s.n * sizeof(float), cudaMemcpyHostToDevice, s.stream), "copy Hessian"));
  reset_control_kernel<<<1, 1, 0, s.stream>>>(s.ctl());
  hessian_coeff_kernel<<<s.grid(s.n), kThreads, 0, s.stream>>>(s.grad.as<float>(), gamma, s.n, s.coeff.as<float>(),
                                                               s.ctl());
  SPS_RETURN_IF_ERROR(check_launch("hessian_coeff_kernel"));
  SPS_RETURN_IF_ERROR(s.fetch());
  clamped = s.host->clamped;
  return {};
}

void DeviceCompressor::set_k(size_t k) { state_->k = std::min(k, state_->n); }

size_t DeviceCompressor::size() const { return state_->n; }

Status DeviceCompressor::copy_residual(float* host) const {
  return state_->copy_floats(host, state_->residual.as<float>(), cudaMemcpyDeviceToHost, "copy residual");
}

Status DeviceCompressor::set_residual(const float* host) {
  return state_->copy_floats(state_->residual.as<float>(), host, cudaMemcpyHostToDevice, "set residual");
}

Status DeviceCompressor::undo_send(const uint32_t* indices, const float* values, size_t m) {
  State& s = *state_;
  if (m == 0 || s.options.error_feedback == DeviceErrorFeedback::kNone) return {};
  DeviceGuard guard(s.options.device);
  SPS_RETURN_IF_ERROR(guard.status());
  // A refused push is rare: staging memory per call keeps the step's buffers out of it.
  DeviceMemory idx, val;
  SPS_RETURN_IF_ERROR(idx.allocate(m * sizeof(uint32_t), "allocate undo_send indices"));
  SPS_RETURN_IF_ERROR(val.allocate(m * sizeof(float), "allocate undo_send values"));
  SPS_RETURN_IF_ERROR(check(
      cudaMemcpyAsync(idx.as<uint32_t>(), indices, m * sizeof(uint32_t), cudaMemcpyHostToDevice, s.stream), "copy indices"));
  SPS_RETURN_IF_ERROR(
      check(cudaMemcpyAsync(val.as<float>(), values, m * sizeof(float), cudaMemcpyHostToDevice, s.stream), "copy values"));
  reset_control_kernel<<<1, 1, 0, s.stream>>>(s.ctl());
  undo_check_kernel<<<s.grid(m), kThreads, 0, s.stream>>>(s.residual.as<float>(), idx.as<uint32_t>(), val.as<float>(),
                                                          m, s.ctl());
  SPS_RETURN_IF_ERROR(check_launch("undo_check_kernel"));
  SPS_RETURN_IF_ERROR(s.fetch());
  if (s.host->bad_index != kNoIndex)
    return invalid_argument("undo_send: residual + value at index " + std::to_string(s.host->bad_index) +
                            " is not finite; nothing was changed");
  undo_add_kernel<<<s.grid(m), kThreads, 0, s.stream>>>(s.residual.as<float>(), idx.as<uint32_t>(), val.as<float>(), m);
  SPS_RETURN_IF_ERROR(check_launch("undo_add_kernel"));
  // The staging memory is freed on return: wait for the kernel that reads it.
  return check(cudaStreamSynchronize(s.stream), "undo_send");
}

Status DeviceCompressor::scale_residual(float factor) {
  State& s = *state_;
  if (s.n == 0 || s.options.error_feedback == DeviceErrorFeedback::kNone) return {};
  DeviceGuard guard(s.options.device);
  SPS_RETURN_IF_ERROR(guard.status());
  reset_control_kernel<<<1, 1, 0, s.stream>>>(s.ctl());
  scale_check_kernel<<<s.grid(s.n), kThreads, 0, s.stream>>>(s.residual.as<float>(), s.n, factor, s.ctl());
  SPS_RETURN_IF_ERROR(check_launch("scale_check_kernel"));
  SPS_RETURN_IF_ERROR(s.fetch());
  if (s.host->bad_index != kNoIndex)
    return invalid_argument("scale_residual: the residual overflows when scaled by " + std::to_string(factor) +
                            " (index " + std::to_string(s.host->bad_index) + "); nothing was changed");
  scale_kernel<<<s.grid(s.n), kThreads, 0, s.stream>>>(s.residual.as<float>(), s.n, factor);
  SPS_RETURN_IF_ERROR(check_launch("scale_kernel"));
  return check(cudaStreamSynchronize(s.stream), "scale_residual");
}

Status DeviceCompressor::copy_momentum(float* host) const {
  const State& s = *state_;
  if (!(s.options.momentum > 0.0f)) return invalid_argument("copy_momentum: momentum is off");
  return s.copy_floats(host, s.u.as<float>(), cudaMemcpyDeviceToHost, "copy momentum");
}

Status DeviceCompressor::set_momentum(const float* host) {
  const State& s = *state_;
  if (!(s.options.momentum > 0.0f)) return invalid_argument("set_momentum: momentum is off");
  return s.copy_floats(s.u.as<float>(), host, cudaMemcpyHostToDevice, "set momentum");
}

}  // namespace sps::kernels::cuda
