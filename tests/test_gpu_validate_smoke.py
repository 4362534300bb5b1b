"""benchmarks/validate_gpu.py without a GPU: a smoke run that skips, says why, and still writes
its summary; and its parity checks, run on the CPU backends at tiny shapes."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "validate_gpu.py"
STAGES = ["build", "parity", "sanitizer", "large", "compile", "benchmark", "tests"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs the real stages")
def test_smoke_run_without_gpu_skips_every_stage_and_writes_the_summary(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "gpu-validation.json").read_text())
    assert summary["finished"] is True
    assert [stage["name"] for stage in summary["stages"]] == STAGES
    for stage in summary["stages"]:
        assert stage["status"] == "skipped"
        assert "needs a GPU" in stage["detail"]
    markdown = (tmp_path / "gpu-validation.md").read_text()
    assert "none (smoke run)" in markdown
    for name in STAGES:
        assert f"| {name} | skipped |" in markdown


def test_one_stage_can_be_chosen_and_the_summary_lists_only_it(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--stage", "parity"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    summary = json.loads((tmp_path / "gpu-validation.json").read_text())
    assert [stage["name"] for stage in summary["stages"]] == ["parity"]
    assert done.returncode == (0 if summary["stages"][0]["status"] in ("passed", "skipped") else 1)


@pytest.mark.slow
def test_parity_checks_pass_on_the_cpu_backends_at_tiny_shapes():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--worker", "parity", "--worker-device", "cpu", "--tiny"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "torch.float16 tiny-dense:" in done.stdout
    assert "FAIL" not in done.stdout
