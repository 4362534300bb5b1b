"""How large is each SoKD term at the first step? A table for choosing the loss weights.

For unit-variance random features of several shapes and for untrained torchvision ResNet
pairs (when torchvision is installed), it prints the mean over seeds of the unweighted terms
(feat, dam, logit) and of the cross-entropy, with both feature normalisations:

    python examples/loss_terms.py              # 3 seeds
    python examples/loss_terms.py --seeds 1    # a smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics

import torch
import torch.nn.functional as F

from sokd import SoKDLoss, tap

RANDOM_SHAPES = ((64, 256, 8, 8), (128, 512, 16, 16), (256, 512, 7, 7))  # Cs, Ct, H, W
RESNET_PAIRS = (("resnet18", "resnet50", "layer2"), ("resnet18", "resnet34", "layer3"))
BATCH, CLASSES, IMAGE = 16, 10, 64


def terms(criterion: SoKDLoss, inputs: tuple) -> dict[str, float]:
    criterion.train()
    student_feature, teacher_feature, student_logits, teacher_logits, labels = inputs
    out = criterion(student_feature, teacher_feature, student_logits, teacher_logits, labels)
    values = {name: float(out.components[name]) for name in ("feat", "dam", "logit")}
    values["ce"] = float(F.cross_entropy(student_logits.detach(), labels))
    values["rms"] = float(teacher_feature.pow(2).mean().sqrt())
    return values


def random_case(shape: tuple[int, int, int, int], normalize: str, seed: int) -> dict:
    student_channels, teacher_channels, height, width = shape
    torch.manual_seed(seed)
    criterion = SoKDLoss(student_channels, teacher_channels, logit_loss="kd", normalize=normalize)
    inputs = (
        torch.randn(BATCH, student_channels, height, width),
        torch.randn(BATCH, teacher_channels, height, width),
        torch.randn(BATCH, CLASSES),
        3 * torch.randn(BATCH, CLASSES),  # a confident teacher
        torch.randint(0, CLASSES, (BATCH,)),
    )
    return terms(criterion, inputs)


def resnet_case(pair: tuple[str, str, str], normalize: str, seed: int) -> dict:
    from torchvision import models

    student_name, teacher_name, layer = pair
    torch.manual_seed(seed)
    teacher = getattr(models, teacher_name)(num_classes=CLASSES).eval()
    student = getattr(models, student_name)(num_classes=CLASSES)
    images = torch.randn(BATCH, 3, IMAGE, IMAGE)
    labels = torch.randint(0, CLASSES, (BATCH,))
    criterion = SoKDLoss.from_models(
        student, teacher, student_layer=layer, teacher_layer=layer,
        example_input=images[:2], logit_loss="kd", normalize=normalize,
    )
    with torch.no_grad():
        teacher_feature, teacher_logits = tap(teacher, layer)(images)
    student_feature, student_logits = tap(student, layer)(images)
    inputs = (student_feature, teacher_feature, student_logits, teacher_logits, labels)
    return terms(criterion, inputs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    cases = [(f"random, C {s[0]}->{s[1]}, {s[2]}x{s[3]}", random_case, s) for s in RANDOM_SHAPES]
    if importlib.util.find_spec("torchvision") is not None:
        for pair in RESNET_PAIRS:
            label = f"untrained {pair[0]} -> {pair[1]}, {pair[2]}, {IMAGE}x{IMAGE} input"
            cases.append((label, resnet_case, pair))
    print("| features | teacher RMS | feat (elements) | feat (mask) | dam | logit (KD) | CE |")
    print("|---|---|---|---|---|---|---|")
    for label, run, case in cases:
        means = {}
        for normalize in ("elements", "mask"):
            rows = [run(case, normalize, seed) for seed in range(args.seeds)]
            for key in rows[0]:
                means[(normalize, key)] = statistics.mean(row[key] for row in rows)
        print(
            f"| {label} | {means[('mask', 'rms')]:.2g} | {means[('elements', 'feat')]:.3g} | "
            f"{means[('mask', 'feat')]:.3g} | {means[('mask', 'dam')]:.3g} | "
            f"{means[('mask', 'logit')]:.3g} | {means[('mask', 'ce')]:.2f} |"
        )


if __name__ == "__main__":
    main()
