"""Wrong calls raise ValueError or TypeError naming the argument, before any kernel runs."""

import pytest
import torch

import sokd
from sokd import FeaturePolicy, InterestHead, SoKDLoss, ops

F4 = torch.randn(2, 3, 4, 5)
LOGITS = torch.randn(4, 6)


def heat_maps(n=2, channels=1, h=4, w=5):
    return torch.rand(n, channels, h, w), torch.rand(n, 2, h, w), torch.rand(n, 2, h, w)


CASES = [
    # masked_feature_loss
    ("ndim", lambda: ops.masked_feature_loss(F4[0], F4[0]), ValueError, "student"),
    ("shape", lambda: ops.masked_feature_loss(F4, F4[:, :2]), ValueError, "teacher"),
    ("dtype", lambda: ops.masked_feature_loss(F4, F4.double()), TypeError, "teacher"),
    ("device", lambda: ops.masked_feature_loss(F4, F4.to("meta")), ValueError, "teacher"),
    ("kd device", lambda: ops.kd_loss(LOGITS, LOGITS, 4.0, torch.rand(4, device="meta")), ValueError, "weight"),
    ("heat device", lambda: ops.interest_map(heat_maps()[0], *(m.to("meta") for m in heat_maps()[1:])), ValueError, "wh"),
    ("int", lambda: ops.masked_feature_loss(F4.long(), F4.long()), TypeError, "student"),
    ("mask shape", lambda: ops.masked_feature_loss(F4, F4, torch.rand(2, 4, 4)), ValueError, "mask"),
    ("mask ndim", lambda: ops.masked_feature_loss(F4, F4, torch.rand(2, 3, 4, 5)), ValueError, "mask"),
    ("normalize", lambda: ops.masked_feature_loss(F4, F4, normalize="sum"), ValueError, "normalize"),
    ("empty", lambda: ops.masked_feature_loss(F4[:0], F4[:0]), ValueError, "student"),
    ("not tensor", lambda: ops.masked_feature_loss(F4.tolist(), F4), TypeError, "student"),
    ("nan", lambda: ops.masked_feature_loss(F4, F4 * float("nan"), check_finite=True), ValueError, "teacher"),
    # kd_loss
    ("T zero", lambda: ops.kd_loss(LOGITS, LOGITS, 0.0), ValueError, "temperature"),
    ("T negative", lambda: ops.kd_loss(LOGITS, LOGITS, -1.0), ValueError, "temperature"),
    ("T type", lambda: ops.kd_loss(LOGITS, LOGITS, "4"), TypeError, "temperature"),
    ("T inf", lambda: ops.kd_loss(LOGITS, LOGITS, float("inf")), ValueError, "temperature"),
    ("kd ndim", lambda: ops.kd_loss(LOGITS[0], LOGITS[0]), ValueError, "student_logits"),
    ("kd shape", lambda: ops.kd_loss(LOGITS, LOGITS[:, :5]), ValueError, "teacher_logits"),
    ("kd dtype", lambda: ops.kd_loss(LOGITS, LOGITS.half()), TypeError, "teacher_logits"),
    ("kd weight", lambda: ops.kd_loss(LOGITS, LOGITS, 4.0, torch.rand(3)), ValueError, "weight"),
    ("kd empty", lambda: ops.kd_loss(LOGITS[:0], LOGITS[:0]), ValueError, "student_logits"),
    ("kd inf", lambda: ops.kd_loss(LOGITS / 0, LOGITS, check_finite=True), ValueError, "student_logits"),
    # decoupled / dkd
    ("mask dtype", lambda: ops.decoupled_kd_loss(LOGITS, LOGITS, torch.ones(4, 6, dtype=torch.long)), TypeError, "class_mask"),
    ("mask float", lambda: ops.decoupled_kd_loss(LOGITS, LOGITS, torch.ones(4, 6)), TypeError, "class_mask"),
    ("mask shape", lambda: ops.decoupled_kd_loss(LOGITS, LOGITS, torch.ones(4, 5, dtype=torch.bool)), ValueError, "class_mask"),
    ("alpha", lambda: ops.decoupled_kd_loss(LOGITS, LOGITS, LOGITS > 0, alpha=-1.0), ValueError, "alpha"),
    ("dkd T", lambda: ops.dkd_loss(LOGITS, LOGITS, torch.zeros(4, dtype=torch.long), temperature=0), ValueError, "temperature"),
    ("target range", lambda: ops.dkd_loss(LOGITS, LOGITS, torch.full((4,), 6)), ValueError, "target"),
    ("target dtype", lambda: ops.dkd_loss(LOGITS, LOGITS, torch.zeros(4)), TypeError, "target"),
    ("target shape", lambda: ops.dkd_loss(LOGITS, LOGITS, torch.zeros(3, dtype=torch.long)), ValueError, "target"),
    # interest_map
    ("k too big", lambda: ops.interest_map(*heat_maps(), k=21), ValueError, "k"),
    ("k zero", lambda: ops.interest_map(*heat_maps(), k=0), ValueError, "k"),
    ("k float", lambda: ops.interest_map(*heat_maps(), k=2.0), TypeError, "k"),
    ("even kernel", lambda: ops.interest_map(*heat_maps(), kernel=2), ValueError, "kernel"),
    ("wh channels", lambda: ops.interest_map(heat_maps()[0], torch.rand(2, 3, 4, 5), heat_maps()[2]), ValueError, "wh"),
    ("offset dtype", lambda: ops.interest_map(*heat_maps()[:2], heat_maps()[2].double()), TypeError, "offset"),
    ("heat ndim", lambda: ops.interest_map(torch.rand(4, 5), *heat_maps()[1:]), ValueError, "heat"),
    ("heat empty", lambda: ops.interest_map(*heat_maps(n=0)), ValueError, "heat"),
    # feature_augment
    ("op id", lambda: ops.feature_augment(F4, [9], torch.rand(1)), ValueError, "op_ids"),
    ("op negative", lambda: ops.feature_augment(F4, [-1], torch.rand(1)), ValueError, "op_ids"),
    ("op type", lambda: ops.feature_augment(F4, ["shear"], torch.rand(1)), TypeError, "op_ids"),
    ("op_ids type", lambda: ops.feature_augment(F4, 3, torch.rand(1)), TypeError, "op_ids"),
    ("magnitude length", lambda: ops.feature_augment(F4, [0, 1], torch.rand(3)), ValueError, "magnitudes"),
    ("magnitude type", lambda: ops.feature_augment(F4, [0], [0.5]), TypeError, "magnitudes"),
    ("magnitude int", lambda: ops.feature_augment(F4, [0], torch.ones(1, dtype=torch.long)), TypeError, "magnitudes"),
    ("x ndim", lambda: ops.feature_augment(F4[0], [0], torch.rand(1)), ValueError, "x"),
    ("generator", lambda: ops.feature_augment(F4, [5], torch.rand(1), generator=3), TypeError, "generator"),
    # modules
    ("no sub-policies", lambda: FeaturePolicy(sub_policies=[]), ValueError, "sub_policies"),
    ("same op twice", lambda: FeaturePolicy(sub_policies=[(1, 1)]), ValueError, "sub_policies"),
    ("sub-policy op", lambda: FeaturePolicy(sub_policies=[(1, 12)]), ValueError, "op_ids"),
    ("policy temperature", lambda: FeaturePolicy(temperature=0), ValueError, "temperature"),
    ("head channels", lambda: InterestHead(0), ValueError, "channels"),
    ("head input", lambda: InterestHead(4)(F4), ValueError, "channels"),
    ("mask_mode", lambda: SoKDLoss(4, 4, mask_mode="both"), ValueError, "mask_mode"),
    ("logit_loss", lambda: SoKDLoss(4, 4, logit_loss="ce"), ValueError, "logit_loss"),
    ("loss k", lambda: SoKDLoss(4, 4, k=-1), ValueError, "k"),
    ("loss kernel", lambda: SoKDLoss(4, 4, kernel=4), ValueError, "kernel"),
    ("connector", lambda: SoKDLoss(4, 8, connector=lambda x: x), TypeError, "connector"),
    ("student_feat", lambda: SoKDLoss(3, 3)(F4[0], F4), ValueError, "student_feat"),
    ("backend name", lambda: sokd.set_backend("gpu"), ValueError, "backend"),
    ("backend type", lambda: sokd.set_backend(None), TypeError, "backend"),
]


@pytest.mark.parametrize("call,error,argument", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(call, error, argument):
    sokd.set_backend("reference")
    with pytest.raises(error, match=argument):
        call()


def test_unknown_backend_from_environment(monkeypatch):
    monkeypatch.setenv("SOKD_BACKEND", "fastest")
    sokd._backend._selected = None
    with pytest.raises(ValueError, match="backend"):
        sokd.get_backend()
