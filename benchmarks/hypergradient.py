"""How far the finite-difference hypergradients of PolicySearch are from the exact one.

    python benchmarks/hypergradient.py --draws 20 --markdown hypergradient.md

The magnitudes' term of the policy gradient, -eta * d/dM (grad_w L_train(w) . v), taken three
ways on the same search step (same weights, batch, policy sample and random draws):
"exact" (double backward), "central" ((G+ - G-) / 2R at w +- R v) and "forward"
((G+ - G) / R), for radii r = R ||v||. Each draw is a fresh student, teacher, batch and policy
sample; draws whose sample applies no op have no magnitude term and are skipped. The error of
a draw is ||fd - exact|| / ||exact||; the table gives its median and quartiles over the draws.

Two students: ReLU (conv-BN-ReLU twice, the kind of network distillation trains, with the
default SoKDLoss: DAM loss on, mutual weight map) and a smooth control (tanh, the DAM loss off
and the teacher's weight map, so that no kink or jump lies between the probes). The exact
mode differentiates twice, so everything runs on the reference backend.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import sokd

RADII = (0.01, 0.001)
MODES = ("central", "forward")
CHANNELS, TEACHER_CHANNELS, CLASSES = 8, 8, 10
# Affine ops and the rest of the defaults: sub-policies whose draws replay exactly.
SUB_POLICIES = sokd.policy.DEFAULT_SUB_POLICIES


class Student(nn.Module):
    def __init__(self, activation):
        super().__init__()
        self.conv1 = nn.Conv2d(3, CHANNELS, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(CHANNELS)
        self.conv2 = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(CHANNELS)
        self.classifier = nn.Linear(CHANNELS, CLASSES)
        self.activation = activation

    def forward(self, x):
        hidden = self.activation(self.norm1(self.conv1(x)))
        feature = self.activation(self.norm2(self.conv2(hidden)))
        return feature, self.classifier(feature.mean(dim=(2, 3)))


def magnitude_term(draw, model, mode, radius, dtype, size):
    """The magnitudes' gradient of one search step, or None if the sample applies no op."""
    torch.manual_seed(draw)
    smooth = model == "smooth"
    student = Student(torch.tanh if smooth else F.relu).to(dtype)
    teacher = nn.Sequential(nn.Conv2d(3, TEACHER_CHANNELS, 3, padding=1), nn.ReLU()).to(dtype)
    head = nn.Linear(TEACHER_CHANNELS, CLASSES).to(dtype)
    criterion = sokd.SoKDLoss(
        CHANNELS,
        TEACHER_CHANNELS,
        policy=sokd.FeaturePolicy(sub_policies=SUB_POLICIES),
        logit_loss="kd",
        k=4,
        w_dam=0.0 if smooth else 1000.0,
        mask_mode="teacher" if smooth else "mutual",
        generator=torch.Generator().manual_seed(draw),
    ).to(dtype)
    generator = torch.Generator().manual_seed(10_000 + draw)
    x = torch.randn(16, 3, size, size, generator=generator, dtype=dtype)
    y = torch.randint(0, CLASSES, (16,), generator=generator)
    with torch.no_grad():
        teacher_feature = teacher(x)
        teacher_logits = head(teacher_feature.mean(dim=(2, 3)))

    def objective(x, y, teacher_feature, teacher_logits, augment=True):
        feature, logits = student(x)
        out = criterion(feature, teacher_feature, logits, teacher_logits, y, augment=augment)
        return F.cross_entropy(logits, y) + out.total

    search = sokd.PolicySearch(
        student, criterion, objective, hypergradient=mode, radius=radius
    )
    started = time.process_time()
    gradients = search.step(x, y, teacher_feature, teacher_logits).policy_gradients
    seconds = time.process_time() - started
    sample = criterion.policy.sample
    if not sample.bits[sample.index].any():
        return None, seconds
    return gradients["magnitude"], seconds


def quartiles(values):
    if len(values) < 2:
        return values[0], values[0], values[0]
    low, median, high = statistics.quantiles(values, n=4)
    return low, median, high


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--size", type=int, default=8, help="height and width of the maps")
    parser.add_argument("--markdown", metavar="PATH")
    args = parser.parse_args(argv)
    sokd.set_backend("reference")
    rows, seconds = [], {}
    for model in ("relu", "smooth"):
        for dtype in (torch.float64, torch.float32):
            exact = {}
            for draw in range(args.draws):
                value, spent = magnitude_term(draw, model, "exact", 0.01, dtype, args.size)
                seconds.setdefault("exact", []).append(spent)
                if value is not None and value.norm() > 0:
                    exact[draw] = value
            for mode in MODES:
                for radius in RADII:
                    errors = []
                    for draw, reference in exact.items():
                        value, spent = magnitude_term(draw, model, mode, radius, dtype, args.size)
                        seconds.setdefault(mode, []).append(spent)
                        errors.append(float((value - reference).norm() / reference.norm()))
                    low, median, high = quartiles(errors)
                    dtype_name = str(dtype).removeprefix("torch.")
                    rows.append((model, dtype_name, mode, radius, len(errors), low, median, high))
                    print(rows[-1], file=sys.stderr, flush=True)
    lines = [
        "| student | dtype | mode | r | draws | 25% | median | 75% |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, dtype, mode, radius, count, low, median, high in rows:
        lines.append(
            f"| {model} | {dtype} | {mode} | {radius:g} | {count} | {low:.2g} | {median:.2g} "
            f"| {high:.2g} |"
        )
    timing = ", ".join(
        f"{mode} {statistics.median(values) * 1e3:.0f} ms" for mode, values in seconds.items()
    )
    table = "\n".join(lines)
    print(table)
    print(f"median CPU time of one search step: {timing}")
    if args.markdown:
        given = list(sys.argv[1:] if argv is None else argv)
        if "--markdown" in given:
            at = given.index("--markdown")
            del given[at : at + 2]
        given = [arg for arg in given if not arg.startswith("--markdown=")]
        command = " ".join(["python benchmarks/hypergradient.py"] + given)
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(args.markdown, "w") as out:
            out.write(
                "# Finite-difference hypergradients against the exact one\n\n"
                f"```bash\n{command}\n```\n\n{started}; torch {torch.__version__}, reference "
                f"backend, maps {args.size}x{args.size}, batch 16. Relative error "
                "||fd - exact|| / ||exact|| of the magnitudes' term, quartiles over the draws."
                f"\n\n{table}\n\nMedian CPU time of one search step on this small model: "
                f"{timing}.\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
