"""The public functional ops. Each one validates its arguments, then runs the chosen backend."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Literal

import torch

from . import _validation as check
from ._backend import backend_for
from ._ops.fused_linear_distill_loss import FusedLinearDistillLoss, fused_linear_distill_loss
from ._ops.logit_distill_loss import LogitDistillLoss, logit_distill_loss
from .augment_ops import NUM_PRIMITIVES, draw_randomness, op_values
from .reference.common import accumulation_dtype

NORMALIZE_MODES = ("elements", "mask")
# The documented range of the distillation temperature T. Beyond it the T^2 factor and the
# logits / T leave the float32 range long before any use of KD needs them to.
TEMPERATURE_RANGE = (1e-2, 1e3)
# The largest max-pool window of interest_map. A window of 2*max(H, W) - 1 already covers the
# whole map from every position, so larger kernels change nothing but the work.
MAX_KERNEL = 4095


def masked_feature_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None = None,
    normalize: Literal["elements", "mask"] = "elements",
    *,
    check_finite: bool = False,
) -> torch.Tensor:
    """sum(mask^2 * (student - teacher)^2) / Z over N x C x H x W features (docs/algorithm.md
    §5). Returns a 0-d loss, float32 (float64 for float64 inputs).

    mask is N x H x W (broadcast over channels) and is a constant: it gets no gradient on any
    backend, even when it requires grad. Z = N*C*H*W with normalize="elements"; Z = C *
    sum(mask^2) with normalize="mask", where an all-zero mask gives a loss of 0 and a gradient
    of 0, and the result does not depend on the mask's scale (mask / max|mask| is used).
    Gradients reach student and teacher.
    """
    check.tensor(student, "student", 4, "N x C x H x W")
    check.tensor(teacher, "teacher", 4, "N x C x H x W")
    check.same_device(teacher, "teacher", student, "student")
    check.same_dtype(teacher, "teacher", student, "student")
    check.shape(teacher, "teacher", student.shape, "the shape of student")
    check.choice(normalize, "normalize", NORMALIZE_MODES)
    if mask is not None:
        n, _, h, w = student.shape
        check.tensor(mask, "mask", 3, "N x H x W")
        check.same_device(mask, "mask", student, "student")
        check.shape(mask, "mask", (n, h, w), "N x H x W of the features")
    if check_finite:
        for value, name in ((student, "student"), (teacher, "teacher"), (mask, "mask")):
            if value is not None:
                check.finite(value, name)
    if mask is not None:
        mask = mask.detach()
        if normalize == "mask":
            # The loss is invariant to the mask's scale, but mask^2 is not representable at
            # every scale (1e-23 squares to 0 and 1e20 to inf in float32): work with a mask
            # whose largest entry is 1. NaN and inf entries still make the loss NaN.
            peak = mask.abs().amax()
            mask = mask / torch.where(peak > 0, peak, 1)
    backend = backend_for("masked_feature_loss", student.device)
    return backend.masked_feature_loss(student, teacher, mask, normalize)


def _check_temperature(temperature):
    return check.temperature(temperature, "temperature", *TEMPERATURE_RANGE)


def _check_logit_pair(student_logits, teacher_logits):
    check.tensor(student_logits, "student_logits", (2, 4), "N x K or dense N x K x H x W")
    check.tensor(teacher_logits, "teacher_logits", (2, 4), "N x K or dense N x K x H x W")
    check.same_device(teacher_logits, "teacher_logits", student_logits, "student_logits")
    check.same_dtype(teacher_logits, "teacher_logits", student_logits, "student_logits")
    check.shape(teacher_logits, "teacher_logits", student_logits.shape, "the shape of student_logits")


def _row_shape(logits):
    """The shape of one value per row: (N,) or, for dense logits, (N, H, W)."""
    return (logits.shape[0],) + tuple(logits.shape[2:])


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 4.0,
    weight: torch.Tensor | None = None,
    *,
    check_finite: bool = False,
) -> torch.Tensor:
    """T^2 * mean over rows of KL(softmax(teacher/T) || softmax(student/T)) (docs/algorithm.md
    §5). Returns a 0-d loss, float32 (float64 for float64 inputs); gradient to student_logits.

    Logits are N x K, or dense N x K x H x W with classes on dim 1 (one row per position).
    weight, if given, holds one non-negative weight per row (N, or N x H x W); the mean then
    becomes sum(w * KL) / sum(w), and 0 where all weights are 0. A negative weight raises
    ValueError. temperature must lie in TEMPERATURE_RANGE. The teacher and the weights are
    constants: they get no gradient on any backend.
    """
    _check_logit_pair(student_logits, teacher_logits)
    temperature = _check_temperature(temperature)
    if weight is not None:
        check.tensor(weight, "weight", student_logits.dim() - 1)
        check.same_device(weight, "weight", student_logits, "student_logits")
        check.shape(weight, "weight", _row_shape(student_logits), "one weight per row")
        weight = weight.detach()
    if check_finite:
        check.finite(student_logits, "student_logits")
        check.finite(teacher_logits, "teacher_logits")
        if weight is not None:
            check.finite(weight, "weight")
    if weight is not None:
        # NaN passes on purpose: like every NaN input it makes the loss NaN.
        check.holds(~(weight < 0), "weight must hold non-negative row weights")
    backend = backend_for("kd_loss", student_logits.device)
    return backend.kd_loss(student_logits, teacher_logits.detach(), temperature, weight)


def decoupled_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    class_mask: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    *,
    check_finite: bool = False,
) -> torch.Tensor:
    """Decoupled KD over a class set G: T^2 * mean over rows of (alpha*TCKD + beta*NCKD)
    (docs/algorithm.md §5). Returns a 0-d loss, float32 (float64 for float64 inputs).

    class_mask is a boolean tensor shaped like the logits, True for the classes in G. TCKD
    compares the binary distributions [p_G, 1 - p_G]; NCKD compares the softmaxes over the
    classes outside G. A term that is undefined for a row (empty G or empty complement)
    contributes 0. The teacher gets no gradient.
    """
    _check_logit_pair(student_logits, teacher_logits)
    check.tensor_of(class_mask, "class_mask", (torch.bool,), "a bool tensor")
    check.same_device(class_mask, "class_mask", student_logits, "student_logits")
    check.shape(class_mask, "class_mask", student_logits.shape, "the shape of the logits")
    alpha = check.non_negative_number(alpha, "alpha")
    beta = check.non_negative_number(beta, "beta")
    temperature = _check_temperature(temperature)
    if check_finite:
        check.finite(student_logits, "student_logits")
        check.finite(teacher_logits, "teacher_logits")
    backend = backend_for("decoupled_kd_loss", student_logits.device)
    return backend.decoupled_kd_loss(
        student_logits, teacher_logits.detach(), class_mask, alpha, beta, temperature
    )


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    *,
    check_finite: bool = False,
) -> torch.Tensor:
    """Decoupled Knowledge Distillation (Zhao et al., 2022): decoupled KD with G = {target}.

    target holds class indices: N for N x K logits, N x H x W for dense logits.
    """
    check.tensor(student_logits, "student_logits", (2, 4), "N x K or dense N x K x H x W")
    check.tensor_of(target, "target", check.INTEGER_DTYPES, "an integer tensor of class indices")
    check.same_device(target, "target", student_logits, "student_logits")
    check.shape(target, "target", _row_shape(student_logits), "one class index per row")
    num_classes = student_logits.shape[1]
    check.holds(
        (target >= 0) & (target < num_classes),
        f"target must hold class indices in [0, {num_classes - 1}]",
    )
    classes = torch.arange(num_classes, device=target.device)
    class_mask = target.long().unsqueeze(1) == classes.view(-1, *([1] * (target.dim() - 1)))
    return decoupled_kd_loss(
        student_logits,
        teacher_logits,
        class_mask,
        alpha,
        beta,
        temperature,
        check_finite=check_finite,
    )


def top_class_mask(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor | None = None,
    ratio: float = 0.2,
) -> torch.Tensor:
    """The top ceil(ratio*K) classes of the teacher per row, intersected with the student's
    top set when student_logits is given (mutual class interest). Shaped like the logits."""
    check.tensor(teacher_logits, "teacher_logits", (2, 4), "N x K or dense N x K x H x W")
    count = math.ceil(check.fraction(ratio, "ratio") * teacher_logits.shape[1])

    def top_set(logits):
        chosen = logits.detach().topk(count, dim=1).indices
        hits = torch.ones_like(chosen, dtype=torch.bool)
        return torch.zeros_like(logits, dtype=torch.bool).scatter(1, chosen, hits)

    mask = top_set(teacher_logits)
    if student_logits is not None:
        _check_logit_pair(student_logits, teacher_logits)
        mask = mask & top_set(student_logits)
    return mask


def interest_map(
    heat: torch.Tensor,
    wh: torch.Tensor,
    offset: torch.Tensor,
    k: int = 8,
    kernel: int = 3,
    *,
    check_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode DAM interest peaks into a count map (docs/algorithm.md §4).

    heat is N x heat_channels x H x W; wh and offset are N x 2 x H x W, as (w, h) and (x, y).
    Returns (count_map, boxes, scores): count_map float32 N x H x W counts how many of the k
    boxes cover each position; boxes int64 N x k x 4 as inclusive (x1, y1, x2, y2); scores
    N x k in heat's dtype. Ties between equal peaks go to the lower flat index. No gradient.
    """
    check.tensor(heat, "heat", 4, "N x heat_channels x H x W")
    n, channels, height, width = heat.shape
    for value, name in ((wh, "wh"), (offset, "offset")):
        check.tensor(value, name, 4, "N x 2 x H x W")
        check.same_device(value, name, heat, "heat")
        check.same_dtype(value, name, heat, "heat")
        check.shape(value, name, (n, 2, height, width), "N x 2 x H x W of heat")
    k = check.positive_int(k, "k")
    if k > channels * height * width:
        raise ValueError(
            f"k must be at most heat_channels*H*W = {channels * height * width}, got {k}"
        )
    kernel = check.positive_int(kernel, "kernel")
    if kernel % 2 == 0:
        raise ValueError(f"kernel must be odd so the max-pool window is centred, got {kernel}")
    if kernel > MAX_KERNEL:
        raise ValueError(f"kernel must be at most {MAX_KERNEL}, got {kernel}")
    if check_finite:
        for value, name in ((heat, "heat"), (wh, "wh"), (offset, "offset")):
            check.finite(value, name)
    # From every position, a window of 2*max(H, W) - 1 already covers the whole map, so a
    # larger one finds the same peaks: no backend is asked for more window than the map has.
    kernel = min(kernel, 2 * max(height, width) - 1)
    backend = backend_for("interest_map", heat.device)
    return backend.interest_map(heat, wh, offset, k, kernel)


class _StraightThroughAugment(torch.autograd.Function):
    """Forward: the augmented map. Backward: d out / d magnitude_k = 1 for every element, so
    each magnitude receives the sum of the incoming gradient (docs/algorithm.md §2)."""

    # torch.func runs forward under its transforms (it is made of PyTorch ops there, as the
    # reference backend serves every op under torch.func) and derives the vmap rule from it.
    generate_vmap_rule = True

    @staticmethod
    def forward(x, magnitudes, op_ids, draws, augment):
        return augment(x, op_ids, op_values(magnitudes, op_ids), draws)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, magnitudes, op_ids, _, _ = inputs
        ctx.magnitude_dtype = magnitudes.dtype
        ctx.num_ops = len(op_ids)

    @staticmethod
    def backward(ctx, grad_output):
        grad_magnitudes = None
        if ctx.needs_input_grad[1]:
            total = grad_output.sum(dtype=accumulation_dtype(grad_output.dtype))
            grad_magnitudes = total.to(ctx.magnitude_dtype).expand(ctx.num_ops)
        return None, grad_magnitudes, None, None, None


def _check_op_ids(op_ids):
    if isinstance(op_ids, torch.Tensor):
        op_ids = op_ids.tolist()
    # A set or a mapping has no defined order, and the ops are applied in order.
    if isinstance(op_ids, (str, bytes, set, frozenset, dict)) or not hasattr(op_ids, "__iter__"):
        raise TypeError(f"op_ids must be a sequence of ints, got {type(op_ids).__name__}")
    op_ids = tuple(op_ids)
    for op in op_ids:
        if isinstance(op, bool) or not isinstance(op, numbers.Integral):
            raise TypeError(f"op_ids must hold ints, got {type(op).__name__}")
        if not 0 <= op < NUM_PRIMITIVES:
            raise ValueError(f"op_ids must hold op ids in [0, {NUM_PRIMITIVES - 1}], got {op}")
    return tuple(int(op) for op in op_ids)


def feature_augment(
    x: torch.Tensor,
    op_ids: Sequence[int] | torch.Tensor,
    magnitudes: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    check_finite: bool = False,
) -> torch.Tensor:
    """Apply the primitive ops `op_ids` (docs/algorithm.md §1) to x (N x C x H x W), in order.

    magnitudes has one entry per op and is clamped to [0, 1]. Random draws (cutout centres,
    channel permutations, drop masks, the noise seed) come from `generator`. The result
    carries the straight-through gradient: each magnitude receives the sum of the gradient
    of the output. x itself gets no gradient.
    """
    check.tensor(x, "x", 4, "N x C x H x W")
    op_ids = _check_op_ids(op_ids)
    check.is_tensor(magnitudes, "magnitudes")
    if not magnitudes.is_floating_point():
        raise TypeError(f"magnitudes must be a floating tensor, got {magnitudes.dtype}")
    if magnitudes.shape != (len(op_ids),):
        raise ValueError(
            f"magnitudes must have shape ({len(op_ids)},), one per op in op_ids, "
            f"got {tuple(magnitudes.shape)}"
        )
    check.same_device(magnitudes, "magnitudes", x, "x")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if check_finite:
        check.finite(x, "x")
        check.finite(magnitudes, "magnitudes")
    if not op_ids:
        return x.detach().clone()
    augment = backend_for("feature_augment", x.device).feature_augment
    draws = draw_randomness(op_ids, x.shape, x.device, generator)
    return _StraightThroughAugment.apply(x.detach(), magnitudes, op_ids, draws, augment)
