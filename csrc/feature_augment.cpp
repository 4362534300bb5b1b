// Schema of sokd::feature_augment (docs/algorithm.md §1).
// The primitive ops applied in order, in one pass. No gradient (the
// straight-through rule lives in sokd/ops.py).
//
// CPU kernel: csrc/cpu/feature_augment_kernel.cpp
// CUDA kernel: csrc/cuda/feature_augment_kernel.cu
// Triton kernel: kernels/feature_augment.py
// Reference: sokd/reference/feature_augment.py
// Fake: sokd/native.py

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(sokd, m) {
  m.def("feature_augment(Tensor x, int[] op_ids, Tensor values, Tensor?[] draws, "
        "int[] noise_seeds) -> Tensor");
}
