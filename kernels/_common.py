"""Launch heuristics, tensor views and the backward guard shared by the Triton kernels.

Block sizes come from these heuristics rather than from `triton.autotune`: a choice that
depends only on the shape keeps every reduction's summation order fixed from one process to
the next (the losses are bitwise reproducible), costs no tuning runs, and behaves the same
under the Triton interpreter, where tuning every config would be very slow. The numbers target
H100 and H200: 128-thread programs for tiles up to 2048 elements, more warps for larger
tiles, and at least a few thousand programs in flight when the shape allows it.
"""

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

# Above this many elements per input tile the registers spill; longer rows are walked in
# chunks of at most this size.
MAX_TILE = 4096
# Enough programs to fill the 132 SMs of an H100 or H200 several times over.
TARGET_PROGRAMS = 1024


def accumulator_type(dtype):
    """float64 inputs accumulate in float64, every other floating type in float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def loss_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def saved_gradient_dtype(dtype):
    """float16 and bfloat16 gradients are kept in float32 until backward has applied the
    incoming gradient, so they are rounded to their own type once, as the float32 result of
    the reference is. Other types keep their own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def saved_gradient_like(view, compute_grad):
    """The buffer for a saved gradient (same strides as `view` when it is dense, float32 for
    half types), or an empty placeholder when no gradient is wanted."""
    if not compute_grad:
        return view.new_empty(0)
    return torch.empty_like(view, dtype=saved_gradient_dtype(view.dtype))


def reciprocal_or_zero(total):
    """1 / total as a 0-d tensor, 0 where total is 0; computed on the device, no sync."""
    nonzero = total != 0
    return torch.where(nonzero, 1 / torch.where(nonzero, total, 1), 0)


def apply_saved_gradient(saved, grad_loss, dtype):
    """d loss / d input = saved * grad_loss in one pass, rounded once to the input's dtype.

    The saved gradient already carries the loss's normalisation, so this is the only pass
    backward makes. It always makes it: handing the saved buffer itself to a seed of 1 would
    alias it with the result of every later backward through a retained graph, and on a GPU
    reading the seed would cost a host sync."""
    result = torch.empty_like(saved, dtype=dtype)
    return torch.mul(saved, grad_loss, out=result)


def from_image_rows(view, shape):
    """Undo `image_rows`: the (images, classes, rows) view back in the logits' own shape."""
    if len(shape) == 2:
        return view[0].t()
    return view.view(shape)


class _SecondDerivativeRefused(torch.autograd.Function):
    """Identity on the first derivative; a backward through it raises. It also takes the
    op's differentiable inputs, so a second derivative with respect to them passes through it
    and raises instead of finding them unused."""

    @staticmethod
    def forward(ctx, gradient, op, *inputs):
        ctx.op = op
        return gradient.view_as(gradient)

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(
            f"{ctx.op} is differentiable once: its fused kernel saves the first derivative "
            "only. Use the reference backend for higher-order gradients."
        )


def keep_differentiable_inputs(ctx, *inputs):
    """Keeps the inputs that get a gradient on ctx for differentiable_once: plain references,
    not saved tensors, so an in-place change of an input after forward stays allowed (the
    backward does not read them)."""
    ctx.differentiable_inputs = tuple(x for x in inputs if x.requires_grad)


def differentiable_once(op):
    """Decorates the backward of a fused loss whose setup_context called
    keep_differentiable_inputs. Its kernel saves the first derivative only, so under
    create_graph=True the gradients would silently miss every second-order term: they come
    back through a node that raises on a second backward instead, with respect to the result
    or to the inputs. (torch's once_differentiable does this only when grad_output requires
    grad, which a loss's seed never does.)"""

    def decorate(backward):
        @functools.wraps(backward)
        def guarded(ctx, *grad_outputs):
            if not torch.is_grad_enabled():
                return backward(ctx, *grad_outputs)
            with torch.no_grad():
                gradients = backward(ctx, *grad_outputs)
            inputs = ctx.differentiable_inputs
            return tuple(
                None
                if gradient is None
                else _SecondDerivativeRefused.apply(
                    gradient.detach().requires_grad_(True), op, *inputs
                )
                for gradient in gradients
            )

        return guarded

    return decorate
