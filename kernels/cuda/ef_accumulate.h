// CUDA backend of the error-feedback accumulate step. This header is plain
// C++ (no CUDA types) so host code and tests can call it without nvcc.
#pragma once

#include <cstddef>
#include <string>

#include "common/status.h"

namespace sps::kernels::cuda {

// Number of usable CUDA devices; 0 when there is no driver or device.
int device_count();
// Why device_count() is 0 (the CUDA runtime's message), or "" when it is not.
std::string probe_error();

// acc = residual + scale * grad for n entries, computed on the device (host
// buffers are copied in and out); returns the number of non-finite acc
// entries. Same arithmetic as the CPU pass in sparsify.cc, so results agree
// bit for bit. (Pointer + size: this header is also compiled as C++17 by nvcc.)
Result<size_t> ef_accumulate(const float* residual, const float* grad, float scale, float* acc, size_t n);

}  // namespace sps::kernels::cuda
