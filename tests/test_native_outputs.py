"""Large CPU outputs of the native kernels (16 MiB and more): they come from a reuse cache of
freed blocks and are written with streaming stores. Each must be fully overwritten, never
shared while alive, visible to torch.profiler, and released by sokd.empty_cache."""

import gc

import pytest
import torch

import sokd
from sokd import ops
from sokd.augment_ops import ROTATE, SHEAR_X

pytest.importorskip("sokd.native", reason="sokd._C was not built")

# 4 x 1100 x 32 x 31 float32 is 17 MiB, above the reuse threshold. Planes of 992 elements
# keep every vector aligned, so the gradient is written with streaming stores; planes of 1023
# elements are not, and take ordinary stores.
LARGE_FEATURES = (4, 1100, 32, 31)
ODD_PLANE_FEATURES = (4, 1100, 33, 31)
LARGE_BYTES = 4 * 1100 * 32 * 31 * 4


@pytest.fixture(autouse=True)
def empty_reuse_cache():
    sokd.empty_cache()
    yield
    sokd.empty_cache()


def on_backend(backend, fn, *args):
    sokd.set_backend(backend)
    return fn(*args)


def student_gradient(backend, loss_fn, student, *args):
    leaf = student.detach().requires_grad_(True)
    loss = on_backend(backend, loss_fn, leaf, *args)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


def feature_pair(seed, dtype=torch.float32, shape=LARGE_FEATURES):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=generator).to(dtype)
    teacher = torch.randn(shape, generator=generator).to(dtype)
    mask = torch.randint(0, 4, (shape[0],) + shape[2:], generator=generator).to(dtype)
    return student, teacher, mask


def assert_masked_loss_matches_reference(student, teacher, mask):
    loss, grad = student_gradient("cpu", ops.masked_feature_loss, student, teacher, mask)
    ref_loss, ref_grad = student_gradient(
        "reference", ops.masked_feature_loss, student, teacher, mask
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-9)
    return grad


@pytest.mark.parametrize(
    "dtype, shape",
    [
        (torch.float32, LARGE_FEATURES),
        (torch.float32, ODD_PLANE_FEATURES),
        (torch.float64, (2, 1100, 32, 31)),
        (torch.float64, (2, 1100, 33, 31)),
    ],
)
def test_freed_gradient_block_is_reused_and_fully_overwritten(dtype, shape):
    first = assert_masked_loss_matches_reference(*feature_pair(1, dtype, shape))
    address = first.data_ptr()
    del first
    gc.collect()
    # Other inputs: any value left from the first gradient would show as a mismatch.
    second = assert_masked_loss_matches_reference(*feature_pair(2, dtype, shape))
    assert second.data_ptr() == address


def test_live_output_is_never_handed_out_again():
    student, teacher, mask = feature_pair(3)
    _, kept = student_gradient("cpu", ops.masked_feature_loss, student, teacher, mask)
    snapshot = kept.clone()
    _, other = student_gradient("cpu", ops.masked_feature_loss, teacher, student, mask)
    assert other.data_ptr() != kept.data_ptr()
    assert torch.equal(kept, snapshot)
    torch.testing.assert_close(other, -kept)


def test_every_op_with_a_large_output_matches_reference_on_reused_blocks():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(4500, 1000, generator=generator) * 3
    dense = torch.randn(2, 19, 360, 360, generator=generator) * 3
    features = torch.randn(LARGE_FEATURES, generator=generator)
    magnitudes = torch.tensor([0.7, 0.4])
    cases = {
        "kd rows": lambda backend: student_gradient(
            backend, ops.kd_loss, logits, logits.flip(0), 2.0
        ),
        "kd dense": lambda backend: student_gradient(
            backend, ops.kd_loss, dense, dense.flip(0), 2.0
        ),
        "decoupled kd": lambda backend: student_gradient(
            backend, ops.decoupled_kd_loss, logits, logits.flip(0), logits > 1.0
        ),
        "feature augment": lambda backend: (
            on_backend(backend, ops.feature_augment, features, (SHEAR_X, ROTATE), magnitudes),
        ),
    }
    for name, run in cases.items():
        # Two bilinear reads in one pass round differently from two grid_sample passes.
        atol = 1e-4 if name == "feature augment" else 1e-6
        for repeat in range(2):  # the second run writes into the block the first one freed
            got = run("cpu")
            want = run("reference")
            for value, expected in zip(got, want):
                torch.testing.assert_close(
                    value, expected, rtol=1e-4, atol=atol, msg=f"{name}, run {repeat}"
                )
            del got, want, value, expected


def test_outputs_in_use_show_in_the_profiler_memory_view():
    student, teacher, mask = feature_pair(5)
    sokd.set_backend("cpu")
    leaf = student.requires_grad_(True)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as profile:
        loss = ops.masked_feature_loss(leaf, teacher, mask)
    sizes = [
        event.nbytes()
        for event in profile.profiler.kineto_results.events()
        if event.name() == "[memory]"
    ]
    del loss
    assert max(sizes) >= LARGE_BYTES


def test_empty_cache_releases_freed_blocks():
    student, teacher, mask = feature_pair(6)
    _, grad = student_gradient("cpu", ops.masked_feature_loss, student, teacher, mask)
    del grad
    gc.collect()
    assert sokd.empty_cache() >= LARGE_BYTES
    assert sokd.empty_cache() == 0
