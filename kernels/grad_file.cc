#include "kernels/grad_file.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>

#include <fmt/format.h>

namespace sps::kernels {
namespace {

Result<std::vector<char>> read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return unavailable(fmt::format("{}: cannot open: {}", path, std::strerror(errno)));
  return std::vector<char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

std::vector<float> floats_from(const char* p, size_t bytes) {
  std::vector<float> out(bytes / 4);
  for (size_t i = 0; i < out.size(); ++i) {
    uint32_t u = 0;
    for (int b = 0; b < 4; ++b) u |= static_cast<uint32_t>(static_cast<unsigned char>(p[4 * i + b])) << (8 * b);
    std::memcpy(&out[i], &u, 4);
  }
  return out;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

Result<std::vector<float>> load_f32(const std::string& path) {
  SPS_ASSIGN_OR_RETURN(auto bytes, read_all(path));
  const bool npy = bytes.size() >= 6 && std::memcmp(bytes.data(), "\x93NUMPY", 6) == 0;
  if (!npy) {
    if (ends_with(path, ".npy")) return malformed(fmt::format("{}: not a NumPy file (bad magic)", path));
    if (bytes.size() % 4 != 0)
      return malformed(fmt::format("{}: {} bytes is not a whole number of float32 values", path, bytes.size()));
    return floats_from(bytes.data(), bytes.size());
  }
  if (bytes.size() < 10) return malformed(fmt::format("{}: truncated .npy header", path));
  const int major = static_cast<unsigned char>(bytes[6]);
  size_t header_len = 0, start = 0;
  if (major == 1) {
    header_len = static_cast<unsigned char>(bytes[8]) | (static_cast<size_t>(static_cast<unsigned char>(bytes[9])) << 8);
    start = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) return malformed(fmt::format("{}: truncated .npy header", path));
    for (int b = 0; b < 4; ++b) header_len |= static_cast<size_t>(static_cast<unsigned char>(bytes[8 + b])) << (8 * b);
    start = 12;
  } else {
    return malformed(fmt::format("{}: unsupported .npy version {}", path, major));
  }
  if (start + header_len > bytes.size()) return malformed(fmt::format("{}: truncated .npy header", path));
  const std::string header(bytes.data() + start, header_len);
  if (header.find("'descr': '<f4'") == std::string::npos && header.find("\"descr\": \"<f4\"") == std::string::npos)
    return malformed(fmt::format("{}: only little-endian float32 ('<f4') arrays are supported; header: {}", path,
                                 header));
  if (header.find("'fortran_order': True") != std::string::npos)
    return malformed(fmt::format("{}: Fortran-order arrays are not supported", path));
  const size_t data = start + header_len;
  if ((bytes.size() - data) % 4 != 0) return malformed(fmt::format("{}: data is not whole float32 values", path));
  return floats_from(bytes.data() + data, bytes.size() - data);
}

Status save_f32(const std::string& path, const std::vector<float>& values) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  for (float v : values) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    const char b[4] = {static_cast<char>(u), static_cast<char>(u >> 8), static_cast<char>(u >> 16),
                       static_cast<char>(u >> 24)};
    f.write(b, 4);
  }
  if (!f) return unavailable(fmt::format("{}: cannot write", path));
  return {};
}

Status save_u32(const std::string& path, const std::vector<uint32_t>& values) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  for (uint32_t u : values) {
    const char b[4] = {static_cast<char>(u), static_cast<char>(u >> 8), static_cast<char>(u >> 16),
                       static_cast<char>(u >> 24)};
    f.write(b, 4);
  }
  if (!f) return unavailable(fmt::format("{}: cannot write", path));
  return {};
}

VectorStats vector_stats(const std::vector<float>& x) {
  VectorStats s;
  s.n = x.size();
  double sum = 0;
  size_t finite = 0;
  for (float v : x) {
    if (!std::isfinite(v)) {
      ++s.non_finite;
      continue;
    }
    sum += v;
    ++finite;
    s.max_abs = std::max(s.max_abs, static_cast<double>(std::fabs(v)));
  }
  if (finite == 0) return s;
  s.mean = sum / static_cast<double>(finite);
  double m2 = 0, m4 = 0;
  for (float v : x) {
    if (!std::isfinite(v)) continue;
    const double d = v - s.mean;
    m2 += d * d;
    m4 += d * d * d * d;
  }
  const double var_pop = m2 / static_cast<double>(finite);
  s.stddev = finite > 1 ? std::sqrt(m2 / static_cast<double>(finite - 1)) : 0.0;
  s.excess_kurtosis = var_pop > 0 ? (m4 / static_cast<double>(finite)) / (var_pop * var_pop) - 3.0 : 0.0;
  std::vector<double> z;
  z.reserve(finite);
  s.abs_histogram.assign(32, 0);
  for (float v : x) {
    if (!std::isfinite(v)) continue;
    const double zz = s.stddev > 0 ? (v - s.mean) / s.stddev : 0.0;
    z.push_back(zz);
    for (int k = 0; k < 3; ++k)
      if (std::fabs(zz) <= k + 1) s.within_sigma[k] += 1;
    const auto bin = s.max_abs > 0 ? static_cast<size_t>(std::fabs(v) / s.max_abs * 32.0) : 0;
    ++s.abs_histogram[std::min<size_t>(bin, 31)];
  }
  for (double& w : s.within_sigma) w /= static_cast<double>(finite);
  std::sort(z.begin(), z.end());
  for (size_t i = 0; i < z.size(); ++i) {
    const double cdf = 0.5 * std::erfc(-z[i] / std::sqrt(2.0));
    const double lo = static_cast<double>(i) / static_cast<double>(z.size());
    const double hi = static_cast<double>(i + 1) / static_cast<double>(z.size());
    s.ks_distance = std::max({s.ks_distance, std::fabs(cdf - lo), std::fabs(hi - cdf)});
  }
  return s;
}

}  // namespace sps::kernels
