"""The benchmark cases: one per sokd op, and one for a whole SoKDLoss step.

A case builds its inputs for a shape. Every contender turns them into a `step`: a function
that runs forward and backward once and returns the tensors that are compared with the
reference (the loss or output first, then the gradients). A case also knows the bytes that a
fused implementation must at least read and write, which give the effective bandwidth.
"""

import peers
import torch

import sokd
from sokd import reference
from sokd.augment_ops import ROTATE, SHEAR_X, op_values

TEMPERATURE = 4.0
DKD_ALPHA, DKD_BETA = 1.0, 8.0
PEAKS, PEAK_KERNEL = 8, 3
AUGMENT_OPS = (SHEAR_X, ROTATE)
AUGMENT_MAGNITUDES = (0.7, 0.3)

# On the CPU the SoKDLoss step is dominated by the DAM head's 3x3 convolutions. Beyond this
# many floating-point operations per step one step takes tens of seconds on a small CPU, and
# the timing would say little about sokd's own kernels.
CPU_STEP_FLOP_LIMIT = 5e11


class Contender:
    """One way to run a case: `prepare(inputs)` returns the step to check and time."""

    def __init__(self, name, kind, prepare, skip_reason=None):
        self.name = name
        self.kind = kind  # reference, compile, backend or peer
        self.prepare = prepare
        self.skip_reason = skip_reason


def _with_backend(name, step):
    def run():
        sokd.set_backend(name)
        return step()

    return run


def _elements_bytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def _logit_pair(shape, device, dtype):
    size = shape.logit_shape()
    # Teacher logits a little peakier than the student's, as after training.
    return (
        torch.randn(size, device=device, dtype=dtype).requires_grad_(),
        (2 * torch.randn(size, device=device)).to(dtype),
    )


class Case:
    """A subclass builds inputs, runs the forward through an ops module (sokd.ops, or
    sokd.reference for torch.compile) and turns the forward's output into compared tensors."""

    name = None
    needs_features = False
    has_backward = True
    # Multiplies the output check's tolerance: long chains of ops (a whole step) sum many
    # rounding differences, for example in a convolution's weight gradient.
    tolerance_scale = 1.0
    # Compiling this case takes long enough on a CPU that --quick leaves it out.
    slow_to_compile = False

    def skip_reason(self, shape, device):
        if self.needs_features and not shape.has_features:
            return "this shape has no feature map"
        return None

    def make_inputs(self, shape, device, dtype):
        raise NotImplementedError

    def bytes_moved(self, inputs):
        """Bytes a fused forward+backward must read and write, or None when not memory-bound."""
        raise NotImplementedError

    def forward(self, inputs, ops):
        raise NotImplementedError

    def reference_forward(self, inputs):
        """The forward that torch.compile compiles: the pure-PyTorch reference."""
        return self.forward(inputs, reference)

    def backward(self, output, inputs):
        """The loss and the student's gradient; cases with other outputs override this."""
        (grad,) = torch.autograd.grad(output, [inputs["student"]])
        return output.detach(), grad

    def peer_contenders(self, device):
        return []

    def contenders(self, device, backends, compile_skip_reason=None):
        """Eager reference first (the baseline), then torch.compile, backends and peers.

        backends holds (name, skip reason or None) for every sokd backend but reference.
        """
        found = [
            Contender("eager", "reference", lambda x: self._sokd_step("reference", x)),
            Contender("compile", "compile", self._compiled_step, compile_skip_reason),
        ]
        for name, reason in backends:
            found.append(
                Contender(name, "backend", lambda x, name=name: self._sokd_step(name, x), reason)
            )
        return found + self.peer_contenders(device)

    def _sokd_step(self, backend, inputs):
        return _with_backend(backend, lambda: self.backward(self.forward(inputs, sokd.ops), inputs))

    def _compiled_step(self, inputs):
        # A fresh compile per case and shape: dynamo would otherwise reuse or generalise the
        # graphs of the previous shape.
        torch._dynamo.reset()
        compiled = torch.compile(lambda: self.reference_forward(inputs), dynamic=False)
        return _with_backend("reference", lambda: self.backward(compiled(), inputs))


class MaskedFeatureLoss(Case):
    name = "masked_feature_loss"
    needs_features = True

    def make_inputs(self, shape, device, dtype):
        size = shape.feature_shape()
        return {
            "student": torch.randn(size, device=device, dtype=dtype).requires_grad_(),
            "teacher": torch.randn(size, device=device, dtype=dtype),
            # Weights like a count map of a few overlapping boxes.
            "mask": torch.randint(0, 4, (shape.n, shape.h, shape.w), device=device).to(dtype),
        }

    def bytes_moved(self, x):
        return _elements_bytes(x["student"], x["teacher"], x["mask"], x["student"])

    def forward(self, x, ops):
        return ops.masked_feature_loss(x["student"], x["teacher"], x["mask"], "elements")


class KdLoss(Case):
    name = "kd_loss"

    def make_inputs(self, shape, device, dtype):
        student, teacher = _logit_pair(shape, device, dtype)
        return {"student": student, "teacher": teacher}

    def bytes_moved(self, x):
        return _elements_bytes(x["student"], x["teacher"], x["student"])

    def forward(self, x, ops):
        return ops.kd_loss(x["student"], x["teacher"], TEMPERATURE, None)

    def peer_contenders(self, device):
        def plain(x):
            return lambda: self.backward(peers.plain_kd(x["student"], x["teacher"], TEMPERATURE), x)

        liger_class, reason = peers.liger_kl_div_class()
        if liger_class is not None and device.type != "cuda":
            reason = "Liger-Kernel runs on CUDA tensors only"

        def liger(x):
            kl_div = liger_class(reduction="batchmean", log_target=True)
            return lambda: self.backward(
                peers.liger_kd(kl_div, x["student"], x["teacher"], TEMPERATURE), x
            )

        return [
            Contender("plain KD (PyTorch)", "peer", plain),
            Contender("Liger KLDiv", "peer", liger, skip_reason=reason),
        ]


class DecoupledKdLoss(Case):
    """DKD: the decoupled loss with the target class as G, so the DKD peer computes the same."""

    name = "decoupled_kd_loss"

    def make_inputs(self, shape, device, dtype):
        student, teacher = _logit_pair(shape, device, dtype)
        row_shape = (shape.n, shape.h, shape.w) if shape.dense else (shape.n,)
        target = torch.randint(0, shape.k, row_shape, device=device)
        class_mask = torch.zeros_like(student, dtype=torch.bool)
        class_mask.scatter_(1, target.unsqueeze(1), True)
        return {"student": student, "teacher": teacher, "target": target, "class_mask": class_mask}

    def bytes_moved(self, x):
        return _elements_bytes(x["student"], x["teacher"], x["class_mask"], x["student"])

    def forward(self, x, ops):
        return ops.decoupled_kd_loss(
            x["student"], x["teacher"], x["class_mask"], DKD_ALPHA, DKD_BETA, TEMPERATURE
        )

    def peer_contenders(self, device):
        def plain(x):
            return lambda: self.backward(
                peers.plain_dkd(
                    x["student"], x["teacher"], x["target"], DKD_ALPHA, DKD_BETA, TEMPERATURE
                ),
                x,
            )

        return [Contender("plain DKD (PyTorch)", "peer", plain)]


class InterestMap(Case):
    """Peak decoding has no backward: its step is the forward alone."""

    name = "interest_map"
    needs_features = True
    has_backward = False

    def make_inputs(self, shape, device, dtype):
        size = (shape.n, 1, shape.h, shape.w)
        box_size = (shape.n, 2, shape.h, shape.w)
        return {
            "heat": torch.sigmoid(torch.randn(size, device=device)).to(dtype),
            "wh": (torch.rand(box_size, device=device) * min(shape.h, shape.w) / 2).to(dtype),
            "offset": torch.rand(box_size, device=device).to(dtype),
            "k": min(PEAKS, shape.h * shape.w),
        }

    def bytes_moved(self, x):
        n, _, h, w = x["heat"].shape
        count_map = n * h * w * 4
        boxes_and_scores = n * x["k"] * (4 * 8 + x["heat"].element_size())
        return _elements_bytes(x["heat"], x["wh"], x["offset"]) + count_map + boxes_and_scores

    def forward(self, x, ops):
        return ops.interest_map(x["heat"], x["wh"], x["offset"], x["k"], PEAK_KERNEL)

    def backward(self, output, inputs):
        return tuple(output)


class FeatureAugment(Case):
    """Two affine ops in one sub-policy, with the straight-through gradient to the magnitudes."""

    name = "feature_augment"
    needs_features = True

    def make_inputs(self, shape, device, dtype):
        size = shape.feature_shape()
        return {
            "x": torch.randn(size, device=device, dtype=dtype),
            "magnitudes": torch.tensor(AUGMENT_MAGNITUDES, device=device).requires_grad_(),
            "grad_output": torch.randn(size, device=device, dtype=dtype),
        }

    def bytes_moved(self, x):
        return _elements_bytes(x["x"], x["x"], x["grad_output"])

    def forward(self, x, ops):
        return ops.feature_augment(x["x"], AUGMENT_OPS, x["magnitudes"])

    def reference_forward(self, x):
        values = op_values(x["magnitudes"], AUGMENT_OPS)
        augmented = reference.feature_augment(
            x["x"], AUGMENT_OPS, values, [None] * len(AUGMENT_OPS)
        )
        # docs/algorithm.md §2: the value is the augmented map, and each magnitude's gradient is
        # the sum of the output's gradient.
        magnitudes = x["magnitudes"]
        straight_through = (magnitudes - magnitudes.detach()).sum().to(augmented.dtype)
        return augmented.detach() + straight_through

    def backward(self, output, x):
        (grad,) = torch.autograd.grad(output, [x["magnitudes"]], x["grad_output"])
        return output.detach(), grad


class SoKDStep(Case):
    """A whole SoKDLoss forward+backward in training mode: augmentation (shear_x then rotate,
    always on), the shared DAM head on both maps, the mutual interest map, the feature loss,
    and a logit loss: masked (mutual class interest) KD for classification, weighted KD for
    dense logits. Gradients: student feature, student logits and every parameter used."""

    name = "SoKDLoss step"
    needs_features = True
    # Each op is checked tightly in its own case; here the check catches dispatch and wiring
    # errors, which are of order one. The 3x3 conv weight gradient sums N*H*W products and
    # differs from the eager reference by up to ~1e-2 of its largest value under a different
    # summation order (torch.compile of the reference itself shows 4e-3 at the cifar preset).
    tolerance_scale = 100.0
    slow_to_compile = True

    @staticmethod
    def head_flop(shape):
        # conv3x3 C -> 3C on two maps: the forward and the two backward products.
        return 3 * 2 * (2 * 9 * shape.n * shape.h * shape.w * shape.c * 3 * shape.c)

    def skip_reason(self, shape, device):
        reason = super().skip_reason(shape, device)
        if reason is None and device.type == "cpu" and self.head_flop(shape) > CPU_STEP_FLOP_LIMIT:
            reason = (
                f"the DAM head's convolutions need {self.head_flop(shape) / 1e12:.1f} TFLOP "
                "per step, tens of seconds or more on a CPU and not sokd's work; run it on a GPU"
            )
        return reason

    def make_inputs(self, shape, device, dtype):
        policy = sokd.FeaturePolicy(sub_policies=(AUGMENT_OPS,))
        with torch.no_grad():
            policy.probability.fill_(1.0)
            policy.magnitude.copy_(torch.tensor([AUGMENT_MAGNITUDES]))
        module = sokd.SoKDLoss(
            shape.c,
            shape.c,
            policy=policy,
            logit_loss="kd" if shape.dense else "masked",
            temperature=TEMPERATURE,
        ).to(device=device, dtype=dtype)
        student_logits, teacher_logits = _logit_pair(shape, device, dtype)
        student = torch.randn(shape.feature_shape(), device=device, dtype=dtype)
        return {
            "module": module,
            "student": student.requires_grad_(),
            "teacher": torch.randn(shape.feature_shape(), device=device, dtype=dtype),
            "student_logits": student_logits,
            "teacher_logits": teacher_logits,
        }

    def bytes_moved(self, x):
        return None

    def forward(self, x, ops):
        # SoKDLoss calls sokd.ops itself; the selected backend (reference under compile)
        # decides what runs.
        module = x["module"]
        return module(x["student"], x["teacher"], x["student_logits"], x["teacher_logits"]).total

    def backward(self, total, x):
        wrt = [x["student"], x["student_logits"]]
        wrt += [p for p in x["module"].parameters() if p.requires_grad]
        grads = torch.autograd.grad(total, wrt, allow_unused=True)
        return (total.detach(), *(g for g in grads if g is not None))


CASES = (
    MaskedFeatureLoss(),
    KdLoss(),
    DecoupledKdLoss(),
    InterestMap(),
    FeatureAugment(),
    SoKDStep(),
)
CASE_NAMES = tuple(case.name for case in CASES)
