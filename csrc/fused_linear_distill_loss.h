#pragma once
// C++ entry of sokd::fused_linear_distill_loss (schema and semantics in
// csrc/fused_linear_distill_loss.cpp): calls the op through the dispatcher, so autograd and the
// kernel apply.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/SymInt.h>

#include <optional>
#include <tuple>

namespace sokd {

using FusedLinearOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline FusedLinearOutputs fused_linear_distill_loss(
    const at::Tensor& student_hidden, const at::Tensor& student_weight,
    const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight,
    const std::optional<at::Tensor>& student_bias, const std::optional<at::Tensor>& teacher_bias,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& row_scale,
    c10::string_view divergence, double beta, double temperature, int64_t ignore_index,
    c10::string_view reduction, const std::optional<at::Tensor>& num_items,
    c10::SymInt vocab_size, int64_t chunk_size, bool with_grad) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sokd::fused_linear_distill_loss", "")
                             .typed<decltype(fused_linear_distill_loss)>();
  return op.call(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
                 teacher_bias, labels, row_scale, divergence, beta, temperature, ignore_index,
                 reduction, num_items, std::move(vocab_size), chunk_size, with_grad);
}

}  // namespace sokd
