"""The reference interest_map against a hand-derived case and a plain Python loop."""

import math

import pytest
import torch

import sokd
from sokd import ops


@pytest.fixture(autouse=True)
def reference_backend():
    sokd.set_backend("reference")


def loop_interest_map(heat, wh, offset, k, kernel):
    """docs/algorithm.md §4 step by step with Python loops and floats."""
    n_images, channels, height, width = heat.shape
    radius = (kernel - 1) // 2
    counts, all_boxes, all_scores = [], [], []
    for n in range(n_images):
        candidates = []
        for c in range(channels):
            for y in range(height):
                for x in range(width):
                    value = float(heat[n, c, y, x])
                    window = [
                        float(heat[n, c, yy, xx])
                        for yy in range(max(0, y - radius), min(height, y + radius + 1))
                        for xx in range(max(0, x - radius), min(width, x + radius + 1))
                    ]
                    kept = value if value == max(window) else 0.0
                    candidates.append((-kept, (c * height + y) * width + x))
        candidates.sort()
        count = [[0] * width for _ in range(height)]
        boxes, scores = [], []
        for negative_score, index in candidates[:k]:
            p = index % (height * width)
            y, x = p // width, p % width
            cx = x + float(offset[n, 0, y, x])
            cy = y + float(offset[n, 1, y, x])
            w, h = float(wh[n, 0, y, x]), float(wh[n, 1, y, x])
            x1 = math.trunc(max(cx - w / 2, 0))
            y1 = math.trunc(max(cy - h / 2, 0))
            x2 = math.trunc(min(cx + w / 2, width - 1))
            y2 = math.trunc(min(cy + h / 2, height - 1))
            boxes.append((x1, y1, x2, y2))
            scores.append(-negative_score)
            for yy in range(max(y1, 0), min(y2, height - 1) + 1):
                for xx in range(max(x1, 0), min(x2, width - 1) + 1):
                    count[yy][xx] += 1
        counts.append(count)
        all_boxes.append(boxes)
        all_scores.append(scores)
    return counts, all_boxes, all_scores


def test_hand_derived_case():
    heat = torch.zeros(1, 1, 4, 5)
    heat[0, 0, 1, 1], heat[0, 0, 2, 3], heat[0, 0, 1, 2] = 0.9, 0.8, 0.5
    wh, offset = torch.zeros(1, 2, 4, 5), torch.zeros(1, 2, 4, 5)
    wh[0, :, 1, 1] = torch.tensor([2.0, 2.0])
    offset[0, :, 1, 1] = torch.tensor([0.5, 0.0])  # centre (1.5, 1): box (0, 0, 2, 2)
    wh[0, :, 2, 3] = torch.tensor([4.0, 1.0])
    offset[0, :, 2, 3] = torch.tensor([0.0, 0.25])  # centre (3, 2.25): box (1, 1, 4, 2)

    count, boxes, scores = ops.interest_map(heat, wh, offset, k=2)
    assert boxes.tolist() == [[[0, 0, 2, 2], [1, 1, 4, 2]]]
    assert scores[0].tolist() == pytest.approx([0.9, 0.8])
    expected = [
        [1, 1, 1, 0, 0],
        [1, 2, 2, 1, 1],
        [1, 2, 2, 1, 1],
        [0, 0, 0, 0, 0],
    ]
    assert count[0].tolist() == expected
    assert count.dtype == torch.float32 and boxes.dtype == torch.int64

    # The 0.5 next to 0.9 is not a local maximum, so the third pick is a zero; among the tied
    # zeros the lowest flat index (0, 0) wins, and its empty-sized box covers (0, 0) itself.
    count3, boxes3, scores3 = ops.interest_map(heat, wh, offset, k=3)
    assert boxes3[0, 2].tolist() == [0, 0, 0, 0] and scores3[0, 2].item() == 0.0
    expected[0][0] += 1
    assert count3[0].tolist() == expected


def test_ties_go_to_lower_flat_index():
    heat = torch.full((2, 2, 3, 3), 0.5)
    wh = torch.zeros(2, 2, 3, 3)
    _, boxes, _ = ops.interest_map(heat, wh, torch.zeros(2, 2, 3, 3), k=4)
    positions = [(b[0], b[1]) for b in boxes[0].tolist()]
    assert positions == [(0, 0), (1, 0), (2, 0), (0, 1)]


@pytest.mark.parametrize(
    "shape,k,kernel",
    [((2, 1, 7, 9), 5, 3), ((3, 2, 5, 4), 40, 5), ((1, 1, 1, 1), 1, 3), ((2, 3, 6, 6), 7, 1)],
)
def test_matches_python_loop(shape, k, kernel):
    generator = torch.Generator().manual_seed(sum(shape) + k)
    n, _, h, w = shape
    heat = torch.rand(shape, generator=generator, dtype=torch.float64)
    heat = torch.where(heat > 0.7, heat, torch.zeros_like(heat))  # plenty of ties at zero
    wh = torch.rand((n, 2, h, w), generator=generator, dtype=torch.float64) * 6
    offset = torch.rand((n, 2, h, w), generator=generator, dtype=torch.float64) * 4 - 2
    count, boxes, scores = ops.interest_map(heat, wh, offset, k=k, kernel=kernel)
    expected_count, expected_boxes, expected_scores = loop_interest_map(heat, wh, offset, k, kernel)
    assert count.tolist() == expected_count
    assert boxes.tolist() == [[list(b) for b in per_image] for per_image in expected_boxes]
    assert scores.tolist() == expected_scores


def test_huge_offsets_give_empty_boxes_without_overflow():
    heat = torch.rand(1, 1, 4, 4)
    wh = torch.ones(1, 2, 4, 4)
    offset = torch.full((1, 2, 4, 4), 1e30)
    count, boxes, _ = ops.interest_map(heat, wh, offset, k=3)
    assert count.sum().item() == 0
    assert (boxes[..., 0] > boxes[..., 2]).all()
