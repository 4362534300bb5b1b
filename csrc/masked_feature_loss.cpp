// Schema of sokd::masked_feature_loss (docs/algorithm.md §5).
// sum(mask^2 * (student - teacher)^2) / Z over N x C x H x W features.
// Returns (loss, grad_student); the teacher's gradient is -grad_student.
// With with_grad=false the gradient is skipped and returned empty.
//
// CPU kernel: csrc/cpu/masked_feature_loss_kernel.cpp
// CUDA kernel: csrc/cuda/masked_feature_loss_kernel.cu
// Triton kernel: kernels/masked_feature_loss.py
// Reference: sokd/reference/masked_feature_loss.py
// Fake: sokd/native.py; autograd: csrc/autograd.cpp

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(sokd, m) {
  m.def("masked_feature_loss(Tensor student, Tensor teacher, Tensor? mask, "
        "bool normalize_by_mask, bool with_grad) -> (Tensor, Tensor)");
}
