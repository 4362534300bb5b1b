#pragma once
// CPU-only glue that lets the shared templates of csrc/*.h run on Vectorized lane groups.

#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

#include "math_ops.h"

namespace sokd {

template <typename T>
struct MathOps<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  // For float, PyTorch's inlined exp_u20: within 3e-7 relative of exp over the range the
  // softmax sums use, at 1.6 times the speed of the Sleef call; exp_u20 turns NaN into +inf,
  // so NaN lanes are put back.
  static V exp(const V& x) {
    if constexpr (std::is_same_v<T, float>) {
      return V::blendv(x.exp_u20(), x, x.isnan());
    } else {
      return x.exp();
    }
  }
  static V expm1(const V& x) { return x.expm1(); }
  static V log(const V& x) { return x.log(); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static V select(const V& in, const V& a, const V& b) { return V::blendv(b, a, in); }
  static V lowest() { return V(-std::numeric_limits<T>::infinity()); }
};

namespace cpu {

// V::size() consecutive elements of any floating dtype, widened to the accumulation type.
template <typename acc_t, typename scalar_t>
inline at::vec::Vectorized<acc_t> load_widened(const scalar_t* source) {
  using V = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return V::loadu(source);
  } else {
    acc_t buffer[V::size()];
    for (int64_t i = 0; i < V::size(); ++i) buffer[i] = static_cast<acc_t>(source[i]);
    return V::loadu(buffer);
  }
}

template <typename acc_t, typename scalar_t>
inline void store_narrowed(const at::vec::Vectorized<acc_t>& value, scalar_t* target) {
  using V = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    value.store(target);
  } else {
    acc_t buffer[V::size()];
    value.store(buffer);
    for (int64_t i = 0; i < V::size(); ++i) target[i] = static_cast<scalar_t>(buffer[i]);
  }
}

// A store of one vector that skips the read for ownership a normal store makes of its cache
// line: writing a buffer much larger than the caches then moves each byte once instead of
// twice. Only full, vector-aligned float or double vectors; the portable build stores normally.
// The caller issues a store fence before other threads read the buffer.
template <typename acc_t>
inline void store_streaming(const at::vec::Vectorized<acc_t>& value, acc_t* target) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    _mm256_stream_ps(target, value);
  } else if constexpr (std::is_same_v<acc_t, double>) {
    _mm256_stream_pd(target, value);
  } else {
    value.store(target);
  }
#else
  value.store(target);
#endif
}

inline void fence_streaming_stores() {
#if defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// True when `data` is aligned for store_streaming.
template <typename T>
inline bool is_vector_aligned(const T* data) {
  return reinterpret_cast<uintptr_t>(data) % (at::vec::Vectorized<T>::size() * sizeof(T)) == 0;
}

// Sum of the partial results in index order, so the total does not depend on how
// at::parallel_for split the work between threads.
template <typename acc_t>
inline acc_t ordered_sum(const std::vector<acc_t>& partials) {
  acc_t total = 0;
  for (acc_t value : partials) total += value;
  return total;
}

}  // namespace cpu
}  // namespace sokd
