"""The (rows x classes) tiles of the KD kernels (kd_loss.py, decoupled_kd_loss.py).

Both kernels see their logits as (images, classes, rows per image) views (`image_rows`), give
each program BLOCK_R rows of one image, and walk a row's classes in tiles of BLOCK_K. The device
functions below are that shared addressing (they are inlined, so they cost nothing at run
time); `RowLaunch` is the host side the two launchers share: views, tile, grid, buffers and the
leading kernel arguments.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from sokd.reference.common import accumulation_dtype

from ._common import (
    MAX_TILE,
    accumulator_type,
    gradient_like,
    image_rows,
    launch_strides,
    row_alignment,
    row_tile,
)


@triton.jit
def multiple_of(value, ROW_ALIGN: tl.constexpr):
    """`value`, known to be a multiple of ROW_ALIGN (see row_alignment), said as arithmetic
    that the compiler's alignment analysis follows (exact for such values): the loads along a
    row become 16 bytes wide with uniform masks whatever K is."""
    if ROW_ALIGN > 1:
        value = value // ROW_ALIGN * ROW_ALIGN
    return value


@triton.jit
def program_rows(row_blocks, rows, BLOCK_R: tl.constexpr):
    """This program's image, its BLOCK_R rows (64-bit) and which of them exist."""
    block = tl.program_id(0)
    image = (block // row_blocks).to(tl.int64)
    row = (block % row_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    # 64-bit row offsets: N x K logits with a large vocabulary pass 2^31 elements.
    return image, row.to(tl.int64), row < rows


@triton.jit
def row_starts(ptr, image, row64, stride_n, stride_r, ROW_ALIGN: tl.constexpr):
    """A (BLOCK_R x 1) column of pointers to the first class of each row."""
    return ptr + image * stride_n + row64[:, None] * multiple_of(stride_r, ROW_ALIGN)


@triton.jit
def load_scaled(rows_ptr, index, stride_k, valid, row_ok, temperature, ACC_TYPE: tl.constexpr):
    """A (rows x classes) tile at classes `index` divided by T, with -inf outside the row."""
    # 64-bit: the classes of a dense map lie H*W apart, and K*H*W may pass 2^31.
    values = tl.load(
        rows_ptr + index.to(tl.int64)[None, :] * stride_k,
        mask=row_ok[:, None] & valid,
        other=0,
    )
    return tl.where(valid, values.to(ACC_TYPE) / temperature, float("-inf"))


@triton.jit
def load_logits(rows, strides_k, index, classes, row_ok, temperature, ACC_TYPE: tl.constexpr):
    """(student / T, teacher / T, which classes exist) of the tile at classes `index`;
    `rows` and `strides_k` start with the student's and the teacher's."""
    valid = (index < classes)[None, :]
    a = load_scaled(rows[0], index, strides_k[0], valid, row_ok, temperature, ACC_TYPE)
    b = load_scaled(rows[1], index, strides_k[1], valid, row_ok, temperature, ACC_TYPE)
    return a, b, valid


@triton.jit
def store_tile(rows_ptr, index, stride_k, values, valid, row_ok):
    """Store a (rows x classes) tile at classes `index`, in the buffer's element type."""
    tl.store(
        rows_ptr + index.to(tl.int64)[None, :] * stride_k,
        values.to(rows_ptr.dtype.element_ty),
        mask=row_ok[:, None] & valid,
    )


@dataclasses.dataclass
class RowLaunch:
    """The launch of a row kernel for one op call: the views of the logits and of the
    gradient, the tile (BLOCK_R x BLOCK_K) and grid, and the buffer of per-program partial
    sums, which torch adds in a fixed order (deterministic)."""

    student_rows: torch.Tensor
    teacher_rows: torch.Tensor
    grad: torch.Tensor
    grad_rows: torch.Tensor
    with_grad: bool
    block_r: int
    block_k: int
    row_blocks: int
    partials: torch.Tensor

    @classmethod
    def plan(cls, student_logits, teacher_logits, with_grad, max_tile=MAX_TILE):
        student_rows = image_rows(student_logits)
        images, classes, rows = student_rows.shape
        grad = gradient_like(student_logits, with_grad)
        block_r, block_k = row_tile(classes, rows, max_tile)
        row_blocks = triton.cdiv(rows, block_r)
        return cls(
            student_rows=student_rows,
            teacher_rows=image_rows(teacher_logits),
            grad=grad,
            grad_rows=image_rows(grad) if with_grad else grad,
            with_grad=with_grad,
            block_r=block_r,
            block_k=block_k,
            row_blocks=row_blocks,
            partials=student_logits.new_empty(
                images * row_blocks, dtype=accumulation_dtype(student_logits.dtype)
            ),
        )

    @property
    def grid(self):
        return (self.partials.numel(),)

    def mean_scale(self):
        """1 / rows as a 0-d tensor of the accumulation dtype."""
        images, _, rows = self.student_rows.shape
        return torch.full((), 1.0 / (images * rows), dtype=self.partials.dtype,
                          device=self.partials.device)

    def arguments(self, third_rows, third_strides, scale):
        """The kernel's leading arguments: the student's, the teacher's and a third input's
        rows, the scale, the gradient and partial buffers, the shape, then every stride."""
        _, classes, rows = self.student_rows.shape
        grad_strides = launch_strides(self.grad_rows) if self.with_grad else (0, 0, 0)
        return (
            self.student_rows, self.teacher_rows, third_rows, scale, self.grad_rows,
            self.partials, classes, rows, self.row_blocks, *launch_strides(self.student_rows),
            *launch_strides(self.teacher_rows), *third_strides, *grad_strides,
        )

    def options(self, num_warps, *row_views):
        """The kernel's compile-time options; `row_views` are the other inputs read along the
        rows, whose alignment ROW_ALIGN must also hold."""
        classes = self.student_rows.shape[1]
        return dict(
            COMPUTE_GRAD=self.with_grad,
            ACC_TYPE=accumulator_type(self.student_rows.dtype),
            BLOCK_R=self.block_r,
            BLOCK_K=self.block_k,
            SINGLE_CHUNK=classes <= self.block_k,
            ROW_ALIGN=row_alignment(
                classes, self.student_rows, self.teacher_rows, *row_views, self.grad_rows
            ),
            num_warps=num_warps(self.block_r * self.block_k),
        )

    def result(self, scale):
        """The op's (loss, gradient) once the kernel has run."""
        return self.partials.sum() * scale, self.grad
