"""Launch heuristics, tensor views and output buffers shared by the Triton kernels.

Block sizes come from these heuristics rather than from `triton.autotune`: a choice that
depends only on the shape keeps every reduction's summation order fixed from one process to
the next (the losses are bitwise reproducible), costs no tuning runs, and behaves the same
under the Triton interpreter, where tuning every config would be very slow. The numbers target
H100 and H200: 128-thread programs for tiles up to 2048 elements, more warps for larger
tiles, and at least a few thousand programs in flight when the shape allows it.
"""

import contextlib
import math

import torch
import triton
import triton.language as tl

from sokd.reference.common import accumulation_dtype

# Above this many elements per input tile the registers spill; longer rows are walked in
# chunks of at most this size.
MAX_TILE = 4096
# Enough programs to fill the 132 SMs of an H100 or H200 several times over.
TARGET_PROGRAMS = 1024


_TRITON_TYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def accumulator_type(dtype):
    """The Triton type of accumulation_dtype(dtype), the rule every backend follows."""
    return _TRITON_TYPES[accumulation_dtype(dtype)]


def num_warps_for(tile_elements):
    if tile_elements <= 2048:
        return 4
    if tile_elements <= 8192:
        return 8
    return 16


def row_tile(classes, rows_per_image, max_tile=MAX_TILE):
    """(BLOCK_ROWS, BLOCK_CLASSES) for softmax rows: a whole row per tile when it fits
    max_tile, several short rows per tile, and chunks of max_tile classes for long rows."""
    block_classes = min(triton.next_power_of_2(classes), max_tile)
    block_rows = min(triton.next_power_of_2(rows_per_image), max(1, max_tile // block_classes))
    return block_rows, block_classes


def image_rows(tensor):
    """A 3-D view (images, classes, rows per image) of N x K logits or N x K x H x W maps.

    N x K logits become one image of N rows (1, K, N); dense maps become (N, K, H*W). The
    result is a view whenever the strides allow, so non-contiguous inputs are not copied.
    """
    if tensor.dim() == 2:
        return tensor.t().unsqueeze(0)
    n, k = tensor.shape[:2]
    return tensor.reshape(n, k, -1)


def launch_strides(view):
    """The strides of `view` for a kernel, 0 for every dimension of size 1.

    Only index 0 of such a dimension is ever read, so its stride is free; 0 lets Triton's
    specialisation see it as divisible by 16, which the vector-load analysis needs."""
    return tuple(0 if size == 1 else stride for size, stride in zip(view.shape, view.stride()))


def row_alignment(classes, *views):
    """The largest power of two, at most 16, that divides the row length `classes`, the row
    stride (the last dimension of `image_rows` views) and the storage offset of every view,
    in elements.

    Triton proves alignment and uniform masks only for values divisible by 16, so N x K
    logits with K = 1000 would be read one element at a time. The kernels hint this value
    instead: K = 1000 is still read 16 bytes at a time, and an odd K falls back to scalars."""
    common = classes
    for view in views:
        if view.numel():  # an empty placeholder (no gradient wanted) is never read
            common = math.gcd(common, launch_strides(view)[-1], view.storage_offset())
    alignment = 16
    while alignment > 1 and common % alignment:
        alignment //= 2
    return alignment


def per_row(weight, logits_dim):
    """Row weights as a 2-D view (images, rows per image) matching `image_rows`."""
    if logits_dim == 2:
        return weight.unsqueeze(0)
    return weight.reshape(weight.shape[0], -1)


def on_device(tensor):
    """The device guard of a launch: Triton launches on the current CUDA device, so tensors on
    cuda:1 need cuda:1 made current, as PyTorch's own CUDA ops do. Entering it costs one
    device exchange; CPU tensors (the interpreter) need no guard."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def gradient_like(tensor, with_grad):
    """The gradient buffer of a loss op, as the sokd:: schema returns it: contiguous, in the
    accumulation dtype (float32 for 16-bit inputs, rounded once by the autograd after it
    scales the gradient), or an empty placeholder of that dtype when no gradient is wanted."""
    dtype = accumulation_dtype(tensor.dtype)
    return torch.empty(tensor.shape if with_grad else (0,), dtype=dtype, device=tensor.device)


def reciprocal_or_zero(total):
    """1 / total as a 0-d tensor, 0 where total is 0; computed on the device, no sync."""
    nonzero = total != 0
    return torch.where(nonzero, 1 / torch.where(nonzero, total, 1), 0)
