// CUDA kernels of the fused losses. The per-element and per-row math is the shared code of
// csrc/loss_math.h that the CPU kernels also run.
//
// Memory access, which bounds every kernel here:
// - N x K logits: a warp per row (a block per row when there are few, long rows). The lanes
//   read the row 16 bytes at a time, keep online softmax statistics, merge them across the
//   warp in a fixed order, and write the gradient in a second pass over the row.
// - Dense N x K x H x W logits: a thread per row; neighbouring threads read neighbouring
//   positions, so each class is read coalesced across the warp.
// - Masked feature loss: 16-byte loads and stores, index math once per vector in 32 bits
//   whenever the map allows.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/reduce.cuh"
#include "loss_math.h"
#include "op_checks.h"

namespace sokd::cuda {
namespace {

using at::Tensor;

// kVec elements per access; a vector never straddles two planes (plane_size % kVec == 0), so
// its mask values are the kVec consecutive ones at the same position. index_t is uint32_t
// whenever the map has fewer than 2^32 elements: the divisions per vector are then 32-bit.
template <typename scalar_t, typename acc_t, int kVec, typename index_t>
__global__ void masked_feature_kernel(const scalar_t* student, const scalar_t* teacher,
                                      const acc_t* mask_sq, const acc_t* normaliser,
                                      index_t vectors, index_t image_vectors,
                                      index_t plane_vectors, scalar_t* grad,
                                      acc_t* block_partials) {
  using Values = Pack<scalar_t, kVec>;
  using Weights = Pack<acc_t, kVec>;
  const acc_t z = *normaliser;
  const acc_t grad_scale = z == acc_t(0) ? acc_t(0) : acc_t(2) / z;
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  acc_t sum = 0;
  for (index_t v = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < vectors;
       v += stride) {
    const Values s = reinterpret_cast<const Values*>(student)[v];
    const Values t = reinterpret_cast<const Values*>(teacher)[v];
    Weights m2;
    if (mask_sq != nullptr) {
      const index_t at = (v / image_vectors) * plane_vectors + v % plane_vectors;
      m2 = reinterpret_cast<const Weights*>(mask_sq)[at];
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) m2.value[k] = acc_t(1);
    }
    Values g;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      acc_t gradient;
      sum += masked_squared_error<acc_t>(static_cast<acc_t>(s.value[k]),
                                         static_cast<acc_t>(t.value[k]), m2.value[k],
                                         grad_scale, gradient);
      g.value[k] = static_cast<scalar_t>(gradient);
    }
    if (grad != nullptr) reinterpret_cast<Values*>(grad)[v] = g;
  }
  acc_t block_total = block_sum(sum);
  if (threadIdx.x == 0) block_partials[blockIdx.x] = block_total;
}

template <typename scalar_t, typename acc_t, int kVec>
void launch_masked_feature(const Tensor& student, const Tensor& teacher, const acc_t* mask_sq,
                           const Tensor& normaliser, int64_t image_size, int64_t plane_size,
                           scalar_t* grad, Tensor& partials) {
  const int64_t vectors = student.numel() / kVec;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = partials.numel();
  auto launch = [&](auto index_zero) {
    using index_t = decltype(index_zero);
    masked_feature_kernel<scalar_t, acc_t, kVec, index_t><<<blocks, kThreads, 0, stream>>>(
        student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(), mask_sq,
        normaliser.data_ptr<acc_t>(), static_cast<index_t>(vectors),
        static_cast<index_t>(image_size / kVec), static_cast<index_t>(plane_size / kVec), grad,
        partials.data_ptr<acc_t>());
  };
  // The loop index may pass `vectors` by up to one grid stride before it stops.
  if (vectors + blocks * kThreads < (int64_t{1} << 32)) {
    launch(uint32_t{0});
  } else {
    launch(int64_t{0});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<Tensor, Tensor> masked_feature_loss(const Tensor& student_in, const Tensor& teacher_in,
                                               const std::optional<Tensor>& mask,
                                               bool normalize_by_mask, bool with_grad) {
  check_masked_feature_inputs(student_in, teacher_in, mask, c10::DeviceType::CUDA);
  c10::cuda::CUDAGuard guard(student_in.device());
  const Tensor student = student_in.contiguous(), teacher = teacher_in.contiguous();
  const auto acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t channels = student.size(1);
  const int64_t plane_size = student.size(2) * student.size(3);
  Tensor mask_sq, normaliser;
  if (mask.has_value()) {
    mask_sq = mask->to(acc_dtype).square().contiguous();
  }
  if (mask.has_value() && normalize_by_mask) {
    normaliser = mask_sq.sum().mul_(static_cast<double>(channels));
  } else {
    normaliser = at::full({}, static_cast<double>(student.numel()), student.options().dtype(acc_dtype));
  }
  Tensor grad = with_grad ? at::empty_like(student) : at::empty({0}, student.options());
  Tensor loss = at::empty({}, student.options().dtype(acc_dtype));
  const int64_t blocks = blocks_for(student.numel());
  Tensor partials = at::empty({blocks}, student.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(),
                                  "sokd_masked_feature_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = kVec16<scalar_t>;
    const acc_t* mask_data = mask.has_value() ? mask_sq.data_ptr<acc_t>() : nullptr;
    scalar_t* grad_data = with_grad ? grad.data_ptr<scalar_t>() : nullptr;
    const bool vectorise =
        plane_size % kVec == 0 &&
        can_vectorise<scalar_t>({student.data_ptr(), teacher.data_ptr(), grad_data}, 0) &&
        can_vectorise<acc_t, kVec>({mask_data}, 0);
    if (vectorise) {
      launch_masked_feature<scalar_t, acc_t, kVec>(student, teacher, mask_data, normaliser,
                                                   channels * plane_size, plane_size,
                                                   grad_data, partials);
    } else {
      launch_masked_feature<scalar_t, acc_t, 1>(student, teacher, mask_data, normaliser,
                                                channels * plane_size, plane_size, grad_data,
                                                partials);
    }
    launch_finish_sum<acc_t>(partials, normaliser, acc_t(1), loss);
  });
  return {loss, grad};
}

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

// Temperature KD statistics of (part of) a row: online softmax of z_s and z_t = logits / T,
// and cross = sum exp(z_t - max_t) * (z_t - z_s), kept against the teacher's running maximum.
template <typename acc_t>
struct KdStats {
  Online<acc_t> s, t;
  acc_t cross;

  __device__ __forceinline__ void add(acc_t zs, acc_t zt) {
    acc_t unused, factor;
    s.add(zs, unused);
    const acc_t et = t.add(zt, factor);
    cross = cross * factor + et * (zt - zs);
  }
  // Adds kVec classes at once: the maxima move once per pack, so each value costs one exp
  // per network instead of two.
  template <int kVec>
  __device__ __forceinline__ void add_pack(const acc_t (&zs)[kVec], const acc_t (&zt)[kVec]) {
    using M = MathOps<acc_t>;
    acc_t max_s = s.max, max_t = t.max;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      max_s = M::max(max_s, zs[k]);
      max_t = M::max(max_t, zt[k]);
    }
    const acc_t factor_t = rescale(t.max, max_t);
    acc_t sum_s = s.sum * rescale(s.max, max_s), sum_t = t.sum * factor_t;
    acc_t pack_cross = cross * factor_t;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      sum_s += max_s == M::lowest() ? acc_t(0) : M::exp(zs[k] - max_s);
      const acc_t et = max_t == M::lowest() ? acc_t(0) : M::exp(zt[k] - max_t);
      sum_t += et;
      pack_cross += et * (zt[k] - zs[k]);
    }
    s = {max_s, sum_s};
    t = {max_t, sum_t};
    cross = pack_cross;
  }
  __device__ __forceinline__ void merge(const KdStats& other) {
    acc_t mine, theirs;
    s.merge(other.s, mine, theirs);
    t.merge(other.t, mine, theirs);
    cross = cross * mine + other.cross * theirs;
  }
  __device__ __forceinline__ KdStats shuffled(int offset) const {
    return {s.shuffled(offset), t.shuffled(offset), __shfl_xor_sync(kFullMask, cross, offset)};
  }
};

// N x K logits: kRowThreads threads per row (blockDim.x / kRowThreads rows per block).
template <typename scalar_t, typename acc_t, int kRowThreads, int kVec>
__global__ void kd_contiguous_rows_kernel(const scalar_t* student, const scalar_t* teacher,
                                          const acc_t* weights, const acc_t* weight_total,
                                          int64_t rows, int64_t classes, acc_t temperature,
                                          scalar_t* grad, acc_t* weighted_kl) {
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kRowThreads;
  if (r >= rows) return;  // whole rows leave together: kRowThreads divides blockDim.x
  const scalar_t* s_row = student + r * classes;
  const scalar_t* t_row = teacher + r * classes;
  const acc_t inv_temperature = acc_t(1) / temperature;
  KdStats<acc_t> stats{online_start<acc_t>(), online_start<acc_t>(), acc_t(0)};
  using Values = Pack<scalar_t, kVec>;
  const int thread = threadIdx.x % kRowThreads;
  const int64_t vectors = kVec > 1 ? classes / kVec : 0;
  for (int64_t v = thread; v < vectors; v += kRowThreads) {
    const Values s = reinterpret_cast<const Values*>(s_row)[v];
    const Values t = reinterpret_cast<const Values*>(t_row)[v];
    acc_t zs[kVec], zt[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      zs[k] = static_cast<acc_t>(s.value[k]) * inv_temperature;
      zt[k] = static_cast<acc_t>(t.value[k]) * inv_temperature;
    }
    stats.add_pack(zs, zt);
  }
  for (int64_t j = vectors * kVec + thread; j < classes; j += kRowThreads) {
    stats.add(static_cast<acc_t>(s_row[j]) * inv_temperature,
              static_cast<acc_t>(t_row[j]) * inv_temperature);
  }
  stats = merge_row<kRowThreads>(stats);
  // kd_row's cross term, taken against both maxima: sum e_t ((z_t - max_t) - (z_s - max_s)).
  const acc_t cross = stats.cross - stats.t.sum * (stats.t.max - stats.s.max);
  const acc_t w = weights ? weights[r] : acc_t(1);
  if (threadIdx.x % kRowThreads == 0) {
    weighted_kl[r] = w * kd_row_divergence(stats.s.sum, stats.t.sum, cross);
  }
  if (grad == nullptr) return;
  const acc_t total = *weight_total;
  const acc_t coef = total == acc_t(0) ? acc_t(0) : temperature * w / total;
  const acc_t shift_s = stats.s.log_sum_exp(), shift_t = stats.t.log_sum_exp();
  auto gradient = [&](scalar_t s, scalar_t t) {
    return static_cast<scalar_t>(
        coef * (MathOps<acc_t>::exp(static_cast<acc_t>(s) * inv_temperature - shift_s) -
                MathOps<acc_t>::exp(static_cast<acc_t>(t) * inv_temperature - shift_t)));
  };
  Values* g_row = reinterpret_cast<Values*>(grad + r * classes);
  for (int64_t v = thread; v < vectors; v += kRowThreads) {
    const Values s = reinterpret_cast<const Values*>(s_row)[v];
    const Values t = reinterpret_cast<const Values*>(t_row)[v];
    Values g;
#pragma unroll
    for (int k = 0; k < kVec; ++k) g.value[k] = gradient(s.value[k], t.value[k]);
    g_row[v] = g;
  }
  for (int64_t j = vectors * kVec + thread; j < classes; j += kRowThreads) {
    grad[r * classes + j] = gradient(s_row[j], t_row[j]);
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

// Dense rows (classes H*W apart): a thread per row, so each class is read coalesced across the
// warp.
template <typename scalar_t, typename acc_t>
__global__ void kd_rows_kernel(const scalar_t* student, const scalar_t* teacher,
                               const acc_t* weights, const acc_t* weight_total, int64_t rows,
                               int64_t classes, int64_t positions, acc_t temperature,
                               scalar_t* grad, acc_t* weighted_kl) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  const int64_t offset = (r / positions) * classes * positions + r % positions;
  const acc_t total = *weight_total;
  const acc_t w = weights ? weights[r] : acc_t(1);
  const acc_t coef = total == acc_t(0) ? acc_t(0) : temperature * w / total;
  StridedRow<scalar_t, acc_t> row{student + offset, teacher + offset, nullptr,
                                  grad ? grad + offset : nullptr, positions,
                                  acc_t(1) / temperature};
  weighted_kl[r] = w * kd_row<acc_t>(row, classes, coef, grad != nullptr);
}

std::tuple<Tensor, Tensor> kd_loss(const Tensor& student_in, const Tensor& teacher_in,
                                   double temperature, const std::optional<Tensor>& weight,
                                   bool with_grad) {
  check_logit_inputs(student_in, teacher_in, temperature, c10::DeviceType::CUDA);
  check_row_weight(weight, student_in, c10::DeviceType::CUDA);
  c10::cuda::CUDAGuard guard(student_in.device());
  const Tensor student = student_in.contiguous(), teacher = teacher_in.contiguous();
  const auto acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t batch = student.size(0), classes = student.size(1);
  const int64_t positions = student.dim() == 4 ? student.size(2) * student.size(3) : 1;
  const int64_t rows = batch * positions;
  Tensor weights, weight_total;
  if (weight.has_value()) {
    weights = weight->to(acc_dtype).reshape({rows}).contiguous();
    weight_total = weights.sum();
  } else {
    weight_total = at::full({}, static_cast<double>(rows), student.options().dtype(acc_dtype));
  }
  Tensor grad = with_grad ? at::empty_like(student) : at::empty({0}, student.options());
  Tensor loss = at::empty({}, student.options().dtype(acc_dtype));
  Tensor weighted_kl = at::empty({rows}, student.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(),
                                  "sokd_kd_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t temp = static_cast<acc_t>(temperature);
    const auto stream = at::cuda::getCurrentCUDAStream();
    const acc_t* weight_data = weight.has_value() ? weights.data_ptr<acc_t>() : nullptr;
    scalar_t* grad_data = with_grad ? grad.data_ptr<scalar_t>() : nullptr;
    if (positions == 1) {
      const bool vectorise = can_vectorise<scalar_t>(
          {student.data_ptr(), teacher.data_ptr(), grad_data}, classes);
      launch_contiguous_rows<kVec16<scalar_t>>(
          rows, classes, vectorise, [&](auto row_threads, auto vec, int64_t blocks) {
            kd_contiguous_rows_kernel<scalar_t, acc_t, decltype(row_threads)::value,
                                      decltype(vec)::value><<<blocks, kThreads, 0, stream>>>(
                student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(), weight_data,
                weight_total.data_ptr<acc_t>(), rows, classes, temp, grad_data,
                weighted_kl.data_ptr<acc_t>());
          });
    } else {
      kd_rows_kernel<scalar_t, acc_t><<<(rows + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
          student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(), weight_data,
          weight_total.data_ptr<acc_t>(), rows, classes, positions, temp, grad_data,
          weighted_kl.data_ptr<acc_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_finish_sum<acc_t>(weighted_kl, weight_total, temp * temp, loss);
  });
  return {loss, grad};
}

template <typename scalar_t, typename acc_t>
__global__ void decoupled_kd_rows_kernel(const scalar_t* student, const scalar_t* teacher,
                                         const bool* class_mask, int64_t rows, int64_t classes,
                                         int64_t positions, acc_t alpha, acc_t beta,
                                         acc_t temperature, scalar_t* grad, acc_t* row_loss) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  const int64_t offset = (r / positions) * classes * positions + r % positions;
  StridedRow<scalar_t, acc_t> row{student + offset, teacher + offset, class_mask + offset,
                                  grad ? grad + offset : nullptr, positions,
                                  acc_t(1) / temperature};
  const acc_t coef = temperature / static_cast<acc_t>(rows);
  row_loss[r] = decoupled_kd_row<acc_t>(row, classes, alpha, beta, coef, grad != nullptr);
}

// Decoupled KD statistics of (part of) a row: online softmax of z_s and z_t inside G and
// outside it, NCKD's cross term outside G against the teacher's running maximum there, and
// whether each set holds a class (from the mask, so a set of -inf logits still counts).
template <typename acc_t>
struct DkdStats {
  Online<acc_t> in_s, out_s, in_t, out_t;
  acc_t cross_out;
  bool has_in, has_out;

  __device__ __forceinline__ void add(bool in, acc_t zs, acc_t zt) {
    acc_t unused, factor;
    if (in) {
      in_s.add(zs, unused);
      in_t.add(zt, unused);
      has_in = true;
    } else {
      out_s.add(zs, unused);
      const acc_t et = out_t.add(zt, factor);
      cross_out = cross_out * factor + et * (zt - zs);
      has_out = true;
    }
  }
  __device__ __forceinline__ void merge(const DkdStats& other) {
    acc_t mine, theirs;
    in_s.merge(other.in_s, mine, theirs);
    in_t.merge(other.in_t, mine, theirs);
    out_s.merge(other.out_s, mine, theirs);
    out_t.merge(other.out_t, mine, theirs);
    cross_out = cross_out * mine + other.cross_out * theirs;
    has_in = has_in || other.has_in;
    has_out = has_out || other.has_out;
  }
  __device__ __forceinline__ DkdStats shuffled(int offset) const {
    return {in_s.shuffled(offset),
            out_s.shuffled(offset),
            in_t.shuffled(offset),
            out_t.shuffled(offset),
            __shfl_xor_sync(kFullMask, cross_out, offset),
            static_cast<bool>(__shfl_xor_sync(kFullMask, static_cast<int>(has_in), offset)),
            static_cast<bool>(__shfl_xor_sync(kFullMask, static_cast<int>(has_out), offset))};
  }
};

// N x K logits: kRowThreads threads per row, as kd_contiguous_rows_kernel. The statistics feed
// the shared decoupled_kd_finish and decoupled_kd_grad of csrc/loss_math.h.
template <typename scalar_t, typename acc_t, int kRowThreads, int kVec>
__global__ void decoupled_kd_contiguous_rows_kernel(const scalar_t* student,
                                                    const scalar_t* teacher,
                                                    const bool* class_mask, int64_t rows,
                                                    int64_t classes, acc_t alpha, acc_t beta,
                                                    acc_t temperature, scalar_t* grad,
                                                    acc_t* row_loss) {
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kRowThreads;
  if (r >= rows) return;  // whole rows leave together: kRowThreads divides blockDim.x
  const scalar_t* s_row = student + r * classes;
  const scalar_t* t_row = teacher + r * classes;
  const bool* m_row = class_mask + r * classes;
  const acc_t inv_temperature = acc_t(1) / temperature;
  const Online<acc_t> empty = online_start<acc_t>();
  DkdStats<acc_t> stats{empty, empty, empty, empty, acc_t(0), false, false};
  for_my_classes<kRowThreads, kVec>(s_row, t_row, classes, [&](int64_t j, scalar_t s, scalar_t t) {
    stats.add(m_row[j], static_cast<acc_t>(s) * inv_temperature,
              static_cast<acc_t>(t) * inv_temperature);
  });
  stats = merge_row<kRowThreads>(stats);
  const DecoupledKdMaxima<acc_t> max{stats.in_s.max, stats.out_s.max, stats.in_t.max,
                                     stats.out_t.max};
  // decoupled_kd_row's cross term, against both maxima outside G.
  const acc_t cross_out =
      stats.cross_out - stats.out_t.sum * (stats.out_t.max - stats.out_s.max);
  const DecoupledKdSums<acc_t> sums{stats.in_s.sum, stats.out_s.sum, stats.in_t.sum,
                                    stats.out_t.sum, cross_out};
  const acc_t coef = temperature / static_cast<acc_t>(rows);
  const DecoupledKdRowResult<acc_t> result =
      decoupled_kd_finish(max, sums, stats.has_in, stats.has_out, alpha, beta, coef);
  if (threadIdx.x % kRowThreads == 0) row_loss[r] = result.loss;
  if (grad == nullptr) return;
  auto gradient = [&](bool in, scalar_t s, scalar_t t) {
    acc_t shifted_s, shifted_t;
    max.shift(in, static_cast<acc_t>(s) * inv_temperature,
              static_cast<acc_t>(t) * inv_temperature, shifted_s, shifted_t);
    return static_cast<scalar_t>(decoupled_kd_grad(in, MathOps<acc_t>::exp(shifted_s),
                                                   MathOps<acc_t>::exp(shifted_t), result));
  };
  using Values = Pack<scalar_t, kVec>;
  const int thread = threadIdx.x % kRowThreads;
  const int64_t vectors = kVec > 1 ? classes / kVec : 0;
  Values* g_row = reinterpret_cast<Values*>(grad + r * classes);
  for (int64_t v = thread; v < vectors; v += kRowThreads) {
    const Values s = reinterpret_cast<const Values*>(s_row)[v];
    const Values t = reinterpret_cast<const Values*>(t_row)[v];
    Values g;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      g.value[k] = gradient(m_row[v * kVec + k], s.value[k], t.value[k]);
    }
    g_row[v] = g;
  }
  for (int64_t j = vectors * kVec + thread; j < classes; j += kRowThreads) {
    grad[r * classes + j] = gradient(m_row[j], s_row[j], t_row[j]);
  }
}

std::tuple<Tensor, Tensor> decoupled_kd_loss(const Tensor& student_in, const Tensor& teacher_in,
                                             const Tensor& class_mask_in, double alpha,
                                             double beta, double temperature, bool with_grad) {
  check_logit_inputs(student_in, teacher_in, temperature, c10::DeviceType::CUDA);
  check_class_mask(class_mask_in, student_in, c10::DeviceType::CUDA);
  TORCH_CHECK(std::isfinite(alpha) && alpha >= 0 && std::isfinite(beta) && beta >= 0,
              "alpha and beta must be finite and >= 0, got ", alpha, " and ", beta);
  c10::cuda::CUDAGuard guard(student_in.device());
  const Tensor student = student_in.contiguous(), teacher = teacher_in.contiguous();
  const Tensor class_mask = class_mask_in.contiguous();
  const auto acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t batch = student.size(0), classes = student.size(1);
  const int64_t positions = student.dim() == 4 ? student.size(2) * student.size(3) : 1;
  const int64_t rows = batch * positions;
  Tensor grad = with_grad ? at::empty_like(student) : at::empty({0}, student.options());
  Tensor loss = at::empty({}, student.options().dtype(acc_dtype));
  Tensor row_loss = at::empty({rows}, student.options().dtype(acc_dtype));
  Tensor row_count = at::full({}, static_cast<double>(rows), student.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(),
                                  "sokd_decoupled_kd_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t temp = static_cast<acc_t>(temperature);
    const auto stream = at::cuda::getCurrentCUDAStream();
    scalar_t* grad_data = with_grad ? grad.data_ptr<scalar_t>() : nullptr;
    if (positions == 1) {
      const bool vectorise = can_vectorise<scalar_t>(
          {student.data_ptr(), teacher.data_ptr(), grad_data}, classes);
      launch_contiguous_rows<kVec16<scalar_t>>(
          rows, classes, vectorise, [&](auto row_threads, auto vec, int64_t blocks) {
            decoupled_kd_contiguous_rows_kernel<scalar_t, acc_t, decltype(row_threads)::value,
                                                decltype(vec)::value>
                <<<blocks, kThreads, 0, stream>>>(
                    student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(),
                    class_mask.data_ptr<bool>(), rows, classes, static_cast<acc_t>(alpha),
                    static_cast<acc_t>(beta), temp, grad_data, row_loss.data_ptr<acc_t>());
          });
    } else {
      decoupled_kd_rows_kernel<scalar_t, acc_t>
          <<<(rows + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
              student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(),
              class_mask.data_ptr<bool>(), rows, classes, positions, static_cast<acc_t>(alpha),
              static_cast<acc_t>(beta), temp, grad_data, row_loss.data_ptr<acc_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_finish_sum<acc_t>(row_loss, row_count, temp * temp, loss);
  });
  return {loss, grad};
}

}  // namespace
}  // namespace sokd::cuda

TORCH_LIBRARY_IMPL(sokd, CUDA, m) {
  m.impl("masked_feature_loss", &sokd::cuda::masked_feature_loss);
  m.impl("kd_loss", &sokd::cuda::kd_loss);
  m.impl("decoupled_kd_loss", &sokd::cuda::decoupled_kd_loss);
}
