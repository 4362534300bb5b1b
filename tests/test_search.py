"""PolicySearch (SPEC section 3): the policy gradient against an independent computation on
copies of the model, exact restoration of weights and buffers, freezing, state and
reproducibility."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sokd
from sokd import PolicySearch

# Affine ops only, so the augmentation draws nothing random and copies of the criterion
# reproduce the search's evaluations exactly.
AFFINE_SUB_POLICIES = ((0, 1), (2, 4), (1, 3))


class TinyStudent(nn.Module):
    """A hint feature and logits, with BatchNorm (train mode) and a parameter it never uses."""

    def __init__(self, channels=4, classes=5, dropout=0.0):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.norm = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels, classes)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        feature = F.relu(self.norm(self.conv(x)))
        return feature, self.classifier(self.dropout(feature.mean(dim=(2, 3))))


def make_setup(seed=0, dtype=torch.float64, sub_policies=AFFINE_SUB_POLICIES, dropout=0.0):
    torch.manual_seed(seed)
    student = TinyStudent(dropout=dropout).to(dtype)
    teacher = nn.Conv2d(1, 6, 3, padding=1).to(dtype)
    policy = sokd.FeaturePolicy(sub_policies=sub_policies)
    with torch.no_grad():
        policy.probability.fill_(0.9)
    criterion = sokd.SoKDLoss(
        4, 6, policy=policy, k=2, logit_loss="kd", generator=torch.Generator().manual_seed(seed)
    ).to(dtype)
    return student, teacher, criterion


def make_objective(student, teacher, criterion):
    def objective(x, y, augment=True):
        feature, logits = student(x)
        with torch.no_grad():
            teacher_feature = teacher(x)
            teacher_logits = teacher_feature.mean(dim=(2, 3))[:, :5]
        sokd_loss = criterion(feature, teacher_feature, logits, teacher_logits, y, augment=augment)
        return F.cross_entropy(logits, y) + sokd_loss.total

    return objective


def make_batch(seed=1, dtype=torch.float64, n=4):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=generator, dtype=dtype)
    return x, torch.randint(0, 5, (n,), generator=generator)


def snapshot(*modules):
    return [
        {name: value.clone() for name, value in module.state_dict().items()} for module in modules
    ]


def expected_policy_gradient(student, teacher, criterion, sample, batch, eta, decay, radius):
    """SPEC section 3 step by step on deep copies, with plain backward passes. For P and omega
    the control-variate terms of G+ and G- cancel, leaving (f+ - f-) * grad log p, and
    (f+ - f-) / 2R is taken in its limit, grad_w L_train . v; M takes the central
    difference."""
    criterion.policy.sample = sample

    def weights(model, loss_module):
        return list(model.parameters()) + [
            p for name, p in loss_module.named_parameters() if not name.startswith("policy.")
        ]

    def loss_at(values, augment):
        model, loss_module = copy.deepcopy(student), copy.deepcopy(criterion)
        with torch.no_grad():
            for parameter, value in zip(weights(model, loss_module), values):
                parameter.copy_(value)
        with loss_module.policy.hold_sample():
            loss = make_objective(model, teacher, loss_module)(*batch, augment=augment)
        return loss, weights(model, loss_module), loss_module.policy

    start = [p.detach().clone() for p in weights(student, criterion)]
    train_loss, train_weights, _ = loss_at(start, augment=True)
    grads = torch.autograd.grad(train_loss, train_weights, allow_unused=True)
    unrolled = [
        w - eta * ((torch.zeros_like(w) if g is None else g) + decay * w)
        for w, g in zip(start, grads)
    ]
    val_loss, val_weights, _ = loss_at(unrolled, augment=False)
    direction = torch.autograd.grad(val_loss, val_weights, allow_unused=True)
    direction = [torch.zeros_like(w) if d is None else d for w, d in zip(start, direction)]
    # (f+ - f-) / 2R in the limit: the directional derivative of L_train along v.
    slope = sum((g * d).sum() for g, d in zip(grads, direction) if g is not None)
    score = torch.autograd.grad(
        criterion.policy.log_prob(sample), (criterion.policy.probability, criterion.policy.logits)
    )
    step = radius / torch.sqrt(sum(d.square().sum() for d in direction))

    def magnitude_gradient(sign):
        values = [w + sign * step * d for w, d in zip(start, direction)]
        loss, _, policy = loss_at(values, augment=True)
        return torch.autograd.grad(loss, policy.magnitude)[0]

    return {
        "probability": -eta * slope * score[0],
        "logits": -eta * slope * score[1],
        "magnitude": -eta * (magnitude_gradient(+1) - magnitude_gradient(-1)) / (2 * step),
    }


def test_policy_gradient_matches_step_by_step_computation():
    student, teacher, criterion = make_setup()
    search = PolicySearch(student, criterion, make_objective(student, teacher, criterion))
    before_student, before_criterion = copy.deepcopy(student), copy.deepcopy(criterion)
    batch = make_batch()
    search.step(*batch)
    sample = criterion.policy.sample
    assert sample.bits[sample.index].any(), "the chosen sample must apply an op to test M"
    expected = expected_policy_gradient(
        before_student, teacher, before_criterion, sample, batch, eta=0.01, decay=1e-4, radius=0.01
    )
    policy = criterion.policy
    for name, value in expected.items():
        torch.testing.assert_close(getattr(policy, name).grad, value, rtol=1e-6, atol=1e-9)
    assert policy.probability.grad.abs().sum() > 0
    assert policy.magnitude.grad.abs().sum() > 0


def test_step_restores_every_weight_and_buffer():
    student, teacher, criterion = make_setup(dtype=torch.float32, dropout=0.3)
    search = PolicySearch(student, criterion, make_objective(student, teacher, criterion))
    weights = [p.detach().clone() for p in search.student_parameters()]
    student_state, connector_state = snapshot(student, criterion.connector)
    policy_before = copy.deepcopy(criterion.policy.state_dict())
    for seed in range(2):
        result = search.step(*make_batch(seed, dtype=torch.float32))
        assert torch.isfinite(result.train_loss) and torch.isfinite(result.val_loss)
    assert int(student.norm.num_batches_tracked) == 0
    for after, before in zip(search.student_parameters(), weights):
        assert torch.equal(after, before)
    for module, state in ((student, student_state), (criterion.connector, connector_state)):
        for name, value in module.state_dict().items():
            assert torch.equal(value, state[name]), name
    assert not torch.equal(criterion.policy.probability, policy_before["probability"])
    assert all(p.grad is None for p in search.student_parameters())


def test_student_parameters_are_the_student_side_weights():
    student, teacher, criterion = make_setup()
    search = PolicySearch(student, criterion, make_objective(student, teacher, criterion))
    expected = list(student.parameters()) + list(criterion.connector.parameters())
    expected += list(criterion.head.parameters())
    assert {id(p) for p in search.student_parameters()} == {id(p) for p in expected}


def test_search_epochs_then_frozen():
    student, teacher, criterion = make_setup()
    search = PolicySearch(
        student, criterion, make_objective(student, teacher, criterion), search_epochs=1
    )
    assert search.searching and criterion.policy.probability.requires_grad
    search.step(*make_batch())
    search.end_epoch()
    frozen = copy.deepcopy(criterion.policy.state_dict())
    assert not search.searching
    assert not any(p.requires_grad for p in criterion.policy.parameters())
    assert search.step(*make_batch()) is None
    for name, value in criterion.policy.state_dict().items():
        assert torch.equal(value, frozen[name])
    # A policy is still sampled and applied after the search.
    criterion.policy.sample = None
    make_objective(student, teacher, criterion)(*make_batch())
    assert criterion.policy.sample is not None


def test_state_dict_round_trip_continues_identically():
    def build():
        student, teacher, criterion = make_setup()
        search = PolicySearch(
            student, criterion, make_objective(student, teacher, criterion), search_epochs=3
        )
        return criterion, search

    criterion, search = build()
    search.step(*make_batch(1))
    search.end_epoch()
    saved_criterion = copy.deepcopy(criterion.state_dict())
    saved_search = copy.deepcopy(search.state_dict())
    generator_state = criterion.generator.get_state()

    restored_criterion, restored = build()
    restored_criterion.load_state_dict(saved_criterion)
    restored.load_state_dict(saved_search)
    restored_criterion.generator.set_state(generator_state)
    assert restored.epoch == 1
    search.step(*make_batch(2))
    restored.step(*make_batch(2))
    for name, value in criterion.policy.state_dict().items():
        assert torch.equal(restored_criterion.policy.state_dict()[name], value), name


def test_loading_a_finished_search_freezes_the_policy():
    student, teacher, criterion = make_setup()
    search = PolicySearch(
        student, criterion, make_objective(student, teacher, criterion), search_epochs=2
    )
    state = search.state_dict()
    state["epoch"] = 2
    search.load_state_dict(state)
    assert not search.searching
    assert not criterion.policy.magnitude.requires_grad


def train_losses(seed):
    student, teacher, criterion = make_setup(
        seed, dtype=torch.float32, dropout=0.2, sub_policies=sokd.policy.DEFAULT_SUB_POLICIES
    )
    objective = make_objective(student, teacher, criterion)
    search = PolicySearch(student, criterion, objective, search_epochs=1)
    optimizer = torch.optim.SGD(search.student_parameters(), lr=0.05)
    torch.manual_seed(seed)
    losses = []
    for step in range(2):
        batch = make_batch(step, dtype=torch.float32)
        search.step(*batch)
        loss = objective(*batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, criterion.policy.probability.detach().clone()


def test_two_runs_with_fixed_seeds_are_identical():
    first_losses, first_policy = train_losses(seed=3)
    second_losses, second_policy = train_losses(seed=3)
    assert first_losses == second_losses
    assert torch.equal(first_policy, second_policy)


def test_bad_arguments():
    student, teacher, criterion = make_setup()
    objective = make_objective(student, teacher, criterion)
    with pytest.raises(TypeError, match="criterion"):
        PolicySearch(student, nn.MSELoss(), objective)
    with pytest.raises(TypeError, match="model"):
        PolicySearch(lambda x: x, criterion, objective)
    with pytest.raises(TypeError, match="objective"):
        PolicySearch(student, criterion, "loss")
    with pytest.raises(ValueError, match="search_epochs"):
        PolicySearch(student, criterion, objective, search_epochs=-1)
    with pytest.raises(ValueError, match="radius"):
        PolicySearch(student, criterion, objective, radius=0.0)
    with pytest.raises(ValueError, match="betas"):
        PolicySearch(student, criterion, objective, betas=(0.5, 1.5))
    with pytest.raises(KeyError, match="epoch"):
        PolicySearch(student, criterion, objective).load_state_dict({})


def test_objective_must_return_a_scalar():
    student, _, criterion = make_setup()

    def objective(x, y, augment=True):
        return student(x)[1]

    search = PolicySearch(student, criterion, objective)
    with pytest.raises(TypeError, match="scalar"):
        search.step(*make_batch())
