"""SoKD in torchdistill: a student wrapper and a loss, registered when this module is imported.

torchdistill builds a training run from a YAML configuration: the student and teacher, their
forward hooks, a loss made of weighted terms that read the hooked tensors from I/O dicts, and
an optimizer over the student model's parameters. SoKD's loss has weights of its own (the
connector, the DAM head, the policy) and a policy search that needs the input batch, so:

- `SoKDStudent` (an auxiliary model wrapper, key "SoKDStudent") wraps the student and owns
  the SoKDLoss and its PolicySearch. Its parameters are the student model's as torchdistill
  sees them, so they reach torchdistill's optimizer and the student's checkpoints. Its
  forward returns the student's logits and keeps the hint feature (tapped at
  `student_layer`) and the batch for the loss.
- `SoKDTorchdistillLoss` (a middle-level loss, key "SoKDLoss") reads the teacher's hint
  feature and logits from the teacher's I/O dict and the student's from the wrapper, and
  returns the SoKD total as a tensor.
- The policy step on a batch runs in the wrapper, just before the student's next forward pass
  (or at the end of the epoch): torchdistill computes the loss after the student's forward
  pass, when a search step would disturb the BatchNorm statistics that the open autograd
  graph holds. So the policy step on batch i sees the weights after the student's step on
  batch i, where the README's loop shows them before it.
- The wrapper's `post_epoch_process`, which torchdistill calls after each epoch, runs the
  last pending policy step and ends a search epoch.

docs/integrations.md has the YAML.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:
    from torchdistill.losses.registry import register_mid_level_loss
    from torchdistill.models.registry import register_auxiliary_model_wrapper
    from torchdistill.models.wrapper import AuxiliaryModelWrapper
except ImportError as error:  # torchdistill is an optional extra
    raise ImportError(
        "sokd.integrations.torchdistill needs torchdistill: pip install torchdistill"
    ) from error

from ..feature_taps import tap
from ..loss import SoKDLoss
from ..search import PolicySearch

# The key under which the wrapper puts itself into the student's I/O dict.
IO_KEY = "sokd"


@register_auxiliary_model_wrapper(key="SoKDStudent")
class SoKDStudent(AuxiliaryModelWrapper):
    """The student with its SoKDLoss (and PolicySearch) attached.

    Args:
        student_model: the student (torchdistill passes it).
        student_layer: the student's hint layer (a `sokd.tap` name, e.g. "layer2").
        student_channels, teacher_channels: channels of the two hint features.
        search_epochs: epochs of policy search (0: none).
        ce_weight: weight of the cross-entropy inside the search's objective; make it the
            weight of the configuration's cross-entropy term.
        search_kwargs: further PolicySearch arguments.
        sokd_kwargs: further SoKDLoss arguments (logit_loss, normalize, w_feat, ...).
        device, device_ids, distributed: passed by torchdistill; the wrapper is moved to
            `device`. Distributed training is not supported by this wrapper.
    """

    def __init__(
        self,
        student_model: nn.Module,
        student_layer: str,
        student_channels: int,
        teacher_channels: int,
        search_epochs: int = 0,
        ce_weight: float = 1.0,
        search_kwargs: dict | None = None,
        sokd_kwargs: dict | None = None,
        device: Any = None,
        device_ids: Any = None,
        distributed: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if distributed:
            raise NotImplementedError(
                "SoKDStudent runs in one process; for several GPUs use the script in "
                "docs/training.md (DistributedDataParallel with PolicySearch)"
            )
        self.student_model = student_model
        self.criterion = SoKDLoss(student_channels, teacher_channels, **(sokd_kwargs or {}))
        self.ce_weight = float(ce_weight)
        self.student_layer = student_layer
        # The tap shares the student's weights; kept out of the module tree so that the
        # state_dict lists them once.
        self._tap = (tap(student_model, student_layer),)
        self.search = None
        if search_epochs > 0:
            self.search = PolicySearch(
                self._tap[0], self.criterion, self._objective, search_epochs=search_epochs,
                **(search_kwargs or {}),
            )
        self._batch: torch.Tensor | None = None
        self._feature: torch.Tensor | None = None
        self._pending: tuple | None = None  # (batch, targets, teacher feature, teacher logits)
        if device is not None:
            self.to(device)

    def train(self, mode: bool = True) -> SoKDStudent:
        super().train(mode)
        self._tap[0].train(mode)
        return self

    def _objective(self, x, y, t_feature, t_logits, augment=True):
        feature, logits = self._tap[0](x)
        out = self.criterion(feature, t_feature, logits, t_logits, y, augment=augment)
        return self.ce_weight * F.cross_entropy(logits, y) + out.total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.run_pending_search_step()
        self._feature, logits = self._tap[0](x)
        self._batch = x
        return logits

    def secondary_forward(self, io_dict: dict) -> None:
        io_dict[IO_KEY] = {"wrapper": self, "feature": self._feature, "batch": self._batch}

    def queue_search_step(
        self,
        batch: torch.Tensor,
        targets: torch.Tensor,
        t_feature: torch.Tensor,
        t_logits: torch.Tensor,
    ) -> None:
        """Keep a batch for the next policy step (while the search lasts)."""
        if self.search is not None and self.search.searching:
            self._pending = (batch, targets, t_feature.detach(), t_logits.detach())

    def run_pending_search_step(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.search.step(*pending)

    def post_epoch_process(self, *args: Any, **kwargs: Any) -> None:
        if self.search is not None:
            self.run_pending_search_step()
            self.search.end_epoch()


@register_mid_level_loss(key="SoKDLoss")
class SoKDTorchdistillLoss(nn.Module):
    """The SoKD total for torchdistill's I/O dicts: `loss(student_io_dict, teacher_io_dict,
    targets)` returns `SoKDLoss(student feature, teacher feature, student logits, teacher
    logits, targets).total`, a scalar tensor.

    Args:
        teacher_feature: where the teacher's hint feature is, `{"module_path": ..., "io":
            "output"}` (the path needs a forward hook in the teacher's configuration).
        teacher_logits: where the teacher's logits are (default: the teacher's output).
    """

    def __init__(
        self,
        teacher_feature: dict,
        teacher_logits: dict | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.teacher_feature = _location(teacher_feature, "teacher_feature")
        self.teacher_logits = _location(
            teacher_logits or {"module_path": ".", "io": "output"}, "teacher_logits"
        )

    def forward(
        self, student_io_dict: dict, teacher_io_dict: dict, targets: torch.Tensor,
        *args: Any, **kwargs: Any,
    ) -> torch.Tensor:
        if IO_KEY not in student_io_dict:
            raise KeyError(
                "the student's I/O dict has no SoKD entry: configure the student with "
                "auxiliary_model_wrapper key 'SoKDStudent' (see docs/integrations.md)"
            )
        entry = student_io_dict[IO_KEY]
        wrapper = entry["wrapper"]
        t_feature = teacher_io_dict[self.teacher_feature[0]][self.teacher_feature[1]]
        t_logits = teacher_io_dict[self.teacher_logits[0]][self.teacher_logits[1]]
        student_logits = student_io_dict["."]["output"]
        if wrapper.training:
            wrapper.queue_search_step(entry["batch"], targets, t_feature, t_logits)
        out = wrapper.criterion(entry["feature"], t_feature, student_logits, t_logits, targets)
        return out.total


def _location(config: dict, name: str) -> tuple[str, str]:
    if not isinstance(config, dict) or "module_path" not in config or "io" not in config:
        raise ValueError(f"{name} must be a dict with module_path and io, got {config!r}")
    return config["module_path"], config["io"]
