"""DAM peak decoding (docs/algorithm.md §4) in three small kernels.

1. Candidates: each program takes a chunk of one image's heat_channels x H x W values, keeps
   the local maxima of its kernel x kernel window (others become 0, as in the reference) and
   picks the chunk's own top k. The window is a loop at run time, clipped to the map (taps
   outside it read -inf and change nothing), so neither compile time nor run time grows with
   a kernel larger than the map.
2. Decode: one program per image picks the top k among the chunks' candidates and turns each
   peak into a box with the reference's clamps.
3. Count map: every position counts the boxes that cover it.

The order used for top-k is "larger value first, then lower flat index", which is exactly a
stable descending sort. Selection walks that order: the next pick is the best candidate that
comes after the previous pick, so nothing has to be marked as taken. Everything is computed in
the accumulation type of the reference, so the outputs are equal, not just close.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from sokd.reference.common import accumulation_dtype

from ._common import accumulator_type, num_warps_for, on_device

# A flat index past every real one marks an unused candidate slot.
_NO_INDEX = tl.constexpr(2**62)


@triton.jit
def _next_in_order(values, index, eligible, prev_value, prev_index):
    """The best (value, index) that comes after (prev_value, prev_index) in the order
    'larger value first, then lower index', among the eligible entries of a 1-D block."""
    after = (values < prev_value) | ((values == prev_value) & (index > prev_index))
    candidate = eligible & after
    best = tl.max(tl.where(candidate, values, float("-inf")), axis=0)
    best_index = tl.min(tl.where(candidate & (values == best), index, _NO_INDEX), axis=0)
    return best, best_index


@triton.jit
def _image_block(blocks, BLOCK: tl.constexpr):
    """(program, its image, its BLOCK offsets within the image), all 64-bit. The grid has one
    dimension, images x blocks: the second and third are limited to 65535."""
    program = tl.program_id(0).to(tl.int64)
    return program, program // blocks, (program % blocks) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _candidates_kernel(
    heat_ptr,
    value_ptr,
    index_ptr,
    k,
    channels,
    height,
    width,
    heat_stride_n,
    heat_stride_c,
    heat_stride_h,
    heat_stride_w,
    radius_y,
    radius_x,
    chunks,
    ACC_TYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # 64-bit: heat_channels x H x W of one image may pass 2^31.
    program, image, flat = _image_block(chunks, BLOCK)
    plane = height * width
    in_map = flat // plane < channels
    channel = flat // plane
    y = (flat % plane) // width
    x = flat % width
    base = heat_ptr + image * heat_stride_n + channel * heat_stride_c
    value = tl.load(base + y * heat_stride_h + x * heat_stride_w, mask=in_map, other=0).to(ACC_TYPE)
    pooled = tl.full((BLOCK,), float("-inf"), ACC_TYPE)
    # radius_y and radius_x are the window's half sizes clipped to the map; the loops run at
    # run time, so a user's kernel size is never unrolled by the compiler.
    for dy in range(0, 2 * radius_y + 1):
        ny = y + (dy - radius_y)
        row_inside = in_map & (ny >= 0) & (ny < height)
        row_at = base + ny * heat_stride_h
        for dx in range(0, 2 * radius_x + 1):
            nx = x + (dx - radius_x)
            inside = row_inside & (nx >= 0) & (nx < width)
            neighbour = tl.load(
                row_at + nx * heat_stride_w, mask=inside, other=float("-inf")
            ).to(ACC_TYPE)
            # NaN spreads through the window, as it does through the reference's max-pool.
            pooled = tl.maximum(pooled, neighbour, propagate_nan=tl.PropagateNan.ALL)
    peak = tl.where(value == pooled, value, 0.0)

    slot_base = program * k
    best = tl.full((), float("inf"), ACC_TYPE)
    best_index = tl.full((), -1, tl.int64)
    for slot in range(k):
        best, best_index = _next_in_order(peak, flat.to(tl.int64), in_map, best, best_index)
        tl.store(value_ptr + slot_base + slot, best)
        tl.store(index_ptr + slot_base + slot, best_index)


@triton.jit
def _decode_kernel(
    value_ptr,
    index_ptr,
    wh_ptr,
    offset_ptr,
    boxes_ptr,
    scores_ptr,
    k,
    candidates,
    height,
    width,
    wh_stride_n,
    wh_stride_c,
    wh_stride_h,
    wh_stride_w,
    offset_stride_n,
    offset_stride_c,
    offset_stride_h,
    offset_stride_w,
    ACC_TYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    image = tl.program_id(0).to(tl.int64)
    candidate_base = image * candidates
    lane = tl.arange(0, BLOCK)
    best = tl.full((), float("inf"), ACC_TYPE)
    best_index = tl.full((), -1, tl.int64)
    for pick in range(k):
        pick_value = tl.full((), float("-inf"), ACC_TYPE)
        pick_index = tl.full((), _NO_INDEX, tl.int64)
        for start in range(0, candidates, BLOCK):
            slot = (start + lane).to(tl.int64)
            present = slot < candidates
            values = tl.load(value_ptr + candidate_base + slot, mask=present, other=float("-inf"))
            index = tl.load(index_ptr + candidate_base + slot, mask=present, other=_NO_INDEX)
            block_value, block_index = _next_in_order(values, index, present, best, best_index)
            better = (block_value > pick_value) | (
                (block_value == pick_value) & (block_index < pick_index)
            )
            pick_value = tl.where(better, block_value, pick_value)
            pick_index = tl.where(better, block_index, pick_index)
        best = pick_value
        best_index = pick_index

        position = best_index % (height * width)
        y = position // width
        x = position % width
        wh_at = wh_ptr + image * wh_stride_n + y * wh_stride_h + x * wh_stride_w
        offset_at = offset_ptr + image * offset_stride_n + y * offset_stride_h + x * offset_stride_w
        centre_x = x.to(ACC_TYPE) + tl.load(offset_at).to(ACC_TYPE)
        centre_y = y.to(ACC_TYPE) + tl.load(offset_at + offset_stride_c).to(ACC_TYPE)
        half_w = tl.load(wh_at).to(ACC_TYPE) / 2
        half_h = tl.load(wh_at + wh_stride_c).to(ACC_TYPE) / 2
        # The reference's clamps: past the map (W, -1) so coverage is as docs/algorithm.md §4
        # defines it, and bounded so that huge centres cannot overflow the integer conversion.
        x1 = tl.minimum(tl.maximum(centre_x - half_w, 0.0), width * 1.0)
        y1 = tl.minimum(tl.maximum(centre_y - half_h, 0.0), height * 1.0)
        x2 = tl.minimum(tl.maximum(centre_x + half_w, -1.0), (width - 1) * 1.0)
        y2 = tl.minimum(tl.maximum(centre_y + half_h, -1.0), (height - 1) * 1.0)
        box = boxes_ptr + (image * k + pick) * 4
        tl.store(box, x1.to(tl.int64))
        tl.store(box + 1, y1.to(tl.int64))
        tl.store(box + 2, x2.to(tl.int64))
        tl.store(box + 3, y2.to(tl.int64))
        tl.store(scores_ptr + image * k + pick, best.to(scores_ptr.dtype.element_ty))


@triton.jit
def _count_kernel(
    boxes_ptr,
    count_ptr,
    k,
    height,
    width,
    position_blocks,
    BLOCK_P: tl.constexpr,
    BLOCK_BOXES: tl.constexpr,
):
    _, image, position = _image_block(position_blocks, BLOCK_P)
    in_map = position < height * width
    y = (position // width)[:, None]
    x = (position % width)[:, None]
    count = tl.zeros((BLOCK_P,), tl.float32)
    for start in range(0, k, BLOCK_BOXES):
        box_id = start + tl.arange(0, BLOCK_BOXES)
        present = box_id < k
        box = boxes_ptr + (image * k + box_id) * 4
        x1 = tl.load(box, mask=present, other=1)[None, :]
        y1 = tl.load(box + 1, mask=present, other=1)[None, :]
        x2 = tl.load(box + 2, mask=present, other=0)[None, :]
        y2 = tl.load(box + 3, mask=present, other=0)[None, :]
        covers = (x >= x1) & (x <= x2) & (y >= y1) & (y <= y2)
        count += tl.sum(covers.to(tl.float32), axis=1)
    tl.store(count_ptr + image * height * width + position, count, mask=in_map)


def launch_plan(images, channels, height, width, k):
    """Block sizes and grids of the three kernels for images x channels x H x W heat maps.

    Every grid has one dimension, whose limit is 2^31 - 1 programs; images and blocks are
    folded into it, because grid dimensions 1 and 2 stop at 65535."""
    values = channels * height * width
    chunk = min(max(1024, triton.next_power_of_2(k)), triton.next_power_of_2(values))
    chunks = triton.cdiv(values, chunk)
    candidate_block = min(triton.next_power_of_2(chunks * k), 4096)
    block_p = min(triton.next_power_of_2(height * width), 256)
    position_blocks = triton.cdiv(height * width, block_p)
    return {
        "chunk": chunk,
        "chunks": chunks,
        "candidates_grid": (images * chunks,),
        "candidate_block": candidate_block,
        "decode_grid": (images,),
        "block_p": block_p,
        "block_boxes": min(triton.next_power_of_2(k), 16),
        "position_blocks": position_blocks,
        "count_grid": (images * position_blocks,),
    }


def _block(size):
    """A kernel's BLOCK and the warps that suit it."""
    return {"BLOCK": size, "num_warps": num_warps_for(size)}


def interest_map(heat, wh, offset, k, kernel):
    """The sokd::interest_map schema: (count map (N x H x W float32), boxes (N x k x 4
    int64), scores (N x k, heat's dtype))."""
    images, channels, height, width = heat.shape
    acc_type = accumulator_type(heat.dtype)
    values_dtype = accumulation_dtype(heat.dtype)
    plan = launch_plan(images, channels, height, width, k)
    chunks = plan["chunks"]
    radius = (kernel - 1) // 2
    candidate_values = heat.new_empty((images, chunks, k), dtype=values_dtype)
    candidate_index = heat.new_empty((images, chunks, k), dtype=torch.int64)
    boxes = heat.new_empty((images, k, 4), dtype=torch.int64)
    scores = heat.new_empty((images, k))
    count = heat.new_empty((images, height, width), dtype=torch.float32)
    with on_device(heat):
        wrap_triton(_candidates_kernel)[plan["candidates_grid"]](
            heat,
            candidate_values,
            candidate_index,
            k,
            channels,
            height,
            width,
            *heat.stride(),
            min(radius, height - 1),
            min(radius, width - 1),
            chunks,
            ACC_TYPE=acc_type,
            **_block(plan["chunk"]),
        )
        wrap_triton(_decode_kernel)[plan["decode_grid"]](
            candidate_values,
            candidate_index,
            wh,
            offset,
            boxes,
            scores,
            k,
            chunks * k,
            height,
            width,
            *wh.stride(),
            *offset.stride(),
            ACC_TYPE=acc_type,
            **_block(plan["candidate_block"]),
        )
        wrap_triton(_count_kernel)[plan["count_grid"]](
            boxes,
            count,
            k,
            height,
            width,
            plan["position_blocks"],
            BLOCK_P=plan["block_p"],
            BLOCK_BOXES=plan["block_boxes"],
            num_warps=num_warps_for(plan["block_p"] * plan["block_boxes"]),
        )
    return count, boxes, scores
