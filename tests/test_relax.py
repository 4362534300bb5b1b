"""RELAX (docs/algorithm.md §2): unbiased against exact enumeration, and the control variate learns
to lower the estimator's variance."""

import itertools
import math

import pytest
import torch

from sokd import FeaturePolicy

SUB_POLICIES = ((0, 1), (2, 3))
BIT_WEIGHTS = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
CHOICE_WEIGHTS = torch.tensor([2.0, -1.0])
PAIR_BONUS = 4.0


def toy_objective(bits, index, offset=0.0):
    """A non-linear function of the hard outcome: it depends on every bit, on j* and on the
    two bits of j* together."""
    bits = bits.float()
    pair = bits[index, 0] * bits[index, 1]
    return offset + float((BIT_WEIGHTS * bits).sum() + CHOICE_WEIGHTS[index] + PAIR_BONUS * pair)


def make_policy(seed=0):
    torch.manual_seed(seed)
    policy = FeaturePolicy(sub_policies=SUB_POLICIES)
    with torch.no_grad():
        policy.probability.copy_(torch.tensor([[0.3, 0.7], [0.6, 0.2]]))
        policy.logits.copy_(torch.tensor([0.4, -0.3]))
    return policy


def exact_gradient(policy, offset=0.0):
    """grad of E[f] for P and omega, summing p(b, j) * f(b, j) over all 2^(2S) * S outcomes."""
    theta = policy.clamped_probability()
    log_pi = torch.log_softmax(policy.logits, dim=0)
    count = policy.num_sub_policies
    expectation = 0.0
    for flat_bits in itertools.product((0, 1), repeat=2 * count):
        bits = torch.tensor(flat_bits, dtype=torch.bool).reshape(count, 2)
        bernoulli = torch.where(bits, theta, 1 - theta).prod()
        for index in range(count):
            probability = bernoulli * log_pi[index].exp()
            expectation = expectation + probability * toy_objective(bits, index, offset)
    return torch.autograd.grad(expectation, (policy.probability, policy.logits))


def relax_estimates(policy, count, generator, offset=0.0):
    """count RELAX estimates of grad E[f], flattened as [P | omega] per row."""
    rows = []
    for _ in range(count):
        sample = policy.resample(generator)
        grads = policy.relax_gradients(toy_objective(sample.bits, sample.index, offset))
        rows.append(torch.cat((grads["probability"].reshape(-1), grads["logits"])))
    return torch.stack(rows)


@pytest.mark.slow  # many Monte Carlo samples: tens of seconds on 2 cores
def test_relax_mean_matches_exact_gradient():
    policy = make_policy()
    exact = torch.cat([g.reshape(-1) for g in exact_gradient(policy)])
    count = 1500
    estimates = relax_estimates(policy, count, torch.Generator().manual_seed(1))
    standard_error = estimates.std(dim=0) / math.sqrt(count)
    # Six entries, each within 4.5 standard errors: a false alarm has odds below 1e-4.
    z_scores = (estimates.mean(dim=0) - exact) / standard_error
    assert z_scores.abs().max() < 4.5, (estimates.mean(dim=0), exact, standard_error)
    # The check must have power: the standard error is small against the gradient itself.
    assert float(standard_error.max()) < 0.1 * float(exact.abs().max())


@pytest.mark.slow  # many Monte Carlo samples: tens of seconds on 2 cores
def test_relax_is_unbiased_for_any_control_variate():
    policy = make_policy(seed=3)
    with torch.no_grad():
        for parameter in policy.control_variate.parameters():
            parameter.mul_(5.0)
    exact = torch.cat([g.reshape(-1) for g in exact_gradient(policy)])
    count = 1500
    estimates = relax_estimates(policy, count, torch.Generator().manual_seed(2))
    z_scores = (estimates.mean(dim=0) - exact) / (estimates.std(dim=0) / math.sqrt(count))
    assert z_scores.abs().max() < 4.5


def estimator_variance(policy, generator, offset):
    return float(relax_estimates(policy, 300, generator, offset).var(dim=0).mean())


@pytest.mark.slow  # many Monte Carlo samples: tens of seconds on 2 cores
def test_control_variate_training_lowers_variance():
    # A large constant in f makes the plain score-function term noisy; c_phi can learn it.
    offset = 20.0
    policy = make_policy(seed=4)
    before = estimator_variance(policy, torch.Generator().manual_seed(5), offset)
    generator = torch.Generator().manual_seed(6)
    cv_params = dict(policy.control_variate.named_parameters())
    optimizer = torch.optim.Adam(cv_params.values(), lr=1e-2)
    for _ in range(200):
        sample = policy.resample(generator)
        grads = policy.relax_gradients(toy_objective(sample.bits, sample.index, offset))
        for name, parameter in cv_params.items():
            parameter.grad = grads[f"control_variate.{name}"]
        optimizer.step()
    after = estimator_variance(policy, torch.Generator().manual_seed(5), offset)
    assert after < 0.5 * before, (before, after)


def test_relax_gradient_names_match_parameters():
    policy = make_policy()
    policy.resample(torch.Generator().manual_seed(0))
    grads = policy.relax_gradients(1.0)
    parameters = dict(policy.named_parameters())
    assert set(grads) == set(parameters) - {"magnitude"}
    for name, grad in grads.items():
        assert grad.shape == parameters[name].shape
        assert not grad.requires_grad
    assert all(p.grad is None for p in policy.parameters())


def test_relax_phi_gradient_matches_its_definition():
    """grad_phi mean(g^2), recomputed here by finite differences of the variance objective."""
    policy = make_policy().double()
    sample = policy.resample(torch.Generator().manual_seed(7))
    f = 2.5
    weight = policy.control_variate[2].weight

    def mean_square():
        grads = policy.relax_gradients(f, sample)
        entries = torch.cat((grads["probability"].reshape(-1), grads["logits"]))
        return float(entries.square().mean())

    analytic = policy.relax_gradients(f, sample)["control_variate.2.weight"][0, :3]
    step = 1e-6
    numeric = []
    for column in range(3):
        with torch.no_grad():
            weight[0, column] += step
        upper = mean_square()
        with torch.no_grad():
            weight[0, column] -= 2 * step
        lower = mean_square()
        with torch.no_grad():
            weight[0, column] += step
        numeric.append((upper - lower) / (2 * step))
    torch.testing.assert_close(
        analytic, torch.tensor(numeric, dtype=torch.float64), rtol=1e-5, atol=1e-8
    )


@pytest.mark.parametrize(
    "objective, error",
    [(torch.ones(2), ValueError), (float("nan"), ValueError), ("1.0", TypeError)],
)
def test_relax_rejects_bad_objective(objective, error):
    policy = make_policy()
    policy.resample(torch.Generator().manual_seed(0))
    with pytest.raises(error, match="objective"):
        policy.relax_gradients(objective)


def test_relax_needs_a_sample():
    with pytest.raises(RuntimeError, match="resample"):
        make_policy().relax_gradients(1.0)
