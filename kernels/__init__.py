"""Triton kernels for sokd, installed as the subpackage `sokd.kernels`: the "triton" backend.

Each op is a PyTorch `triton_op` custom op (namespace sokd_triton) with its autograd formula beside
the kernel, so `torch.compile(fullgraph=True)` traces it. The functions exported here implement
the backend contract documented in sokd/_backend.py.
"""

from .decoupled_kd_loss import decoupled_kd_loss
from .feature_augment import feature_augment
from .interest_map import interest_map
from .kd_loss import kd_loss
from .masked_feature_loss import masked_feature_loss

__all__ = [
    "decoupled_kd_loss",
    "feature_augment",
    "interest_map",
    "kd_loss",
    "masked_feature_loss",
]
