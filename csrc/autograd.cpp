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

#include <initializer_list>
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

// Runs a loss kernel below autograd, saves its gradient for backward and hands that out
// through `grad_out`. The gradient is an output of the op but not of the autograd function,
// so it has no derivative without mark_non_differentiable, which compiled autograd rejects.
// `differentiable` are the inputs that receive a gradient: a second backward must reach
// them to raise (see scaled_saved_grad). They are kept as plain references, not saved
// variables, so an in-place change of an input after forward stays allowed, as it is for
// the reference, whose gradient does not read the inputs either.
template <typename Kernel>
variable_list run_fused_loss(AutogradContext* ctx, Tensor* grad_out,
                             std::initializer_list<Tensor> differentiable, Kernel&& kernel) {
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, grad] = kernel();
    ctx->save_for_backward({grad});
    // The caller gets a view of its own, so the tensor saved here is never exposed and the
    // storage's reference count tells whether anyone else still holds the gradient.
    *grad_out = grad.defined() ? grad.alias() : grad;
    ctx->saved_data["inputs"] = std::vector<Tensor>(differentiable);
    return {loss};
  }
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
// accumulation dtype (float32 for 16-bit inputs).
Tensor scaled(const Tensor& grad, const Tensor& grad_loss, c10::ScalarType input_dtype) {
  Tensor product = grad * grad_loss.to(grad.scalar_type());
  return product.scalar_type() == input_dtype ? product : product.to(input_dtype);
}

// d loss / d student from the saved gradient, or an undefined tensor when it is not `needed`.
Tensor scaled_saved_grad(AutogradContext* ctx, const Tensor& grad_loss, bool needed,
                         const char* op) {
  if (!needed) return {};
  Tensor grad = ctx->get_saved_variables()[0];
  // The inputs are needed by a second backward only; a graph that is freed now drops them.
  const std::vector<Tensor> inputs = ctx->saved_data.at("inputs").toTensorVector();
  // The student comes first; it fixes the dtype of the gradients.
  const c10::ScalarType input_dtype = inputs.front().scalar_type();
  if (!torch::autograd::get_current_graph_task_keep_graph()) ctx->saved_data.erase("inputs");
  // with_grad=False saves a 1-D empty tensor; a real gradient has the logits' or features'
  // 2 or 4 dimensions. The rank is known under tracing, where sizes may be symbolic.
  TORCH_CHECK(grad.dim() != 1, op,
              " ran with with_grad=False, so it saved no gradient to backpropagate; call it "
              "with with_grad=True when its inputs need gradients");
  if (at::GradMode::is_enabled()) {
    // create_graph=True. The kernels save the first derivative only, so this gradient would
    // silently miss every second-order term: like torch.autograd.function's
    // once_differentiable, it comes back through a node that raises on a second backward.
    Tensor first_order;
    {
      at::NoGradGuard no_grad;
      first_order = scaled(grad, grad_loss, input_dtype);
    }
    first_order.requires_grad_(true);
    const std::string message = std::string(op) +
                                " is differentiable once: its fused kernel saves the first "
                                "derivative only. Use the reference backend for higher-order "
                                "gradients.";
    // The error node takes the inputs as well, so that a second derivative with respect to
    // them passes through it and raises, instead of finding them unused.
    variable_list error_inputs{first_order};
    for (const Tensor& input : inputs) {
      if (input.requires_grad()) error_inputs.push_back(input);
    }
    return torch::autograd::DelayedError(message, static_cast<int>(error_inputs.size()))
        .apply(std::move(error_inputs))[0];
  }
  // loss.backward() seeds 1, so the saved gradient is the answer itself. Handing it over
  // spares a full read and write and, on the CPU, the page faults of a fresh tensor. On a
  // GPU, reading the seed would cost a sync.
  if (grad.is_cpu() && grad.scalar_type() == input_dtype && holds_plain_value(grad_loss) &&
      grad_loss.item<double>() == 1.0 && can_hand_over(grad)) {
    return grad;
  }
  return scaled(grad, grad_loss, input_dtype);
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
    return run_fused_loss(ctx, grad_out, {student, teacher}, [&] {
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
    return run_fused_loss(ctx, grad_out, {student}, [&] {
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
    return run_fused_loss(ctx, grad_out, {student}, [&] {
      return op.call(student, teacher, class_mask, alpha, beta, temperature, with_grad);
    });
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return {scaled_saved_grad(ctx, grad_outputs[0], ctx->needs_input_grad(0),
                              "sokd::decoupled_kd_loss"),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

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
}
