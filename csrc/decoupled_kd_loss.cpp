// Schema of sokd::decoupled_kd_loss (docs/algorithm.md §5).
// T^2 * mean over rows of alpha * TCKD + beta * NCKD over the class set class_mask.
// Returns (loss, grad_student).
// With with_grad=false the gradient is skipped and returned empty.
//
// CPU kernel: csrc/cpu/decoupled_kd_loss_kernel.cpp
// CUDA kernel: csrc/cuda/decoupled_kd_loss_kernel.cu
// Triton kernel: kernels/decoupled_kd_loss.py
// Reference: sokd/reference/decoupled_kd_loss.py
// Fake: sokd/native.py; autograd: csrc/autograd.cpp

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(sokd, m) {
  m.def("decoupled_kd_loss(Tensor student_logits, Tensor teacher_logits, Tensor class_mask, "
        "float alpha, float beta, float temperature, bool with_grad) -> (Tensor, Tensor)");
}
