// CUDA kernel of interest_map: one launch per batch, one block per image. The block finds the
// local maxima, selects the top-k peaks, decodes their boxes and fills the count map, with
// the shared ordering and decoding of csrc/interest_math.h.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "accumulation.h"
#include "cuda/reduce.cuh"
#include "interest_math.h"
#include "op_checks.h"

namespace sokd::cuda {
namespace {

using at::Tensor;

template <typename scalar_t, typename acc_t>
__global__ void interest_map_kernel(const scalar_t* heat, const scalar_t* wh,
                                    const scalar_t* offset, int64_t heat_channels,
                                    int64_t height, int64_t width, int64_t k, int64_t radius,
                                    acc_t* peaks, float* count, int64_t* boxes,
                                    scalar_t* scores) {
  const int64_t n = blockIdx.x;
  const int64_t plane = height * width, candidates = heat_channels * plane;
  const scalar_t* image = heat + n * candidates;
  acc_t* image_peaks = peaks + n * candidates;
  for (int64_t i = threadIdx.x; i < candidates; i += blockDim.x) {
    const int64_t position = i % plane;
    image_peaks[i] = local_peak<acc_t>(image + (i / plane) * plane, height, width,
                                       position / width, position % width, radius);
  }
  __syncthreads();

  // Selection round r picks the best peak ranked after the pick of round r - 1, so no peak
  // needs to be marked as taken.
  __shared__ acc_t best_value[kThreads];
  __shared__ int64_t best_index[kThreads];
  __shared__ acc_t previous_value;
  __shared__ int64_t previous_index;
  int64_t* image_boxes = boxes + n * k * 4;
  for (int64_t r = 0; r < k; ++r) {
    acc_t value = 0;
    int64_t index = -1;
    for (int64_t i = threadIdx.x; i < candidates; i += blockDim.x) {
      acc_t candidate = image_peaks[i];
      if (r > 0 && !peak_ranks_before(previous_value, previous_index, candidate, i)) continue;
      if (index < 0 || peak_ranks_before(candidate, i, value, index)) {
        value = candidate;
        index = i;
      }
    }
    best_value[threadIdx.x] = value;
    best_index[threadIdx.x] = index;
    __syncthreads();
    for (int width_left = kThreads / 2; width_left > 0; width_left /= 2) {
      if (threadIdx.x < width_left) {
        const int other = threadIdx.x + width_left;
        if (best_index[other] >= 0 &&
            (best_index[threadIdx.x] < 0 ||
             peak_ranks_before(best_value[other], best_index[other], best_value[threadIdx.x],
                               best_index[threadIdx.x]))) {
          best_value[threadIdx.x] = best_value[other];
          best_index[threadIdx.x] = best_index[other];
        }
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      previous_value = best_value[0];
      previous_index = best_index[0];
      const int64_t position = previous_index % plane;
      const scalar_t* image_wh = wh + n * 2 * plane;
      const scalar_t* image_offset = offset + n * 2 * plane;
      decode_box<acc_t>(position / width, position % width,
                        static_cast<acc_t>(image_offset[position]),
                        static_cast<acc_t>(image_offset[plane + position]),
                        static_cast<acc_t>(image_wh[position]),
                        static_cast<acc_t>(image_wh[plane + position]), height, width,
                        image_boxes + r * 4);
      scores[n * k + r] = static_cast<scalar_t>(previous_value);
    }
    __syncthreads();
  }

  for (int64_t position = threadIdx.x; position < plane; position += blockDim.x) {
    const int64_t y = position / width, x = position % width;
    float covered = 0.f;
    for (int64_t r = 0; r < k; ++r) {
      const int64_t* box = image_boxes + r * 4;
      if (x >= box[0] && x <= box[2] && y >= box[1] && y <= box[3]) covered += 1.f;
    }
    count[n * plane + position] = covered;
  }
}

std::tuple<Tensor, Tensor, Tensor> interest_map(const Tensor& heat_in, const Tensor& wh_in,
                                                const Tensor& offset_in, int64_t k,
                                                int64_t kernel) {
  check_interest_inputs(heat_in, wh_in, offset_in, k, kernel, c10::DeviceType::CUDA);
  c10::cuda::CUDAGuard guard(heat_in.device());
  const Tensor heat = heat_in.contiguous(), wh = wh_in.contiguous();
  const Tensor offset = offset_in.contiguous();
  const int64_t batch = heat.size(0), height = heat.size(2), width = heat.size(3);
  const auto acc_dtype = accumulation_dtype(heat.scalar_type());
  Tensor count = at::empty({batch, height, width}, heat.options().dtype(at::kFloat));
  Tensor boxes = at::empty({batch, k, 4}, heat.options().dtype(at::kLong));
  Tensor scores = at::empty({batch, k}, heat.options());
  Tensor peaks = at::empty({heat.numel()}, heat.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, heat.scalar_type(),
                                  "sokd_interest_map_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    interest_map_kernel<scalar_t, acc_t>
        <<<batch, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            heat.data_ptr<scalar_t>(), wh.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
            heat.size(1), height, width, k, (kernel - 1) / 2, peaks.data_ptr<acc_t>(),
            count.data_ptr<float>(), boxes.data_ptr<int64_t>(), scores.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {count, boxes, scores};
}

}  // namespace
}  // namespace sokd::cuda

TORCH_LIBRARY_IMPL(sokd, CUDA, m) {
  m.impl("interest_map", &sokd::cuda::interest_map);
}
