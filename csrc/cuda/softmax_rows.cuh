#pragma once
// Online softmax statistics, row walks and row launches shared by the CUDA kernels of kd_loss
// and decoupled_kd_loss (csrc/cuda/*_loss_kernel.cu).

#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <type_traits>

#include "cuda/reduce.cuh"
#include "math_ops.h"
#include "op_checks.h"

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

// Walks this thread's classes of one contiguous row: visit_pack(v, student_pack, teacher_pack)
// for the kVec classes from v * kVec on, read through 16-byte loads (rows then start 16-byte
// aligned), and visit_one(j, student_j, teacher_j) for the classes after the last whole pack.
template <int kRowThreads, int kVec, typename scalar_t, typename VisitPack, typename VisitOne>
__device__ __forceinline__ void for_my_packs(const scalar_t* student, const scalar_t* teacher,
                                             int64_t classes, VisitPack&& visit_pack,
                                             VisitOne&& visit_one) {
  using Values = Pack<scalar_t, kVec>;
  const int thread = threadIdx.x % kRowThreads;
  const int64_t vectors = kVec > 1 ? classes / kVec : 0;
  for (int64_t v = thread; v < vectors; v += kRowThreads) {
    const Values s = reinterpret_cast<const Values*>(student)[v];
    const Values t = reinterpret_cast<const Values*>(teacher)[v];
    visit_pack(v, s, t);
  }
  for (int64_t j = vectors * kVec + thread; j < classes; j += kRowThreads) {
    visit_one(j, student[j], teacher[j]);
  }
}

// Calls visit(j, student_j, teacher_j) for this thread's classes of one contiguous row.
template <int kRowThreads, int kVec, typename scalar_t, typename Visit>
__device__ __forceinline__ void for_my_classes(const scalar_t* student, const scalar_t* teacher,
                                               int64_t classes, Visit&& visit) {
  for_my_packs<kRowThreads, kVec>(
      student, teacher, classes,
      [&](int64_t v, const Pack<scalar_t, kVec>& s, const Pack<scalar_t, kVec>& t) {
#pragma unroll
        for (int k = 0; k < kVec; ++k) visit(v * kVec + k, s.value[k], t.value[k]);
      },
      visit);
}

// Writes grad[j] = gradient(j, student_j, teacher_j) for this thread's classes of one
// contiguous row, kVec at a time through 16-byte stores.
template <int kRowThreads, int kVec, typename scalar_t, typename Gradient>
__device__ __forceinline__ void write_my_classes(const scalar_t* student, const scalar_t* teacher,
                                                 scalar_t* grad, int64_t classes,
                                                 Gradient&& gradient) {
  using Values = Pack<scalar_t, kVec>;
  for_my_packs<kRowThreads, kVec>(
      student, teacher, classes,
      [&](int64_t v, const Values& s, const Values& t) {
        Values g;
#pragma unroll
        for (int k = 0; k < kVec; ++k) g.value[k] = gradient(v * kVec + k, s.value[k], t.value[k]);
        reinterpret_cast<Values*>(grad)[v] = g;
      },
      [&](int64_t j, scalar_t s, scalar_t t) { grad[j] = gradient(j, s, t); });
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

// Launches a loss kernel over the rows of `layout` and checks the launch: N x K logits through
// launch_contiguous_rows (contiguous(row_threads, vec, blocks)), with 16-byte accesses where
// student, teacher and grad allow them; dense logits a thread per row (dense(blocks)).
template <typename scalar_t, typename Contiguous, typename Dense>
void launch_logit_rows(const LogitRows& layout, const scalar_t* student, const scalar_t* teacher,
                       const scalar_t* grad, Contiguous&& contiguous, Dense&& dense) {
  if (layout.positions == 1) {
    const bool vectorise = can_vectorise<scalar_t>({student, teacher, grad}, layout.classes);
    launch_contiguous_rows<kVec16<scalar_t>>(layout.rows, layout.classes, vectorise, contiguous);
  } else {
    dense((layout.rows + kThreads - 1) / kThreads);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace sokd::cuda
