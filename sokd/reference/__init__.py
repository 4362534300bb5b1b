"""The pure-PyTorch reference backend: the definition every kernel is tested against.

Each function takes inputs already validated by `sokd.ops` and has the backend signature
documented in `sokd/_backend.py`. Each op lives in the module named after it.
"""

from .decoupled_kd_loss import decoupled_kd_loss
from .feature_augment import feature_augment
from .fused_linear_distill_loss import fused_linear_distill_loss
from .interest_map import interest_map
from .kd_loss import kd_loss
from .logit_distill_loss import logit_distill_loss
from .masked_feature_loss import masked_feature_loss

__all__ = [
    "decoupled_kd_loss",
    "feature_augment",
    "fused_linear_distill_loss",
    "interest_map",
    "kd_loss",
    "logit_distill_loss",
    "masked_feature_loss",
]
