"""`python benchmarks/run.py --preset step`: in tiny form (narrow networks, one round) it runs
every mode at both hints and writes well-formed JSON and markdown; and the hypergradient
accuracy script runs in tiny form. Timings are never asserted."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODES = [
    "student alone",
    "KD",
    "FitNet + KD",
    "SoKD, fixed policy",
    "SoKD search + student step",
]


@pytest.fixture(scope="module")
def run_main():
    """run.py's main, imported in this process: the preset's quick form then takes about a
    second instead of a fresh interpreter's start-up."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return run.main


@pytest.fixture(scope="module")
def quick_step(run_main, tmp_path_factory):
    out = tmp_path_factory.mktemp("step")
    paths = {"json": out / "step.json", "markdown": out / "step.md"}
    capture = pytest.MonkeyPatch()
    stdout = out / "stdout.txt"
    with open(stdout, "w") as sink:
        capture.setattr(sys, "stdout", sink)
        try:
            code = run_main(
                [
                    "--preset",
                    "step",
                    "--quick",
                    "--device",
                    "cpu",
                    "--json",
                    str(paths["json"]),
                    "--markdown",
                    str(paths["markdown"]),
                ]
            )
        finally:
            capture.undo()
    assert code == 0
    return stdout.read_text(), paths, json.loads(paths["json"].read_text())


def test_every_mode_at_both_hints(quick_step):
    _, _, run = quick_step
    assert run["preset"] == "step"
    assert run["machine"]["threads"] >= 1
    assert run["settings"]["rounds"] == 1
    hints = list(dict.fromkeys(row["hint"] for row in run["results"]))
    # The quick networks keep the stage layout: the deepest stage at 8x8, the one before at
    # 16x16.
    assert [hint.split("@")[1] for hint in hints] == ["8x8", "16x16"]
    for hint in hints:
        rows = [row for row in run["results"] if row["hint"] == hint]
        assert [row["mode"] for row in rows] == MODES
        for row in rows:
            assert len(row["cpu_s"]) == 1 and len(row["wall_s"]) == 1
            assert row["median_wall_s"] > 0 and row["median_cpu_s"] >= 0
            expected = row["median_wall_s"] / rows[1]["median_wall_s"]
            assert row["wall_ratio_to_kd"] == pytest.approx(expected)
        assert rows[1]["wall_ratio_to_kd"] == 1.0
    for details in run["settings"]["sokd"].values():
        assert details["hypergradient"] in ("central", "forward", "exact")
        assert details["head_parameters"] > 0


def test_table_and_markdown(quick_step):
    stdout, paths, run = quick_step
    markdown = paths["markdown"].read_text()
    assert "python benchmarks/run.py --preset step --quick --device cpu\n" in markdown
    assert "--json" not in markdown
    for mode in MODES:
        assert f"| {mode} |" in markdown
        assert mode in stdout
    assert run["date"] in markdown
    assert "ratio to KD" in stdout


def test_step_preset_runs_alone(run_main, capsys):
    assert run_main(["--preset", "step", "--preset", "cifar", "--quick"]) == 2
    assert "runs on its own" in capsys.readouterr().err


def test_hypergradient_accuracy_script(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import hypergradient
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "hypergradient.md"
    assert hypergradient.main(["--draws", "2", "--size", "4", "--markdown", str(out)]) == 0
    markdown = out.read_text()
    assert "python benchmarks/hypergradient.py --draws 2 --size 4\n" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith(("| relu", "| smooth"))]
    # Two students, two dtypes, two differences, two radii.
    assert len(rows) == 16
    assert "median CPU time" in capsys.readouterr().out
