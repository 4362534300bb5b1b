#pragma once
// Per-element and per-row math of the fused losses (docs/algorithm.md §5), shared by csrc/cpu and
// csrc/cuda. V is the value type: a scalar on CUDA and in CPU tails, a Vectorized lane group
// in the CPU main loops. Each routine returns the loss term and writes the input gradient in
// the same pass, so backward only has to scale it.

#include "math_ops.h"

namespace sokd {

// One logit row read with a stride (dense rows have their classes H*W apart), scaled by
// 1 / temperature. mask_data is the class set of decoupled KD (unused by plain KD).
template <typename scalar_t, typename acc_t>
struct StridedRow {
  const scalar_t* student_data;
  const scalar_t* teacher_data;
  const bool* mask_data;
  scalar_t* grad_data;
  int64_t stride;
  acc_t inv_temperature;
  C10_HOST_DEVICE acc_t student(int64_t j) const {
    return static_cast<acc_t>(student_data[j * stride]) * inv_temperature;
  }
  C10_HOST_DEVICE acc_t teacher(int64_t j) const {
    return static_cast<acc_t>(teacher_data[j * stride]) * inv_temperature;
  }
  C10_HOST_DEVICE acc_t raw_student(int64_t j) const {
    return static_cast<acc_t>(student_data[j * stride]);
  }
  C10_HOST_DEVICE acc_t raw_teacher(int64_t j) const {
    return static_cast<acc_t>(teacher_data[j * stride]);
  }
  C10_HOST_DEVICE bool in_set(int64_t j) const { return mask_data[j * stride]; }
  C10_HOST_DEVICE void store_grad(int64_t j, acc_t value) const {
    grad_data[j * stride] = static_cast<scalar_t>(value);
  }
};

// One element of sum(m^2 (s - t)^2): returns m^2 (s - t)^2 and sets grad to
// grad_scale * m^2 (s - t), where grad_scale = 2 / Z makes it d loss / d s.
template <typename V>
C10_HOST_DEVICE inline V masked_squared_error(V student, V teacher, V mask_sq, V grad_scale,
                                              V& grad) {
  V diff = student - teacher;
  V weighted = mask_sq * diff;
  grad = weighted * grad_scale;
  return weighted * diff;
}

// KL(softmax(z_t) || softmax(z_s)) of one row from its softmax statistics: the sums of
// exp(z - max) and cross = sum_j exp(z_t,j - max_t) * ((z_t,j - max_t) - (z_s,j - max_s)).
// Working relative to the maxima keeps large logits from cancelling.
template <typename V>
C10_HOST_DEVICE inline V kd_row_divergence(V sum_s, V sum_t, V cross) {
  using M = MathOps<V>;
  return cross / sum_t - M::log(sum_t) + M::log(sum_s);
}

// Temperature KD over one row (or, with Vectorized V, over a group of rows side by side).
// Row provides raw_student(j) and raw_teacher(j) as V, its inv_temperature, and
// store_grad(j, V). Writes grad_coef * (p_s - p_t) when with_grad; returns the row's KL.
//
// The shifted logits are (x - max x) / T rather than x / T - max(x / T): the same up to
// rounding, but exactly 0 at the maximum, where a compiler's fused multiply-add of
// x * (1/T) - m is not. With one class that is the whole row, whose KL must be exactly 0.
template <typename V, typename Row>
C10_HOST_DEVICE inline V kd_row(const Row& row, int64_t classes, V grad_coef, bool with_grad) {
  using M = MathOps<V>;
  const V inv_temperature(row.inv_temperature);
  V max_s(M::lowest()), max_t(M::lowest());
  for (int64_t j = 0; j < classes; ++j) {
    max_s = M::max(max_s, row.raw_student(j));
    max_t = M::max(max_t, row.raw_teacher(j));
  }
  V sum_s(0), sum_t(0), cross(0);
  for (int64_t j = 0; j < classes; ++j) {
    V zs = (row.raw_student(j) - max_s) * inv_temperature;
    V zt = (row.raw_teacher(j) - max_t) * inv_temperature;
    V et = M::exp(zt);
    sum_s = sum_s + M::exp(zs);
    sum_t = sum_t + et;
    cross = cross + et * (zt - zs);
  }
  if (with_grad) {
    V log_sum_s = M::log(sum_s);
    V log_sum_t = M::log(sum_t);
    for (int64_t j = 0; j < classes; ++j) {
      V zs = (row.raw_student(j) - max_s) * inv_temperature;
      V zt = (row.raw_teacher(j) - max_t) * inv_temperature;
      row.store_grad(j, grad_coef * (M::exp(zs - log_sum_s) - M::exp(zt - log_sum_t)));
    }
  }
  return kd_row_divergence(sum_s, sum_t, cross);
}

// log(exp(a) + exp(b)) without overflow; either side may be -inf (an empty class set).
// A NaN on either side gives NaN.
template <typename V>
C10_HOST_DEVICE inline V log_add_exp(V a, V b) {
  using M = MathOps<V>;
  const auto a_higher = a > b;
  const V high = M::select(a_higher, a, b);
  const V low = M::select(a_higher, b, a);
  return M::select(low == V(M::lowest()), high, high + M::log(V(1) + M::exp(low - high)));
}

// Decoupled KD over one row with class set G (docs/algorithm.md §5), in three passes over the
// classes. Each step takes one class; with Vectorized V, either a group of classes of one row
// (the lanes are then reduced into scalars) or one class of several rows side by side. `in`
// says which classes are in G.
//   1. DecoupledKdMaxima::add: the maxima of z_s and z_t inside and outside G.
//   2. DecoupledKdMaxima::shift gives z_s and z_t less their set's maximum, and
//      DecoupledKdSums::add sums es = exp(shifted z_s) and et = exp(shifted z_t) per set and
//      adds the cross term of NCKD.
//   3. decoupled_kd_finish turns a row's statistics into its loss and gradient scales, and
//      decoupled_kd_grad gives each class's gradient from its es and et.
// Every log-sum-exp keeps its own maximum, so a class set whose probability underflows still
// gives finite terms.
template <typename V>
struct DecoupledKdMaxima {
  V in_s, out_s, in_t, out_t;

  template <typename Mask>
  C10_HOST_DEVICE void add(const Mask& in, V zs, V zt) {
    using M = MathOps<V>;
    const V none(M::lowest());
    in_s = M::max(in_s, M::select(in, zs, none));
    out_s = M::max(out_s, M::select(in, none, zs));
    in_t = M::max(in_t, M::select(in, zt, none));
    out_t = M::max(out_t, M::select(in, none, zt));
  }

  template <typename Mask>
  C10_HOST_DEVICE void shift(const Mask& in, V zs, V zt, V& shifted_s, V& shifted_t) const {
    using M = MathOps<V>;
    shifted_s = zs - M::select(in, in_s, out_s);
    shifted_t = zt - M::select(in, in_t, out_t);
  }
};

template <typename V>
struct DecoupledKdSums {
  V in_s, out_s, in_t, out_t, cross_out;

  template <typename Mask>
  C10_HOST_DEVICE void add(const Mask& in, V shifted_s, V shifted_t, V es, V et) {
    using M = MathOps<V>;
    const V zero(0);
    in_s = in_s + M::select(in, es, zero);
    out_s = out_s + M::select(in, zero, es);
    in_t = in_t + M::select(in, et, zero);
    out_t = out_t + M::select(in, zero, et);
    cross_out = cross_out + M::select(in, zero, et * (shifted_t - shifted_s));
  }
};

// The gradient of a row is grad_coef * d(row loss)/d z_s = es * in_scale inside G and
// es * out_scale - et * teacher_scale outside it.
template <typename T>
struct DecoupledKdRowResult {
  T loss, in_scale, out_scale, teacher_scale;
};

// alpha * TCKD + beta * NCKD of a row and its gradient scales. has_in and has_out say whether
// G and its complement hold any class: bools for a scalar row, lane masks for Vectorized rows
// side by side. Terms of an empty set are computed and then dropped, never used.
template <typename V, typename Mask>
C10_HOST_DEVICE inline DecoupledKdRowResult<V> decoupled_kd_finish(
    const DecoupledKdMaxima<V>& max, const DecoupledKdSums<V>& sums, const Mask& has_in,
    const Mask& has_out, V alpha, V beta, V grad_coef) {
  using M = MathOps<V>;
  const V none(M::lowest()), zero(0);
  const V lse_in_s = M::select(has_in, max.in_s + M::log(sums.in_s), none);
  const V lse_in_t = M::select(has_in, max.in_t + M::log(sums.in_t), none);
  const V lse_out_s = M::select(has_out, max.out_s + M::log(sums.out_s), none);
  const V lse_out_t = M::select(has_out, max.out_t + M::log(sums.out_t), none);
  const V lse_s = log_add_exp(lse_in_s, lse_out_s);
  const V lse_t = log_add_exp(lse_in_t, lse_out_t);

  // The log-probabilities of G (in) and of its complement (out) under each softmax.
  const V log_s_in = lse_in_s - lse_s, log_s_out = lse_out_s - lse_s;
  const V log_t_in = lse_in_t - lse_t, log_t_out = lse_out_t - lse_t;
  const V p_s_in = M::select(has_in, M::exp(log_s_in), zero);
  const V p_s_out = M::select(has_out, M::exp(log_s_out), zero);
  const V p_t_in = M::select(has_in, M::exp(log_t_in), zero);
  const V p_t_out = M::select(has_out, M::exp(log_t_out), zero);
  const V tckd = M::select(has_in, p_t_in * (log_t_in - log_s_in), zero) +
                 M::select(has_out, p_t_out * (log_t_out - log_s_out), zero);
  const V nckd =
      M::select(has_out, kd_row_divergence(sums.out_s, sums.out_t, sums.cross_out), zero);

  // With q the student's softmax within a class's own set, d(row loss)/d z_s is
  //   q * (-alpha p_t_in (1 - p_s_in) + alpha p_t_out p_s_in)                   in G,
  //   q * (-alpha p_t_out (1 - p_s_out) + beta + alpha p_t_in p_s_out) - beta r  outside,
  // where r is the teacher's softmax outside G, q = es / sum_s and r = et / sum_t of its set.
  // 1 - p comes from expm1, which keeps it exact when one set holds almost all the mass.
  const V rest_in = -M::expm1(log_s_in), rest_out = -M::expm1(log_s_out);
  const V in_scale = grad_coef * alpha * (p_t_out * p_s_in - p_t_in * rest_in) / sums.in_s;
  const V out_scale =
      grad_coef * (beta + alpha * (p_t_in * p_s_out - p_t_out * rest_out)) / sums.out_s;
  const V teacher_scale = grad_coef * beta / sums.out_t;
  return {alpha * tckd + beta * nckd, M::select(has_in, in_scale, zero),
          M::select(has_out, out_scale, zero), M::select(has_out, teacher_scale, zero)};
}

// With Vectorized V, each lane of `row` holds the scales of its own row, or all lanes the same.
template <typename V, typename Mask>
C10_HOST_DEVICE inline V decoupled_kd_grad(const Mask& in, V es, V et,
                                           const DecoupledKdRowResult<V>& row) {
  using M = MathOps<V>;
  return es * M::select(in, row.in_scale, row.out_scale) -
         M::select(in, V(0), et * row.teacher_scale);
}

// Decoupled KD over one row, one class at a time: returns alpha * TCKD + beta * NCKD and,
// when with_grad, writes grad_coef * d(row loss)/d z_s. Row provides student(j), teacher(j)
// (divided by the temperature), in_set(j) and store_grad(j, T).
template <typename T, typename Row>
C10_HOST_DEVICE inline T decoupled_kd_row(const Row& row, int64_t classes, T alpha, T beta,
                                          T grad_coef, bool with_grad) {
  using M = MathOps<T>;
  DecoupledKdMaxima<T> max{M::lowest(), M::lowest(), M::lowest(), M::lowest()};
  bool has_in = false, has_out = false;
  for (int64_t j = 0; j < classes; ++j) {
    const bool in = row.in_set(j);
    has_in |= in;
    has_out |= !in;
    max.add(in, row.student(j), row.teacher(j));
  }
  DecoupledKdSums<T> sums{0, 0, 0, 0, 0};
  T shifted_s, shifted_t;
  for (int64_t j = 0; j < classes; ++j) {
    const bool in = row.in_set(j);
    max.shift(in, row.student(j), row.teacher(j), shifted_s, shifted_t);
    sums.add(in, shifted_s, shifted_t, M::exp(shifted_s), M::exp(shifted_t));
  }
  const DecoupledKdRowResult<T> result =
      decoupled_kd_finish(max, sums, has_in, has_out, alpha, beta, grad_coef);
  if (with_grad) {
    for (int64_t j = 0; j < classes; ++j) {
      const bool in = row.in_set(j);
      max.shift(in, row.student(j), row.teacher(j), shifted_s, shifted_t);
      row.store_grad(j, decoupled_kd_grad(in, M::exp(shifted_s), M::exp(shifted_t), result));
    }
  }
  return result.loss;
}

}  // namespace sokd
