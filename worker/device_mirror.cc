#include "worker/device_mirror.h"

#include "sps/build_config.h"
#if SPS_HAVE_CUDA
#include "kernels/cuda/device_array.h"
#endif

namespace sps::worker {

#if SPS_HAVE_CUDA
namespace {

class CudaMirror final : public DeviceMirror {
 public:
  CudaMirror(std::unique_ptr<kernels::cuda::DeviceArray> params, std::unique_ptr<kernels::cuda::DeviceArray> grad)
      : params_(std::move(params)), grad_(std::move(grad)) {}
  std::span<float> params() override { return {params_->data(), params_->size()}; }
  std::span<float> grad() override { return {grad_->data(), grad_->size()}; }

  Status update(std::span<const float> host, const PullChanges& changes) override {
    for (const auto& [begin, end] : changes.ranges) SPS_RETURN_IF_ERROR(params_->upload(begin, host.data() + begin, end - begin));
    if (!changes.keys.empty()) {
      values_.resize(changes.keys.size());
      for (size_t i = 0; i < changes.keys.size(); ++i) values_[i] = host[changes.keys[i]];
      SPS_RETURN_IF_ERROR(params_->scatter(changes.keys.data(), values_.data(), changes.keys.size()));
    }
    return params_->synchronize();
  }
  Status upload_all(std::span<const float> host) override {
    SPS_RETURN_IF_ERROR(params_->upload(0, host.data(), host.size()));
    return params_->synchronize();
  }
  Status download_params(std::span<float> host) override { return params_->download(0, host.data(), host.size()); }
  Status copy_params_to(float* device_dst) override { return params_->copy_to_device(device_dst, params_->size()); }

 private:
  std::unique_ptr<kernels::cuda::DeviceArray> params_, grad_;
  std::vector<float> values_;
};

}  // namespace

Result<std::unique_ptr<DeviceMirror>> DeviceMirror::create(size_t n, int device) {
  SPS_ASSIGN_OR_RETURN(auto params, kernels::cuda::DeviceArray::create(n, device));
  SPS_ASSIGN_OR_RETURN(auto grad, kernels::cuda::DeviceArray::create(n, device));
  return std::unique_ptr<DeviceMirror>(new CudaMirror(std::move(params), std::move(grad)));
}
#else
Result<std::unique_ptr<DeviceMirror>> DeviceMirror::create(size_t /*n*/, int /*device*/) {
  return failed_precondition("the model computes on a GPU (Memory::kCuda), but this sps was built without CUDA "
                             "(-DSPS_CUDA=ON needs the CUDA toolkit)");
}
#endif

Result<std::unique_ptr<DeviceMirror>> make_device_scratch(size_t n) { return DeviceMirror::create(n, 0); }

}  // namespace sps::worker
