// The kernel of sokd::fused_linear_distill_loss for every device (docs/algorithm.md §7),
// composed of ATen matmuls and sokd::logit_distill_loss, whose own kernel (C++ on the CPU,
// Triton on a GPU) runs each chunk.
//
// Each chunk of rows makes its logits z_s = h_s W_s^T + b_s and z_t = h_t W_t^T + b_t, runs the
// row kernel, which returns the chunk's loss and its logit gradient g, and turns g into the
// parameter gradients at once: grad h_s = g W_s, grad W_s += g^T h_s, grad b_s += sum_rows g.
// So at most one chunk of logits per model exists at a time.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "fused_linear_distill_loss.h"
#include "logit_distill_loss.h"

namespace sokd {
namespace {

using at::Tensor;

void check_linear(const Tensor& hidden, const char* hidden_name, const Tensor& weight,
                  const char* weight_name, const std::optional<Tensor>& bias,
                  const char* bias_name, const Tensor& student_hidden) {
  TORCH_CHECK(hidden.dim() == 2, hidden_name, " must be N x D, got shape ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1), weight_name,
              " must be V x D with D = ", hidden.size(1), ", got shape ", weight.sizes());
  TORCH_CHECK(hidden.device() == student_hidden.device() &&
                  weight.device() == student_hidden.device(),
              hidden_name, " and ", weight_name, " must be on ", student_hidden.device());
  TORCH_CHECK(hidden.scalar_type() == student_hidden.scalar_type() &&
                  weight.scalar_type() == student_hidden.scalar_type(),
              hidden_name, " and ", weight_name, " must be ", student_hidden.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), bias_name,
                " must hold one value per row of ", weight_name, " (", weight.size(0),
                "), got shape ", bias->sizes());
    TORCH_CHECK(bias->device() == student_hidden.device() &&
                    bias->scalar_type() == student_hidden.scalar_type(),
                bias_name, " must be ", student_hidden.scalar_type(), " on ",
                student_hidden.device());
  }
}

std::optional<Tensor> rows_of(const std::optional<Tensor>& values, int64_t start,
                              int64_t length) {
  if (!values.has_value()) return std::nullopt;
  return values->narrow(0, start, length);
}

FusedLinearOutputs fused_linear_distill_loss_kernel(
    const Tensor& student_hidden, const Tensor& student_weight, const Tensor& teacher_hidden,
    const Tensor& teacher_weight, const std::optional<Tensor>& student_bias,
    const std::optional<Tensor>& teacher_bias, const std::optional<Tensor>& labels,
    const std::optional<Tensor>& row_scale, c10::string_view divergence, double beta,
    double temperature, int64_t ignore_index, c10::string_view reduction,
    const std::optional<Tensor>& num_items, c10::SymInt vocab_size, int64_t chunk_size,
    bool with_grad) {
  check_linear(student_hidden, "student_hidden", student_weight, "student_weight", student_bias,
               "student_bias", student_hidden);
  check_linear(teacher_hidden, "teacher_hidden", teacher_weight, "teacher_weight", teacher_bias,
               "teacher_bias", student_hidden);
  const int64_t rows = student_hidden.size(0);
  TORCH_CHECK(teacher_hidden.size(0) == rows, "teacher_hidden must have N = ", rows,
              " rows, got shape ", teacher_hidden.sizes());
  TORCH_CHECK(chunk_size > 0, "chunk_size must be > 0, got ", chunk_size);
  if (row_scale.has_value()) {
    TORCH_CHECK(row_scale->dim() == 1 && row_scale->size(0) == rows &&
                    row_scale->device() == student_hidden.device(),
                "row_scale must hold one value per row (", rows, ") on ",
                student_hidden.device(), ", got shape ", row_scale->sizes());
  }
  // Outputs never alias one another, the empty ones included (the schema promises fresh
  // tensors).
  auto empty = [&] { return student_hidden.new_empty({0}); };
  const Tensor grad_hidden = with_grad ? at::empty_like(student_hidden) : empty();
  const Tensor grad_weight = with_grad ? at::zeros_like(student_weight) : empty();
  const Tensor grad_bias =
      with_grad && student_bias.has_value() ? at::zeros_like(*student_bias) : empty();
  // "mean" divides by the counted rows of the whole batch, not of one chunk.
  std::optional<Tensor> divisor = num_items;
  if (reduction == "mean" && !num_items.has_value()) {
    divisor = labels.has_value()
                  ? labels->ne(ignore_index).sum().to(at::kDouble)
                  : at::scalar_tensor(static_cast<double>(rows),
                                      student_hidden.options().dtype(at::kDouble));
  }
  std::vector<Tensor> losses;
  // One chunk at least, so that zero rows still give the row kernel's empty-batch result.
  int64_t start = 0;
  do {
    const int64_t length = std::min(chunk_size, rows - start);
    const Tensor hidden = student_hidden.narrow(0, start, length);
    auto [loss, grad] = logit_distill_loss(
        at::linear(hidden, student_weight, student_bias),
        at::linear(teacher_hidden.narrow(0, start, length), teacher_weight, teacher_bias),
        std::nullopt, std::nullopt, rows_of(labels, start, length), divergence, beta,
        temperature, ignore_index, reduction, divisor, vocab_size, with_grad);
    losses.push_back(loss);
    if (with_grad) {
      if (row_scale.has_value()) {
        grad.mul_(row_scale->narrow(0, start, length).unsqueeze(1).to(grad.scalar_type()));
      }
      Tensor hidden_rows = grad_hidden.narrow(0, start, length);
      at::mm_out(hidden_rows, grad, student_weight);
      grad_weight.addmm_(grad.t(), hidden);
      if (student_bias.has_value()) grad_bias.add_(grad.sum(0));
    }
    start += length;
  } while (start < rows);
  Tensor total = reduction == "none" ? at::cat(losses) : at::stack(losses).sum();
  return {total, grad_hidden, grad_weight, grad_bias};
}

}  // namespace
}  // namespace sokd

TORCH_LIBRARY_IMPL(sokd, CompositeExplicitAutograd, m) {
  m.impl("fused_linear_distill_loss", &sokd::fused_linear_distill_loss_kernel);
}
