"""InterestHead and SoKDLoss: the math of the fused head, and every configuration end to end."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sokd
from sokd import InterestHead, SoKDLoss, ops


def three_branch_head(head):
    """The DAM head as the paper draws it: three separate conv3x3 -> ReLU -> conv1x1 branches,
    with the weights of the fused head copied in."""
    channels, hidden = head.channels, head.hidden_channels
    branches = []
    for index, name in enumerate(("heat", "wh", "offset")):
        weight = getattr(head, f"{name}_weight")
        conv3 = nn.Conv2d(channels, hidden, 3, padding=1)
        conv1 = nn.Conv2d(hidden, weight.shape[0], 1)
        rows = slice(index * hidden, (index + 1) * hidden)
        with torch.no_grad():
            conv3.weight.copy_(head.hidden.weight[rows])
            conv3.bias.copy_(head.hidden.bias[rows])
            conv1.weight.copy_(weight[:, :, None, None])
            conv1.bias.copy_(getattr(head, f"{name}_bias"))
        branches.append(nn.Sequential(conv3, nn.ReLU(), conv1))
    return branches


@pytest.mark.parametrize("heat_channels,hidden_channels", [(1, None), (3, None), (1, 2)])
def test_fused_head_equals_three_separate_branches(heat_channels, hidden_channels):
    torch.manual_seed(0)
    head = InterestHead(6, heat_channels, hidden_channels=hidden_channels).double()
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    heat, wh, offset = (branch.double()(x) for branch in three_branch_head(head))
    out = head(x)
    torch.testing.assert_close(out.heat, torch.sigmoid(heat))
    torch.testing.assert_close(out.wh, 1 + F.softplus(wh))
    torch.testing.assert_close(out.offset, torch.sigmoid(offset))
    assert out.heat.shape == (2, heat_channels, 5, 7)
    assert head.hidden.weight.shape[0] == 3 * (hidden_channels or 6)


def test_head_starts_at_centernet_prior_and_three_position_boxes():
    head = InterestHead(8)
    with torch.no_grad():
        for name in ("heat", "wh", "offset"):
            getattr(head, f"{name}_weight").zero_()
        out = head(torch.randn(2, 8, 4, 4))
    torch.testing.assert_close(out.heat, torch.full_like(out.heat, 1 / (1 + 2.718281828**2.19)))
    torch.testing.assert_close(out.wh, torch.full_like(out.wh, 3.0))
    torch.testing.assert_close(out.offset, torch.full_like(out.offset, 0.5))


def test_bfloat16_head_runs_under_autocast_and_returns_float32():
    torch.manual_seed(0)
    head = InterestHead(8)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    exact = head(x)
    head.precision = "bfloat16"
    low = head(x)
    for name in ("heat", "wh", "offset"):
        value = getattr(low, name)
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, getattr(exact, name), rtol=0.05, atol=0.02)
    low.concatenated().sum().backward()
    assert x.grad is not None and head.hidden.weight.grad.dtype == torch.float32
    head.precision = "float16"
    with pytest.raises(ValueError, match="float16"):
        head(x)


def always_augmenting_loss(**kwargs):
    loss = SoKDLoss(8, 16, generator=torch.Generator().manual_seed(0), **kwargs)
    with torch.no_grad():
        loss.policy.probability.fill_(1.0)  # both ops of the sampled sub-policy are active
    return loss


def run_step(loss, dtype, logit_shape=(4, 10), dense_target=False):
    torch.manual_seed(1)
    student = torch.randn(4, 8, 8, 8, requires_grad=True)
    teacher = torch.randn(4, 16, 8, 8)
    s_logits = torch.randn(*logit_shape, requires_grad=True)
    t_logits = torch.randn(*logit_shape)
    target_shape = (logit_shape[0],) + tuple(logit_shape[2:])
    target = torch.randint(0, logit_shape[1], target_shape)
    loss = loss.to(dtype)
    out = loss(student.to(dtype), teacher.to(dtype), s_logits.to(dtype), t_logits.to(dtype), target)
    out.total.backward()
    return out, student, s_logits


@pytest.mark.parametrize(
    "mask_mode,logit_loss,dtype",
    list(
        itertools.product(
            ["student", "teacher", "mutual"],
            ["none", "kd", "dkd", "masked"],
            [torch.float32, torch.bfloat16],
        )
    ),
)
def test_every_configuration_runs_forward_and_backward(mask_mode, logit_loss, dtype):
    sokd.set_backend("reference")
    loss = always_augmenting_loss(mask_mode=mask_mode, logit_loss=logit_loss)
    out, student, s_logits = run_step(loss, dtype)
    assert out.total.dtype == torch.float32 and torch.isfinite(out.total)
    expected_keys = {"feat", "dam", "total", "coverage", "empty", "box_area", "peak_score"}
    expected_keys |= {"logit"} if logit_loss != "none" else set()
    assert set(out.components) == expected_keys
    assert out.weight_map.shape == (4, 8, 8)
    recomputed = 1000 * out.components["feat"] + 1000 * out.components["dam"]
    recomputed = recomputed + out.components.get("logit", 0.0)
    torch.testing.assert_close(out.components["total"], recomputed)

    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0
    for name, parameter in loss.connector.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    for name, parameter in loss.head.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # The student's step never reaches the policy; only the search's probes do.
    assert all(p.grad is None for p in loss.policy.parameters())
    if logit_loss != "none":
        assert s_logits.grad is not None and s_logits.grad.abs().sum() > 0


def test_weight_map_follows_mask_mode():
    sokd.set_backend("reference")
    torch.manual_seed(2)
    loss = SoKDLoss(4, 4).eval()
    student, teacher = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    head_s, head_t = loss.head(student), loss.head(teacher)
    count_s = ops.interest_map(*(m.detach() for m in head_s), k=8)[0]
    count_t = ops.interest_map(*(m.detach() for m in head_t), k=8)[0]
    mutual = torch.minimum(count_s, count_t)
    assert mutual.flatten(1).amax(1).all(), "this case tests the mutual map, not its fallback"
    expected = {"student": count_s, "teacher": count_t, "mutual": mutual}
    for mode, count in expected.items():
        loss.mask_mode = mode
        torch.testing.assert_close(loss(student, teacher).weight_map, count)


def test_eval_mode_uses_the_clean_teacher():
    sokd.set_backend("reference")
    loss = always_augmenting_loss().eval()
    student, teacher = torch.randn(2, 8, 6, 6), torch.randn(2, 16, 6, 6)
    first = loss(student, teacher)
    assert loss.policy.sample is None
    projected = loss.connector(student)
    expected = ops.masked_feature_loss(projected, teacher, first.weight_map)
    torch.testing.assert_close(first.components["feat"], expected)


def test_dense_logits_are_weighted_by_the_interest_map():
    sokd.set_backend("reference")
    loss = SoKDLoss(8, 16, logit_loss="kd", mask_mode="student", k=6).eval()
    student, teacher = torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4)
    s_logits, t_logits = torch.randn(2, 5, 8, 8), torch.randn(2, 5, 8, 8)
    out = loss(student, teacher, s_logits, t_logits)
    weights = out.weight_map.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    expected = ops.kd_loss(s_logits, t_logits, 4.0, weights)
    torch.testing.assert_close(out.components["logit"], expected)


def test_policy_lives_in_the_state_dict():
    loss = SoKDLoss(8, 16)
    with torch.no_grad():
        loss.policy.magnitude.fill_(0.8)
    restored = SoKDLoss(8, 16)
    restored.load_state_dict(loss.state_dict())
    assert torch.all(restored.policy.magnitude == 0.8)


def test_hold_sample_keeps_the_policy_for_repeated_evaluations():
    sokd.set_backend("reference")
    loss = SoKDLoss(4, 4, generator=torch.Generator().manual_seed(3))
    student, teacher = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    loss(student, teacher)
    with loss.policy.hold_sample() as held:
        loss(student, teacher)
        assert loss.policy.sample is held
    seen = set()
    for _ in range(10):
        loss(student, teacher)
        seen.add(loss.policy.sample.index)
    assert len(seen) > 1


def test_missing_logits_or_target_is_a_clear_error():
    student, teacher = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match="student_logits and teacher_logits"):
        SoKDLoss(4, 4, logit_loss="kd")(student, teacher)
    with pytest.raises(ValueError, match="target"):
        SoKDLoss(4, 4, logit_loss="dkd")(student, teacher, torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="teacher_feat"):
        SoKDLoss(4, 8)(student, teacher)


@pytest.mark.parametrize(
    "kwargs,error,name",
    [
        ({"head_channels": 0}, ValueError, "head_channels"),
        ({"head_channels": 2.5}, TypeError, "head_channels"),
        ({"head_precision": "float8"}, ValueError, "head_precision"),
    ],
)
def test_head_options_are_validated(kwargs, error, name):
    with pytest.raises(error, match=name):
        SoKDLoss(4, 8, **kwargs)


def test_head_width_defaults_to_an_eighth_of_the_teacher_channels():
    assert SoKDLoss(8, 16).head.hidden_channels == 2
    assert SoKDLoss(8, 256).head.hidden_channels == 32
    assert SoKDLoss(2, 2).head.hidden_channels == 1
    assert SoKDLoss(8, 16, head_channels=16).head.hidden.weight.shape[0] == 48
