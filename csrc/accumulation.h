#pragma once
// The accumulation rule of every kernel, CPU and CUDA (docs/algorithm.md §7, Precision):
// float64 accumulates in float64, every other floating type (float32, float16, bfloat16) in
// float32, and a loss comes back in that type. For the floating types the ops accept
// (csrc/op_checks.h) ATen's opmath type is exactly this rule, so both forms below are it.

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <tuple>

namespace sokd {

// The accumulation type of a kernel templated on its input type.
template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// The accumulation (and loss) dtype for input of dtype `input`, for host code that allocates.
inline c10::ScalarType accumulation_dtype(c10::ScalarType input) {
  return at::toOpMathType(input);
}

// A loss op's (loss, grad) with grad in the accumulation dtype, the gradient dtype of every
// backend's loss ops: backward scales it by grad_output and rounds once, to the input's
// dtype. The C++ kernels write 16-bit gradients in the input's dtype, so theirs are widened
// here (already rounded); the Triton kernels write them in float32.
inline std::tuple<at::Tensor, at::Tensor> with_accumulation_grad(
    std::tuple<at::Tensor, at::Tensor> loss_and_grad, c10::ScalarType input) {
  auto& grad = std::get<1>(loss_and_grad);
  const c10::ScalarType dtype = accumulation_dtype(input);
  // Checked first: Tensor::to goes through the dispatcher even when it has nothing to do.
  if (grad.scalar_type() != dtype) grad = grad.to(dtype);
  return loss_and_grad;
}

}  // namespace sokd
