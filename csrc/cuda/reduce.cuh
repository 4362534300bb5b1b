#pragma once
// Deterministic reductions for the CUDA kernels: each block reduces its values in a fixed
// tree, and one block adds the per-block partials in a fixed order. No atomics, so a loss is
// bit-identical from run to run.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

namespace sokd::cuda {

constexpr int kThreads = 256;

// The block's sum of `value`, valid in thread 0. Every thread of the block must call it.
template <typename acc_t>
__device__ acc_t block_sum(acc_t value) {
  __shared__ acc_t shared[kThreads];
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) shared[threadIdx.x] += shared[threadIdx.x + width];
    __syncthreads();
  }
  acc_t total = shared[0];
  __syncthreads();
  return total;
}

// out = factor * sum(values) / *denominator, or 0 when the denominator is 0. One block.
template <typename acc_t>
__global__ void finish_sum_kernel(const acc_t* values, int64_t count, const acc_t* denominator,
                                  acc_t factor, acc_t* out) {
  acc_t partial = 0;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) partial += values[i];
  acc_t total = block_sum(partial);
  if (threadIdx.x == 0) {
    acc_t d = *denominator;
    *out = d == acc_t(0) ? acc_t(0) : factor * total / d;
  }
}

template <typename acc_t>
void launch_finish_sum(const at::Tensor& values, const at::Tensor& denominator, acc_t factor,
                       at::Tensor& out) {
  finish_sum_kernel<acc_t><<<1, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      values.data_ptr<acc_t>(), values.numel(), denominator.data_ptr<acc_t>(), factor,
      out.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline int64_t blocks_for(int64_t items, int64_t max_blocks = 1024) {
  int64_t blocks = (items + kThreads - 1) / kThreads;
  return blocks < 1 ? 1 : (blocks > max_blocks ? max_blocks : blocks);
}

}  // namespace sokd::cuda
