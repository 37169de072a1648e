#include "kernels/backend.h"

#include <fmt/format.h>

#include "sps/build_config.h"
#if SPS_HAVE_CUDA
#include "kernels/cuda/ef_accumulate.h"
#endif

namespace sps::kernels {

bool cuda_built() { return SPS_HAVE_CUDA != 0; }

bool cuda_available() {
#if SPS_HAVE_CUDA
  return cuda::device_count() > 0;
#else
  return false;
#endif
}

std::string backend_description() {
#if SPS_HAVE_CUDA
  const int n = cuda::device_count();
  if (n > 0) return fmt::format("cpu+cuda ({} devices)", n);
  return fmt::format("cpu+cuda (no device: {})", cuda::probe_error());
#else
  return "cpu";
#endif
}

}  // namespace sps::kernels
