"""sokd: Student-Oriented Knowledge Distillation (SoKD, ACM MM 2024) as fused PyTorch losses."""

from . import ops
from ._ops.fused_linear_distill_loss import FusedLinearDistillLoss
from ._ops.logit_distill_loss import LogitDistillLoss
from ._backend import (
    available_backends,
    built_backends,
    empty_cache,
    get_backend,
    preload,
    set_backend,
)
from .feature_taps import tap
from .head import HeadOutput, InterestHead
from .loss import SoKDLoss, SoKDOutput
from .policy import FeaturePolicy, PolicySample
from .search import PolicySearch

__version__ = "0.1.0"

preload()

__all__ = [
    "FeaturePolicy",
    "FusedLinearDistillLoss",
    "HeadOutput",
    "InterestHead",
    "LogitDistillLoss",
    "PolicySample",
    "PolicySearch",
    "SoKDLoss",
    "SoKDOutput",
    "available_backends",
    "built_backends",
    "empty_cache",
    "get_backend",
    "ops",
    "set_backend",
    "tap",
]
