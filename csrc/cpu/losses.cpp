// CPU kernels of the fused losses: masked_feature_loss, kd_loss, decoupled_kd_loss.
//
// Determinism: work is cut into fixed pieces (a feature plane, a row, a tile of dense rows)
// whose partial sums land in their own slot; the slots are then added in index order. The
// result therefore does not depend on how many threads at::parallel_for uses.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/outputs.h"
#include "cpu/vec_math.h"
#include "loss_math.h"
#include "op_checks.h"

namespace sokd::cpu {
namespace {

using at::Tensor;
using at::vec::Vectorized;

// Planes or rows per at::parallel_for task: enough work to amortise the task overhead.
constexpr int64_t kGrainElements = 32768;

// How far ahead the streaming loops prefetch their inputs.
constexpr int64_t kPrefetchElements = 256;

int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_item));
}

template <typename acc_t, typename Combine>
acc_t reduce_lanes(const Vectorized<acc_t>& lanes, acc_t initial, Combine combine) {
  acc_t buffer[Vectorized<acc_t>::size()];
  lanes.store(buffer);
  acc_t result = initial;
  for (int64_t i = 0; i < Vectorized<acc_t>::size(); ++i) result = combine(result, buffer[i]);
  return result;
}

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
  using acc_t = at::opmath_type<scalar_t>;
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
  Tensor grad = with_grad ? empty_output_like(student) : at::empty({0}, student.options());
  if (normaliser == acc_t(0)) {
    // An all-zero mask under normalize="mask": loss 0 and gradient 0, never NaN.
    if (with_grad) grad.zero_();
    return {at::zeros({}, student.options().dtype(acc_dtype)), grad};
  }

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
  std::tuple<Tensor, Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(),
                                  "sokd_masked_feature_loss", [&] {
    result = masked_feature_loss_typed<scalar_t>(student.contiguous(), teacher.contiguous(),
                                                 mask, normalize_by_mask, with_grad);
  });
  return result;
}

// kd_row for one contiguous row, vectorised along the classes, with kd_row's shift
// (x - max x) / T. The exponentials of the sum pass are kept in `exps` (2 * classes) so the
// gradient pass needs none of its own.
template <typename scalar_t, typename acc_t>
acc_t kd_contiguous_row(const scalar_t* s, const scalar_t* t, scalar_t* g, int64_t classes,
                        acc_t inv_temperature, acc_t grad_coef, acc_t* exps) {
  using V = Vectorized<acc_t>;
  using M = MathOps<acc_t>;
  const int64_t vector_end = classes - classes % V::size();
  const V inv_lanes(inv_temperature);
  V max_s_lanes(M::lowest()), max_t_lanes(M::lowest());
  for (int64_t j = 0; j < vector_end; j += V::size()) {
    max_s_lanes = at::vec::maximum(max_s_lanes, load_widened<acc_t>(s + j));
    max_t_lanes = at::vec::maximum(max_t_lanes, load_widened<acc_t>(t + j));
  }
  auto take_max = [](acc_t a, acc_t b) { return M::max(a, b); };
  acc_t max_s = reduce_lanes(max_s_lanes, M::lowest(), take_max);
  acc_t max_t = reduce_lanes(max_t_lanes, M::lowest(), take_max);
  for (int64_t j = vector_end; j < classes; ++j) {
    max_s = M::max(max_s, static_cast<acc_t>(s[j]));
    max_t = M::max(max_t, static_cast<acc_t>(t[j]));
  }

  const V max_s_all(max_s), max_t_all(max_t);
  V sum_s_lanes(acc_t(0)), sum_t_lanes(acc_t(0)), cross_lanes(acc_t(0));
  for (int64_t j = 0; j < vector_end; j += V::size()) {
    V zs = (load_widened<acc_t>(s + j) - max_s_all) * inv_lanes;
    V zt = (load_widened<acc_t>(t + j) - max_t_all) * inv_lanes;
    V es = MathOps<V>::exp(zs), et = MathOps<V>::exp(zt);
    es.store(exps + j);
    et.store(exps + classes + j);
    sum_s_lanes = sum_s_lanes + es;
    sum_t_lanes = sum_t_lanes + et;
    cross_lanes = cross_lanes + et * (zt - zs);
  }
  auto add = [](acc_t a, acc_t b) { return a + b; };
  acc_t sum_s = reduce_lanes(sum_s_lanes, acc_t(0), add);
  acc_t sum_t = reduce_lanes(sum_t_lanes, acc_t(0), add);
  acc_t cross = reduce_lanes(cross_lanes, acc_t(0), add);
  for (int64_t j = vector_end; j < classes; ++j) {
    acc_t zs = (static_cast<acc_t>(s[j]) - max_s) * inv_temperature;
    acc_t zt = (static_cast<acc_t>(t[j]) - max_t) * inv_temperature;
    acc_t es = M::exp(zs), et = M::exp(zt);
    exps[j] = es;
    exps[classes + j] = et;
    sum_s += es;
    sum_t += et;
    cross += et * (zt - zs);
  }

  if (g) {
    // grad_coef * (p_s - p_t), with p = exp / sum.
    const acc_t scale_s = grad_coef / sum_s, scale_t = grad_coef / sum_t;
    const V scale_s_all(scale_s), scale_t_all(scale_t);
    for (int64_t j = 0; j < vector_end; j += V::size()) {
      store_narrowed(V::loadu(exps + j) * scale_s_all - V::loadu(exps + classes + j) * scale_t_all,
                     g + j);
    }
    for (int64_t j = vector_end; j < classes; ++j) {
      g[j] = static_cast<scalar_t>(exps[j] * scale_s - exps[classes + j] * scale_t);
    }
  }
  return kd_row_divergence(sum_s, sum_t, cross);
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
  constexpr int64_t vector_size = Vectorized<acc_t>::size();
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

// Dense rows (classes `stride` apart) handled `vectors` * V::size() positions at a time, one
// lane per row. Rows of one image start a multiple of 64 KiB apart at 128x128, so the class
// rows of a tile all fall into one L1 set: each one is read once into `buffer`
// (2 * classes * lanes) and every later pass works there. The exponentials of the sum pass
// replace the logits in the buffer, so the gradient pass needs none of its own.
template <int vectors, typename scalar_t, typename acc_t>
void kd_dense_tile(const scalar_t* s, const scalar_t* t, scalar_t* g, int64_t classes,
                   int64_t stride, acc_t inv_temperature, const acc_t* grad_coef, acc_t* row_kl,
                   acc_t* buffer) {
  using V = Vectorized<acc_t>;
  using M = MathOps<V>;
  constexpr int64_t lanes = vectors * V::size();
  acc_t* student_buffer = buffer;
  acc_t* teacher_buffer = buffer + classes * lanes;
  const V inv_lanes(inv_temperature);
  V max_s[vectors], max_t[vectors];
  for (int u = 0; u < vectors; ++u) max_s[u] = max_t[u] = M::lowest();
  for (int64_t j = 0; j < classes; ++j) {
    for (int u = 0; u < vectors; ++u) {
      const int64_t at = j * lanes + u * V::size();
      V zs = load_widened<acc_t>(s + j * stride + u * V::size()) * inv_lanes;
      V zt = load_widened<acc_t>(t + j * stride + u * V::size()) * inv_lanes;
      zs.store(student_buffer + at);
      zt.store(teacher_buffer + at);
      max_s[u] = M::max(max_s[u], zs);
      max_t[u] = M::max(max_t[u], zt);
    }
  }
  V sum_s[vectors], sum_t[vectors], cross[vectors];
  for (int u = 0; u < vectors; ++u) sum_s[u] = sum_t[u] = cross[u] = V(acc_t(0));
  for (int64_t j = 0; j < classes; ++j) {
    for (int u = 0; u < vectors; ++u) {
      const int64_t at = j * lanes + u * V::size();
      V zs = V::loadu(student_buffer + at) - max_s[u];
      V zt = V::loadu(teacher_buffer + at) - max_t[u];
      V es = MathOps<V>::exp(zs), et = MathOps<V>::exp(zt);
      es.store(student_buffer + at);
      et.store(teacher_buffer + at);
      sum_s[u] = sum_s[u] + es;
      sum_t[u] = sum_t[u] + et;
      cross[u] = cross[u] + et * (zt - zs);
    }
  }
  if (g) {
    // grad_coef * (p_s - p_t), with p = exp / sum.
    V scale_s[vectors], scale_t[vectors];
    for (int u = 0; u < vectors; ++u) {
      const V coef = V::loadu(grad_coef + u * V::size());
      scale_s[u] = coef / sum_s[u];
      scale_t[u] = coef / sum_t[u];
    }
    for (int64_t j = 0; j < classes; ++j) {
      for (int u = 0; u < vectors; ++u) {
        const int64_t at = j * lanes + u * V::size();
        store_narrowed(V::loadu(student_buffer + at) * scale_s[u] -
                           V::loadu(teacher_buffer + at) * scale_t[u],
                       g + j * stride + u * V::size());
      }
    }
  }
  for (int u = 0; u < vectors; ++u) {
    kd_row_divergence(sum_s[u], sum_t[u], cross[u]).store(row_kl + u * V::size());
  }
}

// Row weights in the accumulation type (all ones without a weight) and their ordered sum.
template <typename acc_t>
std::pair<Tensor, acc_t> row_weights(const std::optional<Tensor>& weight, int64_t rows) {
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  if (!weight.has_value()) {
    return {at::ones({rows}, at::TensorOptions().dtype(acc_dtype)), static_cast<acc_t>(rows)};
  }
  Tensor values = weight->to(acc_dtype).reshape({rows}).contiguous();
  const acc_t* data = values.data_ptr<acc_t>();
  acc_t total = 0;
  for (int64_t r = 0; r < rows; ++r) total += data[r];
  return {values, total};
}

template <typename scalar_t>
std::tuple<Tensor, Tensor> kd_loss_typed(const Tensor& student, const Tensor& teacher,
                                         double temperature, const std::optional<Tensor>& weight,
                                         bool with_grad) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t batch = student.size(0), classes = student.size(1);
  const int64_t positions = student.dim() == 4 ? student.size(2) * student.size(3) : 1;
  const int64_t rows = batch * positions;
  const acc_t temp = static_cast<acc_t>(temperature);
  const acc_t inv_temperature = acc_t(1) / temp;

  Tensor weights;
  acc_t weight_total;
  std::tie(weights, weight_total) = row_weights<acc_t>(weight, rows);
  Tensor grad = with_grad ? empty_output_like(student) : at::empty({0}, student.options());
  if (weight_total == acc_t(0)) {
    if (with_grad) grad.zero_();
    return {at::zeros({}, student.options().dtype(acc_dtype)), grad};
  }
  const acc_t* w = weights.data_ptr<acc_t>();
  const scalar_t* s = student.data_ptr<scalar_t>();
  const scalar_t* t = teacher.data_ptr<scalar_t>();
  scalar_t* g = with_grad ? grad.data_ptr<scalar_t>() : nullptr;
  // d loss / d s = T^2 * w_r / sum(w) * (p_s - p_t) / T.
  const acc_t coef_per_weight = temp / weight_total;
  std::vector<acc_t> row_kl(rows);

  if (positions == 1) {
    at::parallel_for(0, rows, grain_for(classes), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> exps(2 * classes);
      for (int64_t r = begin; r < end; ++r) {
        row_kl[r] = kd_contiguous_row<scalar_t, acc_t>(
            s + r * classes, t + r * classes, g ? g + r * classes : nullptr, classes,
            inv_temperature, coef_per_weight * w[r], exps.data());
      }
    });
  } else {
    constexpr int64_t lanes = 2 * V::size();
    auto run_tile = [&](auto vectors, int64_t n, int64_t first, acc_t* buffer) {
      constexpr int count = decltype(vectors)::value;
      const int64_t offset = n * classes * positions + first;
      const int64_t row = n * positions + first;
      acc_t coef[lanes];
      for (int64_t lane = 0; lane < count * V::size(); ++lane) {
        coef[lane] = coef_per_weight * w[row + lane];
      }
      kd_dense_tile<count, scalar_t, acc_t>(s + offset, t + offset, g ? g + offset : nullptr,
                                            classes, positions, inv_temperature, coef,
                                            row_kl.data() + row, buffer);
    };
    auto run_row = [&](int64_t n, int64_t p) {
      const int64_t offset = n * classes * positions + p;
      StridedRow<scalar_t, acc_t> single{s + offset, t + offset, nullptr,
                                         g ? g + offset : nullptr, positions, inv_temperature};
      row_kl[n * positions + p] =
          kd_row<acc_t>(single, classes, coef_per_weight * w[n * positions + p], g != nullptr);
    };
    for_each_dense_tile<acc_t>(batch, classes, positions, 2 * classes * lanes, run_tile,
                               run_row);
  }
  acc_t weighted = 0;
  for (int64_t r = 0; r < rows; ++r) weighted += w[r] * row_kl[r];
  Tensor loss = at::scalar_tensor(temp * temp * weighted / weight_total,
                                  student.options().dtype(acc_dtype));
  return {loss, grad};
}

std::tuple<Tensor, Tensor> kd_loss(const Tensor& student, const Tensor& teacher,
                                   double temperature, const std::optional<Tensor>& weight,
                                   bool with_grad) {
  check_logit_inputs(student, teacher, temperature, c10::DeviceType::CPU);
  check_row_weight(weight, student, c10::DeviceType::CPU);
  std::tuple<Tensor, Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(),
                                  "sokd_kd_loss", [&] {
    result = kd_loss_typed<scalar_t>(student.contiguous(), teacher.contiguous(), temperature,
                                     weight, with_grad);
  });
  return result;
}

// decoupled_kd_row for one contiguous row, vectorised along the classes. `in_lanes` (classes)
// receives the class set as 0/1 values to compare lanes against, and `exps` (2 * classes) the
// exponentials of the sum pass, so the gradient pass needs none of its own.
template <typename scalar_t, typename acc_t>
acc_t decoupled_kd_contiguous_row(const scalar_t* s, const scalar_t* t, const bool* in_set,
                                  scalar_t* g, int64_t classes, acc_t inv_temperature,
                                  acc_t alpha, acc_t beta, acc_t grad_coef, acc_t* exps,
                                  acc_t* in_lanes) {
  using V = Vectorized<acc_t>;
  using M = MathOps<acc_t>;
  const int64_t vector_end = classes - classes % V::size();
  const V inv_lanes(inv_temperature), one(acc_t(1));
  bool has_in = false, has_out = false;
  for (int64_t j = 0; j < classes; ++j) {
    has_in |= in_set[j];
    has_out |= !in_set[j];
    in_lanes[j] = in_set[j] ? acc_t(1) : acc_t(0);
  }
  auto in_at = [&](int64_t j) { return V::loadu(in_lanes + j) == one; };
  auto student_at = [&](int64_t j) { return load_widened<acc_t>(s + j) * inv_lanes; };
  auto teacher_at = [&](int64_t j) { return load_widened<acc_t>(t + j) * inv_lanes; };

  const V none(M::lowest());
  DecoupledKdMaxima<V> max_lanes{none, none, none, none};
  for (int64_t j = 0; j < vector_end; j += V::size()) {
    max_lanes.add(in_at(j), student_at(j), teacher_at(j));
  }
  auto take_max = [](acc_t a, acc_t b) { return M::max(a, b); };
  auto lane_max = [&](const V& lanes) { return reduce_lanes(lanes, M::lowest(), take_max); };
  DecoupledKdMaxima<acc_t> max{lane_max(max_lanes.in_s), lane_max(max_lanes.out_s),
                               lane_max(max_lanes.in_t), lane_max(max_lanes.out_t)};
  for (int64_t j = vector_end; j < classes; ++j) {
    max.add(in_set[j], static_cast<acc_t>(s[j]) * inv_temperature,
            static_cast<acc_t>(t[j]) * inv_temperature);
  }

  const DecoupledKdMaxima<V> max_all{V(max.in_s), V(max.out_s), V(max.in_t), V(max.out_t)};
  const V zero(acc_t(0));
  DecoupledKdSums<V> sum_lanes{zero, zero, zero, zero, zero};
  for (int64_t j = 0; j < vector_end; j += V::size()) {
    const V in = in_at(j);
    V shifted_s, shifted_t;
    max_all.shift(in, student_at(j), teacher_at(j), shifted_s, shifted_t);
    const V es = MathOps<V>::exp(shifted_s), et = MathOps<V>::exp(shifted_t);
    es.store(exps + j);
    et.store(exps + classes + j);
    sum_lanes.add(in, shifted_s, shifted_t, es, et);
  }
  auto add = [](acc_t a, acc_t b) { return a + b; };
  auto lane_sum = [&](const V& lanes) { return reduce_lanes(lanes, acc_t(0), add); };
  DecoupledKdSums<acc_t> sums{lane_sum(sum_lanes.in_s), lane_sum(sum_lanes.out_s),
                              lane_sum(sum_lanes.in_t), lane_sum(sum_lanes.out_t),
                              lane_sum(sum_lanes.cross_out)};
  for (int64_t j = vector_end; j < classes; ++j) {
    acc_t shifted_s, shifted_t;
    max.shift(in_set[j], static_cast<acc_t>(s[j]) * inv_temperature,
              static_cast<acc_t>(t[j]) * inv_temperature, shifted_s, shifted_t);
    exps[j] = M::exp(shifted_s);
    exps[classes + j] = M::exp(shifted_t);
    sums.add(in_set[j], shifted_s, shifted_t, exps[j], exps[classes + j]);
  }

  const DecoupledKdRowResult<acc_t> result =
      decoupled_kd_finish(max, sums, has_in, has_out, alpha, beta, grad_coef);
  if (g) {
    const DecoupledKdRowResult<V> lanes{V(result.loss), V(result.in_scale),
                                        V(result.out_scale), V(result.teacher_scale)};
    for (int64_t j = 0; j < vector_end; j += V::size()) {
      store_narrowed(
          decoupled_kd_grad(in_at(j), V::loadu(exps + j), V::loadu(exps + classes + j), lanes),
          g + j);
    }
    for (int64_t j = vector_end; j < classes; ++j) {
      g[j] = static_cast<scalar_t>(
          decoupled_kd_grad(in_set[j], exps[j], exps[classes + j], result));
    }
  }
  return result.loss;
}

// Dense decoupled KD rows (classes `stride` apart), `vectors` * V::size() positions at a
// time with one lane per row, through a local buffer as in kd_dense_tile: the scaled logits
// (their exponentials after the sum pass) and the class set as 0/1 values, 3 * classes *
// lanes in all. row_loss gets one loss per lane.
template <int vectors, typename scalar_t, typename acc_t>
void decoupled_kd_dense_tile(const scalar_t* s, const scalar_t* t, const bool* in_set,
                             scalar_t* g, int64_t classes, int64_t stride,
                             acc_t inv_temperature, acc_t alpha, acc_t beta, acc_t grad_coef,
                             acc_t* row_loss, acc_t* buffer) {
  using V = Vectorized<acc_t>;
  using M = MathOps<V>;
  constexpr int64_t lanes = vectors * V::size();
  acc_t* student_buffer = buffer;
  acc_t* teacher_buffer = buffer + classes * lanes;
  acc_t* in_buffer = buffer + 2 * classes * lanes;
  const V inv_lanes(inv_temperature), one(acc_t(1)), zero(acc_t(0)), none(M::lowest());
  auto in_at = [&](int64_t at) { return V::loadu(in_buffer + at) == one; };

  DecoupledKdMaxima<V> max[vectors];
  V in_count[vectors];
  for (int u = 0; u < vectors; ++u) {
    max[u] = {none, none, none, none};
    in_count[u] = zero;
  }
  for (int64_t j = 0; j < classes; ++j) {
    for (int u = 0; u < vectors; ++u) {
      const int64_t at = j * lanes + u * V::size();
      const int64_t from = j * stride + u * V::size();
      for (int64_t i = 0; i < V::size(); ++i) in_buffer[at + i] = in_set[from + i] ? 1 : 0;
      const V zs = load_widened<acc_t>(s + from) * inv_lanes;
      const V zt = load_widened<acc_t>(t + from) * inv_lanes;
      zs.store(student_buffer + at);
      zt.store(teacher_buffer + at);
      max[u].add(in_at(at), zs, zt);
      in_count[u] = in_count[u] + V::loadu(in_buffer + at);
    }
  }
  DecoupledKdSums<V> sums[vectors];
  for (int u = 0; u < vectors; ++u) sums[u] = {zero, zero, zero, zero, zero};
  for (int64_t j = 0; j < classes; ++j) {
    for (int u = 0; u < vectors; ++u) {
      const int64_t at = j * lanes + u * V::size();
      const V in = in_at(at);
      V shifted_s, shifted_t;
      max[u].shift(in, V::loadu(student_buffer + at), V::loadu(teacher_buffer + at), shifted_s,
                   shifted_t);
      const V es = M::exp(shifted_s), et = M::exp(shifted_t);
      es.store(student_buffer + at);
      et.store(teacher_buffer + at);
      sums[u].add(in, shifted_s, shifted_t, es, et);
    }
  }

  const V all_classes(static_cast<acc_t>(classes));
  DecoupledKdRowResult<V> scales[vectors];
  for (int u = 0; u < vectors; ++u) {
    scales[u] = decoupled_kd_finish(max[u], sums[u], in_count[u] > zero,
                                    in_count[u] < all_classes, V(alpha), V(beta), V(grad_coef));
    scales[u].loss.store(row_loss + u * V::size());
  }
  if (g) {
    for (int64_t j = 0; j < classes; ++j) {
      for (int u = 0; u < vectors; ++u) {
        const int64_t at = j * lanes + u * V::size();
        store_narrowed(decoupled_kd_grad(in_at(at), V::loadu(student_buffer + at),
                                         V::loadu(teacher_buffer + at), scales[u]),
                       g + j * stride + u * V::size());
      }
    }
  }
}

template <typename scalar_t>
std::tuple<Tensor, Tensor> decoupled_kd_loss_typed(const Tensor& student, const Tensor& teacher,
                                                   const Tensor& class_mask, double alpha,
                                                   double beta, double temperature,
                                                   bool with_grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t batch = student.size(0), classes = student.size(1);
  const int64_t positions = student.dim() == 4 ? student.size(2) * student.size(3) : 1;
  const int64_t rows = batch * positions;
  const acc_t temp = static_cast<acc_t>(temperature);
  const acc_t inv_temperature = acc_t(1) / temp;
  // d loss / d s = T^2 / rows * d(row loss) / d z_s / T.
  const acc_t grad_coef = temp / static_cast<acc_t>(rows);
  const acc_t alpha_acc = static_cast<acc_t>(alpha), beta_acc = static_cast<acc_t>(beta);

  Tensor grad = with_grad ? empty_output_like(student) : at::empty({0}, student.options());
  const scalar_t* s = student.data_ptr<scalar_t>();
  const scalar_t* t = teacher.data_ptr<scalar_t>();
  const bool* in_set = class_mask.data_ptr<bool>();
  scalar_t* g = with_grad ? grad.data_ptr<scalar_t>() : nullptr;
  std::vector<acc_t> row_loss(rows);

  if (positions == 1) {
    at::parallel_for(0, rows, grain_for(classes), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> exps(2 * classes), in_lanes(classes);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t offset = r * classes;
        row_loss[r] = decoupled_kd_contiguous_row<scalar_t, acc_t>(
            s + offset, t + offset, in_set + offset, g ? g + offset : nullptr, classes,
            inv_temperature, alpha_acc, beta_acc, grad_coef, exps.data(), in_lanes.data());
      }
    });
  } else {
    constexpr int64_t lanes = 2 * Vectorized<acc_t>::size();
    auto run_tile = [&](auto vectors, int64_t n, int64_t first, acc_t* buffer) {
      const int64_t offset = n * classes * positions + first;
      decoupled_kd_dense_tile<decltype(vectors)::value, scalar_t, acc_t>(
          s + offset, t + offset, in_set + offset, g ? g + offset : nullptr, classes, positions,
          inv_temperature, alpha_acc, beta_acc, grad_coef,
          row_loss.data() + n * positions + first, buffer);
    };
    auto run_row = [&](int64_t n, int64_t p) {
      const int64_t offset = n * classes * positions + p;
      StridedRow<scalar_t, acc_t> row{s + offset, t + offset, in_set + offset,
                                      g ? g + offset : nullptr, positions, inv_temperature};
      row_loss[n * positions + p] = decoupled_kd_row<acc_t>(row, classes, alpha_acc, beta_acc,
                                                            grad_coef, g != nullptr);
    };
    for_each_dense_tile<acc_t>(batch, classes, positions, 3 * classes * lanes, run_tile,
                               run_row);
  }
  Tensor loss = at::scalar_tensor(temp * temp * ordered_sum(row_loss) / static_cast<acc_t>(rows),
                                  student.options().dtype(acc_dtype));
  return {loss, grad};
}

std::tuple<Tensor, Tensor> decoupled_kd_loss(const Tensor& student, const Tensor& teacher,
                                             const Tensor& class_mask, double alpha, double beta,
                                             double temperature, bool with_grad) {
  check_logit_inputs(student, teacher, temperature, c10::DeviceType::CPU);
  check_class_mask(class_mask, student, c10::DeviceType::CPU);
  TORCH_CHECK(std::isfinite(alpha) && alpha >= 0 && std::isfinite(beta) && beta >= 0,
              "alpha and beta must be finite and >= 0, got ", alpha, " and ", beta);
  std::tuple<Tensor, Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(),
                                  "sokd_decoupled_kd_loss", [&] {
    result = decoupled_kd_loss_typed<scalar_t>(student.contiguous(), teacher.contiguous(),
                                               class_mask.contiguous(), alpha, beta,
                                               temperature, with_grad);
  });
  return result;
}

}  // namespace
}  // namespace sokd::cpu

TORCH_LIBRARY_IMPL(sokd, CPU, m) {
  m.impl("masked_feature_loss", &sokd::cpu::masked_feature_loss);
  m.impl("kd_loss", &sokd::cpu::kd_loss);
  m.impl("decoupled_kd_loss", &sokd::cpu::decoupled_kd_loss);
}
