// The one dispatch point between host code and the optional CUDA backend.
// Host code asks here whether CUDA was built and whether a device is usable
// (probe, don't assume); nothing else includes CUDA headers.
#pragma once

#include <string>

namespace sps::kernels {

// True when the CUDA backend was compiled in (SPS_CUDA=AUTO found nvcc, or ON).
bool cuda_built();
// True when the CUDA backend was built and at least one device answers.
bool cuda_available();
// "cpu", or "cpu+cuda (N devices)" / "cpu+cuda (no device: reason)".
std::string backend_description();

}  // namespace sps::kernels
