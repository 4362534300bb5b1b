#pragma once
// Online softmax statistics and row launches shared by the CUDA kernels of kd_loss and
// decoupled_kd_loss (csrc/cuda/*_loss_kernel.cu).

#include <cstdint>

#include "cuda/reduce.cuh"
#include "math_ops.h"

namespace sokd::cuda {

// Online softmax statistics of a stream of values: the running maximum and the sum of
// exp(value - maximum). Rescaling by exp(old - new) only when the maximum moves keeps an
// empty stream (-inf, 0) from turning into NaN, while a NaN value still propagates.
template <typename acc_t>
__device__ __forceinline__ acc_t rescale(acc_t old_max, acc_t new_max) {
  return old_max == new_max ? acc_t(1) : MathOps<acc_t>::exp(old_max - new_max);
}

template <typename acc_t>
struct Online {
  acc_t max, sum;

  // Adds z; returns exp(z - max) and sets `factor` to the rescale of the earlier sum.
  __device__ __forceinline__ acc_t add(acc_t z, acc_t& factor) {
    const acc_t new_max = MathOps<acc_t>::max(max, z);
    factor = rescale(max, new_max);
    const acc_t e =
        new_max == MathOps<acc_t>::lowest() ? acc_t(0) : MathOps<acc_t>::exp(z - new_max);
    sum = sum * factor + e;
    max = new_max;
    return e;
  }

  // Folds in another part's statistics; sets the rescale factors of both parts. The result is
  // the same whichever part folds in the other (the two products are added, in either order).
  __device__ __forceinline__ void merge(const Online& other, acc_t& mine, acc_t& theirs) {
    const acc_t new_max = MathOps<acc_t>::max(max, other.max);
    mine = rescale(max, new_max);
    theirs = rescale(other.max, new_max);
    sum = sum * mine + other.sum * theirs;
    max = new_max;
  }

  __device__ __forceinline__ Online shuffled(int offset) const {
    return {__shfl_xor_sync(kFullMask, max, offset), __shfl_xor_sync(kFullMask, sum, offset)};
  }

  __device__ __forceinline__ acc_t log_sum_exp() const {
    return max + MathOps<acc_t>::log(sum);
  }
};

template <typename acc_t>
__device__ __forceinline__ Online<acc_t> online_start() {
  return {MathOps<acc_t>::lowest(), acc_t(0)};
}

// Merges per-thread statistics over the kRowThreads threads of a row (a warp, or the whole
// block), in the same fixed order for every row; every thread of the row gets the result.
template <int kRowThreads, typename Stats>
__device__ __forceinline__ Stats merge_row(Stats stats) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) stats.merge(stats.shuffled(offset));
  if constexpr (kRowThreads > kWarp) {
    __shared__ Stats warp_stats[kRowThreads / kWarp];
    if (threadIdx.x % kWarp == 0) warp_stats[threadIdx.x / kWarp] = stats;
    __syncthreads();
    stats = warp_stats[0];
    for (int w = 1; w < kRowThreads / kWarp; ++w) stats.merge(warp_stats[w]);
  }
  return stats;
}

// Calls visit(j, student_j, teacher_j) for this thread's classes of one contiguous row: kVec
// at a time through 16-byte loads (rows then start 16-byte aligned), the rest one by one.
template <int kRowThreads, int kVec, typename scalar_t, typename Visit>
__device__ __forceinline__ void for_my_classes(const scalar_t* student, const scalar_t* teacher,
                                               int64_t classes, Visit&& visit) {
  using Values = Pack<scalar_t, kVec>;
  const int thread = threadIdx.x % kRowThreads;
  const int64_t vectors = kVec > 1 ? classes / kVec : 0;
  for (int64_t v = thread; v < vectors; v += kRowThreads) {
    const Values s = reinterpret_cast<const Values*>(student)[v];
    const Values t = reinterpret_cast<const Values*>(teacher)[v];
#pragma unroll
    for (int k = 0; k < kVec; ++k) visit(v * kVec + k, s.value[k], t.value[k]);
  }
  for (int64_t j = vectors * kVec + thread; j < classes; j += kRowThreads) {
    visit(j, student[j], teacher[j]);
  }
}

// A block per row when the rows are too few to fill the GPU with a warp each and long enough
// to share among 256 threads; a warp per row otherwise.
inline bool block_per_row(int64_t rows, int64_t classes) {
  return rows < 2048 && classes >= 4096;
}

// Launches kernel<kRowThreads, kVec> over `rows` contiguous rows of `classes`, choosing the
// threads per row and whether 16-byte accesses are possible.
template <int kVec, typename Launch>
void launch_contiguous_rows(int64_t rows, int64_t classes, bool vectorise, Launch&& launch) {
  const bool per_block = block_per_row(rows, classes);
  const int64_t rows_per_block = per_block ? 1 : kThreads / kWarp;
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  if (per_block) {
    vectorise ? launch(std::integral_constant<int, kThreads>{}, std::integral_constant<int, kVec>{},
                       blocks)
              : launch(std::integral_constant<int, kThreads>{}, std::integral_constant<int, 1>{},
                       blocks);
  } else {
    vectorise ? launch(std::integral_constant<int, kWarp>{}, std::integral_constant<int, kVec>{},
                       blocks)
              : launch(std::integral_constant<int, kWarp>{}, std::integral_constant<int, 1>{},
                       blocks);
  }
}

}  // namespace sokd::cuda
