"""DAFA: the learnable augmentation policy of docs/algorithm.md §2."""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _validation as check
from . import ops
from .augment_ops import NUM_PRIMITIVES

DEFAULT_SUB_POLICIES = tuple(itertools.combinations(range(NUM_PRIMITIVES), 2))
PROBABILITY_CLAMP = 1e-6


class PolicySample(NamedTuple):
    """One draw of the policy: the uniforms it came from and the hard outcome."""

    u_bernoulli: torch.Tensor  # S x 2
    v_bernoulli: torch.Tensor  # S x 2
    u_categorical: torch.Tensor  # S
    v_categorical: torch.Tensor  # S
    bits: torch.Tensor  # S x 2 bool: b
    index: int  # j*, the sub-policy applied to the whole batch


class RelaxedSamples(NamedTuple):
    """The relaxed samples of docs/algorithm.md §2, differentiable in P and omega."""

    z: torch.Tensor  # S x 2: lambda + logit(u)
    z_tilde: torch.Tensor  # S x 2: conditional re-sample given b
    g: torch.Tensor  # S: log pi - log(-log u)
    g_tilde: torch.Tensor  # S: conditional re-sample given j*


class FeaturePolicy(nn.Module):
    """The augmentation policy: per sub-policy, two op probabilities (P), two magnitudes (M)
    and a selection logit (omega), plus the RELAX control variate c_phi.

    Each training iteration draws one sample (`resample`): a sub-policy j* and its two bits.
    `forward` applies the active ops of j* to a teacher map. Inside `straight_through()` (the
    search's probes) the output carries the straight-through gradient to M; everywhere else it
    carries none, so the student's own step never moves M. P and omega learn only through
    RELAX, and c_phi only through its variance gradient: no forward pass reaches them.
    """

    def __init__(
        self,
        sub_policies: Iterable[Sequence[int]] = DEFAULT_SUB_POLICIES,
        temperature: float = 0.5,
        eps: float = 1e-6,
        hidden: int = 100,
    ) -> None:
        super().__init__()
        self.sub_policies = self._check_sub_policies(sub_policies)
        count = len(self.sub_policies)
        self.temperature = check.positive_number(temperature, "temperature")
        self.eps = check.positive_number(eps, "eps")
        if self.eps >= 1:
            raise ValueError(f"eps must be < 1, got {eps}")
        self.probability = nn.Parameter(torch.full((count, 2), 0.5))
        self.magnitude = nn.Parameter(torch.full((count, 2), 0.5))
        self.logits = nn.Parameter(torch.full((count,), 1e-3))
        self.control_variate = nn.Sequential(
            nn.Linear(3 * count, check.positive_int(hidden, "hidden")),
            nn.Tanh(),
            nn.Linear(hidden, 1),
        )
        self.sample = None
        self._hold_depth = 0
        self._straight_through_depth = 0

    @staticmethod
    def _check_sub_policies(sub_policies):
        try:
            pairs = tuple(tuple(pair) for pair in sub_policies)
        except TypeError:
            raise TypeError("sub_policies must be a sequence of (op_a, op_b) pairs") from None
        if not pairs:
            raise ValueError("sub_policies must hold at least one (op_a, op_b) pair, got none")
        for pair in pairs:
            ops._check_op_ids(pair)
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ValueError(f"sub_policies must hold pairs of two distinct op ids, got {pair}")
        return pairs

    @property
    def num_sub_policies(self) -> int:
        return len(self.sub_policies)

    def clamped_probability(self) -> torch.Tensor:
        return self.probability.clamp(PROBABILITY_CLAMP, 1 - PROBABILITY_CLAMP)

    def _uniform(self, shape, generator):
        device = generator.device if generator is not None else self.probability.device
        u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
        return (self.eps + (1 - self.eps) * u).to(self.probability.device)

    # The sample and the ops it applies (forward) run outside torch.compile graphs: the drawn
    # sub-policy decides which ops run, so a graph tracing it would be specialised to one draw
    # and recompiled for the next. Left out, a compiled SoKDLoss keeps a fixed set of graphs
    # around this step, whatever the policy draws.
    @torch.compiler.disable
    @torch.no_grad()
    def resample(self, generator: torch.Generator | None = None) -> PolicySample:
        """Draw a new sample (docs/algorithm.md §2) from `generator` and make it the active one."""
        count = self.num_sub_policies
        u_b, v_b = self._uniform((count, 2), generator), self._uniform((count, 2), generator)
        u_c, v_c = self._uniform((count,), generator), self._uniform((count,), generator)
        lam = torch.logit(self.clamped_probability().float())
        bits = (lam + torch.logit(u_b)) > 0
        g = torch.log_softmax(self.logits.float(), dim=0) - torch.log(-torch.log(u_c))
        self.sample = PolicySample(u_b, v_b, u_c, v_c, bits, int(g.argmax()))
        return self.sample

    def relaxed_samples(self, sample: PolicySample | None = None) -> RelaxedSamples:
        """z, z~, g and g~ for `sample` (default: the active one), with gradients to P, omega."""
        sample = self._require_sample(sample)
        theta = self.clamped_probability()
        lam = torch.logit(theta)
        z = lam + torch.logit(sample.u_bernoulli)
        v = sample.v_bernoulli
        v_given_b = torch.where(sample.bits, 1 - theta + v * theta, v * (1 - theta))
        z_tilde = lam + torch.logit(v_given_b)

        log_pi = torch.log_softmax(self.logits, dim=0)
        g = log_pi - torch.log(-torch.log(sample.u_categorical))
        log_v = torch.log(sample.v_categorical)
        chosen = torch.zeros_like(log_v, dtype=torch.bool)
        chosen[sample.index] = True
        others = -torch.log(-log_v / log_pi.exp() - log_v[sample.index])
        g_tilde = torch.where(chosen, -torch.log(-log_v), others)
        return RelaxedSamples(z, z_tilde, g, g_tilde)

    def control_variate_input(
        self, bernoulli_logits: torch.Tensor, categorical_logits: torch.Tensor
    ) -> torch.Tensor:
        """2x - 1 for x = [sigma(z/tau) (S*2) | softmax(g/tau) (S)]: the input of c_phi."""
        soft_bits = torch.sigmoid(bernoulli_logits / self.temperature).reshape(-1)
        soft_choice = F.softmax(categorical_logits / self.temperature, dim=0)
        return 2 * torch.cat((soft_bits, soft_choice)) - 1

    def log_prob(self, sample: PolicySample | None = None) -> torch.Tensor:
        """log p(b, j*): the Bernoulli terms of every (s, k) plus the categorical term once."""
        sample = self._require_sample(sample)
        theta = self.clamped_probability()
        bits = sample.bits.to(theta.dtype)
        bernoulli = (bits * torch.log(theta) + (1 - bits) * torch.log1p(-theta)).sum()
        return bernoulli + torch.log_softmax(self.logits, dim=0)[sample.index]

    def relax_gradients(
        self, objective: float | torch.Tensor, sample: PolicySample | None = None
    ) -> dict[str, torch.Tensor]:
        """The RELAX estimate (docs/algorithm.md §2) of the gradient of E[f] for the objective
        value f observed at the hard sample (default: the active one).

        For P and omega: g = (f - c(z~)) * grad log p(b, j*) + grad c(z) - grad c(z~), with
        c = c_phi applied to the relaxed samples. For every parameter of c_phi: the gradient
        of mean(g^2) over all entries of g_P and g_omega, which lowers the variance of g.

        Returns a dict from parameter name (as in `named_parameters()`) to a detached
        gradient; `magnitude` is absent: M learns from the loss itself, through the
        straight-through path that the search opens in its probes (`straight_through`).
        The estimate is unbiased for any c_phi. Nothing is written to `.grad`.
        """
        sample = self._require_sample(sample)
        if isinstance(objective, torch.Tensor):
            if objective.numel() != 1:
                raise ValueError(
                    f"objective must be a scalar, got a tensor of shape {tuple(objective.shape)}"
                )
            objective = objective.detach().item()
        objective = check.real(objective, "objective")
        if not math.isfinite(objective):
            raise ValueError(f"objective must be finite, got {objective}")
        relaxed = self.relaxed_samples(sample)
        with torch.enable_grad():
            c_soft = self.control_variate(self.control_variate_input(relaxed.z, relaxed.g))[0]
            c_conditional = self.control_variate(
                self.control_variate_input(relaxed.z_tilde, relaxed.g_tilde)
            )[0]
            sampling = (self.probability, self.logits)
            score = torch.autograd.grad(self.log_prob(sample), sampling)
            d_difference = torch.autograd.grad(c_soft - c_conditional, sampling, create_graph=True)
            estimates = [(objective - c_conditional) * s + dd for s, dd in zip(score, d_difference)]
            variance = torch.cat([e.reshape(-1) for e in estimates]).square().mean()
            cv_names, cv_params = zip(*self.control_variate.named_parameters())
            cv_grads = torch.autograd.grad(variance, cv_params)
        grads = {"probability": estimates[0].detach(), "logits": estimates[1].detach()}
        grads.update((f"control_variate.{name}", grad) for name, grad in zip(cv_names, cv_grads))
        return grads

    def _require_sample(self, sample):
        sample = sample if sample is not None else self.sample
        if sample is None:
            raise RuntimeError("the policy has no sample yet; call resample() first")
        return sample

    def active_ops(self) -> tuple[list[int], torch.Tensor]:
        """(op_ids, magnitudes) of the active sample: the ops of j* whose bit is 1, in order."""
        sample = self._require_sample(None)
        slots = [k for k, bit in enumerate(sample.bits[sample.index].tolist()) if bit]
        op_ids = [self.sub_policies[sample.index][k] for k in slots]
        return op_ids, self.magnitude[sample.index, slots]

    @contextlib.contextmanager
    def hold_sample(self) -> Iterator[None]:
        """Within this block SoKDLoss reuses the active sample instead of drawing a new one,
        so that several evaluations (such as the bi-level probes) see the same policy."""
        self._hold_depth += 1
        try:
            yield self.sample
        finally:
            self._hold_depth -= 1

    @property
    def sample_held(self) -> bool:
        return self._hold_depth > 0

    @contextlib.contextmanager
    def straight_through(self) -> Iterator[None]:
        """Within this block `forward` gives M the straight-through gradient
        (docs/algorithm.md §2): dL/dM_{j*k} = sum of dL/dt~ over every element, for each
        active op k.

        Only the policy search opens it, around its probes at w+- (docs/algorithm.md §3, step 3).
        Outside it the augmented map has no path to M, so whatever optimizer the student's
        loss reaches (criterion.parameters() included) sees no gradient for any policy
        parameter and leaves the policy exactly as it is (docs/algorithm.md §6, departure 12).
        """
        self._straight_through_depth += 1
        try:
            yield
        finally:
            self._straight_through_depth -= 1

    @property
    def straight_through_active(self) -> bool:
        return self._straight_through_depth > 0

    @torch.compiler.disable
    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Apply the active sample's ops to x (draws one sample first if there is none). The
        result is detached from M unless `straight_through()` is open."""
        if self.sample is None:
            self.resample(generator)
        op_ids, magnitudes = self.active_ops()
        if not op_ids:
            return x.detach()
        if not self.straight_through_active:
            magnitudes = magnitudes.detach()
        return ops.feature_augment(x, op_ids, magnitudes, generator)
