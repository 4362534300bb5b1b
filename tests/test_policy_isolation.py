"""The policy moves only through its search: the student's optimizer, whatever it is handed,
never changes P, omega, M or the control variate (docs/algorithm.md §6, departure 12)."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

import sokd
from sokd import PolicySearch, SoKDLoss


class Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        feature = F.relu(self.conv(x))
        return feature, self.fc(feature.mean(dim=(2, 3)))


def setup(seed=0):
    torch.manual_seed(seed)
    sokd.set_backend("reference")
    student = Student()
    criterion = SoKDLoss(
        8, 16, logit_loss="kd", w_feat=1.0, w_dam=1.0, generator=torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        # Both ops of every sampled sub-policy are active, so M is always on the path.
        criterion.policy.probability.fill_(1.0)
    teacher = nn.Conv2d(3, 16, 3, padding=1)
    teacher_fc = nn.Linear(16, 5)

    def objective(x, y, augment=True):
        feature, logits = student(x)
        with torch.no_grad():
            teacher_feature = F.relu(teacher(x))
            teacher_logits = teacher_fc(teacher_feature.mean(dim=(2, 3)))
        out = criterion(feature, teacher_feature, logits, teacher_logits, y, augment=augment)
        return F.cross_entropy(logits, y) + out.total

    return student, criterion, objective


def batch(step):
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(4, 3, 6, 6, generator=generator)
    return x, torch.randint(0, 5, (4,), generator=generator)


def policy_state(criterion):
    return {name: p.detach().clone() for name, p in criterion.policy.named_parameters()}


def assert_bitwise_equal(before, after):
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), f"policy parameter {name} moved"


def naive_sgd(parameters):
    return torch.optim.SGD(parameters, lr=0.05, momentum=0.9, weight_decay=1e-2)


def test_naive_sgd_over_criterion_parameters_leaves_the_policy_bitwise_unchanged():
    student, criterion, objective = setup()
    optimizer = naive_sgd(list(student.parameters()) + list(criterion.parameters()))
    policy_before = policy_state(criterion)
    head_before = copy.deepcopy(criterion.head.state_dict())
    for step in range(5):
        loss = objective(*batch(step))
        optimizer.zero_grad()
        loss.backward()
        for name, parameter in criterion.policy.named_parameters():
            assert parameter.grad is None, f"the student's loss reached policy parameter {name}"
        optimizer.step()
    assert_bitwise_equal(policy_before, policy_state(criterion))
    # The same optimizer did train the rest of the criterion: the check above can fail.
    assert not torch.equal(head_before["hidden.weight"], criterion.head.hidden.weight)


def test_student_step_between_search_steps_leaves_the_policy_as_the_search_left_it():
    student, criterion, objective = setup(seed=1)
    search = PolicySearch(student, criterion, objective, search_epochs=1)
    everything = list(student.parameters()) + list(criterion.parameters())
    for parameters in (search.student_parameters(), everything):
        optimizer = naive_sgd(parameters)
        for step in range(3):
            x, y = batch(step)
            search.step(x, y)
            after_search = policy_state(criterion)
            loss = objective(x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            assert_bitwise_equal(after_search, policy_state(criterion))


def test_straight_through_gradient_to_m_exists_only_inside_the_probe_context():
    """What the search's probes at w+- do: inside policy.straight_through() each active
    magnitude receives the sum over every element of dL/dt~ (docs/algorithm.md §2)."""
    sokd.set_backend("reference")
    policy = SoKDLoss(4, 4, generator=torch.Generator().manual_seed(3)).policy
    with torch.no_grad():
        policy.probability.fill_(1.0)
    teacher = torch.randn(2, 4, 5, 5)
    upstream = torch.randn(2, 4, 5, 5)
    sample = policy.resample(torch.Generator().manual_seed(4))

    def augmented_loss(generator_seed):
        augmented = policy(teacher, torch.Generator().manual_seed(generator_seed))
        return (augmented * upstream).sum(), augmented

    loss, augmented = augmented_loss(5)
    assert not augmented.requires_grad
    assert policy.magnitude.grad is None

    with policy.straight_through():
        assert policy.straight_through_active
        loss, augmented_probe = augmented_loss(5)
        loss.backward()
    assert not policy.straight_through_active
    # The probe's map has the same value as the student step's: only the gradient path differs.
    torch.testing.assert_close(augmented_probe.detach(), augmented, rtol=0, atol=0)
    expected = torch.zeros_like(policy.magnitude)
    expected[sample.index] = upstream.sum()
    torch.testing.assert_close(policy.magnitude.grad, expected)
