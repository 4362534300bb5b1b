// CUDA kernel of feature_augment: one thread per output element, evaluating the whole op
// sequence through the shared augmented_value (csrc/augment_math.h). No host synchronisation:
// the op values stay on the device and a permutation's range is checked asynchronously.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "accumulation.h"
#include "augment_plan.h"
#include "cuda/reduce.cuh"

namespace sokd::cuda {
namespace {

using at::Tensor;

template <typename scalar_t, typename acc_t>
struct SampleLoader {
  const scalar_t* sample;
  int64_t height, width;
  __device__ acc_t operator()(int64_t channel, int64_t y, int64_t x) const {
    return static_cast<acc_t>(sample[(channel * height + y) * width + x]);
  }
};

// The op values arrive on the device (reading them on the host would wait for the GPU):
// each block completes its copy of the plan with them, and the affine matrices they define,
// in shared memory.
template <typename scalar_t, typename acc_t>
__global__ void feature_augment_kernel(const scalar_t* input, const AugmentPlan host_plan,
                                       const float* values, int64_t numel, scalar_t* output) {
  __shared__ AugmentPlan plan;
  if (threadIdx.x == 0) {
    plan = host_plan;
    for (int i = 0; i < plan.num_ops; ++i) {
      plan.ops[i].value = values[i];
      affine_theta(plan.ops[i].kind, plan.ops[i].value, plan.ops[i].theta);
    }
  }
  __syncthreads();
  const int64_t height = plan.height, width = plan.width, channels = plan.channels;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t x = i % width;
    const int64_t y = (i / width) % height;
    const int64_t c = (i / (width * height)) % channels;
    const int64_t n = i / (width * height * channels);
    SampleLoader<scalar_t, acc_t> load{input + n * channels * height * width, height, width};
    output[i] = static_cast<scalar_t>(augmented_value<acc_t>(plan, n, c, y, x, load));
  }
}

Tensor feature_augment(const Tensor& x, at::IntArrayRef op_ids, const Tensor& values,
                       const c10::List<std::optional<Tensor>>& draws,
                       at::IntArrayRef noise_seeds) {
  PreparedAugment prepared =
      prepare_augment(x, op_ids, values, draws, noise_seeds, c10::DeviceType::CUDA);
  c10::cuda::CUDAGuard guard(x.device());
  const Tensor input = x.contiguous();
  const Tensor device_values = values.to(x.device(), at::kFloat).contiguous();
  Tensor out = at::empty_like(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "sokd_feature_augment_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    feature_augment_kernel<scalar_t, acc_t>
        <<<blocks_for(input.numel(), 65536), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            input.data_ptr<scalar_t>(), prepared.plan, device_values.data_ptr<float>(),
            input.numel(), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace sokd::cuda

TORCH_LIBRARY_IMPL(sokd, CUDA, m) {
  m.impl("feature_augment", &sokd::cuda::feature_augment);
}
