// CUDA kernel of decoupled_kd_loss (docs/algorithm.md §5).
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
  auto gradient = [&](int64_t j, scalar_t s, scalar_t t) {
    const bool in = m_row[j];
    acc_t shifted_s, shifted_t;
    max.shift(in, static_cast<acc_t>(s) * inv_temperature,
              static_cast<acc_t>(t) * inv_temperature, shifted_s, shifted_t);
    return static_cast<scalar_t>(decoupled_kd_grad(in, MathOps<acc_t>::exp(shifted_s),
                                                   MathOps<acc_t>::exp(shifted_t), result));
  };
  write_my_classes<kRowThreads, kVec>(s_row, t_row, grad + r * classes, classes, gradient);
}

std::tuple<Tensor, Tensor> decoupled_kd_loss(const Tensor& student_in, const Tensor& teacher_in,
                                             const Tensor& class_mask_in, double alpha,
                                             double beta, double temperature, bool with_grad) {
  check_decoupled_kd_inputs(student_in, teacher_in, class_mask_in, alpha, beta, temperature,
                            c10::DeviceType::CUDA);
  c10::cuda::CUDAGuard guard(student_in.device());
  const Tensor student = student_in.contiguous(), teacher = teacher_in.contiguous();
  const Tensor class_mask = class_mask_in.contiguous();
  const auto acc_dtype = accumulation_dtype(student.scalar_type());
  const LogitRows layout = logit_rows(student);
  const auto [batch, classes, positions, rows] = layout;
  Tensor grad = with_grad ? at::empty_like(student) : at::empty({0}, student.options());
  Tensor loss = at::empty({}, student.options().dtype(acc_dtype));
  Tensor row_loss = at::empty({rows}, student.options().dtype(acc_dtype));
  Tensor row_count = at::full({}, static_cast<double>(rows), student.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(),
                                  "sokd_decoupled_kd_loss_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t temp = static_cast<acc_t>(temperature);
    const auto stream = at::cuda::getCurrentCUDAStream();
    scalar_t* grad_data = with_grad ? grad.data_ptr<scalar_t>() : nullptr;
    launch_logit_rows(
        layout, student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(), grad_data,
        [&](auto row_threads, auto vec, int64_t blocks) {
          decoupled_kd_contiguous_rows_kernel<scalar_t, acc_t, decltype(row_threads)::value,
                                              decltype(vec)::value>
              <<<blocks, kThreads, 0, stream>>>(
                  student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(),
                  class_mask.data_ptr<bool>(), rows, classes, static_cast<acc_t>(alpha),
                  static_cast<acc_t>(beta), temp, grad_data, row_loss.data_ptr<acc_t>());
        },
        [&](int64_t blocks) {
          decoupled_kd_rows_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
              student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(),
              class_mask.data_ptr<bool>(), rows, classes, positions, static_cast<acc_t>(alpha),
              static_cast<acc_t>(beta), temp, grad_data, row_loss.data_ptr<acc_t>());
        });
    launch_finish_sum<acc_t>(row_loss, row_count, temp * temp, loss);
  });
  return with_accumulation_grad({loss, grad}, student.scalar_type());
}

}  // namespace
}  // namespace sokd::cuda

TORCH_LIBRARY_IMPL(sokd, CUDA, m) {
  m.impl("decoupled_kd_loss", &sokd::cuda::decoupled_kd_loss);
}
