#pragma once
// Deterministic reductions and vector loads for the CUDA kernels. Every sum is taken in a fixed
// order: lanes by warp shuffles in a fixed tree, warps through shared memory, and blocks in a
// second pass whose partition depends only on the count. No atomics, so a loss is
// bit-identical from run to run.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <initializer_list>

namespace sokd::cuda {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// The sum over the 32 lanes of a warp, valid in every lane (a butterfly: same order in all).
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t value) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(kFullMask, value, offset);
  }
  return value;
}

// The block's sum of `value`, valid in thread 0. Every thread of the block must call it, with
// blockDim.x == kThreads.
template <typename acc_t>
__device__ acc_t block_sum(acc_t value) {
  __shared__ acc_t warp_totals[kThreads / kWarp];
  value = warp_sum(value);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) warp_totals[warp] = value;
  __syncthreads();
  acc_t total = 0;
  if (warp == 0) {
    total = warp_sum(lane < kThreads / kWarp ? warp_totals[lane] : acc_t(0));
  }
  __syncthreads();  // warp_totals may be reused by the caller's next block_sum
  return total;
}

// First pass of a long sum: block b adds values[b * chunk, (b + 1) * chunk).
template <typename acc_t>
__global__ void partial_sums_kernel(const acc_t* values, int64_t count, int64_t chunk,
                                    acc_t* partials) {
  const int64_t begin = blockIdx.x * chunk;
  const int64_t end = begin + chunk < count ? begin + chunk : count;
  acc_t sum = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) sum += values[i];
  const acc_t total = block_sum(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
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

// One block sums up to this many values itself; longer sums take a first pass over up to
// kMaxPartialBlocks blocks, so that no single block walks a whole dense map's rows.
constexpr int64_t kSingleBlockCount = 8 * kThreads;
constexpr int64_t kMaxPartialBlocks = 1024;

template <typename acc_t>
void launch_finish_sum(const at::Tensor& values, const at::Tensor& denominator, acc_t factor,
                       at::Tensor& out) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t count = values.numel();
  at::Tensor summed = values;
  if (count > kSingleBlockCount) {
    int64_t blocks = (count + kSingleBlockCount - 1) / kSingleBlockCount;
    blocks = blocks < kMaxPartialBlocks ? blocks : kMaxPartialBlocks;
    const int64_t chunk = (count + blocks - 1) / blocks;
    blocks = (count + chunk - 1) / chunk;
    summed = at::empty({blocks}, values.options());
    partial_sums_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(
        values.data_ptr<acc_t>(), count, chunk, summed.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  finish_sum_kernel<acc_t><<<1, kThreads, 0, stream>>>(
      summed.data_ptr<acc_t>(), summed.numel(), denominator.data_ptr<acc_t>(), factor,
      out.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline int64_t blocks_for(int64_t items, int64_t max_blocks = 1024) {
  int64_t blocks = (items + kThreads - 1) / kThreads;
  return blocks < 1 ? 1 : (blocks > max_blocks ? max_blocks : blocks);
}

// kVec consecutive elements read or written as one access of up to 16 bytes.
template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t value[kVec];
};

// Elements of scalar_t per 16-byte access.
template <typename scalar_t>
constexpr int kVec16 = 16 / sizeof(scalar_t) > 0 ? 16 / sizeof(scalar_t) : 1;

// Whether Pack<scalar_t, kVec> accesses are aligned: every pointer (null ones aside) and the
// element `stride` between rows are multiples of the pack's size.
template <typename scalar_t, int kVec = kVec16<scalar_t>>
inline bool can_vectorise(std::initializer_list<const void*> pointers, int64_t stride) {
  constexpr int64_t bytes = sizeof(Pack<scalar_t, kVec>);
  if ((stride * static_cast<int64_t>(sizeof(scalar_t))) % bytes != 0) return false;
  for (const void* pointer : pointers) {
    if (pointer != nullptr && reinterpret_cast<std::uintptr_t>(pointer) % bytes != 0) return false;
  }
  return true;
}

}  // namespace sokd::cuda
