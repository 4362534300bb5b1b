"""The `step` preset of benchmarks/run.py: whole training steps, each mode against KD.

    python benchmarks/run.py --preset step --threads 1 --markdown step.md

One step is what a training loop pays per batch: the teacher's forward pass under no_grad
(every mode but the student alone), the student's forward and backward passes, the loss and an
SGD step. The networks are RepDistiller's resnet32x4 teacher and resnet8x4 student (written in
cifar_resnets.py) on a CIFAR-100 batch of 64, with the hint at 256 ch @ 8x8 (stage 3) and at
128 ch @ 16x16 (stage 2). Modes:

- student alone: cross-entropy;
- KD: cross-entropy + KD (T = 4);
- FitNet + KD: KD plus the mean squared error between the hints (the channels match, so no
  regressor);
- SoKD, fixed policy: cross-entropy + SoKDLoss with its defaults and the KD logit term, the
  policy frozen (sampled and applied, not searched);
- SoKD search + student step: the same loss while searching, through `PolicySearch.backward`
  with the teacher run once per step and its outputs passed to the objective.

The steps of all modes and both hints run interleaved, one of each per round, so that load
from other processes falls on every mode alike; each mode's time is the median over the
rounds. On a CPU both the process CPU time (all threads together) and the wall time are kept:
with one thread CPU time is the stable measure; with several, wall time is what a user waits.
Each ratio is to the KD step of the same hint, within the same run.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from cifar_resnets import resnet8x4, resnet32x4

import sokd

PRESET = "step"
MODES = (
    "student alone",
    "KD",
    "FitNet + KD",
    "SoKD, fixed policy",
    "SoKD search + student step",
)
BASELINE = "KD"
# The stage whose output is the hint: 256 ch @ 8x8 after stage 3, 128 ch @ 16x16 after stage 2.
HINT_STAGES = (2, 1)
TEMPERATURE = 4.0
FITNET_WEIGHT = 100.0


@dataclass(frozen=True)
class Setting:
    batch: int
    widths: tuple[int, int, int, int]
    classes: int
    warmup_rounds: int
    rounds: int


FULL = Setting(batch=64, widths=(32, 64, 128, 256), classes=100, warmup_rounds=1, rounds=7)
# Narrow networks and one round: checks that every mode runs, in seconds.
QUICK = Setting(batch=2, widths=(4, 8, 8, 16), classes=10, warmup_rounds=0, rounds=1)


def _sgd(parameters):
    return torch.optim.SGD(parameters, lr=0.05, momentum=0.9, weight_decay=5e-4)


def make_steps(
    setting: Setting, stage: int, device: torch.device
) -> tuple[str, dict[str, Callable[[], torch.Tensor]], dict]:
    """(hint name, {mode: one training step}, details of the SoKD set-up) for the hint after
    `stage`. Every mode trains its own student from the same initial weights; the teacher and
    the batch are shared."""
    torch.manual_seed(0)
    teacher = resnet32x4(setting.classes, setting.widths).to(device).eval()
    x = torch.randn(setting.batch, 3, 32, 32, device=device)
    y = torch.randint(0, setting.classes, (setting.batch,), device=device)

    def teacher_outputs():
        with torch.no_grad():
            features, logits = teacher(x)
        return features[stage], logits

    def fresh_student():
        torch.manual_seed(1)
        return resnet8x4(setting.classes, setting.widths).to(device)

    def train(optimizer, loss):
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    steps = {}
    student_alone = fresh_student()
    alone_optimizer = _sgd(student_alone.parameters())

    def alone():
        _, logits = student_alone(x)
        return train(alone_optimizer, F.cross_entropy(logits, y))

    steps["student alone"] = alone

    kd_student = fresh_student()
    kd_optimizer = _sgd(kd_student.parameters())

    def kd():
        _, teacher_logits = teacher_outputs()
        _, logits = kd_student(x)
        loss = F.cross_entropy(logits, y) + sokd.ops.kd_loss(logits, teacher_logits, TEMPERATURE)
        return train(kd_optimizer, loss)

    steps["KD"] = kd

    fitnet_student = fresh_student()
    fitnet_optimizer = _sgd(fitnet_student.parameters())

    def fitnet():
        teacher_feature, teacher_logits = teacher_outputs()
        features, logits = fitnet_student(x)
        loss = (
            F.cross_entropy(logits, y)
            + sokd.ops.kd_loss(logits, teacher_logits, TEMPERATURE)
            + FITNET_WEIGHT * F.mse_loss(features[stage], teacher_feature)
        )
        return train(fitnet_optimizer, loss)

    steps["FitNet + KD"] = fitnet

    channels = setting.widths[stage + 1]
    fixed_student = fresh_student()
    fixed_criterion = sokd.SoKDLoss(channels, channels, logit_loss="kd").to(device)
    fixed_criterion.policy.requires_grad_(False)
    fixed_optimizer = _sgd(
        list(fixed_student.parameters())
        + [p for p in fixed_criterion.parameters() if p.requires_grad]
    )

    def fixed():
        teacher_feature, teacher_logits = teacher_outputs()
        features, logits = fixed_student(x)
        sokd_loss = fixed_criterion(features[stage], teacher_feature, logits, teacher_logits, y)
        return train(fixed_optimizer, F.cross_entropy(logits, y) + sokd_loss.total)

    steps["SoKD, fixed policy"] = fixed

    search_student = fresh_student()
    search_criterion = sokd.SoKDLoss(channels, channels, logit_loss="kd").to(device)

    def objective(x, y, teacher_feature, teacher_logits, augment=True):
        features, logits = search_student(x)
        sokd_loss = search_criterion(
            features[stage], teacher_feature, logits, teacher_logits, y, augment=augment
        )
        return F.cross_entropy(logits, y) + sokd_loss.total

    search = sokd.PolicySearch(search_student, search_criterion, objective)
    search_optimizer = _sgd(search.student_parameters())

    def search_step():
        teacher_feature, teacher_logits = teacher_outputs()
        search_optimizer.zero_grad()
        losses = search.backward(x, y, teacher_feature, teacher_logits)
        search_optimizer.step()
        return losses.train_loss

    steps["SoKD search + student step"] = search_step
    shape = teacher_outputs()[0].shape
    details = {
        "hypergradient": search.hypergradient,
        "head_parameters": sum(p.numel() for p in search_criterion.head.parameters()),
    }
    return f"{shape[1]}@{shape[2]}x{shape[3]}", steps, details


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(steps: dict, setting: Setting, device: torch.device) -> dict:
    """{key: {"cpu_s": [...], "wall_s": [...]}}: every step once per round, interleaved. The
    order rotates from round to round, so no mode always runs right after the same one."""
    keys = list(steps)
    for _ in range(setting.warmup_rounds):
        for key in keys:
            steps[key]()
    samples = {key: {"cpu_s": [], "wall_s": []} for key in keys}
    for round_index in range(setting.rounds):
        shift = round_index % len(keys)
        for key in keys[shift:] + keys[:shift]:
            _synchronize(device)
            cpu, wall = time.process_time(), time.perf_counter()
            loss = steps[key]()
            _synchronize(device)
            samples[key]["cpu_s"].append(time.process_time() - cpu)
            samples[key]["wall_s"].append(time.perf_counter() - wall)
            if not torch.isfinite(loss):
                raise RuntimeError(f"{key}: the loss is {float(loss)}")
        print(f"[round {round_index + 1}/{setting.rounds}]", file=sys.stderr, flush=True)
    return samples


def results(samples: dict, device: torch.device) -> list[dict]:
    rows = []
    for hint in dict.fromkeys(hint for hint, _ in samples):
        baseline = samples[(hint, BASELINE)]
        for mode in MODES:
            entry = {"hint": hint, "mode": mode, **samples[(hint, mode)]}
            for measure_name in ("cpu_s", "wall_s"):
                median = statistics.median(entry[measure_name])
                entry[f"median_{measure_name}"] = median
                entry[f"{measure_name[:-2]}_ratio_to_kd"] = median / statistics.median(
                    baseline[measure_name]
                )
            if device.type == "cuda":
                # The host's CPU time says nothing about the GPU's work.
                entry.update(cpu_s=None, median_cpu_s=None, cpu_ratio_to_kd=None)
            rows.append(entry)
    return rows


def _table(rows, markdown):
    header = ["mode", "CPU s", "CPU ratio to KD", "wall s", "wall ratio to KD"]

    def number(value, pattern):
        return "-" if value is None else pattern.format(value)

    lines = []
    for hint in dict.fromkeys(row["hint"] for row in rows):
        body = [
            [
                row["mode"],
                number(row["median_cpu_s"], "{:.3f}"),
                number(row["cpu_ratio_to_kd"], "{:.2f}"),
                number(row["median_wall_s"], "{:.3f}"),
                number(row["wall_ratio_to_kd"], "{:.2f}"),
            ]
            for row in rows
            if row["hint"] == hint
        ]
        if markdown:
            lines += [f"### hint {hint}", "", "| " + " | ".join(header) + " |"]
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(cells) + " |" for cells in body]
        else:
            widths = [max(len(r[i]) for r in body + [header]) for i in range(len(header))]
            lines.append(f"hint {hint}")
            for cells in [header] + body:
                lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)))
        lines.append("")
    return "\n".join(lines)


def _load_text(load):
    return "unknown" if load is None else f"{load:.1f}"


def main(args, command: str, device_name: str) -> int:
    """Runs the preset with run.py's parsed `args`; `command` reproduces the measurement."""
    if len(args.preset) > 1 or args.shape or args.cases:
        print(
            "--preset step runs on its own: without other presets, --shape or --case",
            file=sys.stderr,
        )
        return 2
    if args.dtype != "float32":
        print("--preset step runs in float32 only", file=sys.stderr)
        return 2
    setting = QUICK if args.quick else FULL
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    steps, details = {}, {}
    for stage in HINT_STAGES:
        hint, mode_steps, details[hint] = make_steps(setting, stage, args.device)
        steps.update(((hint, mode), step) for mode, step in mode_steps.items())
    rows = results(measure(steps, setting, args.device), args.device)
    run = {
        "preset": PRESET,
        "date": started,
        "machine": {
            "device": args.device.type,
            "device_name": device_name,
            "threads": torch.get_num_threads() if args.device.type == "cpu" else None,
            "load_average_1min_before": load_before,
            "load_average_1min_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "software": {
            "sokd": sokd.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "settings": {
            "batch": setting.batch,
            "widths": list(setting.widths),
            "classes": setting.classes,
            "warmup_rounds": setting.warmup_rounds,
            "rounds": setting.rounds,
            "sokd": details,
        },
        "results": rows,
    }
    print(_table(rows, markdown=False))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(run, out, indent=1)
    if args.markdown:
        machine = run["machine"]
        with open(args.markdown, "w") as out:
            out.write(
                f"# Whole training steps against KD\n\n```bash\n{command}\n```\n\n"
                f"{started}; {device_name}; {machine['threads']} thread(s); load average "
                f"{_load_text(machine['load_average_1min_before'])} before, "
                f"{_load_text(machine['load_average_1min_after'])} after; "
                f"torch {torch.__version__}, "
                f"sokd {sokd.__version__}. Batch {setting.batch}, median of {setting.rounds} "
                f"interleaved rounds after {setting.warmup_rounds} warm-up round(s). SoKD "
                f"set-up per hint: {json.dumps(details)}.\n\n"
                + _table(rows, markdown=True)
            )
    return 0
