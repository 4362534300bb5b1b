// CPU kernel of kd_loss (docs/algorithm.md §5).
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
  using acc_t = acc_type<scalar_t>;
  using V = Vectorized<acc_t>;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const auto [batch, classes, positions, rows] = logit_rows(student);
  const acc_t temp = static_cast<acc_t>(temperature);
  const acc_t inv_temperature = acc_t(1) / temp;

  Tensor weights;
  acc_t weight_total;
  std::tie(weights, weight_total) = row_weights<acc_t>(weight, rows);
  Tensor grad = empty_grad_like(student, with_grad);
  if (weight_total == acc_t(0)) return zero_loss(student, grad);
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
  return dispatch_loss(student.scalar_type(), [&](auto dtype) {
    return kd_loss_typed<typename decltype(dtype)::type>(student.contiguous(),
                                                         teacher.contiguous(), temperature,
                                                         weight, with_grad);
  });
}

}  // namespace
}  // namespace sokd::cpu

TORCH_LIBRARY_IMPL(sokd, CPU, m) {
  m.impl("kd_loss", &sokd::cpu::kd_loss);
}
