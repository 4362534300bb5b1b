// Autograd of the fused loss ops, for every device and every kernel below it: the C++ kernels
// and the Triton launchers that sokd/native.py routes to. The kernels return the input
// gradient beside the loss, so backward only scales that saved gradient by grad_output.
//
// These are C++ functions rather than PyTorch's Python register_autograd because its wrapper
// costs more than the kernels at common logit sizes: on a CPU core it added about 75 us to
// each forward and 40 us to each backward, against about 50 us for the whole kernel call at
// 64 x 100 logits.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include "fused_linear_distill_loss.h"
#include "logit_distill_loss.h"

#include <algorithm>
#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace sokd {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using LossAndGrad = std::tuple<Tensor, Tensor>;

// Whether backward may look at the value of `tensor`. A traced tensor (torch.compile's fake
// and functional tensors, functorch wrappers, any dispatch mode) has no value to read, or
// would have it baked into the graph.
bool holds_plain_value(const Tensor& tensor) {
  static const c10::DispatchKeySet traced(
      {c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
       c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::FuncTorchBatched});
  return !tensor.key_set().has_any(traced) && !c10::impl::dispatch_mode_enabled();
}

// The inputs that receive a gradient and whether the kernel computed it, kept for backward.
// A second backward must reach the inputs to raise (see first_order_only). They are kept as
// plain references, not saved variables, so an in-place change of an input after forward
// stays allowed, as it is for the reference, whose gradient does not read the inputs either.
void keep_inputs(AutogradContext* ctx, std::vector<Tensor> differentiable, bool with_grad) {
  ctx->saved_data["inputs"] = std::move(differentiable);
  ctx->saved_data["with_grad"] = with_grad;
}

// The inputs kept by keep_inputs. They are needed by a second backward only, so a graph that
// is freed now drops them.
std::vector<Tensor> take_inputs(AutogradContext* ctx) {
  std::vector<Tensor> inputs = ctx->saved_data.at("inputs").toTensorVector();
  if (!torch::autograd::get_current_graph_task_keep_graph()) ctx->saved_data.erase("inputs");
  return inputs;
}

// Runs a loss kernel below autograd, saves its gradient for backward and hands that out
// through `grad_out`. The gradient is an output of the op but not of the autograd function,
// so it has no derivative without mark_non_differentiable, which compiled autograd rejects.
template <typename Kernel>
variable_list run_fused_loss(AutogradContext* ctx, Tensor* grad_out, bool with_grad,
                             std::vector<Tensor> differentiable, Kernel&& kernel) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto [loss, grad] = kernel();
  ctx->save_for_backward({grad});
  // The caller gets a view of its own, so the tensor saved here is never exposed and the
  // storage's reference count tells whether anyone else still holds the gradient.
  *grad_out = grad.defined() ? grad.alias() : grad;
  keep_inputs(ctx, std::move(differentiable), with_grad);
  return {loss};
}

// Whether `grad` may be handed to the caller as it is: the graph is freed after this backward
// (no retain_graph), so nothing reads the saved gradient again, and no other tensor shares its
// memory (the op's own gradient output, a view, is gone). A retained graph gets a fresh
// tensor on every call, so a write through one result cannot change the next.
bool can_hand_over(const Tensor& grad) {
  return !torch::autograd::get_current_graph_task_keep_graph() &&
         grad.storage().use_count() == 1;
}

// grad * grad_loss, rounded once to the input's dtype: the kernels save the gradient in the
// accumulation dtype (float32 for 16-bit inputs), or in the input's dtype where it is as large
// as the logits of a language model. A grad_loss of one value per row (reduction "none")
// scales each row of `grad`.
Tensor scaled(const Tensor& grad, const Tensor& grad_loss, c10::ScalarType input_dtype) {
  // loss.backward() seeds 1, so the saved gradient is the answer itself. Handing it over
  // spares a full read and write and, on the CPU, the page faults of a fresh tensor. On a
  // GPU, reading the seed would cost a sync.
  if (grad.is_cpu() && grad.scalar_type() == input_dtype && holds_plain_value(grad_loss) &&
      grad_loss.numel() == 1 && grad_loss.item<double>() == 1.0 && can_hand_over(grad)) {
    return grad;
  }
  const Tensor factor = grad_loss.dim() == 0 ? grad_loss : grad_loss.unsqueeze(-1);
  Tensor product = grad * factor.to(grad.scalar_type());
  return product.scalar_type() == input_dtype ? product : product.to(input_dtype);
}

// `grads`, a first derivative. Under create_graph=True they come back through a node that
// raises on a second backward: the kernels save the first derivative only, so a further
// derivative would silently miss every second-order term (like torch.autograd.function's
// once_differentiable). The node takes the inputs as well, so that a second derivative with
// respect to them passes through it and raises, instead of finding them unused.
variable_list first_order_only(variable_list grads, const std::vector<Tensor>& inputs,
                               bool create_graph, const char* op) {
  if (!create_graph) return grads;
  variable_list error_inputs;
  std::vector<size_t> defined;
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!grads[i].defined()) continue;
    defined.push_back(i);
    error_inputs.push_back(grads[i].detach().requires_grad_(true));
  }
  for (const Tensor& input : inputs) {
    if (input.defined() && input.requires_grad()) error_inputs.push_back(input);
  }
  const std::string message = std::string(op) +
                              " is differentiable once: its fused kernel saves the first "
                              "derivative only. Use the reference backend for higher-order "
                              "gradients.";
  variable_list passed = torch::autograd::DelayedError(message,
                                                       static_cast<int>(error_inputs.size()))
                             .apply(std::move(error_inputs));
  for (size_t k = 0; k < defined.size(); ++k) grads[defined[k]] = passed[k];
  return grads;
}

// The gradients saved by forward, each scaled by grad_loss; undefined where not `needed`.
// The first kept input (the student) fixes the dtype of the gradients.
variable_list scaled_saved_grads(AutogradContext* ctx, const Tensor& grad_loss,
                                 const std::vector<bool>& needed, const char* op) {
  variable_list grads(needed.size());
  if (std::none_of(needed.begin(), needed.end(), [](bool n) { return n; })) return grads;
  TORCH_CHECK(ctx->saved_data.at("with_grad").toBool(), op,
              " ran with with_grad=False, so it saved no gradient to backpropagate; call it "
              "with with_grad=True when its inputs need gradients");
  const std::vector<Tensor> inputs = take_inputs(ctx);
  const c10::ScalarType input_dtype = inputs.front().scalar_type();
  const variable_list saved = ctx->get_saved_variables();
  const bool create_graph = at::GradMode::is_enabled();
  {
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < needed.size(); ++i) {
      if (needed[i]) grads[i] = scaled(saved[i], grad_loss, input_dtype);
    }
  }
  return first_order_only(std::move(grads), inputs, create_graph, op);
}

// d loss / d student from the saved gradient, or an undefined tensor when it is not `needed`.
Tensor scaled_saved_grad(AutogradContext* ctx, const Tensor& grad_loss, bool needed,
                         const char* op) {
  return scaled_saved_grads(ctx, grad_loss, {needed}, op)[0];
}

template <typename Schema>
c10::TypedOperatorHandle<Schema> loss_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Schema>();
}

struct MaskedFeatureLoss : torch::autograd::Function<MaskedFeatureLoss> {
  using Schema = LossAndGrad(const Tensor&, const Tensor&, const std::optional<Tensor>&, bool,
                             bool);

  static variable_list forward(AutogradContext* ctx, const Tensor& student,
                               const Tensor& teacher, const std::optional<Tensor>& mask,
                               bool normalize_by_mask, bool with_grad, Tensor* grad_out) {
    static const auto op = loss_op<Schema>("sokd::masked_feature_loss");
    return run_fused_loss(ctx, grad_out, with_grad, {student, teacher}, [&] {
      return op.call(student, teacher, mask, normalize_by_mask, with_grad);
    });
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const bool needed = ctx->needs_input_grad(0) || ctx->needs_input_grad(1);
    Tensor grad_student =
        scaled_saved_grad(ctx, grad_outputs[0], needed, "sokd::masked_feature_loss");
    Tensor grad_teacher;
    if (grad_student.defined() && ctx->needs_input_grad(1)) grad_teacher = -grad_student;
    return {grad_student, grad_teacher, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

struct KdLoss : torch::autograd::Function<KdLoss> {
  using Schema = LossAndGrad(const Tensor&, const Tensor&, double, const std::optional<Tensor>&,
                             bool);

  static variable_list forward(AutogradContext* ctx, const Tensor& student,
                               const Tensor& teacher, double temperature,
                               const std::optional<Tensor>& weight, bool with_grad,
                               Tensor* grad_out) {
    static const auto op = loss_op<Schema>("sokd::kd_loss");
    return run_fused_loss(ctx, grad_out, with_grad, {student}, [&] {
      return op.call(student, teacher, temperature, weight, with_grad);
    });
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return {scaled_saved_grad(ctx, grad_outputs[0], ctx->needs_input_grad(0), "sokd::kd_loss"),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

struct DecoupledKdLoss : torch::autograd::Function<DecoupledKdLoss> {
  using Schema = LossAndGrad(const Tensor&, const Tensor&, const Tensor&, double, double,
                             double, bool);

  static variable_list forward(AutogradContext* ctx, const Tensor& student,
                               const Tensor& teacher, const Tensor& class_mask, double alpha,
                               double beta, double temperature, bool with_grad,
                               Tensor* grad_out) {
    static const auto op = loss_op<Schema>("sokd::decoupled_kd_loss");
    return run_fused_loss(ctx, grad_out, with_grad, {student}, [&] {
      return op.call(student, teacher, class_mask, alpha, beta, temperature, with_grad);
    });
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return {scaled_saved_grad(ctx, grad_outputs[0], ctx->needs_input_grad(0),
                              "sokd::decoupled_kd_loss"),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

struct LogitDistillLoss : torch::autograd::Function<LogitDistillLoss> {
  static variable_list forward(AutogradContext* ctx, const Tensor& student_logits,
                               const std::optional<Tensor>& teacher_logits,
                               const std::optional<Tensor>& teacher_logprobs,
                               const std::optional<Tensor>& teacher_indices,
                               const std::optional<Tensor>& labels, c10::string_view divergence,
                               double beta, double temperature, int64_t ignore_index,
                               c10::string_view reduction,
                               const std::optional<Tensor>& num_items, c10::SymInt vocab_size,
                               bool with_grad, Tensor* grad_out) {
    return run_fused_loss(ctx, grad_out, with_grad, {student_logits}, [&] {
      return sokd::logit_distill_loss(student_logits, teacher_logits, teacher_logprobs,
                                      teacher_indices, labels, divergence, beta, temperature,
                                      ignore_index, reduction, num_items, vocab_size, with_grad);
    });
  }

  // For reduction "none" grad_outputs[0] holds one value per row, which scales that row.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(14);
    grads[0] = scaled_saved_grad(ctx, grad_outputs[0], ctx->needs_input_grad(0),
                                 "sokd::logit_distill_loss");
    return grads;
  }
};

// Gradients reach the student's hidden states, weight and bias (arguments 0, 1 and 4).
constexpr size_t kFusedLinearDifferentiable[] = {0, 1, 4};

struct FusedLinearDistillLoss : torch::autograd::Function<FusedLinearDistillLoss> {
  static variable_list forward(
      AutogradContext* ctx, const Tensor& student_hidden, const Tensor& student_weight,
      const Tensor& teacher_hidden, const Tensor& teacher_weight,
      const std::optional<Tensor>& student_bias, const std::optional<Tensor>& teacher_bias,
      const std::optional<Tensor>& labels, const std::optional<Tensor>& row_scale,
      c10::string_view divergence, double beta, double temperature, int64_t ignore_index,
      c10::string_view reduction, const std::optional<Tensor>& num_items, c10::SymInt vocab_size,
      int64_t chunk_size, bool with_grad, std::array<Tensor, 3>* grads_out) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, grad_hidden, grad_weight, grad_bias] = fused_linear_distill_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
        teacher_bias, labels, row_scale, divergence, beta, temperature, ignore_index, reduction,
        num_items, vocab_size, chunk_size, with_grad);
    const Tensor bias = student_bias.value_or(Tensor());
    // needs_input_grad counts the tensors given, so an absent bias has no index; the tensors
    // before it (hidden states and weights) are always given.
    ctx->saved_data["has_bias"] = bias.defined();
    if (reduction == "none") {
      // Each row's loss has its own grad_output, known only in backward, which reruns the
      // chunks with it (as row_scale) instead of keeping an N x V gradient.
      ctx->save_for_backward({student_hidden, student_weight, teacher_hidden, teacher_weight,
                              bias, teacher_bias.value_or(Tensor()), labels.value_or(Tensor()),
                              num_items.value_or(Tensor())});
      ctx->saved_data["options"] = c10::ivalue::Tuple::create(
          {std::string(divergence), beta, temperature, ignore_index, std::move(vocab_size),
           chunk_size});
      keep_inputs(ctx, {student_hidden, student_weight, bias}, true);
    } else {
      ctx->save_for_backward({grad_hidden, grad_weight, grad_bias});
      keep_inputs(ctx, {student_hidden, student_weight, bias}, with_grad);
    }
    *grads_out = {grad_hidden.defined() ? grad_hidden.alias() : grad_hidden,
                  grad_weight.defined() ? grad_weight.alias() : grad_weight,
                  grad_bias.defined() ? grad_bias.alias() : grad_bias};
    return {loss};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static const char* const op = "sokd::fused_linear_distill_loss";
    const std::vector<bool> needed = {
        ctx->needs_input_grad(0), ctx->needs_input_grad(1),
        ctx->saved_data.at("has_bias").toBool() && ctx->needs_input_grad(4)};
    variable_list grads = ctx->saved_data.count("options") == 0
                              ? scaled_saved_grads(ctx, grad_outputs[0], needed, op)
                              : rerun_with_row_scale(ctx, grad_outputs[0], needed, op);
    variable_list result(18);
    for (size_t k = 0; k < needed.size(); ++k) result[kFusedLinearDifferentiable[k]] = grads[k];
    return result;
  }

  // The gradients of reduction "none": the chunks again, each row's logit gradient scaled by
  // its grad_output.
  static variable_list rerun_with_row_scale(AutogradContext* ctx, const Tensor& grad_loss,
                                            const std::vector<bool>& needed, const char* op) {
    if (std::none_of(needed.begin(), needed.end(), [](bool n) { return n; })) {
      return variable_list(needed.size());
    }
    const variable_list saved = ctx->get_saved_variables();
    auto optional = [](const Tensor& tensor) {
      return tensor.defined() ? std::optional<Tensor>(tensor) : std::nullopt;
    };
    const auto options = ctx->saved_data.at("options").toTuple()->elements();
    const std::vector<Tensor> inputs = take_inputs(ctx);
    const bool create_graph = at::GradMode::is_enabled();
    variable_list grads;
    {
      at::NoGradGuard no_grad;
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      auto [loss, grad_hidden, grad_weight, grad_bias] = fused_linear_distill_loss(
          saved[0], saved[1], saved[2], saved[3], optional(saved[4]), optional(saved[5]),
          optional(saved[6]), grad_loss, options[0].toStringRef(), options[1].toDouble(),
          options[2].toDouble(), options[3].toInt(), "none", optional(saved[7]),
          options[4].toSymInt(), options[5].toInt(), /*with_grad=*/true);
      grads = {grad_hidden, grad_weight, saved[4].defined() ? grad_bias : Tensor()};
    }
    for (size_t k = 0; k < needed.size(); ++k) {
      if (!needed[k]) grads[k] = Tensor();
    }
    return first_order_only(std::move(grads), inputs, create_graph, op);
  }
};

std::tuple<Tensor, Tensor> logit_distill_loss_autograd(
    const Tensor& student_logits, const std::optional<Tensor>& teacher_logits,
    const std::optional<Tensor>& teacher_logprobs, const std::optional<Tensor>& teacher_indices,
    const std::optional<Tensor>& labels, c10::string_view divergence, double beta,
    double temperature, int64_t ignore_index, c10::string_view reduction,
    const std::optional<Tensor>& num_items, c10::SymInt vocab_size, bool with_grad) {
  Tensor grad;
  Tensor loss = LogitDistillLoss::apply(student_logits, teacher_logits, teacher_logprobs,
                                        teacher_indices, labels, divergence, beta, temperature,
                                        ignore_index, reduction, num_items, std::move(vocab_size),
                                        with_grad, &grad)[0];
  return {loss, grad};
}

FusedLinearOutputs fused_linear_distill_loss_autograd(
    const Tensor& student_hidden, const Tensor& student_weight, const Tensor& teacher_hidden,
    const Tensor& teacher_weight, const std::optional<Tensor>& student_bias,
    const std::optional<Tensor>& teacher_bias, const std::optional<Tensor>& labels,
    const std::optional<Tensor>& row_scale, c10::string_view divergence, double beta,
    double temperature, int64_t ignore_index, c10::string_view reduction,
    const std::optional<Tensor>& num_items, c10::SymInt vocab_size, int64_t chunk_size,
    bool with_grad) {
  std::array<Tensor, 3> grads;
  Tensor loss = FusedLinearDistillLoss::apply(
      student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
      labels, row_scale, divergence, beta, temperature, ignore_index, reduction, num_items,
      std::move(vocab_size), chunk_size, with_grad, &grads)[0];
  return {loss, grads[0], grads[1], grads[2]};
}

LossAndGrad masked_feature_loss(const Tensor& student, const Tensor& teacher,
                                const std::optional<Tensor>& mask, bool normalize_by_mask,
                                bool with_grad) {
  Tensor grad;
  Tensor loss =
      MaskedFeatureLoss::apply(student, teacher, mask, normalize_by_mask, with_grad, &grad)[0];
  return {loss, grad};
}

LossAndGrad kd_loss(const Tensor& student, const Tensor& teacher, double temperature,
                    const std::optional<Tensor>& weight, bool with_grad) {
  Tensor grad;
  Tensor loss = KdLoss::apply(student, teacher, temperature, weight, with_grad, &grad)[0];
  return {loss, grad};
}

LossAndGrad decoupled_kd_loss(const Tensor& student, const Tensor& teacher,
                              const Tensor& class_mask, double alpha, double beta,
                              double temperature, bool with_grad) {
  Tensor grad;
  Tensor loss = DecoupledKdLoss::apply(student, teacher, class_mask, alpha, beta, temperature,
                                       with_grad, &grad)[0];
  return {loss, grad};
}

}  // namespace
}  // namespace sokd

TORCH_LIBRARY_IMPL(sokd, Autograd, m) {
  m.impl("masked_feature_loss", &sokd::masked_feature_loss);
  m.impl("kd_loss", &sokd::kd_loss);
  m.impl("decoupled_kd_loss", &sokd::decoupled_kd_loss);
  m.impl("logit_distill_loss", &sokd::logit_distill_loss_autograd);
  m.impl("fused_linear_distill_loss", &sokd::fused_linear_distill_loss_autograd);
}
