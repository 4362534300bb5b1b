"""sokd.integrations: the mdistiller-style Distiller, and torchdistill's own training loop
driven by the YAML configuration documented in docs/integrations.md."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sokd import SoKDLoss
from sokd.integrations.mdistiller import Distiller

ROOT = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    """A two-stage CNN with ResNet-like names: layer1, layer2, fc."""

    def __init__(self, width, classes=10):
        super().__init__()
        self.layer1 = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.layer2 = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(x)).mean((2, 3)))


def make_distiller(search_epochs):
    torch.manual_seed(0)
    student, teacher = Net(4), Net(8)
    x = torch.randn(8, 3, 8, 8)
    criterion = SoKDLoss.from_models(
        student, teacher, student_layer="layer2", teacher_layer="layer2", example_input=x[:2],
        logit_loss="kd", normalize="mask", w_feat=1.0, w_dam=10.0,
    )
    distiller = Distiller(student, teacher, criterion, student_layer="layer2",
                          teacher_layer="layer2", search_epochs=search_epochs)
    return distiller, x, torch.randint(0, 10, (8,))


def test_distiller_follows_the_mdistiller_contract():
    distiller, x, y = make_distiller(search_epochs=0)
    distiller.train()
    assert distiller.student.training and not distiller.teacher.training
    logits, losses = distiller(image=x, target=y, epoch=1)
    assert set(losses) == {"loss_ce", "loss_sokd"}
    torch.testing.assert_close(losses["loss_ce"], F.cross_entropy(logits, y))
    assert losses["loss_sokd"].dim() == 0 and losses["loss_sokd"].requires_grad
    sum(losses.values()).backward()
    connector_weight = distiller.criterion.connector[0].weight
    assert connector_weight.grad is not None
    distiller.eval()
    torch.testing.assert_close(distiller(image=x), distiller.student(x))
    # One entry per tensor: the taps are not registered a second time.
    keys = list(distiller.state_dict())
    assert all(k.split(".")[0] in {"student", "teacher", "criterion"} for k in keys)


def test_distiller_parameters_leave_the_policy_to_the_search():
    distiller, _, _ = make_distiller(search_epochs=1)
    learnable = {id(p) for p in distiller.get_learnable_parameters()}
    assert {id(p) for p in distiller.student.parameters()} <= learnable
    assert {id(p) for p in distiller.criterion.head.parameters()} <= learnable
    assert {id(p) for p in distiller.criterion.connector.parameters()} <= learnable
    assert not {id(p) for p in distiller.criterion.policy.parameters()} & learnable
    assert not {id(p) for p in distiller.teacher.parameters()} & learnable
    assert distiller.get_extra_parameters() == sum(
        p.numel() for p in distiller.criterion.parameters()
    )


def test_distiller_searches_while_the_epoch_count_says_so():
    distiller, x, y = make_distiller(search_epochs=1)
    probability = distiller.criterion.policy.probability
    before = probability.detach().clone()
    distiller.train()
    distiller(image=x, target=y, epoch=1)
    assert not torch.equal(probability, before)  # a policy step ran
    assert distiller.search.searching
    distiller(image=x, target=y, epoch=2)  # the new epoch ends the search
    assert not distiller.search.searching
    after_search = probability.detach().clone()
    distiller(image=x, target=y, epoch=2)
    assert torch.equal(probability, after_search)


def yaml_block():
    text = (ROOT / "docs" / "integrations.md").read_text()
    (block,) = re.findall(r"```yaml\n(.*?)```", text, re.S)
    return block


def test_torchdistill_trains_with_the_documented_configuration(tmp_path):
    pytest.importorskip("yaml", reason="torchdistill's configuration loader needs PyYAML")
    pytest.importorskip("torchdistill", reason="the torchdistill integration needs torchdistill")
    from torchdistill.common import yaml_util
    from torchdistill.core.distillation import get_distillation_box

    from sokd.integrations.torchdistill import SoKDStudent

    path = tmp_path / "sokd.yaml"
    path.write_text(yaml_block())
    train_config = yaml_util.load_yaml_file(str(path))["train"]
    # The documented channels are ResNet-18's and ResNet-50's; these models are smaller.
    wrapper_kwargs = train_config["student"]["auxiliary_model_wrapper"]["kwargs"]
    wrapper_kwargs.update(student_channels=4, teacher_channels=8)
    train_config["train_data_loader"]["kwargs"]["batch_size"] = 8
    torch.manual_seed(0)
    student, teacher = Net(4), Net(8)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,)))
    box = get_distillation_box(
        teacher, student, {"train": data}, train_config, torch.device("cpu"), None, False, 1.0
    )
    wrapper = box.student_model
    assert isinstance(wrapper, SoKDStudent)
    criterion = wrapper.criterion
    optimized = {id(p) for group in box.optimizer.param_groups for p in group["params"]}
    for module in (student, criterion.connector, criterion.head):
        assert {id(p) for p in module.parameters()} <= optimized
    assert not {id(p) for p in criterion.policy.parameters()} & optimized
    watched = {
        "student": student.layer1[0].weight,
        "connector": criterion.connector[0].weight,
        "head": next(criterion.head.parameters()),
        "policy": criterion.policy.probability,
    }
    losses = []
    for epoch in range(train_config["num_epochs"]):
        box.pre_epoch_process(epoch=epoch)
        before = {name: p.detach().clone() for name, p in watched.items()}
        for images, labels, supp_dict in box.train_data_loader:
            loss = box.forward_process(images, labels, supp_dict)
            assert loss.dim() == 0 and torch.isfinite(loss)
            losses.append(loss.item())
            box.post_forward_process(loss=loss)
        box.post_epoch_process()
        for name in ("student", "connector", "head"):
            assert not torch.equal(watched[name], before[name]), (epoch, name)
        if epoch == 0:
            assert not torch.equal(watched["policy"], before["policy"])  # searched
            assert not wrapper.search.searching  # one search epoch, then frozen
        else:
            assert torch.equal(watched["policy"], before["policy"])
    assert len(losses) == 4


def test_torchdistill_loss_says_how_to_configure_the_student():
    pytest.importorskip("torchdistill", reason="the torchdistill integration needs torchdistill")
    from sokd.integrations.torchdistill import SoKDTorchdistillLoss

    loss = SoKDTorchdistillLoss(teacher_feature={"module_path": "layer2", "io": "output"})
    with pytest.raises(KeyError, match="auxiliary_model_wrapper key 'SoKDStudent'"):
        loss({".": {"output": torch.zeros(1, 3)}}, {}, torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="teacher_feature must be a dict with module_path and io"):
        SoKDTorchdistillLoss(teacher_feature="layer2")
