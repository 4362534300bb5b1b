#pragma once
// CPU-only glue that lets the shared templates of csrc/*.h run on Vectorized lane groups.

#include <ATen/cpu/vec/vec.h>

#include "math_ops.h"

namespace sokd {

template <typename T>
struct MathOps<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V exp(const V& x) { return x.exp(); }
  static V log(const V& x) { return x.log(); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
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
