#pragma once
// Work splitting, lane reductions and the entry steps (dtype dispatch, gradient output, zero
// loss) shared by the CPU loss kernels (csrc/cpu/*_loss_kernel.cpp).
//
// Determinism: work is cut into fixed pieces (a feature plane, a row, a tile of dense rows)
// whose partial sums land in their own slot; the slots are then added in index order. The
// result therefore does not depend on how many threads at::parallel_for uses.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "accumulation.h"
#include "cpu/outputs.h"

namespace sokd::cpu {

// Planes or rows per at::parallel_for task: enough work to amortise the task overhead.
inline constexpr int64_t kGrainElements = 32768;

inline int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_item));
}

template <typename acc_t, typename Combine>
acc_t reduce_lanes(const at::vec::Vectorized<acc_t>& lanes, acc_t initial, Combine combine) {
  acc_t buffer[at::vec::Vectorized<acc_t>::size()];
  lanes.store(buffer);
  acc_t result = initial;
  for (int64_t i = 0; i < at::vec::Vectorized<acc_t>::size(); ++i) result = combine(result, buffer[i]);
  return result;
}

// Walks the rows of dense logits (batch x classes x positions, one row per position) in
// tiles of two vectors of positions, which cover a whole cache line of each class row:
// run_tile(std::integral_constant<int, vectors>{}, image, first, buffer) takes `vectors`
// vectors of positions from `first` on, and run_row(image, position) takes the positions
// left at the end of an image. Each task gets its own buffer of buffer_elements.
template <typename acc_t, typename RunTile, typename RunRow>
void for_each_dense_tile(int64_t batch, int64_t classes, int64_t positions,
                         int64_t buffer_elements, const RunTile& run_tile,
                         const RunRow& run_row) {
  constexpr int64_t vector_size = at::vec::Vectorized<acc_t>::size();
  constexpr int64_t lanes = 2 * vector_size;
  const int64_t tiles_per_image = (positions + lanes - 1) / lanes;
  at::parallel_for(0, batch * tiles_per_image, grain_for(classes * lanes),
                   [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(buffer_elements);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t image = tile / tiles_per_image;
      int64_t first = (tile % tiles_per_image) * lanes;
      const int64_t last = std::min(first + lanes, positions);
      if (last - first == lanes) {
        run_tile(std::integral_constant<int, 2>{}, image, first, buffer.data());
        first += lanes;
      } else if (last - first >= vector_size) {
        run_tile(std::integral_constant<int, 1>{}, image, first, buffer.data());
        first += vector_size;
      }
      for (int64_t p = first; p < last; ++p) run_row(image, p);
    }
  });
}

// The gradient output of a loss kernel for `student`: empty (no elements) without with_grad.
inline at::Tensor empty_grad_like(const at::Tensor& student, bool with_grad) {
  return with_grad ? empty_output_like(student) : at::empty({0}, student.options());
}

// (loss, grad) of a loss whose normaliser is 0: loss 0 and gradient 0, never NaN.
inline std::tuple<at::Tensor, at::Tensor> zero_loss(const at::Tensor& student, at::Tensor grad) {
  grad.zero_();
  return {at::zeros({}, student.options().dtype(accumulation_dtype(student.scalar_type()))),
          grad};
}

// The entry of a loss kernel: run_typed(std::type_identity<scalar_t>{}) computes (loss, grad)
// for the floating dtype `input`; the gradient comes back in the accumulation dtype.
template <typename RunTyped>
std::tuple<at::Tensor, at::Tensor> dispatch_loss(c10::ScalarType input,
                                                 const RunTyped& run_typed) {
  std::tuple<at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input, "sokd_cpu_loss", [&] {
    result = run_typed(std::type_identity<scalar_t>{});
  });
  return with_accumulation_grad(std::move(result), input);
}

}  // namespace sokd::cpu
