// The CUDA backend behind the Compressor interface (built when SPS_HAVE_CUDA).
#pragma once

#include <memory>

#include "kernels/compressor.h"

namespace sps::kernels {

// Fails with kUnavailable when no device answers.
Result<std::unique_ptr<Compressor>> make_cuda_compressor(size_t n, const CompressorOptions& options);

}  // namespace sps::kernels
