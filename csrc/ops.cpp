// The sokd operator library: every schema in one place. The CPU kernels register in
// csrc/cpu, the CUDA kernels in csrc/cuda, the autograd of the losses in csrc/autograd.cpp;
// sokd/native.py adds the fake tensors.
//
// The loss ops return (loss, grad_student): the fused kernels compute the gradient in the
// same pass as the loss, and backward only scales it. With with_grad=false the gradient is
// skipped and returned empty.

#include <Python.h>
#include <torch/library.h>

#include "cpu/outputs.h"

extern "C" {
// Importing sokd._C runs the static TORCH_LIBRARY registrations. The module itself only
// says whether the CUDA kernels were compiled in (WITH_CUDA), so tests can hold the
// registrations to the build.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* created = PyModule_Create(&module);
#ifdef SOKD_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (created != nullptr && PyModule_AddIntConstant(created, "WITH_CUDA", with_cuda) != 0) {
    Py_DECREF(created);
    return nullptr;
  }
  return created;
}
}

TORCH_LIBRARY(sokd, m) {
  m.def("masked_feature_loss(Tensor student, Tensor teacher, Tensor? mask, "
        "bool normalize_by_mask, bool with_grad) -> (Tensor, Tensor)");
  m.def("kd_loss(Tensor student_logits, Tensor teacher_logits, float temperature, "
        "Tensor? weight, bool with_grad) -> (Tensor, Tensor)");
  m.def("decoupled_kd_loss(Tensor student_logits, Tensor teacher_logits, Tensor class_mask, "
        "float alpha, float beta, float temperature, bool with_grad) -> (Tensor, Tensor)");
  m.def("interest_map(Tensor heat, Tensor wh, Tensor offset, int k, int kernel) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("feature_augment(Tensor x, int[] op_ids, Tensor values, Tensor?[] draws, "
        "int[] noise_seeds) -> Tensor");
  m.def("release_cached_outputs() -> int", &sokd::cpu::release_cached_outputs);
}
