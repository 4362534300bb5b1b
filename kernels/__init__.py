"""Triton kernels for sokd, installed as the subpackage `sokd.kernels`: the "triton" backend.

Each launcher is a plain function with exactly the positional arguments and the outputs of
the sokd:: op of the same name (csrc/<op>.cpp): the losses return (loss, gradient) with the
gradient already normalised, so the C++ autograd of those ops is the only autograd, whichever
kernel runs below it. Kernels are launched through torch.library.wrap_triton, PyTorch's
traceable form of a Triton launch; tests/triton_compile.py records the launches there.
LAUNCHERS maps each op name to its launcher, for registering them as implementations of the
sokd:: ops.
"""

from .decoupled_kd_loss import decoupled_kd_loss
from .feature_augment import feature_augment
from .interest_map import interest_map
from .kd_loss import kd_loss
from .logit_distill_loss import logit_distill_loss
from .masked_feature_loss import masked_feature_loss

LAUNCHERS = {
    "decoupled_kd_loss": decoupled_kd_loss,
    "feature_augment": feature_augment,
    "interest_map": interest_map,
    "kd_loss": kd_loss,
    "logit_distill_loss": logit_distill_loss,
    "masked_feature_loss": masked_feature_loss,
}

__all__ = [
    "LAUNCHERS",
    "decoupled_kd_loss",
    "feature_augment",
    "interest_map",
    "kd_loss",
    "logit_distill_loss",
    "masked_feature_loss",
]
