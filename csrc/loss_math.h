#pragma once
// Per-element and per-row math of the fused losses (SPEC section 5), shared by csrc/cpu and
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
// Row provides student(j) and teacher(j) as V, already divided by the temperature, and
// store_grad(j, V). Writes grad_coef * (p_s - p_t) when with_grad; returns the row's KL.
template <typename V, typename Row>
C10_HOST_DEVICE inline V kd_row(const Row& row, int64_t classes, V grad_coef, bool with_grad) {
  using M = MathOps<V>;
  V max_s(M::lowest()), max_t(M::lowest());
  for (int64_t j = 0; j < classes; ++j) {
    max_s = M::max(max_s, row.student(j));
    max_t = M::max(max_t, row.teacher(j));
  }
  V sum_s(0), sum_t(0), cross(0);
  for (int64_t j = 0; j < classes; ++j) {
    V zs = row.student(j) - max_s, zt = row.teacher(j) - max_t;
    V et = M::exp(zt);
    sum_s = sum_s + M::exp(zs);
    sum_t = sum_t + et;
    cross = cross + et * (zt - zs);
  }
  if (with_grad) {
    V shift_s = max_s + M::log(sum_s);
    V shift_t = max_t + M::log(sum_t);
    for (int64_t j = 0; j < classes; ++j) {
      row.store_grad(j, grad_coef * (M::exp(row.student(j) - shift_s) -
                                     M::exp(row.teacher(j) - shift_t)));
    }
  }
  return kd_row_divergence(sum_s, sum_t, cross);
}

// log(exp(a) + exp(b)) without overflow; either side may be -inf (an empty class set).
template <typename T>
C10_HOST_DEVICE inline T log_add_exp(T a, T b) {
  using M = MathOps<T>;
  T high = a > b ? a : b;
  T low = a > b ? b : a;
  if (low == M::lowest()) return high;
  return high + M::log(T(1) + M::exp(low - high));
}

// Decoupled KD over one row with class set G (SPEC section 5): returns
// alpha * TCKD + beta * NCKD and, when with_grad, writes grad_coef * d(row loss)/d z_s.
// Row provides student(j), teacher(j) (divided by the temperature), in_set(j) and
// store_grad(j, T). Every log-sum-exp keeps its own maximum, so a class set whose
// probability underflows still gives finite terms.
template <typename T, typename Row>
C10_HOST_DEVICE inline T decoupled_kd_row(const Row& row, int64_t classes, T alpha, T beta,
                                          T grad_coef, bool with_grad) {
  using M = MathOps<T>;
  const T none = M::lowest();
  T max_in_s = none, max_out_s = none, max_in_t = none, max_out_t = none;
  for (int64_t j = 0; j < classes; ++j) {
    T zs = row.student(j), zt = row.teacher(j);
    if (row.in_set(j)) {
      max_in_s = M::max(max_in_s, zs);
      max_in_t = M::max(max_in_t, zt);
    } else {
      max_out_s = M::max(max_out_s, zs);
      max_out_t = M::max(max_out_t, zt);
    }
  }
  T sum_in_s = 0, sum_out_s = 0, sum_in_t = 0, sum_out_t = 0, cross_out = 0;
  bool has_in = false, has_out = false;
  for (int64_t j = 0; j < classes; ++j) {
    T zs = row.student(j), zt = row.teacher(j);
    if (row.in_set(j)) {
      has_in = true;
      sum_in_s += M::exp(zs - max_in_s);
      sum_in_t += M::exp(zt - max_in_t);
    } else {
      has_out = true;
      T et = M::exp(zt - max_out_t);
      sum_out_s += M::exp(zs - max_out_s);
      sum_out_t += et;
      cross_out += et * ((zt - max_out_t) - (zs - max_out_s));
    }
  }
  T lse_in_s = has_in ? max_in_s + M::log(sum_in_s) : none;
  T lse_in_t = has_in ? max_in_t + M::log(sum_in_t) : none;
  T lse_out_s = has_out ? max_out_s + M::log(sum_out_s) : none;
  T lse_out_t = has_out ? max_out_t + M::log(sum_out_t) : none;
  T lse_s = log_add_exp(lse_in_s, lse_out_s);
  T lse_t = log_add_exp(lse_in_t, lse_out_t);

  T tckd = 0, nckd = 0, p_t_in = 0, p_t_out = 0;
  if (has_in) {
    T log_t = lse_in_t - lse_t;
    p_t_in = M::exp(log_t);
    tckd += p_t_in * (log_t - (lse_in_s - lse_s));
  }
  if (has_out) {
    T log_t = lse_out_t - lse_t;
    p_t_out = M::exp(log_t);
    tckd += p_t_out * (log_t - (lse_out_s - lse_s));
    nckd = kd_row_divergence(sum_out_s, sum_out_t, cross_out);
  }

  if (with_grad) {
    for (int64_t j = 0; j < classes; ++j) {
      T zs = row.student(j);
      T p_s = M::exp(zs - lse_s);
      T grad;
      if (row.in_set(j)) {
        grad = -alpha * p_t_in * (M::exp(zs - lse_in_s) - p_s);
        if (has_out) grad += alpha * p_t_out * p_s;
      } else {
        T q_s = M::exp(zs - lse_out_s);
        grad = -alpha * p_t_out * (q_s - p_s) + beta * (q_s - M::exp(row.teacher(j) - lse_out_t));
        if (has_in) grad += alpha * p_t_in * p_s;
      }
      row.store_grad(j, grad_coef * grad);
    }
  }
  return alpha * tckd + beta * nckd;
}

}  // namespace sokd
