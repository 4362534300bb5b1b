"""torch.library.opcheck for every torch.ops.sokd op, on every backend built here.

opcheck runs each sample through the op's schema check, its autograd registration, its fake
(meta) kernel against the real one, and torch.compile's AOT dispatch with static and dynamic
shapes. The samples cover two sizes per op (one contiguous, one a strided view), float32,
float64 and a half dtype, with and without requires_grad.

Samples are built by argument name: `_arguments` reads each op's schema and takes the value
of every argument it names, so a reordered or extended schema needs no change here, and an
argument no builder knows fails the test by its name.
"""

import pytest
import torch

import sokd
from sokd import _backend
from sokd.augment_ops import draw_randomness, op_values

# release_cached_outputs frees the CPU kernels' output cache: no tensor goes in or out, so
# there is no kernel for opcheck to compare.
NO_TENSOR_OPS = {"release_cached_outputs"}
# The inputs that may require grad, per op; the others are constants of the op.
DIFFERENTIABLE = {
    "masked_feature_loss": {"student", "teacher"},
    "kd_loss": {"student_logits", "student"},
    "decoupled_kd_loss": {"student_logits", "student"},
    "logit_distill_loss": {"student_logits"},
    "fused_linear_distill_loss": {"student_hidden", "student_weight", "student_bias"},
    "interest_map": set(),
    "feature_augment": set(),
}
HALF = {"cpu": torch.bfloat16, "meta": torch.bfloat16, "cuda": torch.float16}


def _sokd_ops():
    names = torch._C._dispatch_get_all_op_names()
    return sorted(
        {name.split("::")[1].split(".")[0] for name in names if name.startswith("sokd::")}
        - NO_TENSOR_OPS
    )


class _Sample:
    """Random inputs of one case: dtype, layout (contiguous or strided views) and whether the
    differentiable inputs require grad. Tensors are drawn on the CPU from a fixed seed and
    then moved, so every device sees the same values."""

    def __init__(self, device, dtype, contiguous, requires_grad):
        self.device, self.dtype = device, dtype
        self.contiguous, self.requires_grad = contiguous, requires_grad
        self.generator = torch.Generator().manual_seed(0)

    def tensor(self, *shape, low=None, high=None, dtype=None):
        dtype = dtype or self.dtype
        wide = shape[:-1] + (2 * shape[-1],)
        values = torch.randn(wide, generator=self.generator, dtype=torch.float64)
        if low is not None:
            values = low + (high - low) * torch.rand(wide, generator=self.generator)
        values = values.to(dtype).to(self.device)
        # Every other column of a twice-as-wide tensor: a view with a stride of 2.
        return values[..., ::2] if not self.contiguous else values[..., : shape[-1]].contiguous()

    def integers(self, high, *shape):
        return torch.randint(0, high, shape, generator=self.generator).to(self.device)


def _masked_feature_loss(s):
    n, c, h, w = (3, 5, 7, 9) if s.contiguous else (2, 3, 4, 6)
    mask = s.tensor(n, h, w, low=0.0, high=1.0)
    return {
        "student": s.tensor(n, c, h, w),
        "teacher": s.tensor(n, c, h, w),
        "mask": mask if s.contiguous else None,
        "normalize_by_mask": s.contiguous,
    }


def _kd_loss(s):
    # Plain N x K rows for contiguous cases, dense N x K x H x W rows with weights otherwise.
    shape = (5, 11) if s.contiguous else (2, 7, 3, 5)
    weight = None if s.contiguous else s.tensor(2, 3, 5, low=0.0, high=2.0)
    student, teacher = s.tensor(*shape), s.tensor(*shape)
    return {"student_logits": student, "teacher_logits": teacher, "temperature": 2.0,
            "weight": weight}


def _decoupled_kd_loss(s):
    rows, classes = (6, 13) if s.contiguous else (3, 8)
    student, teacher = s.tensor(rows, classes), s.tensor(rows, classes)
    class_mask = torch.rand(rows, classes, generator=s.generator).to(s.device) < 0.3
    return {"student_logits": student, "teacher_logits": teacher, "class_mask": class_mask,
            "alpha": 1.0, "beta": 8.0, "temperature": 4.0}


def _interest_map(s):
    n, h, w = (2, 7, 9) if s.contiguous else (3, 5, 4)
    return {
        "heat": s.tensor(n, 1, h, w, low=0.0, high=1.0),
        "wh": s.tensor(n, 2, h, w, low=1.0, high=4.0),
        "offset": s.tensor(n, 2, h, w, low=0.0, high=1.0),
        "k": 4,
        "kernel": 3,
    }


def _feature_augment(s):
    # Two affine ops and every random one: the most one fused pass takes is 2 affine ops.
    op_ids = [0, 4, 5, 6, 7, 8] if s.contiguous else [3, 8, 6]
    shape = (2, 5, 7, 9) if s.contiguous else (3, 4, 5, 6)
    magnitudes = torch.rand(len(op_ids), generator=s.generator)
    draws = draw_randomness(op_ids, shape, "cpu", s.generator)
    return {
        "x": s.tensor(*shape),
        "op_ids": op_ids,
        "values": op_values(magnitudes, op_ids).to(s.device),
        "draws": [d.to(s.device) if isinstance(d, torch.Tensor) else None for d in draws],
        "noise_seeds": [d if isinstance(d, int) else 0 for d in draws],
    }


def _llm_targets(s, rows, vocab, vocab_size):
    """Labels, teacher logits, and the teacher's top 3 log-probabilities over the first
    vocab_size classes, in the loss's dtype (float32, float64 for float64 logits)."""
    labels = s.integers(vocab_size, rows)
    labels[1] = -100
    teacher = s.tensor(rows, vocab)
    logprobs, ids = torch.log_softmax(teacher[:, :vocab_size].double(), -1).topk(3, dim=-1)
    loss_dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
    return labels, teacher, logprobs.to(loss_dtype), ids


def _logit_distill_loss(s):
    # Contiguous cases: full teacher logits, "mean" over the items. Strided cases:
    # a vocab_size cut of wider rows against a top-k teacher, one loss per row.
    rows, vocab = 4, 13
    vocab_size = vocab if s.contiguous else vocab - 1
    labels, teacher, logprobs, ids = _llm_targets(s, rows, vocab, vocab_size)
    student = s.tensor(rows, vocab)
    if not s.contiguous and s.requires_grad:
        # The first columns of wider rows (20 apart), which the kernels read in place.
        student = s.tensor(rows, 20).contiguous()[:, :vocab]
    common = {"student_logits": student, "labels": labels, "beta": 0.5,
              "temperature": 2.0, "ignore_index": -100, "num_items": None}
    if s.contiguous:
        # Without requires_grad: forward KL over a given count of items.
        num_items = None if s.requires_grad else torch.tensor(5.0, dtype=torch.float64)
        return {**common, "teacher_logits": teacher, "teacher_logprobs": None,
                "teacher_indices": None, "num_items": num_items, "reduction": "mean",
                "divergence": "jsd" if s.requires_grad else "forward_kl", "vocab_size": vocab_size}
    return {**common, "teacher_logits": None, "teacher_logprobs": logprobs,
            "teacher_indices": ids, "divergence": "reverse_kl", "reduction": "none",
            "vocab_size": vocab_size}


def _fused_linear_distill_loss(s):
    rows, hidden, vocab = (5, 6, 11) if s.contiguous else (4, 3, 9)
    labels = s.integers(vocab, rows)
    labels[2] = -100
    return {
        "student_hidden": s.tensor(rows, hidden),
        "student_weight": s.tensor(vocab, hidden),
        "teacher_hidden": s.tensor(rows, hidden + 2),
        "teacher_weight": s.tensor(vocab, hidden + 2),
        "student_bias": s.tensor(vocab) if s.contiguous else None,
        "teacher_bias": s.tensor(vocab),
        "labels": labels,
        "row_scale": None,
        "divergence": "forward_kl" if s.contiguous else "jsd",
        "beta": 0.5,
        "temperature": 1.0,
        "ignore_index": -100,
        "reduction": "mean" if s.contiguous else "sum",
        "num_items": None,
        "vocab_size": vocab,
        "chunk_size": 2,
    }


BUILDERS = {
    "masked_feature_loss": _masked_feature_loss,
    "kd_loss": _kd_loss,
    "decoupled_kd_loss": _decoupled_kd_loss,
    "interest_map": _interest_map,
    "feature_augment": _feature_augment,
    "logit_distill_loss": _logit_distill_loss,
    "fused_linear_distill_loss": _fused_linear_distill_loss,
}
# (dtype, contiguous, requires_grad); "half" is the device's half dtype.
CASES = [
    (torch.float32, True, True),
    (torch.float64, False, True),
    (torch.float64, True, False),
    ("half", False, False),
]


def _arguments(op, sample):
    """The positional arguments of `op`, in its schema's order, from the builder's values.
    The kernel's with_grad flag follows requires_grad, as the public functions set it."""
    name = op._schema.name.split("::")[1]
    values = BUILDERS[name](sample)
    values["with_grad"] = sample.requires_grad
    arguments = []
    for argument in op._schema.arguments:
        if argument.name not in values:
            raise KeyError(f"no sample value for argument {argument.name!r} of {name}")
        value = values[argument.name]
        if isinstance(value, torch.Tensor) and argument.name in DIFFERENTIABLE[name]:
            value.requires_grad_(sample.requires_grad)
        arguments.append(value)
    return tuple(arguments)


# Every device has its cells; where this build or machine cannot run one they skip, saying why.
DEVICES = ("cpu", "meta", "cuda")


def _skip_unless_runs(device):
    if device == "cpu" and "cpu" not in sokd.built_backends():
        pytest.skip("sokd._C was built without its CPU kernels")
    if device == "cuda" and "cuda" not in sokd.available_backends():
        pytest.skip("the CUDA kernels need a GPU and a build with SOKD_CUDA=1")


OPS = _sokd_ops()


def test_every_op_has_samples():
    # A new op in the sokd namespace must come with samples here.
    assert set(OPS) <= set(BUILDERS), set(OPS) - set(BUILDERS)
    if "cpu" in sokd.built_backends():
        assert set(OPS) == set(BUILDERS)


def _case_id(case):
    dtype, contiguous, requires_grad = case
    layout = "contiguous" if contiguous else "strided"
    return f"{str(dtype).replace('torch.', '')}-{layout}{'-grad' if requires_grad else ''}"


# Ops without a differentiable input run only the cases without requires_grad.
PARAMS = [
    pytest.param(name, device, case, id=f"{name}-{device}-{_case_id(case)}")
    for name in OPS
    for device in DEVICES
    for case in CASES
    if DIFFERENTIABLE[name] or not case[2]
]


@pytest.mark.parametrize("name, device, case", PARAMS)
def test_opcheck(name, device, case):
    _skip_unless_runs(device)
    dtype, contiguous, requires_grad = case
    dtype = HALF[device] if dtype == "half" else dtype
    op = getattr(torch.ops.sokd, name).default
    sample = _Sample(device, dtype, contiguous, requires_grad)
    torch.library.opcheck(op, _arguments(op, sample))


# --- Triton ----------------------------------------------------------------------------------
# The Triton launchers are kernels of the same torch.ops.sokd ops: with the triton backend
# selected, the op's router (sokd/native.py) runs them below the one C++ autograd. Without a GPU
# they run in the Triton interpreter on CPU tensors (conftest.py sets TRITON_INTERPRET=1, which
# also puts the router at the CPU key); the samples are small enough that all of them take
# seconds there. fused_linear_distill_loss has one kernel for every device, made of matmuls and
# sokd::logit_distill_loss, so its Triton cells assert that the row op's launcher ran.

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# test_aot_dispatch_dynamic runs the op's kernel on functional tensors. On a GPU, wrap_triton
# turns each launch into a traceable call; under the interpreter it hands back the interpreted
# kernel itself (torch.library.wrap_triton), which then reads the functional tensors' storage,
# which holds no data ("invalid python storage"). That is the interpreter's limit, not the
# op's: the check runs on a GPU, and tests/test_contract.py compiles the Triton path with
# dynamic shapes under the interpreter.
TRITON_CHECKS = (
    ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if TRITON_DEVICE == "cuda"
    else ("test_schema", "test_autograd_registration", "test_faketensor")
)
# The interpreter computes in numpy, which has float16 but no bfloat16.
TRITON_HALF = torch.float16
# Each op, and the launcher that must run below it.
TRITON_OPS = {name: name for name in _backend.OPS if name not in _backend.COMPOSITE_OPS} | {
    "fused_linear_distill_loss": "logit_distill_loss"
}

TRITON_PARAMS = [
    pytest.param(name, case, id=f"{name}-{_case_id(case)}")
    for name in TRITON_OPS
    for case in CASES
    if DIFFERENTIABLE[name] or not case[2]
]


# The interpreter evaluates masked-out lanes too (-inf - -inf there); the kernels discard them.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("name, case", TRITON_PARAMS)
def test_opcheck_triton(name, case, monkeypatch):
    if "triton" not in sokd.available_backends():
        pytest.skip("the Triton kernels need triton, and a GPU or TRITON_INTERPRET=1")
    from sokd import kernels

    launched = []
    kernel = TRITON_OPS[name]
    launcher = kernels.LAUNCHERS[kernel]

    def counted(*args):
        launched.append(kernel)
        return launcher(*args)

    monkeypatch.setitem(kernels.LAUNCHERS, kernel, counted)
    dtype, contiguous, requires_grad = case
    dtype = TRITON_HALF if dtype == "half" else dtype
    op = getattr(torch.ops.sokd, name).default
    sample = _Sample(TRITON_DEVICE, dtype, contiguous, requires_grad)
    sokd.set_backend("triton")  # the conftest fixture restores the previous backend
    torch.library.opcheck(op, _arguments(op, sample), test_utils=TRITON_CHECKS)
    assert launched, f"torch.ops.sokd.{name} never reached the Triton launcher of {kernel}"
