"""One call of every op (forward and, for the losses, backward) on seeded inputs: the unit of
work that the determinism and concurrency tests repeat and compare bit for bit."""

import torch
from backend_matrix import using

from sokd import ops
from sokd.augment_ops import (
    CHANNEL_DROP,
    CHANNEL_SHUFFLE,
    CUTOUT,
    NOISE,
    ROTATE,
    SHEAR_X,
    TRANSLATE_Y,
)

# Sizes that give a compiled backend several threads or thread blocks per op, and tiny ones
# for the Triton interpreter.
LARGE = {"features": (4, 16, 24, 24), "rows": 512, "classes": 100, "dense": (2, 19, 16, 16)}
TINY = {"features": (2, 3, 6, 5), "rows": 8, "classes": 10, "dense": (1, 5, 3, 4)}

AUGMENT_SEQUENCES = (
    (SHEAR_X, ROTATE),
    (CUTOUT, CHANNEL_SHUFFLE),
    (NOISE, CHANNEL_DROP),
    (TRANSLATE_Y, NOISE),
)


def seeded_inputs(sizes, seed, device):
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(shape, generator=generator).to(device)

    def rand(*shape):
        return torch.rand(shape, generator=generator).to(device)

    n, c, h, w = sizes["features"]
    rows, classes = sizes["rows"], sizes["classes"]
    dense = sizes["dense"]
    return {
        "student": normal(n, c, h, w),
        "teacher": normal(n, c, h, w),
        "mask": rand(n, h, w) * 2,
        "logits_s": normal(rows, classes) * 3,
        "logits_t": normal(rows, classes) * 3,
        "weight": rand(rows),
        "class_mask": rand(rows, classes) < 0.2,
        "dense_s": normal(*dense),
        "dense_t": normal(*dense),
        "heat": rand(n, 2, h, w),
        "wh": rand(n, 2, h, w) * 6,
        "offset": rand(n, 2, h, w) * 2 - 0.5,
        "magnitudes": rand(2),
    }


def _loss_and_grads(loss, *inputs):
    return [loss.detach(), *torch.autograd.grad(loss, inputs)]


def run_every_op(backend, inputs, augment_seed=0):
    """Named outputs of every op; the augmentations draw from their own seeded generator."""
    x = inputs
    student = x["student"].detach().requires_grad_()
    teacher = x["teacher"].detach().requires_grad_()
    logits_s = x["logits_s"].detach().requires_grad_()
    dense_s = x["dense_s"].detach().requires_grad_()
    results = {}
    with using(backend):
        for normalize in ("elements", "mask"):
            loss = ops.masked_feature_loss(student, teacher, x["mask"], normalize)
            results[f"feature {normalize}"] = _loss_and_grads(loss, student, teacher)
        results["kd"] = _loss_and_grads(
            ops.kd_loss(logits_s, x["logits_t"], 4.0, x["weight"]), logits_s
        )
        results["kd dense"] = _loss_and_grads(ops.kd_loss(dense_s, x["dense_t"], 2.0), dense_s)
        loss = ops.decoupled_kd_loss(logits_s, x["logits_t"], x["class_mask"], 1.0, 8.0, 4.0)
        results["decoupled kd"] = _loss_and_grads(loss, logits_s)
        k = min(16, x["heat"][0].numel())
        results["interest map"] = list(ops.interest_map(x["heat"], x["wh"], x["offset"], k=k))
    results.update(run_augmentations(backend, inputs, augment_seed))
    return results


def run_augmentations(backend, inputs, seed):
    """Each of AUGMENT_SEQUENCES in turn, all drawing from one generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    results = {}
    with using(backend):
        for sequence in AUGMENT_SEQUENCES:
            magnitudes = inputs["magnitudes"].detach().requires_grad_()
            out = ops.feature_augment(inputs["student"], sequence, magnitudes, generator)
            results[sequence] = [out, *torch.autograd.grad(out.sum(), magnitudes)]
    return results


def assert_bitwise_equal(actual, expected, context):
    assert actual.keys() == expected.keys()
    for name in expected:
        for index, (a, b) in enumerate(zip(actual[name], expected[name])):
            assert a.dtype == b.dtype and a.shape == b.shape, f"{context}: {name}[{index}]"
            assert torch.equal(a, b), (
                f"{context}: {name}[{index}] differs in "
                f"{int((a != b).sum())} of {a.numel()} entries"
            )
