#pragma once
// C++ entry of sokd::logit_distill_loss (schema and semantics in csrc/logit_distill_loss.cpp):
// calls the op through the dispatcher, so autograd and the device kernel apply.

#include <ATen/ATen.h>
#include <c10/core/SymInt.h>

#include <optional>
#include <tuple>

namespace sokd {

std::tuple<at::Tensor, at::Tensor> logit_distill_loss(
    const at::Tensor& student_logits, const std::optional<at::Tensor>& teacher_logits,
    const std::optional<at::Tensor>& teacher_logprobs,
    const std::optional<at::Tensor>& teacher_indices, const std::optional<at::Tensor>& labels,
    c10::string_view divergence, double beta, double temperature, int64_t ignore_index,
    c10::string_view reduction, const std::optional<at::Tensor>& num_items,
    c10::SymInt vocab_size, bool with_grad);

}  // namespace sokd
