// Schema of sokd::logit_distill_loss (docs/algorithm.md §7). The CPU kernel is
// csrc/cpu/logit_distill_loss_kernel.cpp and the CUDA kernel the Triton launcher
// kernels/logit_distill_loss.py (there is no CUDA C++ kernel); the autograd is in
// csrc/autograd.cpp, the fake in sokd/native.py.
//
// Rows are 2-D: student_logits N x Vs, and either teacher_logits N x Vt or the top-k teacher
// (teacher_logprobs float32/float64 N x k, teacher_indices int64 N x k). Both logits are cut to
// their first vocab_size columns. Returns (loss, grad): loss is a scalar for reduction "mean"
// and "sum" and N row values for "none"; grad is d loss / d student_logits for "mean" and
// "sum", and d row_loss / d student_logits for "none", in student_logits' dtype and shape
// (zero beyond vocab_size and on ignored rows): unlike the other losses, whose gradient is in
// the accumulation dtype, an N x V gradient of 16-bit logits stays 16-bit, as large as the
// logits and no larger. With with_grad=false grad is empty.

// The C++ entry is header-only; included here so that every build compiles it.
#include "logit_distill_loss.h"

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(sokd, m) {
  m.def("logit_distill_loss(Tensor student_logits, Tensor? teacher_logits, "
        "Tensor? teacher_logprobs, Tensor? teacher_indices, Tensor? labels, str divergence, "
        "float beta, float temperature, int ignore_index, str reduction, Tensor? num_items, "
        "SymInt vocab_size, bool with_grad) -> (Tensor, Tensor)");
}
