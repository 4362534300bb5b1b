// Schema of sokd::fused_linear_distill_loss (docs/algorithm.md §7): logit_distill_loss of
// h_s W_s^T + b_s against h_t W_t^T + b_t, with the N x V logits of either model made one chunk
// of rows at a time. Its kernel is composed of other ops (matmuls and sokd::logit_distill_loss)
// and serves every device: csrc/composite/fused_linear_distill_loss_kernel.cpp. The autograd is
// in csrc/autograd.cpp, the fake in sokd/native.py.
//
// student_hidden N x Ds, student_weight Vs x Ds, teacher_hidden N x Dt, teacher_weight Vt x Dt,
// biases Vs and Vt; labels, num_items and the options as for sokd::logit_distill_loss. Returns
// (loss, grad student_hidden, grad student_weight, grad student_bias): the gradients are of the
// loss for "mean" and "sum" and of the sum of the row losses for "none", in the inputs' dtype,
// and empty without with_grad (grad student_bias also without a bias). row_scale (N values, for
// "none" only) multiplies each row's logit gradient: the backward of "none" reruns the chunks
// with grad_output as row_scale, so no N x V tensor outlives the forward pass.

#include "fused_linear_distill_loss.h"

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(sokd, m) {
  m.def("fused_linear_distill_loss(Tensor student_hidden, Tensor student_weight, "
        "Tensor teacher_hidden, Tensor teacher_weight, Tensor? student_bias, "
        "Tensor? teacher_bias, Tensor? labels, Tensor? row_scale, str divergence, float beta, "
        "float temperature, int ignore_index, str reduction, Tensor? num_items, "
        "SymInt vocab_size, int chunk_size, bool with_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}
