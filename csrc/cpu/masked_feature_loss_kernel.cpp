// CPU kernel of masked_feature_loss (docs/algorithm.md §5).
//
// Determinism: see csrc/cpu/loss_kernels.h.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "accumulation.h"
#include "cpu/loss_kernels.h"
#include "cpu/outputs.h"
#include "cpu/vec_math.h"
#include "loss_math.h"
#include "op_checks.h"

namespace sokd::cpu {
namespace {

using at::Tensor;
using at::vec::Vectorized;

// How far ahead the streaming loop prefetches its inputs.
constexpr int64_t kPrefetchElements = 256;

// Per-position mask^2 in the accumulation type, and its sum (added in index order).
template <typename acc_t>
std::pair<Tensor, acc_t> mask_squared(const Tensor& mask) {
  Tensor squared = mask.to(c10::CppTypeToScalarType<acc_t>::value).square().contiguous();
  const acc_t* data = squared.data_ptr<acc_t>();
  acc_t total = 0;
  for (int64_t i = 0; i < squared.numel(); ++i) total += data[i];
  return {squared, total};
}

template <typename scalar_t>
std::tuple<Tensor, Tensor> masked_feature_loss_typed(const Tensor& student, const Tensor& teacher,
                                                     const std::optional<Tensor>& mask,
                                                     bool normalize_by_mask, bool with_grad) {
  using acc_t = acc_type<scalar_t>;
  using V = Vectorized<acc_t>;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t channels = student.size(1);
  const int64_t plane_size = student.size(2) * student.size(3);
  const int64_t planes = student.size(0) * channels;

  Tensor mask_sq;
  acc_t normaliser = static_cast<acc_t>(student.numel());
  if (mask.has_value()) {
    acc_t mask_total;
    std::tie(mask_sq, mask_total) = mask_squared<acc_t>(*mask);
    if (normalize_by_mask) normaliser = static_cast<acc_t>(channels) * mask_total;
  }
  Tensor grad = empty_grad_like(student, with_grad);
  // An all-zero mask under normalize="mask".
  if (normaliser == acc_t(0)) return zero_loss(student, grad);

  const scalar_t* s = student.data_ptr<scalar_t>();
  const scalar_t* t = teacher.data_ptr<scalar_t>();
  const acc_t* m2 = mask.has_value() ? mask_sq.data_ptr<acc_t>() : nullptr;
  scalar_t* g = with_grad ? grad.data_ptr<scalar_t>() : nullptr;
  const acc_t grad_scale = acc_t(2) / normaliser;
  // A gradient larger than the caches is gone from them before backward reads it: write it
  // with streaming stores. Only whole aligned vectors: large outputs start on a huge page,
  // and planes of a multiple of V::size() keep every vector aligned with no scalar store
  // sharing a cache line with a streamed one (which would flush the line half-written).
  const bool streaming = std::is_same_v<scalar_t, acc_t> && g != nullptr &&
                         is_vector_aligned(g) && plane_size % V::size() == 0 &&
                         grad.nbytes() >= kLargeOutputBytes;
  const int64_t vector_end = plane_size - plane_size % V::size();
  std::vector<acc_t> partials(planes);

  at::parallel_for(0, planes, grain_for(plane_size), [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t offset = plane * plane_size;
      const acc_t* plane_mask = m2 ? m2 + (plane / channels) * plane_size : nullptr;
      V sum_lanes(acc_t(0));
      const V scale_lanes(grad_scale);
      for (int64_t i = 0; i < vector_end; i += V::size()) {
        // Two input streams and an output stream outrun the hardware prefetcher on one core.
        __builtin_prefetch(s + offset + i + kPrefetchElements);
        __builtin_prefetch(t + offset + i + kPrefetchElements);
        V m2_lanes = plane_mask ? V::loadu(plane_mask + i) : V(acc_t(1));
        V grad_lanes;
        sum_lanes = sum_lanes + masked_squared_error(load_widened<acc_t>(s + offset + i),
                                                     load_widened<acc_t>(t + offset + i),
                                                     m2_lanes, scale_lanes, grad_lanes);
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          if (streaming) {
            store_streaming(grad_lanes, g + offset + i);
            continue;
          }
        }
        if (g) store_narrowed(grad_lanes, g + offset + i);
      }
      acc_t sum = reduce_lanes(sum_lanes, acc_t(0), [](acc_t a, acc_t b) { return a + b; });
      for (int64_t i = vector_end; i < plane_size; ++i) {
        acc_t grad_value;
        sum += masked_squared_error(static_cast<acc_t>(s[offset + i]),
                                    static_cast<acc_t>(t[offset + i]),
                                    plane_mask ? plane_mask[i] : acc_t(1), grad_scale,
                                    grad_value);
        if (g) g[offset + i] = static_cast<scalar_t>(grad_value);
      }
      partials[plane] = sum;
    }
    if (streaming) fence_streaming_stores();
  });
  Tensor loss = at::scalar_tensor(ordered_sum(partials) / normaliser,
                                  student.options().dtype(acc_dtype));
  return {loss, grad};
}

std::tuple<Tensor, Tensor> masked_feature_loss(const Tensor& student, const Tensor& teacher,
                                               const std::optional<Tensor>& mask,
                                               bool normalize_by_mask, bool with_grad) {
  check_masked_feature_inputs(student, teacher, mask, c10::DeviceType::CPU);
  return dispatch_loss(student.scalar_type(), [&](auto dtype) {
    return masked_feature_loss_typed<typename decltype(dtype)::type>(
        student.contiguous(), teacher.contiguous(), mask, normalize_by_mask, with_grad);
  });
}

}  // namespace
}  // namespace sokd::cpu

TORCH_LIBRARY_IMPL(sokd, CPU, m) {
  m.impl("masked_feature_loss", &sokd::cpu::masked_feature_loss);
}
