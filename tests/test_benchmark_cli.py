"""`python benchmarks/run.py`: it runs, checks contenders against the reference, and writes
well-formed JSON, markdown and (with matplotlib) a plot. Timings are never asserted."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"
TINY_SHAPE = "N=2,C=4,H=4,W=4,K=5"
STATUSES = {"ok", "skipped", "wrong"}
CASES = {
    "masked_feature_loss",
    "kd_loss",
    "decoupled_kd_loss",
    "interest_map",
    "feature_augment",
    "SoKDLoss step",
}
CONTENDER_FIELDS = {
    "name": str,
    "kind": str,
    "status": str,
    "reps": int,
}
NUMBER_FIELDS = ("median_s", "iqr_s", "gbps", "of_copy", "speedup_vs_eager", "speedup_vs_compile")


def run_cli(*args, timeout=600):
    # One thread: on a busy shared machine the OpenMP barriers of tiny ops otherwise wait
    # for time slices, and the run takes much longer.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(RUN), *args],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    paths = {"json": out / "run.json", "markdown": out / "run.md", "plot": out / "run.png"}
    completed = run_cli(
        "--quick",
        "--no-compile",
        "--device",
        "cpu",
        "--shape",
        TINY_SHAPE,
        "--json",
        str(paths["json"]),
        "--markdown",
        str(paths["markdown"]),
        "--plot",
        str(paths["plot"]),
    )
    assert completed.returncode == 0, completed.stderr
    return completed, paths, json.loads(paths["json"].read_text())


def check_contender(entry):
    for field, kind in CONTENDER_FIELDS.items():
        assert isinstance(entry[field], kind), (field, entry)
    assert entry["status"] in STATUSES
    if entry["status"] == "ok":
        assert entry["reason"] is None
        assert entry["reps"] >= 1
        assert isinstance(entry["median_s"], float) and entry["median_s"] > 0
        assert isinstance(entry["iqr_s"], float) and entry["iqr_s"] >= 0
        assert isinstance(entry["peak_extra_bytes"], int) and entry["peak_extra_bytes"] >= 0
    else:
        assert isinstance(entry["reason"], str) and entry["reason"]
        assert entry["reps"] == 0
        assert all(entry[field] is None for field in NUMBER_FIELDS)
    for field in NUMBER_FIELDS:
        assert entry[field] is None or isinstance(entry[field], float), (field, entry)


def test_quick_json_schema(quick_run):
    _, _, run = quick_run
    assert run["schema_version"] == 1
    assert run["machine"]["device"] == "cpu"
    assert isinstance(run["machine"]["device_name"], str) and run["machine"]["device_name"]
    assert run["settings"]["quick"] is True and run["settings"]["compile"] is False
    assert "reference" in run["backends_available"]
    assert {result["case"] for result in run["results"]} == CASES
    for result in run["results"]:
        assert result["preset"] == "custom"
        assert result["shape"] == {"n": 2, "k": 5, "c": 4, "h": 4, "w": 4, "dense": False}
        assert result["status"] == "ok", result
        names = [entry["name"] for entry in result["contenders"]]
        assert names[:2] == ["eager", "compile"]
        assert {"cpu", "cuda", "triton"} <= set(names)
        for entry in result["contenders"]:
            check_contender(entry)
        eager = result["contenders"][0]
        assert eager["status"] == "ok" and eager["speedup_vs_eager"] == 1.0
        assert result["contenders"][1]["reason"] == "left out by --no-compile"
        if result["case"] == "SoKDLoss step":
            assert result["bytes"] is None and result["copy"] is None
        else:
            assert isinstance(result["bytes"], int) and result["bytes"] > 0
            assert result["copy"]["median_s"] > 0


def test_every_available_backend_agrees_with_the_reference(quick_run):
    _, _, run = quick_run
    for result in run["results"]:
        for entry in result["contenders"]:
            # On a CPU run only the cpu backend runs; cuda and triton need CUDA tensors.
            runs_here = entry["name"] == "cpu" and "cpu" in run["backends_available"]
            if entry["kind"] == "backend" and runs_here:
                assert entry["status"] == "ok", (result["case"], entry)
            if entry["kind"] == "peer" and entry["name"].startswith("plain"):
                assert entry["status"] == "ok", (result["case"], entry)


def test_absent_contenders_are_skipped_with_a_reason(quick_run):
    _, _, run = quick_run
    kd = next(r for r in run["results"] if r["case"] == "kd_loss")
    by_name = {entry["name"]: entry for entry in kd["contenders"]}
    assert by_name["cuda"]["status"] == "skipped" and "CUDA" in by_name["cuda"]["reason"]
    assert by_name["triton"]["status"] == "skipped"
    assert by_name["Liger KLDiv"]["status"] == "skipped"


def test_table_progress_and_markdown(quick_run):
    completed, paths, run = quick_run
    assert "vs eager" in completed.stdout and "vs compile" in completed.stdout
    for case in CASES:
        assert case in completed.stdout
    assert "[1/" in completed.stderr  # progress lines
    markdown = paths["markdown"].read_text()
    assert run["machine"]["device_name"] in markdown
    assert run["date"] in markdown
    assert "| contender |" in markdown


def test_plot_or_clear_message(quick_run):
    completed, paths, _ = quick_run
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in completed.stderr
        assert not paths["plot"].exists()
    else:
        assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def benchmark_modules():
    """The benchmark helpers, which live beside run.py rather than in the sokd package."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import shapes
        import suite
        from cases import Contender
        from measure import Budget
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return shapes, suite, Contender, Budget


def test_bad_shape_stops_the_cli_with_its_reason():
    completed = run_cli("--shape", "N=2,C=4", timeout=120)
    assert completed.returncode == 2
    assert "--shape needs K" in completed.stderr


@pytest.mark.parametrize(
    "text, message",
    [
        ("N=2,K=3,C=4", "C, H and W"),
        ("N=0,K=3", "N must be > 0"),
        ("N=2,K=x", "K must be an integer"),
        ("N=2,K=3,Q=1", "'Q'"),
        ("N=2,N=3,K=1", "twice"),
        ("N=2,K=3,dense=1", "dense=1 needs H and W"),
    ],
)
def test_bad_shape_is_rejected_with_its_reason(benchmark_modules, text, message):
    shapes = benchmark_modules[0]
    with pytest.raises(ValueError, match=message):
        shapes.parse_shape(text)


def test_shape_syntax_round_trip(benchmark_modules):
    shapes = benchmark_modules[0]
    shape = shapes.parse_shape("N=8,C=16,H=8,W=4,K=10,dense=1")
    assert (shape.n, shape.c, shape.h, shape.w, shape.k, shape.dense) == (8, 16, 8, 4, 10, True)
    assert shape.logit_shape() == (8, 10, 8, 4)
    assert shapes.parse_shape("N=4096,K=32000").has_features is False


def test_a_disagreeing_contender_is_wrong_and_not_timed(benchmark_modules):
    _, suite, Contender, Budget = benchmark_modules
    expected = (torch.tensor(2.0), torch.ones(3))
    calls = []

    def off_by_a_little(inputs):
        def step():
            calls.append(1)
            return torch.tensor(2.0), torch.ones(3) * 1.01

        return step

    entry, outputs = suite.run_contender(
        Contender("off", "peer", off_by_a_little),
        {},
        expected,
        torch.device("cpu"),
        torch.float32,
        Budget(warmup=0, min_reps=3, max_reps=3, budget_s=0.0),
        1.0,
    )
    assert entry["status"] == "wrong" and "output 1" in entry["reason"]
    assert entry["median_s"] is None and outputs is None
    assert len(calls) == 1  # checked once, never timed


@pytest.mark.slow
def test_compile_contender_matches_the_reference(tmp_path):
    out = tmp_path / "run.json"
    completed = run_cli(
        "--quick", "--device", "cpu", "--shape", TINY_SHAPE, "--case", "kd_loss", "--json", str(out)
    )
    assert completed.returncode == 0, completed.stderr
    (result,) = json.loads(out.read_text())["results"]
    compiled = next(entry for entry in result["contenders"] if entry["name"] == "compile")
    assert compiled["status"] == "ok", compiled
    assert compiled["speedup_vs_compile"] == 1.0
