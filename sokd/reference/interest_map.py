"""Reference DAM peak decoding (docs/algorithm.md §4): local maxima, top-k, boxes, count map."""

import torch
import torch.nn.functional as F

from .common import accumulation_dtype


def _top_k_lowest_index_first(values, k):
    # A stable descending sort keeps equal values in index order, which is the tie rule.
    order = torch.sort(values, dim=1, descending=True, stable=True)
    return order.values[:, :k], order.indices[:, :k]


@torch.no_grad()
def interest_map(heat, wh, offset, k, kernel):
    n, _, height, width = heat.shape
    acc = accumulation_dtype(heat.dtype)
    heat_acc = heat.to(acc)
    pooled = F.max_pool2d(heat_acc, kernel, stride=1, padding=(kernel - 1) // 2)
    peaks = torch.where(heat_acc == pooled, heat_acc, 0.0)
    scores, flat_index = _top_k_lowest_index_first(peaks.reshape(n, -1), k)

    position = flat_index % (height * width)
    ys = (position // width).to(acc)
    xs = (position % width).to(acc)

    def at_peaks(maps, channel):
        return maps[:, channel].reshape(n, -1).to(acc).gather(1, position)

    cx = xs + at_peaks(offset, 0)
    cy = ys + at_peaks(offset, 1)
    half_w = at_peaks(wh, 0) / 2
    half_h = at_peaks(wh, 1) / 2
    # The clamps past the map (W, -1) leave every box's coverage as docs/algorithm.md §4
    # defines it, and keep huge centres from overflowing the integer conversion.
    x1 = torch.clamp(cx - half_w, 0, width).trunc()
    y1 = torch.clamp(cy - half_h, 0, height).trunc()
    x2 = torch.clamp(cx + half_w, -1, width - 1).trunc()
    y2 = torch.clamp(cy + half_h, -1, height - 1).trunc()
    boxes = torch.stack((x1, y1, x2, y2), dim=-1).to(torch.int64)

    cols = torch.arange(width, device=heat.device)
    rows = torch.arange(height, device=heat.device)
    in_cols = (cols >= boxes[..., 0:1]) & (cols <= boxes[..., 2:3])
    in_rows = (rows >= boxes[..., 1:2]) & (rows <= boxes[..., 3:4])
    count = (in_rows[:, :, :, None] & in_cols[:, :, None, :]).sum(dim=1, dtype=torch.float32)
    return count, boxes, scores.to(heat.dtype)
