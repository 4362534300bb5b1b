// Schema of sokd::interest_map (docs/algorithm.md §4).
// DAM peak decoding into (count_map, boxes, scores). No gradient.
//
// CPU kernel: csrc/cpu/interest_map_kernel.cpp
// CUDA kernel: csrc/cuda/interest_map_kernel.cu
// Triton kernel: kernels/interest_map.py
// Reference: sokd/reference/interest_map.py
// Fake: sokd/native.py

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(sokd, m) {
  m.def("interest_map(Tensor heat, Tensor wh, Tensor offset, int k, int kernel) "
        "-> (Tensor, Tensor, Tensor)");
}
