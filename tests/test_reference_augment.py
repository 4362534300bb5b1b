"""Reference feature augmentation: hand-derived cases, grid_sample equivalence, composition,
random draws, and the straight-through gradient."""

import math

import pytest
import torch
import torch.nn.functional as F

import sokd
from sokd import ops
from sokd.augment_ops import draw_randomness

AFFINE = [0, 1, 2, 3, 4]
# Mapped magnitudes are float32 on every backend, so float64 maps agree to float32 precision.
MAGNITUDE_TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(autouse=True)
def reference_backend():
    sokd.set_backend("reference")


def theta_from_table(op, m):
    """docs/algorithm.md §1's affine table, written out independently of sokd.augment_ops."""
    ranges = {0: 0.3, 1: 0.3, 2: 0.45, 3: 0.45, 4: 30.0}
    v = -ranges[op] + min(max(m, 0.0), 1.0) * 2 * ranges[op]
    if op == 0:
        return [[1, v, 0], [0, 1, 0]]
    if op == 1:
        return [[1, 0, 0], [v, 1, 0]]
    if op == 2:
        return [[1, 0, 2 * v], [0, 1, 0]]
    if op == 3:
        return [[1, 0, 0], [0, 1, 2 * v]]
    a = v * math.pi / 180
    return [[math.cos(a), math.sin(a), 0], [-math.sin(a), math.cos(a), 0]]


def grid_sample_with(x, theta):
    theta = torch.tensor(theta, dtype=x.dtype).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment(x, op_ids, mags, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return ops.feature_augment(x, op_ids, torch.tensor(mags, dtype=torch.float64), generator)


@pytest.mark.parametrize("op", AFFINE)
@pytest.mark.parametrize("m", [0.0, 0.23, 0.5, 0.91, 1.0, 1.7])
def test_affine_ops_match_affine_grid_and_grid_sample(op, m):
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    expected = grid_sample_with(x, theta_from_table(op, m))
    torch.testing.assert_close(augment(x, [op], [m]), expected, **MAGNITUDE_TOL)


@pytest.mark.parametrize("op", AFFINE)
def test_affine_ops_are_identity_at_midpoint(op):
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    torch.testing.assert_close(augment(x, [op], [0.5]), x, **MAGNITUDE_TOL)


def test_translate_x_shifts_by_v_times_width_pixels():
    x = torch.arange(2 * 4 * 4, dtype=torch.float64).reshape(1, 2, 4, 4)
    m = (0.25 + 0.45) / 0.9  # v = 0.25: a shift of 0.25 * 4 = 1 pixel
    expected = torch.zeros_like(x)
    expected[..., :, :3] = x[..., :, 1:]  # theta maps output x to input x + 1 pixel
    torch.testing.assert_close(augment(x, [2], [m]), expected, **MAGNITUDE_TOL)


def test_translate_y_shifts_by_v_times_height_pixels():
    x = torch.randn(1, 2, 4, 3, dtype=torch.float64)
    m = (-0.25 + 0.45) / 0.9  # v = -0.25: output row y reads input row y - 1
    expected = torch.zeros_like(x)
    expected[..., 1:, :] = x[..., :3, :]
    torch.testing.assert_close(augment(x, [3], [m]), expected, **MAGNITUDE_TOL)


def test_two_affine_ops_compose_exactly_not_by_product_matrix():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    first, second = theta_from_table(0, 0.9), theta_from_table(4, 0.1)
    sequential = grid_sample_with(grid_sample_with(x, first), second)
    torch.testing.assert_close(augment(x, [0, 4], [0.9, 0.1]), sequential, **MAGNITUDE_TOL)

    # theta maps output to input, so op_b then op_a gives the single combined matrix
    a = torch.tensor(first + [[0, 0, 1]], dtype=torch.float64)
    b = torch.tensor(second + [[0, 0, 1]], dtype=torch.float64)
    product = grid_sample_with(x, (a @ b)[:2].tolist())
    assert (sequential - product).abs().max() > 1e-3


def test_cutout_zeroes_a_floor_sized_box_at_the_drawn_centre():
    x = torch.randn(3, 2, 10, 10, dtype=torch.float64) + 5
    out = augment(x, [5], [1.0], seed=4)  # v = 0.2: a 2 x 2 box
    (centres,) = draw_randomness([5], x.shape, "cpu", torch.Generator().manual_seed(4))
    for n, (cy, cx) in enumerate(centres.tolist()):
        zero = torch.zeros(10, 10, dtype=torch.bool)
        zero[max(cy - 1, 0) : cy + 1, max(cx - 1, 0) : cx + 1] = True
        assert torch.equal(out[n][:, zero], torch.zeros_like(out[n][:, zero]))
        assert torch.equal(out[n][:, ~zero], x[n][:, ~zero])


def test_cutout_smaller_than_a_pixel_does_nothing():
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(augment(x, [5], [1.0]), x)  # floor(0.2 * 4) = 0


def test_channel_shuffle_permutes_channels_per_sample():
    x = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    out = augment(x, [7], [0.3], seed=7)
    (perm,) = draw_randomness([7], x.shape, "cpu", torch.Generator().manual_seed(7))
    for n in range(4):
        assert sorted(perm[n].tolist()) == list(range(6))
        for c in range(6):
            assert torch.equal(out[n, c], x[n, perm[n, c]])
    assert not all(torch.equal(perm[n], torch.arange(6)) for n in range(4))


def test_channel_drop_zeroes_channels_whose_uniform_is_below_v():
    x = torch.randn(5, 8, 2, 2, dtype=torch.float64) + 3
    out = augment(x, [8], [0.8], seed=9)  # v = 0.4
    (uniforms,) = draw_randomness([8], x.shape, "cpu", torch.Generator().manual_seed(9))
    dropped = uniforms < 0.4
    assert dropped.any() and (~dropped).any()
    assert torch.equal(out[dropped], torch.zeros_like(out[dropped]))
    assert torch.equal(out[~dropped], x[~dropped])


def test_noise_statistics_and_seed_reproducibility():
    x = torch.zeros(4, 16, 32, 32)
    out = augment(x, [6], [1.0], seed=11)  # v = 0.1
    eps = out / 0.1
    assert abs(eps.mean().item()) < 0.02 and abs(eps.std().item() - 1) < 0.02
    assert torch.equal(augment(x, [6], [1.0], seed=11), out)
    assert not torch.equal(augment(x, [6], [1.0], seed=12), out)


def test_half_inputs_keep_their_dtype():
    x = torch.randn(2, 3, 5, 5)
    out = augment(x.to(torch.bfloat16), [1, 8], [0.7, 0.6])
    assert out.dtype == torch.bfloat16
    computed_in_float32 = augment(x.to(torch.bfloat16).float(), [1, 8], [0.7, 0.6])
    assert torch.equal(out, computed_in_float32.to(torch.bfloat16))


@pytest.mark.parametrize("op_ids", [[0, 4], [5, 6], [7, 2], [8, 3]])
def test_straight_through_gradient_is_the_sum_of_the_output_gradient(op_ids):
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    magnitudes = torch.tensor([0.3, 1.4], dtype=torch.float64, requires_grad=True)
    out = ops.feature_augment(x, op_ids, magnitudes, torch.Generator().manual_seed(0))
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    # d out / d m_k = 1 for every element, also past the clamp at 1.0
    torch.testing.assert_close(magnitudes.grad, upstream.sum().expand(2))
