#pragma once
// The accumulation rule of every kernel, CPU and CUDA (docs/algorithm.md §7, Precision):
// float64 accumulates in float64, every other floating type (float32, float16, bfloat16) in
// float32, and a loss comes back in that type. For the floating types the ops accept
// (csrc/op_checks.h) ATen's opmath type is exactly this rule, so both forms below are it.

#include <ATen/OpMathType.h>

namespace sokd {

// The accumulation type of a kernel templated on its input type.
template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// The accumulation (and loss) dtype for input of dtype `input`, for host code that allocates.
inline c10::ScalarType accumulation_dtype(c10::ScalarType input) {
  return at::toOpMathType(input);
}

}  // namespace sokd
