// Schema of sokd::kd_loss (docs/algorithm.md §5).
// T^2 * mean over rows of KL(softmax(t/T) || softmax(s/T)), optionally weighted per
// row. Returns (loss, grad_student).
// With with_grad=false the gradient is skipped and returned empty.
//
// CPU kernel: csrc/cpu/kd_loss_kernel.cpp
// CUDA kernel: csrc/cuda/kd_loss_kernel.cu
// Triton kernel: kernels/kd_loss.py
// Reference: sokd/reference/kd_loss.py
// Fake: sokd/native.py; autograd: csrc/autograd.cpp

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(sokd, m) {
  m.def("kd_loss(Tensor student_logits, Tensor teacher_logits, float temperature, "
        "Tensor? weight, bool with_grad) -> (Tensor, Tensor)");
}
