// CPU kernel of decoupled_kd_loss (docs/algorithm.md §5).
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
  using acc_t = acc_type<scalar_t>;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const auto [batch, classes, positions, rows] = logit_rows(student);
  const acc_t temp = static_cast<acc_t>(temperature);
  const acc_t inv_temperature = acc_t(1) / temp;
  // d loss / d s = T^2 / rows * d(row loss) / d z_s / T.
  const acc_t grad_coef = temp / static_cast<acc_t>(rows);
  const acc_t alpha_acc = static_cast<acc_t>(alpha), beta_acc = static_cast<acc_t>(beta);

  Tensor grad = empty_grad_like(student, with_grad);
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
  check_decoupled_kd_inputs(student, teacher, class_mask, alpha, beta, temperature,
                            c10::DeviceType::CPU);
  return dispatch_loss(student.scalar_type(), [&](auto dtype) {
    return decoupled_kd_loss_typed<typename decltype(dtype)::type>(
        student.contiguous(), teacher.contiguous(), class_mask.contiguous(), alpha, beta,
        temperature, with_grad);
  });
}

}  // namespace
}  // namespace sokd::cpu

TORCH_LIBRARY_IMPL(sokd, CPU, m) {
  m.impl("decoupled_kd_loss", &sokd::cpu::decoupled_kd_loss);
}
