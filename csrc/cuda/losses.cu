// CUDA kernels of the fused losses. The per-element and per-row math is the shared code of
// csrc/loss_math.h that the CPU kernels also run.

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

template <typename scalar_t, typename acc_t>
__global__ void masked_feature_kernel(const scalar_t* student, const scalar_t* teacher,
                                      const acc_t* mask_sq, const acc_t* normaliser,
                                      int64_t numel, int64_t image_size, int64_t plane_size,
                                      scalar_t* grad, acc_t* block_partials) {
  const acc_t z = *normaliser;
  const acc_t grad_scale = z == acc_t(0) ? acc_t(0) : acc_t(2) / z;
  acc_t sum = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t m2 = mask_sq ? mask_sq[(i / image_size) * plane_size + i % plane_size] : acc_t(1);
    acc_t g;
    sum += masked_squared_error<acc_t>(static_cast<acc_t>(student[i]),
                                       static_cast<acc_t>(teacher[i]), m2, grad_scale, g);
    if (grad) grad[i] = static_cast<scalar_t>(g);
  }
  acc_t block_total = block_sum(sum);
  if (threadIdx.x == 0) block_partials[blockIdx.x] = block_total;
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
    masked_feature_kernel<scalar_t, acc_t>
        <<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(),
            mask.has_value() ? mask_sq.data_ptr<acc_t>() : nullptr,
            normaliser.data_ptr<acc_t>(), student.numel(), channels * plane_size, plane_size,
            with_grad ? grad.data_ptr<scalar_t>() : nullptr, partials.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_finish_sum<acc_t>(partials, normaliser, acc_t(1), loss);
  });
  return {loss, grad};
}

// One thread per row. Dense rows (classes H*W apart) are then read coalesced across the warp.
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
    kd_rows_kernel<scalar_t, acc_t>
        <<<(rows + kThreads - 1) / kThreads, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(),
            weight.has_value() ? weights.data_ptr<acc_t>() : nullptr,
            weight_total.data_ptr<acc_t>(), rows, classes, positions, temp,
            with_grad ? grad.data_ptr<scalar_t>() : nullptr, weighted_kl.data_ptr<acc_t>());
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
    decoupled_kd_rows_kernel<scalar_t, acc_t>
        <<<(rows + kThreads - 1) / kThreads, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(),
            class_mask.data_ptr<bool>(), rows, classes, positions, static_cast<acc_t>(alpha),
            static_cast<acc_t>(beta), temp, with_grad ? grad.data_ptr<scalar_t>() : nullptr,
            row_loss.data_ptr<acc_t>());
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
