"""`python benchmarks/run.py --preset step`: in tiny form (narrow networks, one round) it runs
every mode at both hints and writes well-formed JSON and markdown. Timings are never asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"
MODES = [
    "student alone",
    "KD",
    "FitNet + KD",
    "SoKD, fixed policy",
    "SoKD search + student step",
]


def run_cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(RUN), *args],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def quick_step(tmp_path_factory):
    out = tmp_path_factory.mktemp("step")
    paths = {"json": out / "step.json", "markdown": out / "step.md"}
    completed = run_cli(
        "--preset",
        "step",
        "--quick",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--json",
        str(paths["json"]),
        "--markdown",
        str(paths["markdown"]),
    )
    assert completed.returncode == 0, completed.stderr
    return completed, paths, json.loads(paths["json"].read_text())


def test_every_mode_at_both_hints(quick_step):
    _, _, run = quick_step
    assert run["preset"] == "step"
    assert run["machine"]["threads"] == 1
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
    completed, paths, run = quick_step
    markdown = paths["markdown"].read_text()
    assert "python benchmarks/run.py --preset step --quick --device cpu --threads 1" in markdown
    assert "--json" not in markdown
    for mode in MODES:
        assert f"| {mode} |" in markdown
        assert mode in completed.stdout
    assert run["date"] in markdown
    assert "ratio to KD" in completed.stdout


def test_step_preset_runs_alone():
    completed = run_cli("--preset", "step", "--preset", "cifar", "--quick")
    assert completed.returncode == 2
    assert "runs on its own" in completed.stderr
