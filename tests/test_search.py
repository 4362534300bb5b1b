"""PolicySearch (docs/algorithm.md §3): the policy gradient against an independent computation on
copies of the model, exact restoration of weights and buffers, freezing, state and
reproducibility."""

import copy
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

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


class Distilled(nn.Module):
    def __init__(self, student, criterion):
        super().__init__()
        self.student, self.criterion = student, criterion

    def forward(self, x, y, teacher_feature, teacher_logits, augment=True):
        feature, logits = self.student(x)
        out = self.criterion(feature, teacher_feature, logits, teacher_logits, y, augment=augment)
        return F.cross_entropy(logits, y) + out.total


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
    """docs/algorithm.md §3 step by step on deep copies, with plain backward passes. For P and
    omega the control-variate terms of G+ and G- cancel, leaving (f+ - f-) * grad log p, and
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
        with loss_module.policy.hold_sample(), loss_module.policy.straight_through():
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
    search = PolicySearch(
        student, criterion, make_objective(student, teacher, criterion), hypergradient="central"
    )
    before_student, before_criterion = copy.deepcopy(student), copy.deepcopy(criterion)
    batch = make_batch()
    gradients = search.step(*batch).policy_gradients
    sample = criterion.policy.sample
    assert sample.bits[sample.index].any(), "the chosen sample must apply an op to test M"
    expected = expected_policy_gradient(
        before_student, teacher, before_criterion, sample, batch, eta=0.01, decay=1e-4, radius=0.01
    )
    policy = criterion.policy
    for name, value in expected.items():
        torch.testing.assert_close(gradients[name], value, rtol=1e-6, atol=1e-9)
    assert gradients["probability"].abs().sum() > 0
    assert gradients["magnitude"].abs().sum() > 0
    # The Adam step has used them; an optimizer that also holds the policy finds nothing left.
    assert all(parameter.grad is None for parameter in policy.parameters())


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


def test_step_keeps_the_weights_of_a_criterion_inside_the_model():
    student, teacher, criterion = make_setup()
    model = Distilled(student, criterion)

    def objective(x, y, augment=True):
        with torch.no_grad():
            teacher_feature = teacher(x)
        teacher_logits = teacher_feature.mean(dim=(2, 3))[:, :5]
        return model(x, y, teacher_feature, teacher_logits, augment=augment)

    search = PolicySearch(model, criterion, objective)
    parameters = dict(model.named_parameters())
    values = {name: p.detach().clone() for name, p in parameters.items()}
    search.step(*make_batch())
    for name, parameter in model.named_parameters():
        assert parameter is parameters[name], name
        if not name.startswith("criterion.policy."):
            assert torch.equal(parameter, values[name]), name
    assert {id(p) for p in search.student_parameters()} == {
        id(p) for name, p in parameters.items() if not name.startswith("criterion.policy.")
    }


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


class SmoothStudent(nn.Module):
    """TinyStudent with tanh for ReLU: the training loss is smooth in the weights."""

    def __init__(self, channels=4, classes=5):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.norm = nn.BatchNorm2d(channels)
        self.classifier = nn.Linear(channels, classes)

    def forward(self, x):
        feature = torch.tanh(self.norm(self.conv(x)))
        return feature, self.classifier(feature.mean(dim=(2, 3)))


def magnitude_hypergradient(seed, hypergradient, radius=0.01):
    """grad M of one search step on a smooth set-up, float64, reference backend. The DAM head
    has ReLUs and the weight map is piecewise constant, so the head stays out of the loss
    (w_dam = 0) and the map comes from the teacher's view alone (fixed across the probes)."""
    sokd.set_backend("reference")
    torch.manual_seed(seed)
    student = SmoothStudent().double()
    teacher = nn.Conv2d(1, 6, 3, padding=1).double()
    policy = sokd.FeaturePolicy(sub_policies=AFFINE_SUB_POLICIES)
    with torch.no_grad():
        policy.probability.fill_(0.9)
    criterion = sokd.SoKDLoss(
        4,
        6,
        policy=policy,
        k=2,
        logit_loss="kd",
        w_dam=0.0,
        mask_mode="teacher",
        generator=torch.Generator().manual_seed(seed),
    ).double()
    objective = make_objective(student, teacher, criterion)
    search = PolicySearch(
        student, criterion, objective, hypergradient=hypergradient, radius=radius
    )
    gradients = search.step(*make_batch(seed + 10, n=8)).policy_gradients
    assert policy.sample.bits[policy.sample.index].any(), "the sample must apply an op"
    return gradients


def relative_error(value, reference):
    return float((value - reference).norm() / reference.norm())


@pytest.mark.parametrize("seed", [0, 2])
def test_exact_and_central_hypergradients_agree_on_a_smooth_model(seed):
    exact = magnitude_hypergradient(seed, "exact")
    central = magnitude_hypergradient(seed, "central")
    assert exact["magnitude"].abs().sum() > 0
    assert relative_error(central["magnitude"], exact["magnitude"]) < 1e-3
    # P, omega and the control variate take the same exact term in every mode.
    for name, value in exact.items():
        if name != "magnitude":
            torch.testing.assert_close(central[name], value, rtol=1e-12, atol=0)


def test_forward_difference_converges_to_the_exact_hypergradient():
    exact = magnitude_hypergradient(0, "exact")["magnitude"]
    coarse = relative_error(magnitude_hypergradient(0, "forward")["magnitude"], exact)
    fine = relative_error(magnitude_hypergradient(0, "forward", radius=1e-4)["magnitude"], exact)
    # First order in R: a hundredth of the radius, about a hundredth of the error.
    assert fine < 1e-3 and fine < coarse / 30, (coarse, fine)


@pytest.mark.skipif("cpu" not in sokd.available_backends(), reason="native CPU kernels not built")
def test_exact_hypergradient_names_the_backend_it_needs():
    sokd.set_backend("cpu")
    student, teacher, criterion = make_setup(dtype=torch.float32)
    search = PolicySearch(
        student, criterion, make_objective(student, teacher, criterion), hypergradient="exact"
    )
    with pytest.raises(RuntimeError, match="reference"):
        search.step(*make_batch(dtype=torch.float32))


def test_bad_hypergradient():
    student, teacher, criterion = make_setup()
    with pytest.raises(ValueError, match="hypergradient"):
        PolicySearch(
            student, criterion, make_objective(student, teacher, criterion), hypergradient="fd"
        )


def objective_gradients(student, teacher, criterion, sample, batch):
    """The training loss on the given copies with the given policy sample, and its gradient
    for every student-side weight (None where it does not reach)."""
    criterion.policy.sample = sample
    with criterion.policy.hold_sample():
        loss = make_objective(student, teacher, criterion)(*batch)
    weights = list(student.parameters()) + [
        p for name, p in criterion.named_parameters() if not name.startswith("policy.")
    ]
    return loss, torch.autograd.grad(loss, weights, allow_unused=True)


def test_backward_reuses_the_search_evaluation_for_the_student():
    student, teacher, criterion = make_setup()
    twin_student, twin_criterion = copy.deepcopy(student), copy.deepcopy(criterion)
    search = PolicySearch(student, criterion, make_objective(student, teacher, criterion))
    twin = PolicySearch(
        twin_student, twin_criterion, make_objective(twin_student, teacher, twin_criterion)
    )
    plain_student, plain_criterion = copy.deepcopy(student), copy.deepcopy(criterion)
    batch = make_batch()

    result = search.backward(*batch)
    twin.step(*batch)
    # The same policy step as `step`.
    for name, value in twin_criterion.policy.state_dict().items():
        assert torch.equal(criterion.policy.state_dict()[name], value), name
    # The student's gradient: the objective at w with the search's sample.
    loss, expected = objective_gradients(
        plain_student, teacher, plain_criterion, criterion.policy.sample, batch
    )
    torch.testing.assert_close(result.train_loss, loss.detach(), rtol=1e-12, atol=0)
    for weight, grad in zip(search.student_parameters(), expected):
        if grad is None:
            assert weight.grad is None
        else:
            torch.testing.assert_close(weight.grad, grad, rtol=1e-10, atol=1e-12)
    assert student.unused.weight.grad is None
    # BatchNorm moved once, as in one forward pass of the objective; the probes left no trace.
    assert int(student.norm.num_batches_tracked) == 1
    torch.testing.assert_close(student.norm.running_var, plain_student.norm.running_var)
    assert all(p.grad is None for p in twin.student_parameters())


def test_backward_accumulates_like_loss_backward():
    student, teacher, criterion = make_setup()
    search = PolicySearch(student, criterion, make_objective(student, teacher, criterion))
    first = make_batch(1)
    search.backward(*first)
    once = [None if w.grad is None else w.grad.clone() for w in search.student_parameters()]
    sample = criterion.policy.sample
    plain_student, plain_criterion = copy.deepcopy(student), copy.deepcopy(criterion)
    second = make_batch(2)
    search.backward(*second)
    _, expected = objective_gradients(
        plain_student, teacher, plain_criterion, criterion.policy.sample, second
    )
    assert criterion.policy.sample is not sample
    for weight, before, grad in zip(search.student_parameters(), once, expected):
        if grad is not None:
            torch.testing.assert_close(weight.grad, before + grad, rtol=1e-9, atol=1e-12)


def test_backward_after_the_search_is_the_plain_backward_pass():
    student, teacher, criterion = make_setup()
    search = PolicySearch(
        student, criterion, make_objective(student, teacher, criterion), search_epochs=0
    )
    plain_student, plain_criterion = copy.deepcopy(student), copy.deepcopy(criterion)
    batch = make_batch()
    policy_before = copy.deepcopy(criterion.policy.state_dict())
    result = search.backward(*batch)
    assert result.val_loss is None
    loss = make_objective(plain_student, teacher, plain_criterion)(*batch)
    loss.backward()
    torch.testing.assert_close(result.train_loss, loss.detach(), rtol=0, atol=0)
    for weight, plain in zip(
        search.student_parameters(),
        list(plain_student.parameters()) + list(plain_criterion.connector.parameters())
        + list(plain_criterion.head.parameters()),
    ):
        assert (weight.grad is None) == (plain.grad is None)
        if plain.grad is not None:
            assert torch.equal(weight.grad, plain.grad)
    for name, value in criterion.policy.state_dict().items():
        assert torch.equal(value, policy_before[name]), name


def _train_with_backward(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=60),
    )
    try:
        student, teacher, criterion = make_setup(seed=0, dtype=torch.float32)
        criterion.generator.manual_seed(100 + rank)  # each rank draws its own sample
        model = DistributedDataParallel(
            Distilled(student, criterion), find_unused_parameters=True
        )

        def objective(x, y, teacher_feature, teacher_logits, augment=True):
            return model(x, y, teacher_feature, teacher_logits, augment=augment)

        search = PolicySearch(model, criterion, objective, search_epochs=1)
        optimizer = torch.optim.SGD(search.student_parameters(), lr=0.05, momentum=0.9)
        local = []
        for step in range(3):
            if step == 2:
                search.end_epoch()  # the last step runs the plain backward pass
            x, y = make_batch(seed=10 * step + rank, dtype=torch.float32)
            with torch.no_grad():
                teacher_feature = teacher(x)
                teacher_logits = teacher_feature.mean(dim=(2, 3))[:, :5]
            optimizer.zero_grad()
            search.backward(x, y, teacher_feature, teacher_logits)
            grads = [p.grad for p in search.student_parameters() if p.grad is not None]
            local.append([grad.clone() for grad in grads])
            optimizer.step()
        torch.save(
            {
                "policy": criterion.policy.state_dict(),
                "weights": [p.detach() for p in search.student_parameters()],
                "grads": local,
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_backward_averages_student_gradients_over_ranks(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_train_with_backward, args=(port, str(tmp_path)), nprocs=2, join=True)
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    # Different data on each rank, yet the same gradients: they were averaged.
    for mine, theirs in zip(first["grads"], second["grads"]):
        assert len(mine) == len(theirs) > 0
        for one, other in zip(mine, theirs):
            assert torch.equal(one, other)
    for mine, theirs in zip(first["weights"], second["weights"]):
        assert torch.equal(mine, theirs)
    for name, value in first["policy"].items():
        assert torch.equal(value, second["policy"][name]), name
