// Reading and writing gradient vectors for offline analysis (sps-grad):
// raw little-endian float32 files and NumPy .npy float32 vectors.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"

namespace sps::kernels {

// Loads a float32 vector: `.npy` files (dtype '<f4', C order, any shape,
// flattened) by their header, anything else as raw little-endian float32.
// Errors name the file and what is wrong.
Result<std::vector<float>> load_f32(const std::string& path);
Status save_f32(const std::string& path, const std::vector<float>& values);
Status save_u32(const std::string& path, const std::vector<uint32_t>& values);

// Summary statistics of a vector, and how close its shape is to a normal
// distribution (Shi et al.: accumulated gradients are bell-shaped).
struct VectorStats {
  size_t n = 0;
  double mean = 0;
  double stddev = 0;           // unbiased
  double excess_kurtosis = 0;  // 0 for a normal distribution
  double max_abs = 0;
  size_t non_finite = 0;
  // Fraction of entries with |x - mean| <= 1, 2, 3 stddev (normal: .683, .954, .997).
  double within_sigma[3] = {0, 0, 0};
  // Kolmogorov-Smirnov distance between the standardised data and N(0, 1).
  double ks_distance = 0;
  // Histogram of |x| over 32 equal bins on [0, max_abs].
  std::vector<uint64_t> abs_histogram;
};
VectorStats vector_stats(const std::vector<float>& x);

}  // namespace sps::kernels
