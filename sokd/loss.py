"""SoKDLoss: the whole SoKD objective of docs/algorithm.md §5 as one drop-in module."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import _validation as check
from . import ops
from .head import HEAD_PRECISIONS, HeadOutput, HeadPrecision, InterestHead
from .feature_taps import ResizeMode, TapMethod
from .policy import FeaturePolicy

MASK_MODES = ("student", "teacher", "mutual")
MaskMode = Literal["student", "teacher", "mutual"]
# The default head is an eighth as wide as the authors' (docs/training.md, "Head width and
# precision"; docs/algorithm.md §6, departure 17).
DEFAULT_HEAD_RATIO = 8
LOGIT_LOSSES = ("none", "kd", "dkd", "masked")
LogitLoss = Literal["none", "kd", "dkd", "masked"]


@dataclass
class SoKDOutput:
    total: torch.Tensor  # the scalar to backpropagate
    # name -> detached scalar, for logging: the loss terms, and the interest-map diagnostics
    # coverage, empty, box_area and peak_score (docs/training.md, "Reading the diagnostics")
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    weight_map: torch.Tensor | None = None  # N x H x W spatial weights used by the feature loss


class SoKDLoss(nn.Module):
    """Student-Oriented Knowledge Distillation loss.

    L = w_feat * L_feat(W, s, t~) + w_dam * L_dam + w_logit * L_logit, where s is the student
    feature after the connector, t~ the teacher feature after the learnable augmentation
    policy (training mode only) and W the interest weight map of the shared DAM head.

    One flat list of keyword options, as torch's own losses and the KD trainers'
    configurations take them (docs/api.md, "Why one flat list of options"). Grouped:

    Shapes and submodules:
        student_channels: C_s, the channels of the student's hint feature.
        teacher_channels: C_t, the channels of the teacher's hint feature.
        connector: module mapping the student feature to the teacher's shape; default
            conv1x1 + BatchNorm when the channel counts differ, identity otherwise.
        policy: the FeaturePolicy to learn (default: all 36 pairs of the 9 primitives).
    The DAM head and its weight map (docs/algorithm.md §4):
        heat_channels: heat outputs of the head (the authors' code uses one per class).
        head_channels: width of each head branch; default C_t // 8 (at least 1). The
            authors' head is C_t wide (docs/training.md, "Head width and precision").
        head_precision: "float32", or "bfloat16"/"float16" to run the head's convolutions
            under autocast; its outputs, the DAM loss and the peak decoding stay float32.
        mask_mode: "mutual" (min of both count maps; a sample whose mutual map is empty
            falls back to the union, max of both), "student" or "teacher".
        k: peaks decoded per sample (at most heat_channels x H x W).
        kernel: odd size of the peak-finding max-pool window.
    The loss terms (docs/algorithm.md §5):
        normalize: "elements" (divide the masked squared error by N*C*H*W) or "mask"
            (by C * sum W^2, a weighted mean over the covered positions).
        w_feat: weight of the masked feature loss.
        w_dam: weight of the DAM consistency loss.
        w_logit: weight of the logit loss.
        logit_loss: "none", "kd", "dkd" (needs target) or "masked" (mutual class interest).
        temperature: T of the logit loss, in [1e-2, 1e3].
        alpha: weight of TCKD (the class set against the rest) in "dkd" and "masked".
        beta: weight of NCKD (among the classes outside the set) in "dkd" and "masked".
        class_ratio: the fraction of classes in the teacher's top set for "masked".
        mutual_classes: "masked" intersects the teacher's top set with the student's.
    Randomness and checks:
        generator: torch.Generator for the policy sample and the augmentation draws
            (default: torch's global generator).
        check_finite: raise ValueError on NaN or Inf inputs.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        *,
        connector: nn.Module | None = None,
        policy: FeaturePolicy | None = None,
        heat_channels: int = 1,
        head_channels: int | None = None,
        head_precision: HeadPrecision = "float32",
        mask_mode: MaskMode = "mutual",
        logit_loss: LogitLoss = "none",
        k: int = 8,
        kernel: int = 3,
        normalize: Literal["elements", "mask"] = "elements",
        w_feat: float = 1000.0,
        w_dam: float = 1000.0,
        w_logit: float = 1.0,
        temperature: float = 4.0,
        alpha: float = 1.0,
        beta: float = 8.0,
        class_ratio: float = 0.2,
        mutual_classes: bool = True,
        generator: torch.Generator | None = None,
        check_finite: bool = False,
    ) -> None:
        super().__init__()
        student_channels = check.positive_int(student_channels, "student_channels")
        teacher_channels = check.positive_int(teacher_channels, "teacher_channels")
        if connector is None:
            connector = (
                nn.Identity()
                if student_channels == teacher_channels
                else nn.Sequential(
                    nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
                    nn.BatchNorm2d(teacher_channels),
                )
            )
        if not isinstance(connector, nn.Module):
            raise TypeError(f"connector must be an nn.Module, got {type(connector).__name__}")
        if policy is not None and not isinstance(policy, FeaturePolicy):
            raise TypeError(f"policy must be a FeaturePolicy, got {type(policy).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.connector = connector
        self.policy = policy if policy is not None else FeaturePolicy()
        if head_channels is None:
            head_channels = max(1, teacher_channels // DEFAULT_HEAD_RATIO)
        self.head = InterestHead(
            teacher_channels,
            heat_channels,
            hidden_channels=check.positive_int(head_channels, "head_channels"),
            precision=check.choice(head_precision, "head_precision", HEAD_PRECISIONS),
        )
        self.teacher_channels = teacher_channels
        self.mask_mode = check.choice(mask_mode, "mask_mode", MASK_MODES)
        self.logit_loss = check.choice(logit_loss, "logit_loss", LOGIT_LOSSES)
        self.k = check.positive_int(k, "k")
        self.kernel = check.positive_int(kernel, "kernel")
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd, got {kernel}")
        self.normalize = check.choice(normalize, "normalize", ops.NORMALIZE_MODES)
        self.w_feat = check.non_negative_number(w_feat, "w_feat")
        self.w_dam = check.non_negative_number(w_dam, "w_dam")
        self.w_logit = check.non_negative_number(w_logit, "w_logit")
        self.temperature = check.temperature(temperature, "temperature", *ops.TEMPERATURE_RANGE)
        self.alpha = check.non_negative_number(alpha, "alpha")
        self.beta = check.non_negative_number(beta, "beta")
        self.class_ratio = check.fraction(class_ratio, "class_ratio")
        self.mutual_classes = check.boolean(mutual_classes, "mutual_classes")
        self.generator = generator
        self.check_finite = check.boolean(check_finite, "check_finite")

    def get_extra_state(self) -> dict[str, torch.Tensor | None]:
        """The state of `generator`, so that a run restored from state_dict draws the same
        policy samples and augmentations as the run that saved it."""
        return {"generator": None if self.generator is None else self.generator.get_state()}

    def set_extra_state(self, state: dict[str, torch.Tensor | None]) -> None:
        saved = state["generator"]
        if (saved is None) != (self.generator is None):
            raise ValueError(
                "state_dict was saved from a SoKDLoss "
                f"{'without' if saved is None else 'with'} a generator, but this one has "
                f"{'one' if saved is None else 'none'}"
            )
        if saved is not None:
            self.generator.set_state(saved)

    def teacher_view(self, teacher_feat: torch.Tensor, augment: bool) -> torch.Tensor:
        """The teacher map the student learns from: t~ when augmenting, else t (detached)."""
        teacher = teacher_feat.detach()
        if not augment:
            return teacher
        if not self.policy.sample_held:
            self.policy.resample(self.generator)
        return self.policy(teacher, self.generator)

    def weight_map(
        self, student_head: HeadOutput, teacher_head: HeadOutput
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The spatial weight map W (N x H x W float32, no gradient) of `mask_mode`, and its
        diagnostics (detached scalars):

        - coverage: the fraction of positions with W > 0;
        - empty: the fraction of samples whose map was all zero before the fallback (mutual:
          the student's and the teacher's boxes do not meet; they then get the union);
        - box_area: the mean area, in positions, of the decoded boxes (clipped to the map);
        - peak_score: the mean heat of the top-k peaks.
        """
        decoded = {}
        if self.mask_mode in ("student", "mutual"):
            decoded["student"] = self._decode(student_head)
        if self.mask_mode in ("teacher", "mutual"):
            decoded["teacher"] = self._decode(teacher_head)
        counts = [count for count, _, _ in decoded.values()]
        weights = counts[0] if len(counts) == 1 else torch.minimum(*counts)
        empty = weights.flatten(1).amax(dim=1) == 0
        if len(counts) == 2:
            union = torch.maximum(*counts)
            weights = torch.where(empty[:, None, None], union, weights)
        boxes = torch.cat([boxes for _, boxes, _ in decoded.values()], dim=1)
        scores = torch.cat([scores for _, _, scores in decoded.values()], dim=1)
        width = (boxes[..., 2] - boxes[..., 0] + 1).clamp_min(0)
        height = (boxes[..., 3] - boxes[..., 1] + 1).clamp_min(0)
        diagnostics = {
            "coverage": (weights > 0).float().mean(),
            "empty": empty.float().mean(),
            "box_area": (width * height).float().mean(),
            "peak_score": scores.float().mean(),
        }
        return weights, diagnostics

    def _decode(self, head: HeadOutput):
        maps = head.heat.detach(), head.wh.detach(), head.offset.detach()
        return ops.interest_map(*maps, k=self.k, kernel=self.kernel)

    def forward(
        self,
        student_feat: torch.Tensor,
        teacher_feat: torch.Tensor,
        student_logits: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        *,
        augment: bool | None = None,
    ) -> SoKDOutput:
        """augment defaults to self.training: the policy is sampled and applied while
        training, and the clean teacher feature is used in eval mode."""
        check.tensor(student_feat, "student_feat", 4, "N x C x H x W")
        check.tensor(teacher_feat, "teacher_feat", 4, "N x C x H x W")
        check.same_device(teacher_feat, "teacher_feat", student_feat, "student_feat")
        if self.check_finite:
            check.finite(student_feat, "student_feat")
            check.finite(teacher_feat, "teacher_feat")
        student = self.connector(student_feat)
        if student.shape != teacher_feat.shape:
            raise ValueError(
                f"student_feat after the connector has shape {tuple(student.shape)} but "
                f"teacher_feat has {tuple(teacher_feat.shape)}; they must match"
            )
        augment = self.training if augment is None else bool(augment)
        teacher = self.teacher_view(teacher_feat, augment).to(student.dtype)

        student_head, teacher_head = self.head(student), self.head(teacher)
        dam = F.mse_loss(
            student_head.concatenated().float(), teacher_head.concatenated().float()
        )
        weights, diagnostics = self.weight_map(student_head, teacher_head)
        feat = ops.masked_feature_loss(student, teacher, weights, self.normalize)
        components = {"feat": feat, "dam": dam}
        total = self.w_feat * feat + self.w_dam * dam
        if self.logit_loss != "none":
            logit = self._logit_loss(student_logits, teacher_logits, target, weights)
            components["logit"] = logit
            total = total + self.w_logit * logit
        components = {name: value.detach() for name, value in components.items()}
        components["total"] = total.detach()
        components.update(diagnostics)
        return SoKDOutput(total, components, weights)

    def _logit_loss(self, student_logits, teacher_logits, target, weights):
        if student_logits is None or teacher_logits is None:
            raise ValueError(
                f"logit_loss={self.logit_loss!r} needs student_logits and teacher_logits"
            )
        check.tensor(student_logits, "student_logits", (2, 4), "N x K or dense N x K x H x W")
        check.tensor(teacher_logits, "teacher_logits", (2, 4), "N x K or dense N x K x H x W")
        teacher_logits = teacher_logits.detach().to(student_logits.dtype)
        if self.logit_loss == "kd":
            row_weights = None
            if student_logits.dim() == 4:
                row_weights = F.interpolate(
                    weights[:, None], size=student_logits.shape[2:], mode="nearest"
                )[:, 0]
            return ops.kd_loss(
                student_logits,
                teacher_logits,
                self.temperature,
                row_weights,
                check_finite=self.check_finite,
            )
        if self.logit_loss == "dkd":
            if target is None:
                raise ValueError("logit_loss='dkd' needs target (the class indices)")
            return ops.dkd_loss(
                student_logits,
                teacher_logits,
                target,
                self.alpha,
                self.beta,
                self.temperature,
                check_finite=self.check_finite,
            )
        student_for_mask = student_logits if self.mutual_classes else None
        class_mask = ops.top_class_mask(teacher_logits, student_for_mask, self.class_ratio)
        return ops.decoupled_kd_loss(
            student_logits,
            teacher_logits,
            class_mask,
            self.alpha,
            self.beta,
            self.temperature,
            check_finite=self.check_finite,
        )

    @classmethod
    def from_models(
        cls,
        student: nn.Module,
        teacher: nn.Module,
        *,
        student_layer: str,
        teacher_layer: str,
        example_input: torch.Tensor,
        resize: ResizeMode = "bilinear",
        method: TapMethod = "auto",
        **options: Any,
    ) -> SoKDLoss:
        """A SoKDLoss for the hint layers of two models, sized from one example batch.

        Runs `example_input` through both models once (eval mode, no gradients) to read the
        channels and spatial sizes of `student_layer` and `teacher_layer` (submodule or
        torch.fx node names, see `sokd.tap`). A student map of another spatial size is
        resized to the teacher's by the default connector (`resize="bilinear"` or
        `"nearest"`); `resize="error"` raises instead. Other keyword arguments go to
        `SoKDLoss`. Defined in `sokd/feature_taps.py` (`loss_from_models`).
        """
        from .feature_taps import loss_from_models

        return loss_from_models(
            cls,
            student,
            teacher,
            student_layer=student_layer,
            teacher_layer=teacher_layer,
            example_input=example_input,
            resize=resize,
            method=method,
            **options,
        )
