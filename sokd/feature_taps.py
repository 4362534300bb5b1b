"""Hint features from real models: tap any layer of any nn.Module, and build a SoKDLoss from
two models and one example batch.

`tap(model, layer)` returns a module whose forward gives `(feature, output)`: the output of
`layer` and the model's own output, which is the `(feature, logits)` pair that `SoKDLoss`,
`PolicySearch` objectives and the examples expect. Two ways to get there:

- "fx": torchvision's `create_feature_extractor` traces the model with torch.fx, so `layer` may
  be any node that `get_graph_node_names` lists (a submodule such as "layer3", or an
  operation inside one, such as "layer3.1.add", the residual sum before its ReLU).
- "hook": a forward hook on the submodule `layer` (any name in `model.named_modules()`).
  Needs no torchvision and no tracing, so it also works for models that torch.fx cannot
  trace (data-dependent control flow).

Both share the model's parameters and buffers (nothing is copied): an optimizer built from
`model.parameters()` trains the tapped module, and `model.state_dict()` is unchanged.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

TapMethod = Literal["auto", "fx", "hook"]
ResizeMode = Literal["bilinear", "nearest", "error"]
_TAP_METHODS = ("auto", "fx", "hook")
_RESIZE_MODES = ("bilinear", "nearest", "error")


class HookTap(nn.Module):
    """`(output of model.<layer>, model(*args))` through a forward hook on the submodule.

    The hook lives as long as this module; `model` is held as a submodule, so `train()`,
    `eval()`, `to()` and `state_dict()` reach it (its keys gain the prefix "model.").
    """

    def __init__(self, model: nn.Module, layer: str) -> None:
        super().__init__()
        self.model = model
        self.layer = layer
        target = _submodule(model, layer)
        self._captured: list[torch.Tensor] = []
        self._handle = target.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._captured.append(output)

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        self._captured.clear()
        try:
            output = self.model(*args, **kwargs)
            if not self._captured:
                raise RuntimeError(
                    f"layer {self.layer!r} did not run in the forward pass of "
                    f"{type(self.model).__name__}; tap a layer that the forward pass uses"
                )
            # A layer called more than once (a shared block) is tapped at its last call.
            return self._captured[-1], output
        finally:
            self._captured.clear()

    def remove(self) -> None:
        """Detach the hook from the model; this tap no longer works afterwards."""
        self._handle.remove()


class FxTap(nn.Module):
    """`(value of node <layer>, model output)` from torchvision's feature extractor.

    `extractor` is torchvision's GraphModule: it holds the model's own submodules (shared,
    not copied) and separate train and eval graphs, selected by this module's mode.
    """

    def __init__(self, model: nn.Module, layer: str) -> None:
        super().__init__()
        from torchvision.models.feature_extraction import (
            create_feature_extractor,
            get_graph_node_names,
        )

        train_nodes, eval_nodes = get_graph_node_names(model)
        # A submodule's name stands for the last node inside it, as in torchvision.
        if not (_names_node(train_nodes, layer) and _names_node(eval_nodes, layer)):
            raise ValueError(
                f"layer {layer!r} is not a node of {type(model).__name__}'s traced graph; "
                f"nodes include {_preview(eval_nodes)} "
                "(torchvision.models.feature_extraction.get_graph_node_names lists them all)"
            )
        self.layer = layer
        self.extractor = create_feature_extractor(
            model,
            train_return_nodes={layer: "feature", train_nodes[-1]: "output"},
            eval_return_nodes={layer: "feature", eval_nodes[-1]: "output"},
        )
        self.train(model.training)

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        values = self.extractor(*args, **kwargs)
        return values["feature"], values["output"]


def tap(model: nn.Module, layer: str, *, method: TapMethod = "auto") -> nn.Module:
    """A module returning `(feature, output)`: the value of `layer` and `model`'s output.

    Args:
        model: any nn.Module (a torchvision ResNet, a timm model, your own network).
        layer: for "hook", a name from `model.named_modules()` ("layer3", "features.8");
            for "fx", a node name from torchvision's `get_graph_node_names(model)`.
        method: "fx" (torchvision's `create_feature_extractor`; needs torchvision), "hook"
            (a forward hook on a submodule), or "auto": "fx" when torchvision is installed
            and the model traces, else "hook".

    Returns:
        An nn.Module to use in place of `model` (train/eval it, call it); it shares every
        parameter and buffer with `model`. Calling it gives the tapped tensor (for CNNs
        N x C x H x W, the dtype and device of the model's activations, differentiable like
        any activation) and the model's own output unchanged.

    Raises:
        TypeError: `model` is not an nn.Module or `layer` is not a string.
        ValueError: `layer` is not a submodule / graph node, or `method` is unknown.
        ImportError: method="fx" without torchvision.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a string (a submodule or node name), got {layer!r}")
    if method not in _TAP_METHODS:
        raise ValueError(f"method must be one of {', '.join(_TAP_METHODS)}; got {method!r}")
    has_torchvision = importlib.util.find_spec("torchvision") is not None
    if method == "fx":
        if not has_torchvision:
            raise ImportError("tap(method='fx') needs torchvision: pip install torchvision")
        return FxTap(model, layer)
    if method == "auto" and has_torchvision:
        try:
            return FxTap(model, layer)
        except Exception as error:  # noqa: BLE001 - torch.fx raises many kinds on untraceable code
            if layer not in dict(model.named_modules()):
                raise ValueError(
                    f"layer {layer!r} could not be tapped: tracing failed ({error}) and it "
                    "is not a submodule for a forward hook either"
                ) from error
    return HookTap(model, layer)


class Resize(nn.Module):
    """Resizes N x C x h x w maps to a fixed H x W with `F.interpolate` (bilinear without
    corner alignment, or nearest); differentiable in its input like `F.interpolate`."""

    def __init__(self, size: tuple[int, int], mode: Literal["bilinear", "nearest"]) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == self.size:
            return x
        if self.mode == "nearest":
            return F.interpolate(x, size=self.size, mode="nearest")
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}, mode={self.mode!r}"


def probe_features(
    model: nn.Module, layer: str, example_input: Any, *, method: TapMethod = "auto"
) -> torch.Tensor:
    """The value of `layer` for one example batch, computed in eval mode without gradients;
    the model's mode is restored afterwards and no hook or tracer is left on it."""
    tapped = tap(model, layer, method=method)
    was_training = model.training
    tapped.eval()
    try:
        with torch.no_grad():
            feature, _ = tapped(example_input)
    finally:
        if isinstance(tapped, HookTap):
            tapped.remove()
        model.train(was_training)
    if not isinstance(feature, torch.Tensor) or feature.dim() != 4:
        shape = tuple(feature.shape) if isinstance(feature, torch.Tensor) else type(feature)
        raise ValueError(
            f"layer {layer!r} of {type(model).__name__} gives {shape}; SoKDLoss needs an "
            "N x C x H x W feature map (tap a convolutional stage)"
        )
    return feature


def loss_from_models(
    loss_class: type,
    student: nn.Module,
    teacher: nn.Module,
    *,
    student_layer: str,
    teacher_layer: str,
    example_input: Any,
    resize: ResizeMode = "bilinear",
    method: TapMethod = "auto",
    **options: Any,
) -> nn.Module:
    """`loss_class(C_s, C_t, **options)` with the channel counts read from one example batch.

    Spatial sizes: when the student's map (h x w) differs from the teacher's (H x W) and no
    `connector` is given, the default connector becomes `Resize((H, W), resize)` followed by
    a 1x1 convolution and BatchNorm to C_t channels (the resize alone when C_s == C_t).
    `resize="error"` raises instead, naming both sizes and the two fixes. A given
    `connector` is checked on the example feature: it must map the student's map to the
    teacher's shape. The loss is moved to `example_input`'s device.
    """
    if resize not in _RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(_RESIZE_MODES)}; got {resize!r}")
    student_feature = probe_features(student, student_layer, example_input, method=method)
    teacher_feature = probe_features(teacher, teacher_layer, example_input, method=method)
    student_channels, teacher_channels = student_feature.shape[1], teacher_feature.shape[1]
    student_size, teacher_size = tuple(student_feature.shape[2:]), tuple(teacher_feature.shape[2:])
    k, heat_channels = options.get("k", 8), options.get("heat_channels", 1)
    positions = heat_channels * teacher_size[0] * teacher_size[1]
    if isinstance(k, int) and isinstance(heat_channels, int) and k > positions:
        raise ValueError(
            f"teacher layer {teacher_layer!r} gives {teacher_size[0]}x{teacher_size[1]} maps, "
            f"too small for the interest map's k={k} boxes (at most heat_channels*H*W = "
            f"{positions}); tap an earlier, larger layer or pass a smaller k"
        )
    if options.get("connector") is None and student_size != teacher_size:
        if resize == "error":
            raise ValueError(
                f"student layer {student_layer!r} gives {student_size[0]}x{student_size[1]} "
                f"maps but teacher layer {teacher_layer!r} gives "
                f"{teacher_size[0]}x{teacher_size[1]}; tap layers of the same spatial size, "
                "or pass resize='bilinear' to interpolate the student's map to the teacher's"
            )
        steps: list[nn.Module] = [Resize(teacher_size, resize)]
        if student_channels != teacher_channels:
            steps += [
                nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
                nn.BatchNorm2d(teacher_channels),
            ]
        options["connector"] = nn.Sequential(*steps)
    loss = loss_class(student_channels, teacher_channels, **options)
    loss.to(student_feature.device)
    was_training = loss.training
    loss.eval()
    try:
        with torch.no_grad():
            connected = loss.connector(student_feature)
    finally:
        loss.train(was_training)
    if connected.shape[1:] != teacher_feature.shape[1:]:
        raise ValueError(
            f"the connector maps the student's {tuple(student_feature.shape[1:])} feature to "
            f"{tuple(connected.shape[1:])}, but the teacher's is "
            f"{tuple(teacher_feature.shape[1:])}; give a connector that produces the teacher's "
            "shape, or leave connector out to get a resize plus a 1x1 convolution"
        )
    return loss


def _names_node(nodes: list[str], layer: str) -> bool:
    return any(node == layer or node.startswith(layer + ".") for node in nodes)


def _submodule(model: nn.Module, layer: str) -> nn.Module:
    modules = dict(model.named_modules())
    if layer not in modules or layer == "":
        names = [name for name in modules if name]
        raise ValueError(
            f"layer {layer!r} is not a submodule of {type(model).__name__}; "
            f"submodules include {_preview(names)} (see model.named_modules())"
        )
    return modules[layer]


def _preview(names: list[str], count: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:count])
    return shown + (f", ... ({len(names)} in all)" if len(names) > count else "")
