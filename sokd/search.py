"""Bi-level search of the augmentation policy (docs/algorithm.md §3)."""

from __future__ import annotations

import contextlib
import numbers
from typing import Any, Callable, Literal, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel

from . import _backend
from . import _validation as check
from .loss import SoKDLoss

# The losses of SoKDLoss: their native kernels save a first derivative that is a constant to
# autograd, so a second derivative through them would silently miss every term.
_LOSS_OPS = ("masked_feature_loss", "kd_loss", "decoupled_kd_loss")

# Keeps R = r / ||v|| finite when the validation gradient vanishes; the probes then coincide
# and the policy gradient is zero.
_MIN_DIRECTION_NORM = 1e-12

Hypergradient = Literal["central", "forward", "exact"]
HYPERGRADIENTS = ("central", "forward", "exact")


class SearchStep(NamedTuple):
    train_loss: torch.Tensor  # L_train(w, alpha), detached
    val_loss: Optional[torch.Tensor]  # L_val(w') after the unrolled step, detached; None
    # from `backward` once the search is over
    # grad alpha of this step by policy parameter name, as the policy's Adam step used it; the
    # policy's .grad is cleared after that step, so that an optimizer the user also gave the
    # policy (criterion.parameters()) cannot apply it a second time. None after the search.
    policy_gradients: Optional[dict[str, torch.Tensor]] = None


class _Evaluation(nn.Module):
    """Holds the model and the criterion (references, not copies) so that functional_call can
    swap the weights of both while the user's objective runs them.

    A criterion that lives inside the model (the DistributedDataParallel recipe) is reached
    through the model only: functional_call cannot put back the weights of a module it reaches
    by two paths (it records the already swapped tensor as the second path's original), and
    the criterion would keep the last probe's weights."""

    def __init__(self, model, criterion):
        super().__init__()
        self.model = model
        if not any(module is criterion for module in model.modules()):
            self.criterion = criterion

    def forward(self, objective, batch, kwargs, augment):
        return objective(*batch, augment=augment, **kwargs)


class _RandomReplay:
    """Rewinds every random stream an evaluation may draw from (the criterion's generator, the
    global CPU and CUDA generators), so that all evaluations of one search step see the same
    augmentation draws and dropout masks. The finite difference then measures only the change
    of weights, not a change of noise."""

    def __init__(self, generator, devices):
        self._generator = generator
        self._generator_state = generator.get_state() if generator is not None else None
        self._cpu_state = torch.get_rng_state()
        self._cuda_states = {device: torch.cuda.get_rng_state(device) for device in devices}

    def rewind(self):
        if self._generator is not None:
            self._generator.set_state(self._generator_state)
        torch.set_rng_state(self._cpu_state)
        for device, state in self._cuda_states.items():
            torch.cuda.set_rng_state(state, device)


class PolicySearch:
    """Learns the augmentation policy of `criterion` by the bi-level step of docs/algorithm.md §3.

    Args:
        model: the module the objective runs (the student; it may be wrapped in
            DistributedDataParallel). Its trainable parameters, with the criterion's
            connector and DAM head, are the student-side weights w.
        criterion: the SoKDLoss whose `policy` is searched.
        objective: `objective(*batch, augment=...)` returns the scalar training loss (task loss
            plus the SoKD loss) by running `model` and `criterion` on one batch, passing
            `augment` on to the criterion. PolicySearch calls it with the weights swapped in
            by `torch.func.functional_call`: w itself is never copied or changed. The
            teacher's outputs belong in the batch (computed once per step, under no_grad),
            not inside the objective, which runs several times per search step.
        search_epochs: epochs during which `step` updates the policy; after them the policy
            is frozen (it is still sampled and applied).
        unroll_lr, unroll_weight_decay: eta and lambda of the unrolled step
            w' = w - eta * (grad L_train(w) + lambda * w).
        radius: r of the finite-difference Hessian-vector term, R = r / ||v||.
        hypergradient: how the magnitudes' term -eta * d/dM (grad_w L_train(w) . v) is taken:
            "forward" (the default: the one-sided (G+ - G) / R, one probe at w + R v; G at w
            comes from the training loss already evaluated), "central" (the authors'
            (G+ - G-) / 2R at w +- R v, two probes) or "exact" (double backward through the
            training loss; the losses must run on the reference backend, as the native kernels
            are differentiable once). On ReLU networks both differences are as far from the
            exact term as each other (docs/training.md), and "forward" costs one probe less.
            P, omega and the control variate take the exact term in every mode: their RELAX
            estimate is linear in the loss value f, so their finite difference is the
            directional derivative grad_w L_train(w) . v, which the first evaluation gives.
        lr, betas, weight_decay: Adam on the policy parameters.

    Call `backward(*batch)` in place of the student's own `loss.backward()` (it takes the
    policy step while searching and reuses its first evaluation for the student's gradient),
    or `step(*batch)` before an ordinary student step; `end_epoch()` after each epoch. The
    policy parameters themselves live in `criterion.state_dict()`; `state_dict()` here holds
    the epoch count and the Adam state.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: SoKDLoss,
        objective: Callable[..., torch.Tensor],
        *,
        search_epochs: int = 50,
        unroll_lr: float = 0.01,
        unroll_weight_decay: float = 1e-4,
        radius: float = 0.01,
        hypergradient: Hypergradient = "forward",
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        weight_decay: float = 1e-3,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(criterion, SoKDLoss):
            raise TypeError(f"criterion must be a SoKDLoss, got {type(criterion).__name__}")
        if not callable(objective):
            raise TypeError(f"objective must be callable, got {type(objective).__name__}")
        self.search_epochs = _non_negative_int(search_epochs, "search_epochs")
        self.unroll_lr = check.positive_number(unroll_lr, "unroll_lr")
        self.unroll_weight_decay = check.non_negative_number(
            unroll_weight_decay, "unroll_weight_decay"
        )
        self.radius = check.positive_number(radius, "radius")
        self.hypergradient = check.choice(hypergradient, "hypergradient", HYPERGRADIENTS)
        self.model = model
        self.criterion = criterion
        self.objective = objective
        self.policy = criterion.policy
        self._evaluation = _Evaluation(model, criterion)

        policy_ids = {id(p) for p in self.policy.parameters()}
        named_weights = [
            (name, p)
            for name, p in self._evaluation.named_parameters()
            if p.requires_grad and id(p) not in policy_ids
        ]
        if not named_weights:
            raise ValueError("model and criterion have no trainable weights to search with")
        self._weight_names = [name for name, _ in named_weights]
        self._weights = [p for _, p in named_weights]
        self._buffers = [b for b in self._evaluation.buffers()]
        self.optimizer = torch.optim.Adam(
            self.policy.parameters(),
            lr=check.positive_number(lr, "lr"),
            betas=_betas(betas),
            weight_decay=check.non_negative_number(weight_decay, "weight_decay"),
        )
        self.epoch = 0
        self._apply_freezing()

    @property
    def searching(self) -> bool:
        return self.epoch < self.search_epochs

    def student_parameters(self) -> list[nn.Parameter]:
        """The student-side weights w (model, connector, DAM head): what the ordinary student
        optimizer trains. The policy is left out; only `step` updates it."""
        return list(self._weights)

    def end_epoch(self) -> None:
        """Count one finished epoch; after `search_epochs` of them the policy is frozen."""
        self.epoch += 1
        self._apply_freezing()

    def _apply_freezing(self):
        self.policy.requires_grad_(self.searching)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = {"epoch", "optimizer"} - set(state_dict)
        if missing:
            raise KeyError(f"state_dict lacks {sorted(missing)}")
        self.epoch = _non_negative_int(state_dict["epoch"], "state_dict['epoch']")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._apply_freezing()

    def step(self, *batch: Any, **kwargs: Any) -> Optional[SearchStep]:
        """One bi-level policy step on `batch` (passed on to the objective with `kwargs`).

        Returns the SearchStep losses, or None once the search epochs are over. Every
        student-side weight, its `.grad` and every buffer of the model and the criterion is
        left exactly as it was; only the policy moves. The student's own step then evaluates
        the objective again; `backward` spares that evaluation.
        """
        if not self.searching:
            return None
        return self._search(batch, kwargs, student_gradients=False)

    def backward(self, *batch: Any, **kwargs: Any) -> SearchStep:
        """The student's backward pass, with the policy step folded in while searching.

        Accumulates grad_w L_train(w) of `objective(*batch, augment=True, **kwargs)` into the
        `.grad` of the student-side weights, as `loss.backward()` would (averaged over the
        ranks when the model is DistributedDataParallel), and leaves the buffers as one
        forward pass of the objective leaves them. While searching it first takes the policy
        step of `step` on the same batch, and the student's gradient is the one that step
        computes anyway at w, with the same policy sample and random draws: the objective is
        not evaluated a second time. Returns the detached training loss (and, while
        searching, the validation loss after the unrolled step).
        """
        if not self.searching:
            loss = self._checked_loss(self.objective(*batch, augment=True, **kwargs))
            loss.backward()
            return SearchStep(loss.detach(), None)
        return self._search(batch, kwargs, student_gradients=True)

    def _search(self, batch, kwargs, student_gradients):
        self.policy.resample(self.criterion.generator)
        buffers = _BufferSnapshot(self._buffers)
        # straight_through: the search's evaluations are the only ones that give M a gradient
        # (docs/algorithm.md §6, departure 12).
        with self.policy.hold_sample(), self.policy.straight_through(), self._gradient_sync_paused():
            try:
                result, grads = self._hessian_step(batch, kwargs, buffers, student_gradients)
            finally:
                buffers.restore()
        if dist.is_available() and dist.is_initialized():
            self._average_policy_gradients()
        self.optimizer.step()
        policy_gradients = {
            name: parameter.grad for name, parameter in self.policy.named_parameters()
        }
        self.optimizer.zero_grad(set_to_none=True)
        if student_gradients:
            self._accumulate_student_gradients(grads)
        return result._replace(policy_gradients=policy_gradients)

    def _hessian_step(self, batch, kwargs, buffers, student_gradients):
        """Steps 1 to 3 of docs/algorithm.md §3: leaves grad alpha in the policy's .grad and
        returns the losses with grad_w L_train(w) (None where the loss does not reach a
        weight)."""
        eta, weights, magnitude = self.unroll_lr, self._weights, self.policy.magnitude
        exact = self.hypergradient == "exact"
        if exact:
            _require_twice_differentiable_losses(weights[0].device)
        # With no op of the sample active, M has no effect on the loss and no term to probe.
        probe_magnitude = bool(self.policy.active_ops()[0])
        cuda_devices = {p.device for p in weights if p.device.type == "cuda"}
        replay = _RandomReplay(self.criterion.generator, cuda_devices)

        replay.rewind()
        train_loss = self._loss(weights, batch, kwargs, augment=True)
        if student_gradients:
            buffers.take()  # the student's own forward pass moves BatchNorm's statistics
        # The one-sided difference needs grad_M at w itself: the same backward pass gives it.
        one_sided = self.hypergradient == "forward" and probe_magnitude
        inputs = weights + [magnitude] if one_sided else weights
        train_grads = _raw_gradients(train_loss, inputs, create_graph=exact)
        magnitude_grad = _or_zeros(train_grads.pop(), magnitude) if one_sided else None
        with torch.no_grad():
            unrolled = [
                (w - eta * (_or_zeros(g, w) + self.unroll_weight_decay * w)).requires_grad_()
                for w, g in zip(weights, train_grads)
            ]

        replay.rewind()
        val_loss = self._loss(unrolled, batch, kwargs, augment=False)
        val_grads = _raw_gradients(val_loss, unrolled)
        direction = [_or_zeros(g, w) for w, g in zip(unrolled, val_grads)]

        # (G+ - G-) / 2R for P, omega and c_phi is (f+ - f-) / 2R times the part of RELAX that
        # is linear in f, and (f+ - f-) / 2R tends to this directional derivative.
        with torch.no_grad():
            slope = sum(
                (g.double() * d.double()).sum()
                for g, d in zip(train_grads, direction)
                if g is not None
            )
        with_slope = self.policy.relax_gradients(float(slope))
        without = self.policy.relax_gradients(0.0)
        for name, parameter in self.policy.named_parameters():
            if name != "magnitude":
                parameter.grad = -eta * (with_slope[name] - without[name])

        if not probe_magnitude:
            magnitude.grad = torch.zeros_like(magnitude)
        elif exact:
            magnitude.grad = -eta * self._exact_magnitude_term(train_grads, direction)
        else:
            with torch.no_grad():
                norm = torch.sqrt(sum(d.double().square().sum() for d in direction))
                step = self.radius / float(norm.clamp_min(_MIN_DIRECTION_NORM))
            plus = self._magnitude_gradient(weights, direction, step, batch, kwargs, replay)
            if self.hypergradient == "central":
                minus = self._magnitude_gradient(weights, direction, -step, batch, kwargs, replay)
                magnitude.grad = -eta * (plus - minus) / (2 * step)
            else:
                magnitude.grad = -eta * (plus - magnitude_grad) / step
        student_grads = [None if g is None else g.detach() for g in train_grads]
        return SearchStep(train_loss.detach(), val_loss.detach()), student_grads

    def _exact_magnitude_term(self, train_grads, direction):
        """d/dM (grad_w L_train(w) . v), by differentiating the first gradient again."""
        magnitude = self.policy.magnitude
        product = sum(
            (g * d).sum()
            for g, d in zip(train_grads, direction)
            if g is not None and g.requires_grad
        )
        if not isinstance(product, torch.Tensor):
            return torch.zeros_like(magnitude)
        (grad,) = torch.autograd.grad(product, [magnitude], allow_unused=True)
        return _or_zeros(grad, magnitude)

    def _magnitude_gradient(self, weights, direction, step, batch, kwargs, replay):
        """grad_M L_train at w + step * v, with the step's policy sample and random draws."""
        with torch.no_grad():
            probe = [w + step * d for w, d in zip(weights, direction)]
        replay.rewind()
        loss = self._loss(probe, batch, kwargs, augment=True)
        (grad,) = _raw_gradients(loss, [self.policy.magnitude])
        return _or_zeros(grad, self.policy.magnitude)

    def _loss(self, weights, batch, kwargs, augment):
        parameters = dict(zip(self._weight_names, weights))
        return self._checked_loss(
            functional_call(self._evaluation, parameters, (self.objective, batch, kwargs, augment))
        )

    @staticmethod
    def _checked_loss(loss):
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else ""
            raise TypeError(
                "objective must return the loss as a scalar tensor, got "
                f"{type(loss).__name__}{shape}"
            )
        return loss.reshape(())

    def _accumulate_student_gradients(self, grads):
        """Adds grads into .grad as loss.backward() does; under DistributedDataParallel the
        gradients of the weights it holds are averaged over the ranks first, as its own
        backward hooks would do (the search took them with autograd.grad, which the hooks
        never see)."""
        if isinstance(self.model, DistributedDataParallel) and dist.is_initialized():
            synced = {id(p) for p in self.model.parameters()}
            indices = [i for i, w in enumerate(self._weights) if id(w) in synced]
            if indices:
                flat = torch.cat(
                    [_or_zeros(grads[i], self._weights[i]).reshape(-1) for i in indices]
                )
                dist.all_reduce(flat)
                flat /= dist.get_world_size()
                offset = 0
                for i in indices:
                    numel = self._weights[i].numel()
                    grads[i] = flat[offset : offset + numel].view_as(self._weights[i])
                    offset += numel
        for weight, grad in zip(self._weights, grads):
            if grad is None:
                continue
            if weight.grad is None:
                weight.grad = grad
            else:
                weight.grad += grad

    def _average_policy_gradients(self):
        grads = [p.grad for p in self.policy.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def _gradient_sync_paused(self):
        """The probes take gradients with torch.autograd.grad, which never reaches DDP's
        all-reduce; no_sync keeps DDP from waiting for a backward pass that never comes."""
        if isinstance(self.model, DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()


class _BufferSnapshot:
    """BatchNorm in train mode updates running statistics in every probe; the probes must
    leave no trace, so every buffer is put back bit for bit (to the values taken last)."""

    def __init__(self, buffers):
        self._buffers = buffers
        self.take()

    def take(self):
        self._saved = [b.clone() for b in self._buffers]

    def restore(self):
        with torch.no_grad():
            for buffer, value in zip(self._buffers, self._saved):
                buffer.copy_(value)


def _require_twice_differentiable_losses(device):
    reference = _backend._load("reference")
    once = [op for op in _LOSS_OPS if _backend.resolve(op, device) is not reference]
    if once:
        raise RuntimeError(
            "hypergradient='exact' differentiates the training loss twice, but the active "
            f"backend ({_backend.get_backend()}) runs {', '.join(once)} with fused kernels "
            "that are differentiable once; choose the reference backend "
            "(sokd.set_backend('reference')) or hypergradient='central' or 'forward'"
        )


def _raw_gradients(loss, inputs, create_graph=False):
    """d loss / d inputs, None for the inputs the loss does not reach."""
    if not loss.requires_grad:
        return [None for _ in inputs]
    return list(torch.autograd.grad(loss, inputs, allow_unused=True, create_graph=create_graph))


def _or_zeros(grad, like):
    return torch.zeros_like(like) if grad is None else grad


def _non_negative_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _betas(betas):
    try:
        first, second = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise TypeError(f"betas must be a pair of numbers, got {betas!r}") from None
    if not (0 <= first < 1 and 0 <= second < 1):
        raise ValueError(f"betas must both lie in [0, 1), got {betas!r}")
    return first, second
