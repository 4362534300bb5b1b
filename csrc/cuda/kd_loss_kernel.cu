// CUDA kernel of kd_loss (docs/algorithm.md §5).
// The per-element and per-row math is the shared code of csrc/loss_math.h that the CPU kernels
// also run.
//
// Memory access, which bounds it:
// - N x K logits: a warp per row (a block per row when there are few, long rows). The lanes
//   read the row 16 bytes at a time, keep online softmax statistics, merge them across the
//   warp in a fixed order, and write the gradient in a second pass over the row.
// - Dense N x K x H x W logits: a thread per row; neighbouring threads read neighbouring
//   positions, so each class is read coalesced across the warp.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "accumulation.h"
#include "cuda/reduce.cuh"
#include "cuda/softmax_rows.cuh"
#include "loss_math.h"
#include "op_checks.h"

namespace sokd::cuda {
namespace {

using at::Tensor;

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
  for_my_packs<kRowThreads, kVec>(
      s_row, t_row, classes,
      [&](int64_t, const Pack<scalar_t, kVec>& s, const Pack<scalar_t, kVec>& t) {
        acc_t zs[kVec], zt[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          zs[k] = static_cast<acc_t>(s.value[k]) * inv_temperature;
          zt[k] = static_cast<acc_t>(t.value[k]) * inv_temperature;
        }
        stats.add_pack(zs, zt);
      },
      [&](int64_t, scalar_t s, scalar_t t) {
        stats.add(static_cast<acc_t>(s) * inv_temperature, static_cast<acc_t>(t) * inv_temperature);
      });
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
  write_my_classes<kRowThreads, kVec>(
      s_row, t_row, grad + r * classes, classes, [&](int64_t, scalar_t s, scalar_t t) {
        return static_cast<scalar_t>(
            coef * (MathOps<acc_t>::exp(static_cast<acc_t>(s) * inv_temperature - shift_s) -
                    MathOps<acc_t>::exp(static_cast<acc_t>(t) * inv_temperature - shift_t)));
      });
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
  const auto acc_dtype = accumulation_dtype(student.scalar_type());
  const LogitRows layout = logit_rows(student);
  const auto [batch, classes, positions, rows] = layout;
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
    using acc_t = acc_type<scalar_t>;
    const acc_t temp = static_cast<acc_t>(temperature);
    const auto stream = at::cuda::getCurrentCUDAStream();
    const acc_t* weight_data = weight.has_value() ? weights.data_ptr<acc_t>() : nullptr;
    scalar_t* grad_data = with_grad ? grad.data_ptr<scalar_t>() : nullptr;
    launch_logit_rows(
        layout, student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(), grad_data,
        [&](auto row_threads, auto vec, int64_t blocks) {
          kd_contiguous_rows_kernel<scalar_t, acc_t, decltype(row_threads)::value,
                                    decltype(vec)::value><<<blocks, kThreads, 0, stream>>>(
              student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(), weight_data,
              weight_total.data_ptr<acc_t>(), rows, classes, temp, grad_data,
              weighted_kl.data_ptr<acc_t>());
        },
        [&](int64_t blocks) {
          kd_rows_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
              student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(), weight_data,
              weight_total.data_ptr<acc_t>(), rows, classes, positions, temp, grad_data,
              weighted_kl.data_ptr<acc_t>());
        });
    launch_finish_sum<acc_t>(weighted_kl, weight_total, temp * temp, loss);
  });
  return with_accumulation_grad({loss, grad}, student.scalar_type());
}

}  // namespace
}  // namespace sokd::cuda

TORCH_LIBRARY_IMPL(sokd, CUDA, m) {
  m.impl("kd_loss", &sokd::cuda::kd_loss);
}
