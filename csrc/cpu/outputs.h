#pragma once
// Allocation of the outputs that the CPU kernels write.

#include <ATen/ATen.h>

#include <cstdint>

namespace sokd::cpu {

// Outputs from this size on come from the reuse cache below and start on a 2 MiB boundary.
constexpr size_t kLargeOutputBytes = size_t(16) << 20;

// A new contiguous tensor shaped like `like`, for a kernel to fill completely.
//
// Large outputs (a loss gradient, an augmented map) are allocated every training step with
// the same size. A fresh allocation of that size comes from the operating system, which
// zeroes every page on its first write: for a 128 MiB gradient that is one more full write
// of the buffer, more than the fused kernel's own write. Freed large outputs are therefore
// kept in a small cache (a few blocks, 1 GiB at most) and handed to the next output of the
// same size; release_cached_outputs() gives them back to the system. New blocks are 2 MiB
// aligned and advised to use transparent huge pages, which makes the first-touch faults 512
// times fewer where the system allows it.
at::Tensor empty_output_like(const at::Tensor& like);

// Frees every cached output block; returns the bytes released.
int64_t release_cached_outputs();

}  // namespace sokd::cpu
