#pragma once
// The few math functions the shared kernels need, behind one traits type so that the same
// templated code runs on scalars (CPU and CUDA) and on at::vec::Vectorized lanes (CPU only;
// csrc/cpu/vec_math.h adds that specialisation).

#include <c10/macros/Macros.h>

#include <cmath>
#include <limits>

namespace sokd {

// select(in, a, b) is a where `in` holds and b elsewhere; `in` is a bool for scalars and a
// lane mask (as from a comparison) for Vectorized lanes.
template <typename T>
struct ScalarCompareOps {
  C10_HOST_DEVICE static T max(T a, T b) { return a > b ? a : b; }
  C10_HOST_DEVICE static T select(bool in, T a, T b) { return in ? a : b; }
  C10_HOST_DEVICE static T lowest() { return -std::numeric_limits<T>::infinity(); }
};

template <typename T>
struct MathOps : ScalarCompareOps<T> {
  C10_HOST_DEVICE static T exp(T x) { return ::exp(x); }
  C10_HOST_DEVICE static T expm1(T x) { return ::expm1(x); }
  C10_HOST_DEVICE static T log(T x) { return ::log(x); }
};

// Calls the float functions by name, so that float math never goes through double.
template <>
struct MathOps<float> : ScalarCompareOps<float> {
  C10_HOST_DEVICE static float exp(float x) { return ::expf(x); }
  C10_HOST_DEVICE static float expm1(float x) { return ::expm1f(x); }
  C10_HOST_DEVICE static float log(float x) { return ::logf(x); }
};

}  // namespace sokd
