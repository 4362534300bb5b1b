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
