// CUDA kernel of masked_feature_loss (docs/algorithm.md §5).
// The per-element and per-row math is the shared code of csrc/loss_math.h that the CPU kernels
// also run.
//
// Memory access, which bounds it: 16-byte loads and stores, index math once per vector in
// 32 bits whenever the map allows.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "accumulation.h"
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
  const auto acc_dtype = accumulation_dtype(student.scalar_type());
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
    using acc_t = acc_type<scalar_t>;
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
  return with_accumulation_grad({loss, grad}, student.scalar_type());
}

}  // namespace
}  // namespace sokd::cuda

TORCH_LIBRARY_IMPL(sokd, CUDA, m) {
  m.impl("masked_feature_loss", &sokd::cuda::masked_feature_loss);
}
