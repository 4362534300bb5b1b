"""Bi-level search of the augmentation policy (SPEC section 3)."""

import contextlib
import numbers
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel

from . import _validation as check
from .loss import SoKDLoss

# Keeps R = r / ||v|| finite when the validation gradient vanishes; the probes then coincide
# and the policy gradient is zero.
_MIN_DIRECTION_NORM = 1e-12


class SearchStep(NamedTuple):
    train_loss: torch.Tensor  # L_train(w, alpha), detached
    val_loss: torch.Tensor  # L_val(w') after the unrolled step, detached


class _Evaluation(nn.Module):
    """Holds the model and the criterion (references, not copies) so that functional_call can
    swap the weights of both while the user's objective runs them."""

    def __init__(self, model, criterion):
        super().__init__()
        self.model = model
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
    """Learns the augmentation policy of `criterion` by the bi-level step of SPEC section 3.

    Args:
        model: the module the objective runs (the student; it may be wrapped in
            DistributedDataParallel). Its trainable parameters, with the criterion's
            connector and DAM head, are the student-side weights w.
        criterion: the SoKDLoss whose `policy` is searched.
        objective: `objective(*batch, augment=...)` returns the scalar training loss (task loss
            plus the SoKD loss) by running `model` and `criterion` on one batch, passing
            `augment` on to the criterion. PolicySearch calls it with the weights swapped in
            by `torch.func.functional_call`: w itself is never copied or changed.
        search_epochs: epochs during which `step` updates the policy; after them the policy
            is frozen (it is still sampled and applied).
        unroll_lr, unroll_weight_decay: eta and lambda of the unrolled step
            w' = w - eta * (grad L_train(w) + lambda * w).
        radius: r of the finite-difference Hessian-vector term, R = r / ||v||.
        lr, betas, weight_decay: Adam on the policy parameters.

    Call `step(*batch)` before each ordinary student step, and `end_epoch()` after each epoch.
    The policy parameters themselves live in `criterion.state_dict()`; `state_dict()` here holds
    the epoch count and the Adam state.
    """

    def __init__(
        self,
        model,
        criterion,
        objective,
        *,
        search_epochs=50,
        unroll_lr=0.01,
        unroll_weight_decay=1e-4,
        radius=0.01,
        lr=3e-4,
        betas=(0.5, 0.999),
        weight_decay=1e-3,
    ):
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
    def searching(self):
        return self.epoch < self.search_epochs

    def student_parameters(self):
        """The student-side weights w (model, connector, DAM head): what the ordinary student
        optimizer trains. The policy is left out; only `step` updates it."""
        return list(self._weights)

    def end_epoch(self):
        """Count one finished epoch; after `search_epochs` of them the policy is frozen."""
        self.epoch += 1
        self._apply_freezing()

    def _apply_freezing(self):
        self.policy.requires_grad_(self.searching)

    def state_dict(self):
        return {"epoch": self.epoch, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict):
        missing = {"epoch", "optimizer"} - set(state_dict)
        if missing:
            raise KeyError(f"state_dict lacks {sorted(missing)}")
        self.epoch = _non_negative_int(state_dict["epoch"], "state_dict['epoch']")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._apply_freezing()

    def step(self, *batch, **kwargs):
        """One bi-level policy step on `batch` (passed on to the objective with `kwargs`).

        Returns the SearchStep losses, or None once the search epochs are over. Every
        parameter and buffer of the model and the criterion is left exactly as it was.
        """
        if not self.searching:
            return None
        self.policy.resample(self.criterion.generator)
        with self.policy.hold_sample(), self._buffers_restored(), self._gradient_sync_paused():
            result = self._hessian_step(batch, kwargs)
        if dist.is_available() and dist.is_initialized():
            self._average_policy_gradients()
        self.optimizer.step()
        return result

    def _hessian_step(self, batch, kwargs):
        """Steps 1 to 3 of SPEC section 3: leaves grad alpha in the policy's .grad."""
        eta, weights = self.unroll_lr, self._weights
        cuda_devices = {p.device for p in weights if p.device.type == "cuda"}
        replay = _RandomReplay(self.criterion.generator, cuda_devices)

        replay.rewind()
        train_loss = self._loss(weights, batch, kwargs, augment=True)
        train_grads = _gradients(train_loss, weights)
        with torch.no_grad():
            unrolled = [
                (w - eta * (g + self.unroll_weight_decay * w)).requires_grad_()
                for w, g in zip(weights, train_grads)
            ]

        replay.rewind()
        val_loss = self._loss(unrolled, batch, kwargs, augment=False)
        direction = _gradients(val_loss, unrolled)

        with torch.no_grad():
            norm = torch.sqrt(sum(d.double().square().sum() for d in direction))
            step = self.radius / float(norm.clamp_min(_MIN_DIRECTION_NORM))
            plus = [w + step * d for w, d in zip(weights, direction)]
            minus = [w - step * d for w, d in zip(weights, direction)]
        grads_plus = self._policy_gradients(plus, batch, kwargs, replay)
        grads_minus = self._policy_gradients(minus, batch, kwargs, replay)
        scale = -eta / (2 * step)
        for name, parameter in self.policy.named_parameters():
            parameter.grad = scale * (grads_plus[name] - grads_minus[name])
        return SearchStep(train_loss.detach(), val_loss.detach())

    def _loss(self, weights, batch, kwargs, augment):
        parameters = dict(zip(self._weight_names, weights))
        loss = functional_call(
            self._evaluation, parameters, (self.objective, batch, kwargs, augment)
        )
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(
                "objective must return the loss as a scalar tensor, got "
                f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}"
            )
        return loss.reshape(())

    def _policy_gradients(self, weights, batch, kwargs, replay):
        """G at the given weights: RELAX for P, omega and c_phi; autograd for M."""
        replay.rewind()
        loss = self._loss(weights, batch, kwargs, augment=True)
        grads = self.policy.relax_gradients(loss.detach())
        grads["magnitude"] = _gradients(loss, [self.policy.magnitude])[0]
        return grads

    def _average_policy_gradients(self):
        grads = [p.grad for p in self.policy.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    @contextlib.contextmanager
    def _buffers_restored(self):
        """BatchNorm in train mode updates running statistics in every probe; the probes must
        leave no trace, so every buffer is put back bit for bit."""
        saved = [b.clone() for b in self._buffers]
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, value in zip(self._buffers, saved):
                    buffer.copy_(value)

    def _gradient_sync_paused(self):
        """The probes take gradients with torch.autograd.grad, which never reaches DDP's
        all-reduce; no_sync keeps DDP from waiting for a backward pass that never comes."""
        if isinstance(self.model, DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()


def _gradients(loss, inputs):
    """d loss / d inputs, with zeros for the inputs the loss does not reach."""
    if not loss.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


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
