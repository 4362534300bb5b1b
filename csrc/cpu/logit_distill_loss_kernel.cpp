// CPU kernel of sokd::logit_distill_loss (docs/algorithm.md §7): per row, the forward KL,
// reverse KL or generalised JSD between P = softmax(z_t / T) and Q = softmax(z_s / T), or
// between their (k + 1)-way bucket distributions for a top-k teacher, and d loss / d z_s in
// the same pass.
//
// Every divergence has the gradient G_m - Q_m * sum(G) in the scaled logits u = z_s / T, where
// G_m = Q_m * dD/dQ_m (§7): forward KL G = -P, reverse KL G = Q (log Q - log P + 1),
// JSD G = (1 - beta) Q (log Q - log M).
//
// One row at a time, vectorised along the vocabulary: a row of 32000 float32 logits of both
// models (256 KiB) plus its local buffer stays in L2 between the passes. Rows run in parallel
// (at::parallel_for); their losses are added in row order, so the result does not depend on
// the number of threads.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "accumulation.h"
#include "cpu/loss_kernels.h"
#include "cpu/outputs.h"
#include "cpu/vec_math.h"

namespace sokd::cpu {
namespace {

using at::Tensor;
using at::vec::Vectorized;

enum class Divergence { kForwardKl, kReverseKl, kJsd };
enum class Reduction { kNone, kMean, kSum };

// The option named `value` among `options` (listed in the order the error names them); any
// other name raises, naming `what` and every option.
template <typename Option, size_t kCount>
Option parse_option(c10::string_view value, const char* what,
                    const std::pair<c10::string_view, Option> (&options)[kCount]) {
  for (const auto& [name, option] : options) {
    if (value == name) return option;
  }
  std::string listed;
  for (size_t i = 0; i < kCount; ++i) {
    listed += i == 0 ? "'" : i + 1 == kCount ? " or '" : ", '";
    listed += std::string(options[i].first) + "'";
  }
  TORCH_CHECK(false, what, " must be ", listed, ", got '", std::string(value), "'");
}

Divergence parse_divergence(c10::string_view name) {
  return parse_option<Divergence>(name, "divergence", {{"forward_kl", Divergence::kForwardKl},
                                                       {"reverse_kl", Divergence::kReverseKl},
                                                       {"jsd", Divergence::kJsd}});
}

Reduction parse_reduction(c10::string_view name) {
  return parse_option<Reduction>(name, "reduction", {{"mean", Reduction::kMean},
                                                     {"sum", Reduction::kSum},
                                                     {"none", Reduction::kNone}});
}

template <typename acc_t>
acc_t lane_sum(const Vectorized<acc_t>& lanes) {
  return reduce_lanes(lanes, acc_t(0), [](acc_t a, acc_t b) { return a + b; });
}

template <typename acc_t>
acc_t lane_max(const Vectorized<acc_t>& lanes) {
  return reduce_lanes(lanes, -std::numeric_limits<acc_t>::infinity(),
                      [](acc_t a, acc_t b) { return std::max(a, b); });
}

// x * (log x - log y), 0 where x = 0 (so a masked entry, log x = -inf, adds nothing).
template <typename V>
V x_log_ratio_lanes(const V& x, const V& log_x, const V& log_y) {
  return MathOps<V>::select(x > V(0), x * (log_x - log_y), V(0));
}

template <typename T>
T x_log_ratio(T x, T log_x, T log_y) {
  return x > T(0) ? x * (log_x - log_y) : T(0);
}

// The divergence term of one bucket (or vocabulary entry), and its G = Q dD/dQ.
template <typename T>
T bucket_term(Divergence divergence, T beta, T p, T log_p, T q, T log_q, T& g) {
  switch (divergence) {
    case Divergence::kForwardKl:
      g = -p;
      return x_log_ratio(p, log_p, log_q);
    case Divergence::kReverseKl: {
      const T term = x_log_ratio(q, log_q, log_p);
      g = term + q;
      return term;
    }
    case Divergence::kJsd: {
      const T log_m = std::log(beta * p + (T(1) - beta) * q);
      const T student_side = x_log_ratio(q, log_q, log_m);
      g = (T(1) - beta) * student_side;
      return beta * x_log_ratio(p, log_p, log_m) + (T(1) - beta) * student_side;
    }
  }
  return T(0);
}

// dD/dQ of the tail bucket, 0 when the student leaves no tail (the clamp in §7 holds it).
template <typename T>
T tail_slope(Divergence divergence, T beta, T p, T log_p, T q, T log_q) {
  if (!(q > T(0))) return T(0);
  switch (divergence) {
    case Divergence::kForwardKl:
      return -p / q;
    case Divergence::kReverseKl:
      return log_q - log_p + T(1);
    case Divergence::kJsd:
      return (T(1) - beta) * (log_q - std::log(beta * p + (T(1) - beta) * q));
  }
  return T(0);
}

template <typename scalar_t, typename acc_t>
struct RowSpec {
  int64_t vocab;        // columns used
  acc_t inv_temperature;
  acc_t grad_coef;      // d loss / d row loss, divided by T
  Divergence divergence;
  acc_t beta;
};

// Maximum of logits * inv_temperature over the first `vocab` columns.
template <typename scalar_t, typename acc_t>
acc_t scaled_max(const scalar_t* x, int64_t vocab, acc_t inv_temperature) {
  using V = Vectorized<acc_t>;
  const int64_t vector_end = vocab - vocab % V::size();
  V lanes(-std::numeric_limits<acc_t>::infinity());
  for (int64_t j = 0; j < vector_end; j += V::size()) {
    lanes = at::vec::maximum(lanes, load_widened<acc_t>(x + j));
  }
  acc_t result = lane_max(lanes);
  for (int64_t j = vector_end; j < vocab; ++j) result = std::max(result, acc_t(x[j]));
  // Multiplying after the maximum is the same for T > 0 and saves a multiply per element.
  return result * inv_temperature;
}

// A dense row against full teacher logits. `buffer` holds 2 * vocab acc_t.
template <typename scalar_t, typename acc_t>
acc_t dense_row(const scalar_t* s, const scalar_t* t, scalar_t* g,
                const RowSpec<scalar_t, acc_t>& spec, acc_t* buffer) {
  using V = Vectorized<acc_t>;
  using M = MathOps<V>;
  const int64_t vocab = spec.vocab;
  const int64_t vector_end = vocab - vocab % V::size();
  acc_t* first = buffer;
  acc_t* second = buffer + vocab;
  const acc_t inv = spec.inv_temperature;
  const V inv_lanes(inv), zero(acc_t(0));
  const acc_t max_s = scaled_max<scalar_t, acc_t>(s, vocab, inv);
  const acc_t max_t = scaled_max<scalar_t, acc_t>(t, vocab, inv);
  const V max_s_all(max_s), max_t_all(max_t);
  auto shifted = [&](const scalar_t* x, int64_t j, const V& max_all) {
    return load_widened<acc_t>(x + j) * inv_lanes - max_all;
  };

  // Sum pass: sums of exponentials, and what the gradient pass needs per entry.
  //   forward KL: buffer = (e_s, e_t); cross = sum e_t (z_t - z_s)
  //   reverse KL: buffer = (e_s, z_s - z_t); cross = sum e_s (z_s - z_t)
  //   JSD:        buffer = (z_s, z_t), shifted logits for the term pass
  const Divergence divergence = spec.divergence;
  V sum_s_lanes(zero), sum_t_lanes(zero), cross_lanes(zero);
  for (int64_t j = 0; j < vector_end; j += V::size()) {
    const V zs = shifted(s, j, max_s_all), zt = shifted(t, j, max_t_all);
    const V es = M::exp(zs), et = M::exp(zt);
    sum_s_lanes = sum_s_lanes + es;
    sum_t_lanes = sum_t_lanes + et;
    if (divergence == Divergence::kForwardKl) {
      cross_lanes = cross_lanes + x_log_ratio_lanes(et, zt, zs);
      es.store(first + j);
      et.store(second + j);
    } else if (divergence == Divergence::kReverseKl) {
      cross_lanes = cross_lanes + x_log_ratio_lanes(es, zs, zt);
      es.store(first + j);
      (zs - zt).store(second + j);
    } else {
      zs.store(first + j);
      zt.store(second + j);
    }
  }
  acc_t sum_s = lane_sum(sum_s_lanes), sum_t = lane_sum(sum_t_lanes);
  acc_t cross = lane_sum(cross_lanes);
  for (int64_t j = vector_end; j < vocab; ++j) {
    const acc_t zs = acc_t(s[j]) * inv - max_s, zt = acc_t(t[j]) * inv - max_t;
    const acc_t es = std::exp(zs), et = std::exp(zt);
    sum_s += es;
    sum_t += et;
    if (divergence == Divergence::kForwardKl) {
      cross += x_log_ratio(et, zt, zs);
      first[j] = es;
      second[j] = et;
    } else if (divergence == Divergence::kReverseKl) {
      cross += x_log_ratio(es, zs, zt);
      first[j] = es;
      second[j] = zs - zt;
    } else {
      first[j] = zs;
      second[j] = zt;
    }
  }
  const acc_t log_sum_s = std::log(sum_s), log_sum_t = std::log(sum_t);
  const acc_t coef = spec.grad_coef;

  if (divergence == Divergence::kForwardKl) {
    // KL(P || Q) = cross / sum_t - log sum_t + log sum_s; gradient coef (Q - P).
    if (g) {
      const V scale_s(coef / sum_s), scale_t(coef / sum_t);
      for (int64_t j = 0; j < vector_end; j += V::size()) {
        store_narrowed(V::loadu(first + j) * scale_s - V::loadu(second + j) * scale_t, g + j);
      }
      for (int64_t j = vector_end; j < vocab; ++j) {
        g[j] = static_cast<scalar_t>(first[j] * (coef / sum_s) - second[j] * (coef / sum_t));
      }
    }
    return cross / sum_t - log_sum_t + log_sum_s;
  }
  if (divergence == Divergence::kReverseKl) {
    // KL(Q || P) = cross / sum_s - log sum_s + log sum_t; gradient coef Q (log Q/P - KL).
    const acc_t loss = cross / sum_s - log_sum_s + log_sum_t;
    if (g) {
      const acc_t offset = log_sum_t - log_sum_s - loss;
      const V scale(coef / sum_s), offset_all(offset);
      for (int64_t j = 0; j < vector_end; j += V::size()) {
        const V es = V::loadu(first + j);
        const V value = M::select(es > zero, es * scale * (V::loadu(second + j) + offset_all),
                                  zero);
        store_narrowed(value, g + j);
      }
      for (int64_t j = vector_end; j < vocab; ++j) {
        const acc_t es = first[j];
        g[j] = static_cast<scalar_t>(es > 0 ? es * (coef / sum_s) * (second[j] + offset) : 0);
      }
    }
    return loss;
  }

  // JSD term pass: log P, log Q from the shifted logits, then P, Q and log M per entry. The
  // buffer then holds (G, Q) for the gradient pass.
  const acc_t beta = spec.beta;
  const V beta_all(beta), rest_all(acc_t(1) - beta);
  const V log_sum_s_all(log_sum_s), log_sum_t_all(log_sum_t);
  V loss_lanes(zero), g_total_lanes(zero);
  for (int64_t j = 0; j < vector_end; j += V::size()) {
    const V log_q = V::loadu(first + j) - log_sum_s_all;
    const V log_p = V::loadu(second + j) - log_sum_t_all;
    const V q = M::exp(log_q), p = M::exp(log_p);
    const V log_m = (beta_all * p + rest_all * q).log();
    const V student_side = x_log_ratio_lanes(q, log_q, log_m);
    const V g_lanes = rest_all * student_side;
    loss_lanes = loss_lanes + beta_all * x_log_ratio_lanes(p, log_p, log_m) + g_lanes;
    g_total_lanes = g_total_lanes + g_lanes;
    g_lanes.store(first + j);
    q.store(second + j);
  }
  acc_t loss = lane_sum(loss_lanes), g_total = lane_sum(g_total_lanes);
  for (int64_t j = vector_end; j < vocab; ++j) {
    const acc_t log_q = first[j] - log_sum_s, log_p = second[j] - log_sum_t;
    acc_t g_value;
    loss += bucket_term(Divergence::kJsd, beta, std::exp(log_p), log_p, std::exp(log_q), log_q,
                        g_value);
    g_total += g_value;
    first[j] = g_value;
    second[j] = std::exp(log_q);
  }
  if (g) {
    const V coef_all(coef), g_total_all(g_total);
    for (int64_t j = 0; j < vector_end; j += V::size()) {
      store_narrowed(coef_all * (V::loadu(first + j) - V::loadu(second + j) * g_total_all), g + j);
    }
    for (int64_t j = vector_end; j < vocab; ++j) {
      g[j] = static_cast<scalar_t>(coef * (first[j] - second[j] * g_total));
    }
  }
  return loss;
}

// A row against a top-k teacher: (k + 1) buckets, the k ids and the tail. `buffer` holds
// vocab acc_t (the student's exponentials).
template <typename scalar_t, typename acc_t>
acc_t topk_row(const scalar_t* s, const acc_t* logprobs, const int64_t* ids, int64_t k,
               scalar_t* g, const RowSpec<scalar_t, acc_t>& spec, acc_t* buffer) {
  using V = Vectorized<acc_t>;
  using M = MathOps<V>;
  const int64_t vocab = spec.vocab;
  const int64_t vector_end = vocab - vocab % V::size();
  const acc_t inv = spec.inv_temperature;
  const V inv_lanes(inv);
  const acc_t max_s = scaled_max<scalar_t, acc_t>(s, vocab, inv);
  const V max_all(max_s);
  V sum_lanes(acc_t(0));
  for (int64_t j = 0; j < vector_end; j += V::size()) {
    const V es = M::exp(load_widened<acc_t>(s + j) * inv_lanes - max_all);
    sum_lanes = sum_lanes + es;
    es.store(buffer + j);
  }
  acc_t sum_s = lane_sum(sum_lanes);
  for (int64_t j = vector_end; j < vocab; ++j) {
    buffer[j] = std::exp(acc_t(s[j]) * inv - max_s);
    sum_s += buffer[j];
  }
  const acc_t log_sum_s = std::log(sum_s);

  // The k buckets: log Q_i from the log-softmax, then the tails left by each side.
  const Divergence divergence = spec.divergence;
  const acc_t beta = spec.beta;
  acc_t loss = 0, g_total = 0, q_sum = 0, p_sum = 0;
  for (int64_t i = 0; i < k; ++i) {
    const acc_t log_q = acc_t(s[ids[i]]) * inv - max_s - log_sum_s;
    const acc_t q = std::exp(log_q), p = std::exp(logprobs[i]);
    q_sum += q;
    p_sum += p;
    acc_t g_value;
    loss += bucket_term(divergence, beta, p, logprobs[i], q, log_q, g_value);
    g_total += g_value;
  }
  const acc_t p_tail = std::max(acc_t(1) - p_sum, acc_t(0));
  const acc_t q_tail = std::max(acc_t(1) - q_sum, acc_t(0));
  const acc_t log_p_tail = std::log(p_tail), log_q_tail = std::log(q_tail);
  acc_t unused;
  loss += bucket_term(divergence, beta, p_tail, log_p_tail, q_tail, log_q_tail, unused);

  if (g) {
    // Outside the ids: coef Q_m (a_tail * sum(Q_ids) - sum(G)); at id i:
    // coef (G_i - Q_i (sum(G) + a_tail (1 - sum(Q_ids)))), with a_tail = dD/dQ_tail (§7).
    const acc_t a_tail = tail_slope(divergence, beta, p_tail, log_p_tail, q_tail, log_q_tail);
    const acc_t coef = spec.grad_coef;
    const acc_t outside = coef * (a_tail * q_sum - g_total) / sum_s;
    const V outside_all(outside);
    for (int64_t j = 0; j < vector_end; j += V::size()) {
      store_narrowed(V::loadu(buffer + j) * outside_all, g + j);
    }
    for (int64_t j = vector_end; j < vocab; ++j) g[j] = static_cast<scalar_t>(buffer[j] * outside);
    const acc_t shared = g_total + a_tail * (acc_t(1) - q_sum);
    for (int64_t i = 0; i < k; ++i) {
      const acc_t log_q = acc_t(s[ids[i]]) * inv - max_s - log_sum_s;
      const acc_t q = std::exp(log_q), p = std::exp(logprobs[i]);
      acc_t g_value;
      bucket_term(divergence, beta, p, logprobs[i], q, log_q, g_value);
      g[ids[i]] = static_cast<scalar_t>(coef * (g_value - q * shared));
    }
  }
  return loss;
}

template <typename scalar_t>
std::tuple<Tensor, Tensor> logit_distill_typed(
    const Tensor& student, const std::optional<Tensor>& teacher,
    const std::optional<Tensor>& logprobs, const std::optional<Tensor>& indices,
    const std::optional<Tensor>& labels, Divergence divergence, double beta, double temperature,
    int64_t ignore_index, Reduction reduction, const std::optional<Tensor>& num_items,
    int64_t vocab, bool with_grad) {
  using acc_t = acc_type<scalar_t>;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t rows = student.size(0), width = student.size(1);
  const bool topk = logprobs.has_value();
  const int64_t k = topk ? logprobs->size(1) : 0;

  const int64_t* label_data = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  auto counted = [&](int64_t r) { return label_data == nullptr || label_data[r] != ignore_index; };
  int64_t count = 0;
  for (int64_t r = 0; r < rows; ++r) count += counted(r);

  // d loss / d row loss: 1 / (num_items or the counted rows) for "mean", else 1.
  acc_t scale = 1;
  if (reduction == Reduction::kMean) {
    const double denominator =
        num_items.has_value() ? num_items->item<double>() : static_cast<double>(count);
    scale = denominator == 0 ? acc_t(0) : static_cast<acc_t>(1.0 / denominator);
  }
  const RowSpec<scalar_t, acc_t> spec{vocab,
                                      static_cast<acc_t>(1.0 / temperature),
                                      static_cast<acc_t>(scale / temperature),
                                      divergence,
                                      static_cast<acc_t>(beta)};

  Tensor grad = empty_grad_like(student, with_grad);
  const scalar_t* s = student.data_ptr<scalar_t>();
  const int64_t s_stride = student.stride(0);
  const scalar_t* t = topk ? nullptr : teacher->data_ptr<scalar_t>();
  const int64_t t_stride = topk ? 0 : teacher->stride(0);
  const acc_t* lp = topk ? logprobs->data_ptr<acc_t>() : nullptr;
  const int64_t* ids = topk ? indices->data_ptr<int64_t>() : nullptr;
  scalar_t* g = with_grad ? grad.data_ptr<scalar_t>() : nullptr;
  std::vector<acc_t> row_loss(rows, acc_t(0));

  at::parallel_for(0, rows, grain_for(vocab), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer((topk ? 1 : 2) * vocab);
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* g_row = g ? g + r * width : nullptr;
      if (!counted(r) || (scale == acc_t(0) && reduction == Reduction::kMean)) {
        if (g_row) std::memset(static_cast<void*>(g_row), 0, width * sizeof(scalar_t));
        continue;
      }
      row_loss[r] = topk ? topk_row<scalar_t, acc_t>(s + r * s_stride, lp + r * k, ids + r * k,
                                                     k, g_row, spec, buffer.data())
                         : dense_row<scalar_t, acc_t>(s + r * s_stride, t + r * t_stride, g_row,
                                                      spec, buffer.data());
      if (g_row && width > vocab) {
        std::memset(static_cast<void*>(g_row + vocab), 0, (width - vocab) * sizeof(scalar_t));
      }
    }
  });

  if (reduction == Reduction::kNone) {
    Tensor loss = at::empty({rows}, student.options().dtype(acc_dtype));
    std::copy(row_loss.begin(), row_loss.end(), loss.data_ptr<acc_t>());
    return {loss, grad};
  }
  return {at::scalar_tensor(ordered_sum(row_loss) * scale, student.options().dtype(acc_dtype)),
          grad};
}

std::tuple<Tensor, Tensor> logit_distill_loss_kernel(
    const Tensor& student_logits, const std::optional<Tensor>& teacher_logits,
    const std::optional<Tensor>& teacher_logprobs, const std::optional<Tensor>& teacher_indices,
    const std::optional<Tensor>& labels, c10::string_view divergence, double beta,
    double temperature, int64_t ignore_index, c10::string_view reduction,
    const std::optional<Tensor>& num_items, int64_t vocab_size, bool with_grad) {
  TORCH_CHECK(student_logits.dim() == 2, "student_logits must be N x V, got shape ",
              student_logits.sizes());
  const int64_t rows = student_logits.size(0);
  TORCH_CHECK(vocab_size > 0 && vocab_size <= student_logits.size(1),
              "vocab_size must be in [1, ", student_logits.size(1), "], got ", vocab_size);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0,
              "temperature must be finite and > 0, got ", temperature);
  const Divergence kind = parse_divergence(divergence);
  TORCH_CHECK(kind != Divergence::kJsd || (beta > 0 && beta < 1),
              "beta must be in (0, 1) for jsd, got ", beta);
  const Reduction reduce = parse_reduction(reduction);
  const auto acc_dtype = accumulation_dtype(student_logits.scalar_type());
  TORCH_CHECK(teacher_logits.has_value() != teacher_logprobs.has_value(),
              "give teacher_logits or teacher_logprobs with teacher_indices, not both");
  if (teacher_logits.has_value()) {
    TORCH_CHECK(teacher_logits->dim() == 2 && teacher_logits->size(0) == rows &&
                    teacher_logits->size(1) >= vocab_size,
                "teacher_logits must be N x V with N = ", rows, " and V >= vocab_size = ",
                vocab_size, ", got shape ", teacher_logits->sizes());
    TORCH_CHECK(teacher_logits->scalar_type() == student_logits.scalar_type(),
                "teacher_logits has dtype ", teacher_logits->scalar_type(),
                " but student_logits has ", student_logits.scalar_type());
  } else {
    TORCH_CHECK(teacher_indices.has_value(), "teacher_logprobs needs teacher_indices");
    TORCH_CHECK(teacher_logprobs->dim() == 2 && teacher_logprobs->size(0) == rows,
                "teacher_logprobs must be N x k with N = ", rows, ", got shape ",
                teacher_logprobs->sizes());
    TORCH_CHECK(teacher_logprobs->scalar_type() == acc_dtype, "teacher_logprobs must be ",
                acc_dtype, ", got ", teacher_logprobs->scalar_type());
    TORCH_CHECK(teacher_indices->scalar_type() == at::kLong &&
                    teacher_indices->sizes() == teacher_logprobs->sizes(),
                "teacher_indices must be int64 with the shape of teacher_logprobs ",
                teacher_logprobs->sizes(), ", got ", teacher_indices->scalar_type(), " ",
                teacher_indices->sizes());
    if (teacher_indices->numel() > 0) {
      TORCH_CHECK(teacher_indices->min().item<int64_t>() >= 0 &&
                      teacher_indices->max().item<int64_t>() < vocab_size,
                  "teacher_indices must hold ids in [0, ", vocab_size - 1, "]");
    }
  }
  if (labels.has_value()) {
    TORCH_CHECK(labels->scalar_type() == at::kLong && labels->dim() == 1 &&
                    labels->size(0) == rows,
                "labels must be int64 of shape [", rows, "], got ", labels->scalar_type(), " ",
                labels->sizes());
  }
  if (num_items.has_value()) {
    TORCH_CHECK(num_items->numel() == 1, "num_items must hold one value, got shape ",
                num_items->sizes());
  }
  // Rows must have unit column stride; any row stride is read in place (a vocab_size cut of
  // a wider tensor is not copied).
  auto rows_of = [](const Tensor& x) { return x.stride(1) == 1 ? x : x.contiguous(); };
  const Tensor student = rows_of(student_logits);
  std::optional<Tensor> teacher, logprobs, indices, label_rows;
  if (teacher_logits.has_value()) teacher = rows_of(*teacher_logits);
  if (teacher_logprobs.has_value()) {
    logprobs = teacher_logprobs->contiguous();
    indices = teacher_indices->contiguous();
  }
  if (labels.has_value()) label_rows = labels->contiguous();
  std::tuple<Tensor, Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(),
                                  "sokd_logit_distill_loss", [&] {
    result = logit_distill_typed<scalar_t>(student, teacher, logprobs, indices, label_rows, kind,
                                           beta, temperature, ignore_index, reduce, num_items,
                                           vocab_size, with_grad);
  });
  return result;
}

}  // namespace
}  // namespace sokd::cpu

TORCH_LIBRARY_IMPL(sokd, CPU, m) {
  m.impl("logit_distill_loss", &sokd::cpu::logit_distill_loss_kernel);
}
