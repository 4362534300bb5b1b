"""The pure-PyTorch reference backend: the definition every kernel is tested against.

Each function takes inputs already validated by `sokd.ops` and has the backend signature
documented in `sokd/_backend.py`.
"""

from .augment import feature_augment
from .interest import interest_map
from .losses import decoupled_kd_loss, kd_loss, masked_feature_loss

__all__ = [
    "decoupled_kd_loss",
    "feature_augment",
    "interest_map",
    "kd_loss",
    "masked_feature_loss",
]
