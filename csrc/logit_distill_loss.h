#pragma once
// C++ entry of sokd::logit_distill_loss (schema and semantics in csrc/logit_distill_loss.cpp):
// calls the op through the dispatcher, so autograd and the device kernel apply.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/SymInt.h>

#include <optional>
#include <tuple>

namespace sokd {

inline std::tuple<at::Tensor, at::Tensor> logit_distill_loss(
    const at::Tensor& student_logits, const std::optional<at::Tensor>& teacher_logits,
    const std::optional<at::Tensor>& teacher_logprobs,
    const std::optional<at::Tensor>& teacher_indices, const std::optional<at::Tensor>& labels,
    c10::string_view divergence, double beta, double temperature, int64_t ignore_index,
    c10::string_view reduction, const std::optional<at::Tensor>& num_items,
    c10::SymInt vocab_size, bool with_grad) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sokd::logit_distill_loss", "")
                             .typed<decltype(logit_distill_loss)>();
  return op.call(student_logits, teacher_logits, teacher_logprobs, teacher_indices, labels,
                 divergence, beta, temperature, ignore_index, reduction, num_items,
                 std::move(vocab_size), with_grad);
}

}  // namespace sokd
