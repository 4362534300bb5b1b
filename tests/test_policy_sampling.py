"""FeaturePolicy sampling (docs/algorithm.md §2): shapes, frequencies, conditional re-samples,
and the straight-through forward."""

import math

import pytest
import torch

import sokd
from sokd import FeaturePolicy

SUB_POLICIES = ((0, 4), (5, 6), (7, 8), (2, 3))


def make_policy():
    policy = FeaturePolicy(SUB_POLICIES)
    with torch.no_grad():
        policy.probability.copy_(torch.tensor([[0.1, 0.9], [0.5, 0.3], [0.7, 0.02], [0.45, 0.99]]))
        policy.logits.copy_(torch.tensor([0.5, -1.0, 1.2, 0.0]))
    return policy


def test_default_policy_has_all_36_pairs_in_order_and_spec_initial_values():
    policy = FeaturePolicy()
    assert policy.sub_policies[:3] == ((0, 1), (0, 2), (0, 3)) and len(policy.sub_policies) == 36
    assert policy.probability.shape == (36, 2) and torch.all(policy.probability == 0.5)
    assert policy.magnitude.shape == (36, 2) and torch.all(policy.magnitude == 0.5)
    assert policy.logits.shape == (36,) and torch.allclose(policy.logits, torch.tensor(1e-3))
    first = policy.control_variate[0]
    assert (first.in_features, first.out_features, policy.control_variate[2].out_features) == (
        108,
        100,
        1,
    )
    names = set(policy.state_dict())
    assert {"probability", "magnitude", "logits"} <= names


def test_sample_shapes_and_draw_range():
    policy = make_policy()
    sample = policy.resample(torch.Generator().manual_seed(0))
    assert sample.bits.shape == (4, 2) and sample.bits.dtype == torch.bool
    assert sample.u_bernoulli.shape == sample.v_bernoulli.shape == (4, 2)
    assert sample.u_categorical.shape == sample.v_categorical.shape == (4,)
    assert 0 <= sample.index < 4
    for draw in (sample.u_bernoulli, sample.v_bernoulli, sample.u_categorical):
        assert draw.min() >= policy.eps and draw.max() < 1


def test_frequencies_match_probabilities_within_binomial_error():
    policy = make_policy()
    generator = torch.Generator().manual_seed(1)
    draws = 4000
    bit_counts = torch.zeros(4, 2)
    index_counts = torch.zeros(4)
    for _ in range(draws):
        sample = policy.resample(generator)
        bit_counts += sample.bits.float()
        index_counts[sample.index] += 1
    p_bits = policy.probability.detach()
    p_index = torch.softmax(policy.logits.detach(), dim=0)
    for observed, p in ((bit_counts / draws, p_bits), (index_counts / draws, p_index)):
        sigma = torch.sqrt(p * (1 - p) / draws)
        assert torch.all((observed - p).abs() <= 4.5 * sigma + 1e-9), (observed, p)


def test_conditional_resamples_agree_with_the_hard_sample():
    policy = make_policy()
    generator = torch.Generator().manual_seed(2)
    for _ in range(200):
        sample = policy.resample(generator)
        relaxed = policy.relaxed_samples()
        assert torch.equal(relaxed.z > 0, sample.bits)
        assert torch.equal(relaxed.z_tilde > 0, sample.bits)  # z~ is drawn given b
        assert int(relaxed.g.argmax()) == sample.index
        assert int(relaxed.g_tilde.argmax()) == sample.index  # g~ is drawn given j*


def test_log_prob_counts_the_categorical_term_once():
    policy = make_policy()
    sample = policy.resample(torch.Generator().manual_seed(3))
    p = policy.probability.detach().double()
    bits = sample.bits.double()
    expected = (bits * p.log() + (1 - bits) * (1 - p).log()).sum().item()
    expected += math.log(torch.softmax(policy.logits.detach().double(), 0)[sample.index].item())
    assert policy.log_prob().item() == pytest.approx(expected, rel=1e-5)


def test_control_variate_input_is_2x_minus_1_of_the_relaxed_sample():
    policy = make_policy()
    policy.resample(torch.Generator().manual_seed(4))
    relaxed = policy.relaxed_samples()
    x = torch.cat((torch.sigmoid(relaxed.z / 0.5).reshape(-1), torch.softmax(relaxed.g / 0.5, 0)))
    torch.testing.assert_close(policy.control_variate_input(relaxed.z, relaxed.g), 2 * x - 1)


def test_forward_applies_the_active_ops_with_the_straight_through_gradient():
    """Inside straight_through(), as in the search's probes (outside it, the isolation tests)."""
    sokd.set_backend("reference")
    policy = make_policy()
    x = torch.randn(2, 3, 6, 6)
    generator = torch.Generator().manual_seed(5)
    for _ in range(20):
        sample = policy.resample(generator)
        policy.magnitude.grad = None
        state = generator.get_state()
        with policy.straight_through():
            out = policy(x, generator)
        op_ids = [policy.sub_policies[sample.index][k] for k in range(2) if sample.bits[sample.index, k]]
        if not op_ids:
            assert torch.equal(out, x)
            continue
        generator_copy = torch.Generator().manual_seed(0)
        generator_copy.set_state(state)
        magnitudes = policy.magnitude.detach()[sample.index][sample.bits[sample.index]]
        expected = sokd.ops.feature_augment(x, op_ids, magnitudes, generator_copy)
        torch.testing.assert_close(out, expected)
        weights = torch.randn_like(out)
        (out * weights).sum().backward()
        grad = policy.magnitude.grad
        active = torch.zeros(4, 2, dtype=torch.bool)
        active[sample.index] = sample.bits[sample.index]
        torch.testing.assert_close(grad[active], weights.sum().expand(len(op_ids)))
        assert torch.all(grad[~active] == 0)
        assert policy.probability.grad is None and policy.logits.grad is None
