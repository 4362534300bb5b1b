"""The reference losses against hand-derived values, independent numpy loops, and gradcheck."""

import math

import numpy as np
import pytest
import torch

import sokd
from sokd import ops


@pytest.fixture(autouse=True)
def reference_backend():
    sokd.set_backend("reference")


def numpy_kd(student, teacher, temperature, weight=None):
    """KD written as explicit loops over rows and classes, in float64."""
    s = np.asarray(student, dtype=np.float64) / temperature
    t = np.asarray(teacher, dtype=np.float64) / temperature
    per_row = []
    for zs, zt in zip(s, t):
        ps = np.exp(zs - zs.max()) / np.exp(zs - zs.max()).sum()
        pt = np.exp(zt - zt.max()) / np.exp(zt - zt.max()).sum()
        per_row.append(sum(pt[c] * math.log(pt[c] / ps[c]) for c in range(len(pt)) if pt[c] > 0))
    per_row = np.array(per_row)
    if weight is None:
        return per_row.mean() * temperature**2
    w = np.asarray(weight, dtype=np.float64)
    return (w * per_row).sum() / w.sum() * temperature**2


def numpy_decoupled(student, teacher, mask, alpha, beta, temperature):
    def softmax(z):
        e = np.exp(z - z.max())
        return e / e.sum()

    def kl(p, q):
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)

    total = 0.0
    for zs, zt, g in zip(student, teacher, mask):
        zs, zt, g = np.asarray(zs, np.float64), np.asarray(zt, np.float64), np.asarray(g, bool)
        ps, pt = softmax(zs / temperature), softmax(zt / temperature)
        tckd = kl([pt[g].sum(), pt[~g].sum()], [ps[g].sum(), ps[~g].sum()])
        nckd = kl(softmax(zt[~g] / temperature), softmax(zs[~g] / temperature)) if (~g).any() else 0
        total += alpha * tckd + beta * nckd
    return total / len(student) * temperature**2


class TestMaskedFeatureLoss:
    def test_hand_derived(self):
        diff = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # N=1, C=2, H=1, W=2
        teacher = torch.zeros_like(diff)
        mask = torch.tensor([[[1.0, 0.5]]])
        # numerator = 1 * (1 + 9) + 0.25 * (4 + 16) = 15
        assert ops.masked_feature_loss(diff, teacher, mask).item() == pytest.approx(15 / 4)
        assert ops.masked_feature_loss(diff, teacher, mask, "mask").item() == pytest.approx(15 / 2.5)
        assert ops.masked_feature_loss(diff, teacher).item() == pytest.approx(30 / 4)

    def test_matches_numpy_loop(self):
        torch.manual_seed(0)
        s, t, mask = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6), torch.rand(3, 5, 6)
        sn, tn, mn = s.double().numpy(), t.double().numpy(), mask.double().numpy()
        numerator = 0.0
        for n, c, h, w in np.ndindex(*sn.shape):
            numerator += mn[n, h, w] ** 2 * (sn[n, c, h, w] - tn[n, c, h, w]) ** 2
        loss_elements = ops.masked_feature_loss(s.double(), t.double(), mask.double())
        loss_mask = ops.masked_feature_loss(s.double(), t.double(), mask.double(), "mask")
        assert loss_elements.item() == pytest.approx(numerator / sn.size, rel=1e-12)
        assert loss_mask.item() == pytest.approx(numerator / (4 * (mn**2).sum()), rel=1e-12)

    def test_all_zero_mask_gives_zero_loss_and_gradient(self):
        s = torch.randn(2, 3, 4, 4, requires_grad=True)
        loss = ops.masked_feature_loss(s, torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4), "mask")
        loss.backward()
        assert loss.item() == 0.0
        assert torch.equal(s.grad, torch.zeros_like(s))

    def test_teacher_gradient_is_minus_student_gradient(self):
        s = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
        t = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
        ops.masked_feature_loss(s, t, torch.rand(2, 4, 5, dtype=torch.float64)).backward()
        torch.testing.assert_close(t.grad, -s.grad)

    @pytest.mark.parametrize("normalize", ["elements", "mask"])
    def test_gradcheck(self, normalize):
        s = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
        t = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
        mask = torch.rand(2, 3, 4, dtype=torch.float64)
        assert torch.autograd.gradcheck(
            lambda a, b: ops.masked_feature_loss(a, b, mask, normalize), (s, t)
        )

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_half_inputs_accumulate_in_float32(self, dtype):
        s, t, mask = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5), torch.rand(2, 5, 5)
        expected = ops.masked_feature_loss(s.to(dtype).float(), t.to(dtype).float(), mask)
        loss = ops.masked_feature_loss(s.to(dtype), t.to(dtype), mask)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, expected)


class TestKDLoss:
    def test_hand_derived(self):
        # teacher uniform over 2 classes, student [1/4, 3/4]: KL = ln(4/3) / 2
        teacher = torch.tensor([[0.0, 0.0]])
        assert ops.kd_loss(torch.tensor([[0.0, math.log(3)]]), teacher, 1.0).item() == (
            pytest.approx(0.5 * math.log(4 / 3))
        )
        # the same distributions at T=2 are scaled by T^2 = 4
        student = torch.tensor([[0.0, 2 * math.log(3)]])
        assert ops.kd_loss(student, teacher, 2.0).item() == pytest.approx(2 * math.log(4 / 3))

    def test_matches_numpy_loop_with_and_without_weights(self):
        torch.manual_seed(1)
        s, t, w = torch.randn(7, 11) * 3, torch.randn(7, 11) * 3, torch.rand(7)
        expected = numpy_kd(s.numpy(), t.numpy(), 3.0)
        assert ops.kd_loss(s, t, 3.0).item() == pytest.approx(expected, rel=1e-5)
        expected_w = numpy_kd(s.numpy(), t.numpy(), 3.0, w.numpy())
        assert ops.kd_loss(s, t, 3.0, w).item() == pytest.approx(expected_w, rel=1e-5)

    def test_dense_rows_are_positions(self):
        torch.manual_seed(2)
        s, t, w = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4), torch.rand(2, 3, 4)
        rows_s = s.permute(0, 2, 3, 1).reshape(-1, 5).numpy()
        rows_t = t.permute(0, 2, 3, 1).reshape(-1, 5).numpy()
        expected = numpy_kd(rows_s, rows_t, 2.0, w.reshape(-1).numpy())
        assert ops.kd_loss(s, t, 2.0, w).item() == pytest.approx(expected, rel=1e-5)

    def test_all_zero_weights_give_zero(self):
        s = torch.randn(3, 4, requires_grad=True)
        loss = ops.kd_loss(s, torch.randn(3, 4), 4.0, torch.zeros(3))
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))

    def test_teacher_gets_no_gradient(self):
        s = torch.randn(3, 4, requires_grad=True)
        t = torch.randn(3, 4, requires_grad=True)
        ops.kd_loss(s, t).backward()
        assert t.grad is None and s.grad is not None

    @pytest.mark.parametrize("shape,weight_shape", [((4, 6), (4,)), ((2, 3, 2, 3), (2, 2, 3))])
    def test_gradcheck(self, shape, weight_shape):
        s = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        t = torch.randn(*shape, dtype=torch.float64)
        w = torch.rand(*weight_shape, dtype=torch.float64)
        assert torch.autograd.gradcheck(lambda a: ops.kd_loss(a, t, 2.5, w), (s,))


class TestDecoupledKD:
    def test_hand_derived(self):
        # G = {0}; teacher uniform over 3 classes; student [1/2, 1/4, 1/4].
        # TCKD = KL([1/3, 2/3] || [1/2, 1/2]); NCKD = 0 (both uniform over {1, 2}).
        student = torch.tensor([[math.log(2), 0.0, 0.0]])
        teacher = torch.zeros(1, 3)
        mask = torch.tensor([[True, False, False]])
        expected = (1 / 3) * math.log(2 / 3) + (2 / 3) * math.log(4 / 3)
        loss = ops.decoupled_kd_loss(student, teacher, mask, 1.0, 8.0, 1.0)
        assert loss.item() == pytest.approx(expected)

    def test_matches_numpy_loop(self):
        torch.manual_seed(3)
        s, t = torch.randn(9, 7) * 2, torch.randn(9, 7) * 2
        mask = torch.rand(9, 7) < 0.4
        mask[0] = False  # empty G
        mask[1] = True  # empty complement
        expected = numpy_decoupled(s.numpy(), t.numpy(), mask.numpy(), 1.5, 6.0, 3.0)
        loss = ops.decoupled_kd_loss(s, t, mask, 1.5, 6.0, 3.0)
        assert loss.item() == pytest.approx(expected, rel=1e-5)

    def test_empty_set_is_beta_times_kd_and_full_set_is_zero(self):
        s, t = torch.randn(5, 6), torch.randn(5, 6)
        empty = torch.zeros(5, 6, dtype=torch.bool)
        loss_empty = ops.decoupled_kd_loss(s, t, empty, 1.0, 8.0, 4.0)
        torch.testing.assert_close(loss_empty, 8.0 * ops.kd_loss(s, t, 4.0))
        full = ops.decoupled_kd_loss(s, t, ~empty, 1.0, 8.0, 4.0)
        assert full.item() == 0.0

    def test_dkd_is_decoupled_with_target_class(self):
        s, t, target = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
        mask = torch.nn.functional.one_hot(target, 10).bool()
        torch.testing.assert_close(
            ops.dkd_loss(s, t, target), ops.decoupled_kd_loss(s, t, mask, 1.0, 8.0, 4.0)
        )

    def test_dense_dkd(self):
        s, t = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)
        target = torch.randint(0, 5, (2, 3, 3))
        def rows(x):
            return x.permute(0, 2, 3, 1).reshape(-1, 5)

        expected = ops.dkd_loss(rows(s), rows(t), target.reshape(-1))
        torch.testing.assert_close(ops.dkd_loss(s, t, target), expected)

    def test_gradcheck_including_empty_and_full_rows(self):
        s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
        t = torch.randn(4, 5, dtype=torch.float64)
        mask = torch.tensor(
            [[False] * 5, [True] * 5, [True, False, True, False, False], [False, True] + [False] * 3]
        )
        loss = ops.decoupled_kd_loss(s, t, mask, 1.0, 8.0, 2.0)
        loss.backward()
        assert torch.isfinite(s.grad).all()
        assert torch.autograd.gradcheck(
            lambda a: ops.decoupled_kd_loss(a, t, mask, 1.0, 8.0, 2.0), (s,)
        )

    def test_top_class_mask(self):
        teacher = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
        student = torch.tensor([[1.0, 5.0, 4.0, 2.0, 3.0]])
        # ceil(0.4 * 5) = 2 classes: teacher {0, 1}, student {1, 2}
        assert ops.top_class_mask(teacher, ratio=0.4).tolist() == [[True, True, False, False, False]]
        mutual = ops.top_class_mask(teacher, student, ratio=0.4)
        assert mutual.tolist() == [[False, True, False, False, False]]
