"""sokd.tap and SoKDLoss.from_models: hint features from real models."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sokd
from sokd.feature_taps import FxTap, HookTap, Resize


class Net(nn.Module):
    """conv (stride) -> BN -> ReLU -> conv -> ReLU -> pool -> linear."""

    def __init__(self, width, stride=1, classes=5):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=stride, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("method", ["hook", "fx"])
def test_tap_returns_the_layer_value_and_the_unchanged_output(method):
    if method == "fx":
        pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = Net(6).eval()
    x = torch.randn(2, 3, 8, 8)
    tapped = sokd.tap(model, "stem", method=method)
    assert isinstance(tapped, HookTap if method == "hook" else FxTap)
    feature, output = tapped(x)
    torch.testing.assert_close(feature, model.stem(x))
    torch.testing.assert_close(output, model(x))


def test_tap_shares_the_weights():
    model = Net(4)
    tapped = sokd.tap(model, "block", method="hook")
    feature, output = tapped(torch.randn(2, 3, 8, 8))
    (feature.sum() + output.sum()).backward()
    assert model.stem[0].weight.grad is not None and model.fc.weight.grad is not None
    assert {id(p) for p in tapped.parameters()} == {id(p) for p in model.parameters()}


def test_fx_tap_reaches_an_operation_that_is_no_module():
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = Net(6).eval()
    x = torch.randn(2, 3, 8, 8)
    tapped = sokd.tap(model, "mean")  # the global pooling, a tensor method in forward
    assert isinstance(tapped, FxTap)
    pooled, output = tapped(x)
    torch.testing.assert_close(pooled, model.block(model.stem(x)).mean((2, 3)))
    torch.testing.assert_close(output, model(x))
    with pytest.raises(ValueError, match="'mean' is not a submodule"):
        sokd.tap(model, "mean", method="hook")


def test_fx_tap_follows_the_mode_of_the_tapped_module():
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = models.resnet18(num_classes=4)
    x = torch.randn(2, 3, 32, 32)
    tapped = sokd.tap(model, "layer1")
    tapped.eval()
    eval_feature, _ = tapped(x)
    torch.testing.assert_close(eval_feature, sokd.tap(model, "layer1", method="hook").eval()(x)[0])
    tapped.train()  # batch statistics, as in the model's own train mode
    train_feature, _ = tapped(x)
    assert not torch.allclose(train_feature, eval_feature)


def test_tap_rejects_bad_arguments():
    model = Net(4)
    with pytest.raises(ValueError, match="'nope' is not a submodule of Net; submodules include"):
        sokd.tap(model, "nope", method="hook")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sokd.tap(lambda x: x, "stem")
    with pytest.raises(TypeError, match="layer must be a string"):
        sokd.tap(model, 3)
    with pytest.raises(ValueError, match="method must be one of auto, fx, hook"):
        sokd.tap(model, "stem", method="jit")


def test_a_layer_that_does_not_run_is_reported():
    model = Net(4)
    model.unused = nn.ReLU()
    with pytest.raises(RuntimeError, match="'unused' did not run"):
        sokd.tap(model, "unused", method="hook")(torch.randn(1, 3, 4, 4))


def test_from_models_reads_channels_and_keeps_the_models_as_they_were():
    torch.manual_seed(0)
    student, teacher = Net(4), Net(12).eval()
    x = torch.randn(2, 3, 8, 8)
    criterion = sokd.SoKDLoss.from_models(
        student, teacher, student_layer="block", teacher_layer="block", example_input=x,
        logit_loss="kd", w_feat=2.0,
    )
    assert criterion.connector[0].in_channels == 4 and criterion.connector[0].out_channels == 12
    assert criterion.w_feat == 2.0 and criterion.logit_loss == "kd"
    assert student.training and not teacher.training
    for module in list(student.modules()) + list(teacher.modules()):
        assert not module._forward_hooks
    feature, logits = sokd.tap(student, "block")(x)
    t_feature, t_logits = sokd.tap(teacher, "block")(x)
    out = criterion(feature, t_feature.detach(), logits, t_logits.detach())
    out.total.backward()
    assert torch.isfinite(out.total) and student.stem[0].weight.grad is not None


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_from_models_resizes_a_student_map_of_another_size(mode):
    torch.manual_seed(0)
    student, teacher = Net(4, stride=2), Net(8).eval()
    x = torch.randn(2, 3, 8, 8)
    criterion = sokd.SoKDLoss.from_models(
        student, teacher, student_layer="stem", teacher_layer="stem", example_input=x,
        resize=mode,
    )
    resize = criterion.connector[0]
    assert isinstance(resize, Resize) and resize.size == (8, 8) and resize.mode == mode
    small = torch.randn(2, 4, 4, 4)
    expected = F.interpolate(small, size=(8, 8), mode=mode, **(
        {"align_corners": False} if mode == "bilinear" else {}
    ))
    torch.testing.assert_close(resize(small), expected)
    feature, _ = sokd.tap(student, "stem")(x)
    assert criterion.connector(feature).shape == (2, 8, 8, 8)


def test_from_models_explains_a_size_mismatch_when_asked_not_to_resize():
    student, teacher = Net(4, stride=2), Net(8).eval()
    with pytest.raises(ValueError, match=r"gives 4x4 maps but teacher layer 'stem' gives 8x8"):
        sokd.SoKDLoss.from_models(
            student, teacher, student_layer="stem", teacher_layer="stem",
            example_input=torch.randn(1, 3, 8, 8), resize="error",
        )


def test_from_models_checks_a_given_connector_and_the_map_size():
    student, teacher = Net(4), Net(8).eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="the connector maps the student's"):
        sokd.SoKDLoss.from_models(
            student, teacher, student_layer="stem", teacher_layer="stem", example_input=x,
            connector=nn.Conv2d(4, 6, 1),
        )
    with pytest.raises(ValueError, match="too small for the interest map's k=8 boxes"):
        sokd.SoKDLoss.from_models(
            student, teacher, student_layer="stem", teacher_layer="stem",
            example_input=torch.randn(1, 3, 2, 2),
        )
    with pytest.raises(ValueError, match="resize must be one of"):
        sokd.SoKDLoss.from_models(
            student, teacher, student_layer="stem", teacher_layer="stem", example_input=x,
            resize="area",
        )


def test_from_models_rejects_a_layer_without_a_feature_map():
    student, teacher = Net(4), Net(8).eval()
    with pytest.raises(ValueError, match="needs an N x C x H x W feature map"):
        sokd.SoKDLoss.from_models(
            student, teacher, student_layer="fc", teacher_layer="stem",
            example_input=torch.randn(1, 3, 8, 8), method="hook",
        )


def test_policy_search_runs_through_a_tapped_student():
    torch.manual_seed(0)
    student, teacher = Net(4), Net(8).eval()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    criterion = sokd.SoKDLoss.from_models(
        student, teacher, student_layer="stem", teacher_layer="stem", example_input=x,
        logit_loss="kd", normalize="mask", w_feat=1.0, w_dam=10.0,
    )
    student_net, teacher_net = sokd.tap(student, "stem"), sokd.tap(teacher, "stem")

    def objective(x, y, t_feature, t_logits, augment=True):
        feature, logits = student_net(x)
        out = criterion(feature, t_feature, logits, t_logits, y, augment=augment)
        return F.cross_entropy(logits, y) + out.total

    search = sokd.PolicySearch(student_net, criterion, objective, search_epochs=1)
    assert {id(p) for p in student.parameters()} <= {id(p) for p in search.student_parameters()}
    weights = [p.detach().clone() for p in student.parameters()]
    probabilities = criterion.policy.probability.detach().clone()
    with torch.no_grad():
        t_feature, t_logits = teacher_net(x)
    assert search.step(x, y, t_feature, t_logits) is not None
    assert not torch.equal(criterion.policy.probability, probabilities)
    for before, after in zip(weights, student.parameters()):
        assert torch.equal(before, after)


def test_without_torchvision_auto_uses_a_hook_and_fx_says_what_to_install(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "torchvision" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    model = Net(4)
    assert isinstance(sokd.tap(model, "stem"), HookTap)
    with pytest.raises(ImportError, match="pip install torchvision"):
        sokd.tap(model, "stem", method="fx")


def test_auto_falls_back_to_a_hook_when_tracing_fails():
    pytest.importorskip("torchvision")

    class Branchy(Net):
        def forward(self, x):  # data-dependent control flow: torch.fx cannot trace it
            hidden = self.block(self.stem(x))
            if hidden.sum() > 0:
                hidden = hidden * 2
            return self.fc(hidden.mean((2, 3)))

    torch.manual_seed(0)
    model = Branchy(4).eval()
    x = torch.randn(2, 3, 8, 8)
    tapped = sokd.tap(model, "block")
    assert isinstance(tapped, HookTap)
    feature, output = tapped(x)
    torch.testing.assert_close(feature, model.block(model.stem(x)))
    torch.testing.assert_close(output, model(x))
