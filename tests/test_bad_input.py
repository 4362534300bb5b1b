"""Wrong calls raise ValueError or TypeError naming the argument, before any kernel runs.

The whole matrix runs once per available backend, with the inputs on that backend's device,
so that no backend can let a wrong call through to a kernel.
"""

from types import SimpleNamespace

import pytest
import torch
from backend_matrix import ALL_TARGETS, target_params, using

import sokd
from sokd import FeaturePolicy, InterestHead, SoKDLoss, ops


def valid_inputs(device):
    """Well-formed arguments for every op on `device`; each case breaks exactly one of them.
    `other` is a device that is not `device`, for the mismatch cases (meta when `device` is
    the CPU: it needs no hardware)."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.rand(shape, generator=generator).to(device)

    return SimpleNamespace(
        device=device,
        other=torch.device("cpu") if device.type != "cpu" else torch.device("meta"),
        f4=rand(2, 3, 4, 5),
        mask=rand(2, 4, 5),
        logits=rand(4, 6),
        dense=rand(2, 6, 3, 3),
        weight=rand(4),
        class_mask=rand(4, 6) > 0.5,
        target=torch.zeros(4, dtype=torch.long, device=device),
        heat=rand(2, 1, 4, 5),
        wh=rand(2, 2, 4, 5),
        offset=rand(2, 2, 4, 5),
        magnitudes=rand(2),
    )


def interest(x, k=4, kernel=3, **maps):
    maps = {"heat": x.heat, "wh": x.wh, "offset": x.offset, **maps}
    return ops.interest_map(maps["heat"], maps["wh"], maps["offset"], k=k, kernel=kernel)


CASES = [
    # masked_feature_loss
    ("ndim", lambda x: ops.masked_feature_loss(x.f4[0], x.f4[0]), ValueError, "student"),
    ("shape", lambda x: ops.masked_feature_loss(x.f4, x.f4[:, :2]), ValueError, "teacher"),
    ("dtype", lambda x: ops.masked_feature_loss(x.f4, x.f4.double()), TypeError, "teacher"),
    ("device", lambda x: ops.masked_feature_loss(x.f4, x.f4.to(x.other)), ValueError, "teacher"),
    ("int", lambda x: ops.masked_feature_loss(x.f4.long(), x.f4.long()), TypeError, "student"),
    ("bool", lambda x: ops.masked_feature_loss(x.f4 > 0, x.f4 > 0), TypeError, "student"),
    (
        "mask shape",
        lambda x: ops.masked_feature_loss(x.f4, x.f4, x.mask[:, :3]),
        ValueError,
        "mask",
    ),
    ("mask ndim", lambda x: ops.masked_feature_loss(x.f4, x.f4, x.f4), ValueError, "mask"),
    ("mask int", lambda x: ops.masked_feature_loss(x.f4, x.f4, x.mask.long()), TypeError, "mask"),
    (
        "mask device",
        lambda x: ops.masked_feature_loss(x.f4, x.f4, x.mask.to(x.other)),
        ValueError,
        "mask",
    ),
    (
        "normalize",
        lambda x: ops.masked_feature_loss(x.f4, x.f4, normalize="sum"),
        ValueError,
        "normalize",
    ),
    (
        "normalize type",
        lambda x: ops.masked_feature_loss(x.f4, x.f4, normalize=None),
        ValueError,
        "normalize",
    ),
    ("empty", lambda x: ops.masked_feature_loss(x.f4[:0], x.f4[:0]), ValueError, "student"),
    ("not tensor", lambda x: ops.masked_feature_loss(x.f4.tolist(), x.f4), TypeError, "student"),
    (
        "nan",
        lambda x: ops.masked_feature_loss(x.f4, x.f4 * float("nan"), check_finite=True),
        ValueError,
        "teacher",
    ),
    # kd_loss
    ("T zero", lambda x: ops.kd_loss(x.logits, x.logits, 0.0), ValueError, "temperature"),
    ("T negative", lambda x: ops.kd_loss(x.logits, x.logits, -1.0), ValueError, "temperature"),
    ("T type", lambda x: ops.kd_loss(x.logits, x.logits, "4"), TypeError, "temperature"),
    ("T bool", lambda x: ops.kd_loss(x.logits, x.logits, True), TypeError, "temperature"),
    ("T inf", lambda x: ops.kd_loss(x.logits, x.logits, float("inf")), ValueError, "temperature"),
    ("T nan", lambda x: ops.kd_loss(x.logits, x.logits, float("nan")), ValueError, "temperature"),
    ("kd ndim", lambda x: ops.kd_loss(x.logits[0], x.logits[0]), ValueError, "student_logits"),
    ("kd 3-D", lambda x: ops.kd_loss(x.dense[0], x.dense[0]), ValueError, "student_logits"),
    ("kd shape", lambda x: ops.kd_loss(x.logits, x.logits[:, :5]), ValueError, "teacher_logits"),
    ("kd dtype", lambda x: ops.kd_loss(x.logits, x.logits.half()), TypeError, "teacher_logits"),
    (
        "kd int",
        lambda x: ops.kd_loss(x.logits.long(), x.logits.long()),
        TypeError,
        "student_logits",
    ),
    (
        "kd device",
        lambda x: ops.kd_loss(x.logits, x.logits.to(x.other)),
        ValueError,
        "teacher_logits",
    ),
    (
        "kd weight",
        lambda x: ops.kd_loss(x.logits, x.logits, 4.0, x.weight[:3]),
        ValueError,
        "weight",
    ),
    (
        "kd weight int",
        lambda x: ops.kd_loss(x.logits, x.logits, 4.0, x.weight.long()),
        TypeError,
        "weight",
    ),
    (
        "kd weight device",
        lambda x: ops.kd_loss(x.logits, x.logits, 4.0, x.weight.to(x.other)),
        ValueError,
        "weight",
    ),
    (
        "kd dense weight",
        lambda x: ops.kd_loss(x.dense, x.dense, 4.0, x.weight),
        ValueError,
        "weight",
    ),
    ("kd empty", lambda x: ops.kd_loss(x.logits[:0], x.logits[:0]), ValueError, "student_logits"),
    (
        "kd inf",
        lambda x: ops.kd_loss(x.logits / 0, x.logits, check_finite=True),
        ValueError,
        "student_logits",
    ),
    # decoupled_kd_loss, dkd_loss, top_class_mask
    (
        "mask dtype",
        lambda x: ops.decoupled_kd_loss(x.logits, x.logits, x.class_mask.long()),
        TypeError,
        "class_mask",
    ),
    (
        "mask float",
        lambda x: ops.decoupled_kd_loss(x.logits, x.logits, x.class_mask.float()),
        TypeError,
        "class_mask",
    ),
    (
        "mask list",
        lambda x: ops.decoupled_kd_loss(x.logits, x.logits, x.class_mask.tolist()),
        TypeError,
        "class_mask",
    ),
    (
        "class mask shape",
        lambda x: ops.decoupled_kd_loss(x.logits, x.logits, x.class_mask[:, :5]),
        ValueError,
        "class_mask",
    ),
    (
        "class mask device",
        lambda x: ops.decoupled_kd_loss(x.logits, x.logits, x.class_mask.to(x.other)),
        ValueError,
        "class_mask",
    ),
    (
        "alpha",
        lambda x: ops.decoupled_kd_loss(x.logits, x.logits, x.class_mask, alpha=-1.0),
        ValueError,
        "alpha",
    ),
    (
        "beta",
        lambda x: ops.decoupled_kd_loss(x.logits, x.logits, x.class_mask, beta=float("nan")),
        ValueError,
        "beta",
    ),
    (
        "beta type",
        lambda x: ops.decoupled_kd_loss(x.logits, x.logits, x.class_mask, beta="8"),
        TypeError,
        "beta",
    ),
    (
        "decoupled T",
        lambda x: ops.decoupled_kd_loss(x.logits, x.logits, x.class_mask, temperature=0),
        ValueError,
        "temperature",
    ),
    (
        "decoupled int",
        lambda x: ops.decoupled_kd_loss(x.logits.int(), x.logits.int(), x.class_mask),
        TypeError,
        "student_logits",
    ),
    (
        "dkd T",
        lambda x: ops.dkd_loss(x.logits, x.logits, x.target, temperature=0),
        ValueError,
        "temperature",
    ),
    (
        "target range",
        lambda x: ops.dkd_loss(x.logits, x.logits, x.target + 6),
        ValueError,
        "target",
    ),
    (
        "target negative",
        lambda x: ops.dkd_loss(x.logits, x.logits, x.target - 1),
        ValueError,
        "target",
    ),
    (
        "target dtype",
        lambda x: ops.dkd_loss(x.logits, x.logits, x.target.float()),
        TypeError,
        "target",
    ),
    (
        "target shape",
        lambda x: ops.dkd_loss(x.logits, x.logits, x.target[:3]),
        ValueError,
        "target",
    ),
    (
        "target device",
        lambda x: ops.dkd_loss(x.logits, x.logits, x.target.to(x.other)),
        ValueError,
        "target",
    ),
    ("ratio", lambda x: ops.top_class_mask(x.logits, ratio=0), ValueError, "ratio"),
    ("ratio type", lambda x: ops.top_class_mask(x.logits, ratio="0.2"), TypeError, "ratio"),
    ("top int", lambda x: ops.top_class_mask(x.logits.long()), TypeError, "teacher_logits"),
    # interest_map
    ("k too big", lambda x: interest(x, k=21), ValueError, "k"),
    ("k zero", lambda x: interest(x, k=0), ValueError, "k"),
    ("k negative", lambda x: interest(x, k=-3), ValueError, "k"),
    ("k float", lambda x: interest(x, k=2.0), TypeError, "k"),
    ("k bool", lambda x: interest(x, k=True), TypeError, "k"),
    ("even kernel", lambda x: interest(x, kernel=2), ValueError, "kernel"),
    ("kernel zero", lambda x: interest(x, kernel=0), ValueError, "kernel"),
    ("kernel float", lambda x: interest(x, kernel=3.0), TypeError, "kernel"),
    ("wh channels", lambda x: interest(x, wh=x.wh[:, :1]), ValueError, "wh"),
    ("offset shape", lambda x: interest(x, offset=x.offset[..., :4]), ValueError, "offset"),
    ("offset dtype", lambda x: interest(x, offset=x.offset.double()), TypeError, "offset"),
    ("wh int", lambda x: interest(x, wh=x.wh.long()), TypeError, "wh"),
    ("heat int", lambda x: interest(x, heat=x.heat.long()), TypeError, "heat"),
    ("heat device", lambda x: interest(x, wh=x.wh.to(x.other)), ValueError, "wh"),
    ("heat ndim", lambda x: interest(x, heat=x.heat[0, 0]), ValueError, "heat"),
    (
        "heat empty",
        lambda x: interest(x, heat=x.heat[:0], wh=x.wh[:0], offset=x.offset[:0]),
        ValueError,
        "heat",
    ),
    # feature_augment
    ("op id", lambda x: ops.feature_augment(x.f4, [9], x.magnitudes[:1]), ValueError, "op_ids"),
    (
        "op negative",
        lambda x: ops.feature_augment(x.f4, [-1], x.magnitudes[:1]),
        ValueError,
        "op_ids",
    ),
    (
        "op type",
        lambda x: ops.feature_augment(x.f4, ["shear"], x.magnitudes[:1]),
        TypeError,
        "op_ids",
    ),
    ("op float", lambda x: ops.feature_augment(x.f4, [1.0], x.magnitudes[:1]), TypeError, "op_ids"),
    ("op_ids type", lambda x: ops.feature_augment(x.f4, 3, x.magnitudes[:1]), TypeError, "op_ids"),
    ("op_ids string", lambda x: ops.feature_augment(x.f4, "01", x.magnitudes), TypeError, "op_ids"),
    (
        "magnitude length",
        lambda x: ops.feature_augment(x.f4, [0, 1], x.magnitudes[:1]),
        ValueError,
        "magnitudes",
    ),
    (
        "magnitude 2-D",
        lambda x: ops.feature_augment(x.f4, [0, 1], x.magnitudes[None]),
        ValueError,
        "magnitudes",
    ),
    ("magnitude type", lambda x: ops.feature_augment(x.f4, [0], [0.5]), TypeError, "magnitudes"),
    (
        "magnitude int",
        lambda x: ops.feature_augment(x.f4, [0], x.magnitudes[:1].long()),
        TypeError,
        "magnitudes",
    ),
    (
        "magnitude device",
        lambda x: ops.feature_augment(x.f4, [0], x.magnitudes[:1].to(x.other)),
        ValueError,
        "magnitudes",
    ),
    ("x ndim", lambda x: ops.feature_augment(x.f4[0], [0], x.magnitudes[:1]), ValueError, "x"),
    ("x int", lambda x: ops.feature_augment(x.f4.long(), [0], x.magnitudes[:1]), TypeError, "x"),
    ("x empty", lambda x: ops.feature_augment(x.f4[:, :0], [0], x.magnitudes[:1]), ValueError, "x"),
    (
        "generator",
        lambda x: ops.feature_augment(x.f4, [5], x.magnitudes[:1], generator=3),
        TypeError,
        "generator",
    ),
    # modules
    ("no sub-policies", lambda x: FeaturePolicy(sub_policies=[]), ValueError, "sub_policies"),
    ("same op twice", lambda x: FeaturePolicy(sub_policies=[(1, 1)]), ValueError, "sub_policies"),
    (
        "sub-policy triple",
        lambda x: FeaturePolicy(sub_policies=[(0, 1, 2)]),
        ValueError,
        "sub_policies",
    ),
    ("sub-policies type", lambda x: FeaturePolicy(sub_policies=5), TypeError, "sub_policies"),
    ("sub-policy op", lambda x: FeaturePolicy(sub_policies=[(1, 12)]), ValueError, "op_ids"),
    ("policy temperature", lambda x: FeaturePolicy(temperature=0), ValueError, "temperature"),
    ("policy eps", lambda x: FeaturePolicy(eps=2.0), ValueError, "eps"),
    ("policy hidden", lambda x: FeaturePolicy(hidden=0), ValueError, "hidden"),
    ("head channels", lambda x: InterestHead(0), ValueError, "channels"),
    ("head heat channels", lambda x: InterestHead(4, heat_channels=0), ValueError, "heat_channels"),
    ("head input", lambda x: InterestHead(4).to(x.device)(x.f4), ValueError, "channels"),
    ("head input int", lambda x: InterestHead(3).to(x.device)(x.f4.long()), TypeError, "x"),
    ("mask_mode", lambda x: SoKDLoss(4, 4, mask_mode="both"), ValueError, "mask_mode"),
    ("logit_loss", lambda x: SoKDLoss(4, 4, logit_loss="ce"), ValueError, "logit_loss"),
    ("loss normalize", lambda x: SoKDLoss(4, 4, normalize="sum"), ValueError, "normalize"),
    ("loss k", lambda x: SoKDLoss(4, 4, k=-1), ValueError, "k"),
    ("loss k zero", lambda x: SoKDLoss(4, 4, k=0), ValueError, "k"),
    ("loss kernel", lambda x: SoKDLoss(4, 4, kernel=4), ValueError, "kernel"),
    ("loss temperature", lambda x: SoKDLoss(4, 4, temperature=-4), ValueError, "temperature"),
    ("loss weight", lambda x: SoKDLoss(4, 4, w_feat=-1), ValueError, "w_feat"),
    ("class_ratio", lambda x: SoKDLoss(4, 4, class_ratio=1.5), ValueError, "class_ratio"),
    ("class_ratio type", lambda x: SoKDLoss(4, 4, class_ratio="0.2"), TypeError, "class_ratio"),
    ("mutual_classes", lambda x: SoKDLoss(4, 4, mutual_classes="no"), TypeError, "mutual_classes"),
    ("channels", lambda x: SoKDLoss(0, 4), ValueError, "student_channels"),
    ("policy type", lambda x: SoKDLoss(4, 4, policy=object()), TypeError, "policy"),
    ("connector", lambda x: SoKDLoss(4, 8, connector=lambda t: t), TypeError, "connector"),
    (
        "student_feat",
        lambda x: SoKDLoss(3, 3).to(x.device)(x.f4[0], x.f4),
        ValueError,
        "student_feat",
    ),
    (
        "teacher_feat int",
        lambda x: SoKDLoss(3, 3).to(x.device)(x.f4, x.f4.long()),
        TypeError,
        "teacher_feat",
    ),
    ("feat device", lambda x: SoKDLoss(3, 3)(x.f4, x.f4.to(x.other)), ValueError, "teacher_feat"),
    (
        "missing logits",
        lambda x: SoKDLoss(3, 3, logit_loss="kd").to(x.device)(x.f4, x.f4),
        ValueError,
        "student_logits",
    ),
    (
        "dkd needs target",
        lambda x: SoKDLoss(3, 3, logit_loss="dkd").to(x.device)(
            x.f4, x.f4, x.logits[:2], x.logits[:2]
        ),
        ValueError,
        "target",
    ),
    ("backend name", lambda x: sokd.set_backend("gpu"), ValueError, "backend"),
    ("backend type", lambda x: sokd.set_backend(None), TypeError, "backend"),
]


@pytest.mark.parametrize("target", **target_params(ALL_TARGETS))
@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_a_clear_error(target, case):
    _, call, error, argument = case
    inputs = valid_inputs(target.device)
    with using(target.backend), pytest.raises(error, match=argument):
        call(inputs)


def test_unknown_backend_from_environment(monkeypatch):
    monkeypatch.setenv("SOKD_BACKEND", "fastest")
    sokd._backend._selected = None
    with pytest.raises(ValueError, match="backend"):
        sokd.get_backend()
