"""A distiller in the style of mdistiller (the DKD authors' code base, not on PyPI).

mdistiller's trainer calls `distiller(image=..., target=..., epoch=...)` in train mode and
expects `(logits, losses)`, a dict of loss tensors that it sums; in eval mode it calls
`distiller(image=...)` and expects the student's logits. It builds its optimizer from
`distiller.get_learnable_parameters()`. `Distiller` here keeps that contract and runs SoKD,
with the policy search, inside it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..feature_taps import TapMethod, tap
from ..loss import SoKDLoss
from ..search import PolicySearch


class Distiller(nn.Module):
    """Student, teacher and SoKDLoss as one mdistiller-style module.

    forward_train: `losses = {"loss_ce": ce_weight * CE(student logits, target),
    "loss_sokd": SoKDLoss(...).total}`; while the policy search runs, one `PolicySearch.step`
    on the same batch precedes the student's forward pass (the recipe of the README).

    Args:
        student, teacher: models returning logits; the hint features are tapped at
            `student_layer` and `teacher_layer` with `sokd.tap(..., method=tap_method)`.
        criterion: the SoKDLoss (for example from `SoKDLoss.from_models`).
        ce_weight: weight of the cross-entropy, also inside the search's objective.
        search_epochs: epochs of policy search (0: no search; the policy stays as it is).
        search_options: further keyword arguments of PolicySearch.

    Epochs: mdistiller passes `epoch` (counted from 1) to forward_train; each increase ends
    a search epoch. Without it, call `end_epoch()` after each epoch.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        criterion: SoKDLoss,
        *,
        student_layer: str,
        teacher_layer: str,
        ce_weight: float = 1.0,
        search_epochs: int = 0,
        tap_method: TapMethod = "auto",
        **search_options: Any,
    ) -> None:
        super().__init__()
        if not isinstance(criterion, SoKDLoss):
            raise TypeError(f"criterion must be a SoKDLoss, got {type(criterion).__name__}")
        self.student, self.teacher, self.criterion = student, teacher, criterion
        self.ce_weight = float(ce_weight)
        # The taps share the models' weights; kept out of the module tree so that
        # state_dict() and parameters() list every tensor once, under student/teacher.
        self._taps = (tap(student, student_layer, method=tap_method),
                      tap(teacher, teacher_layer, method=tap_method))
        self.search = None
        if search_epochs > 0:
            self.search = PolicySearch(
                self._taps[0], criterion, self._objective, search_epochs=search_epochs,
                **search_options,
            )
        self._last_epoch: int | None = None
        self.train()

    def train(self, mode: bool = True) -> Distiller:
        """The student and the criterion follow `mode`; the teacher always stays in eval."""
        super().train(mode)
        self._taps[0].train(mode)
        self.teacher.eval()
        self._taps[1].eval()
        return self

    def _objective(self, image, target, t_feature, t_logits, augment=True):
        feature, logits = self._taps[0](image)
        out = self.criterion(feature, t_feature, logits, t_logits, target, augment=augment)
        return self.ce_weight * F.cross_entropy(logits, target) + out.total

    def forward_train(
        self, image: torch.Tensor, target: torch.Tensor, epoch: int | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`(student logits, {"loss_ce": ..., "loss_sokd": ...})` for one training batch."""
        self._count_epochs(epoch)
        with torch.no_grad():
            t_feature, t_logits = self._taps[1](image)
        if self.search is not None:
            self.search.step(image, target, t_feature, t_logits)
        feature, logits = self._taps[0](image)
        out = self.criterion(feature, t_feature, logits, t_logits, target)
        losses = {"loss_ce": self.ce_weight * F.cross_entropy(logits, target),
                  "loss_sokd": out.total}
        return logits, losses

    def forward_test(self, image: torch.Tensor) -> torch.Tensor:
        """The student's logits."""
        return self.student(image)

    def forward(
        self, **kwargs: Any
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.training:
            return self.forward_train(**kwargs)
        return self.forward_test(kwargs["image"])

    def end_epoch(self) -> None:
        """Count one finished epoch of the policy search (nothing without a search)."""
        if self.search is not None:
            self.search.end_epoch()

    def _count_epochs(self, epoch: int | None) -> None:
        if epoch is None:
            return
        if self._last_epoch is not None:
            for _ in range(max(int(epoch) - self._last_epoch, 0)):
                self.end_epoch()
        if self._last_epoch is None or int(epoch) > self._last_epoch:
            self._last_epoch = int(epoch)

    def get_learnable_parameters(self) -> list[nn.Parameter]:
        """What the trainer's optimizer trains: the student, the connector and the DAM head
        (the policy is left to the search)."""
        policy = {id(p) for p in self.criterion.policy.parameters()}
        params = list(self.student.parameters()) + [
            p for p in self.criterion.parameters() if id(p) not in policy
        ]
        return params

    def get_extra_parameters(self) -> int:
        """Number of trainable values beside the student's (connector, DAM head, policy)."""
        return sum(p.numel() for p in self.criterion.parameters())
