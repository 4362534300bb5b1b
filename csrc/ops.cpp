// The sokd operator library and the module init of sokd._C. Each op has its schema in
// csrc/<op>.cpp (a TORCH_LIBRARY_FRAGMENT), its CPU kernel in csrc/cpu/<op>_kernel.cpp, its
// CUDA kernel in csrc/cuda/<op>_kernel.cu, or, when it is composed of other ops, one kernel for
// every device in csrc/composite/<op>_kernel.cpp; the autograd of the losses is
// csrc/autograd.cpp and sokd/native.py adds the fake tensors.
//
// The loss ops return (loss, grad_student), both in the accumulation dtype (csrc/accumulation.h):
// the fused kernels compute the gradient in the same pass as the loss, and backward only scales
// it. The Triton launchers of kernels/ implement the same ops (sokd/native.py routes to them).

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
  m.def("release_cached_outputs() -> int", &sokd::cpu::release_cached_outputs);
}
