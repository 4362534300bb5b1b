"""Two gloo processes train SoKDLoss + PolicySearch under DistributedDataParallel: the ranks
see different data and draw different policy samples, yet stay in step."""

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import sokd

WORLD_SIZE = 2
STEPS = 3
SEARCH_STEPS = 2


class Distilled(nn.Module):
    """The student and the SoKD criterion in one module, so that DDP synchronises the
    connector and the DAM head along with the student."""

    def __init__(self, student, criterion):
        super().__init__()
        self.student = student
        self.criterion = criterion

    def forward(self, x, y, teacher_feature, teacher_logits, augment=True):
        feature, logits = self.student(x)
        sokd_loss = self.criterion(
            feature, teacher_feature, logits, teacher_logits, y, augment=augment
        )
        return F.cross_entropy(logits, y) + sokd_loss.total


class Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.classifier = nn.Linear(4, 5)

    def forward(self, x):
        feature = self.features(x)
        return feature, self.classifier(feature.mean(dim=(2, 3)))


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _train(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    try:
        torch.manual_seed(0)  # identical initial weights on both ranks
        teacher = nn.Conv2d(1, 6, 3, padding=1)
        criterion = sokd.SoKDLoss(
            4, 6, k=2, logit_loss="kd", generator=torch.Generator().manual_seed(100 + rank)
        )
        model = DistributedDataParallel(
            Distilled(Student(), criterion), find_unused_parameters=True
        )

        def objective(x, y, teacher_feature, teacher_logits, augment=True):
            return model(x, y, teacher_feature, teacher_logits, augment=augment)

        search = sokd.PolicySearch(model, criterion, objective, search_epochs=1)
        optimizer = torch.optim.SGD(search.student_parameters(), lr=0.05, momentum=0.9)
        data = torch.Generator().manual_seed(rank)
        for step in range(STEPS):
            if step == SEARCH_STEPS:
                search.end_epoch()  # the last steps run with the frozen policy
            x = torch.randn(4, 1, 6, 6, generator=data)
            y = torch.randint(0, 5, (4,), generator=data)
            with torch.no_grad():
                teacher_feature = teacher(x)
                teacher_logits = teacher_feature.mean(dim=(2, 3))[:, :5]
            search.step(x, y, teacher_feature, teacher_logits)
            loss = objective(x, y, teacher_feature, teacher_logits)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        torch.save(
            {
                "policy": criterion.policy.state_dict(),
                "weights": [p.detach() for p in search.student_parameters()],
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes with their own torch start-up
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_ranks_stay_in_step(tmp_path):
    initial_policy = sokd.FeaturePolicy().state_dict()
    mp.spawn(_train, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE))
    for name, value in first["policy"].items():
        assert torch.equal(value, second["policy"][name]), name
    for mine, theirs in zip(first["weights"], second["weights"]):
        assert torch.equal(mine, theirs)
    # The search did move the policy, so equality is not the trivial kind.
    assert not torch.equal(first["policy"]["probability"], initial_policy["probability"])
