"""`python benchmarks/run.py`: it runs, checks contenders against the reference, and writes
well-formed JSON, markdown and (with matplotlib) a plot. Timings are never asserted."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sokd

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
        assert entry["unstable"] is None or "measured 3 times" in entry["unstable"]
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
    assert run["machine"]["threads"] == 1  # one torch thread unless --threads says otherwise
    assert run["machine"]["cores"] == os.cpu_count()
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


@pytest.mark.slow
def test_threads_option_reaches_torch(tmp_path):
    out = tmp_path / "run.json"
    completed = run_cli(
        "--quick", "--no-compile", "--device", "cpu", "--shape", TINY_SHAPE, "--case",
        "kd_loss", "--threads", "2", "--json", str(out), timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(out.read_text())["machine"]["threads"] == 2


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


@pytest.fixture
def measure_and_report():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import measure
        import report
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return measure, report


def test_a_wide_spread_is_measured_again_then_flagged(measure_and_report, monkeypatch):
    measure, _ = measure_and_report
    monkeypatch.setattr(measure, "load_problem", lambda: None)
    durations = iter([0.001, 0.02] * 100)  # every other run 20 times slower
    calls = []

    def step():
        calls.append(1)
        time.sleep(next(durations))

    budget = measure.Budget(warmup=0, min_reps=4, max_reps=4, budget_s=0.0)
    timing = measure.time_step(step, torch.device("cpu"), budget)
    assert len(calls) == 3 * 4  # three measurements of four runs
    assert timing.unstable.startswith("spread (IQR)") and "measured 3 times" in timing.unstable
    steady = measure.time_step(lambda: None, torch.device("cpu"), budget)
    assert steady.unstable is None or "spread" not in steady.unstable


def test_a_busy_machine_makes_every_timing_unstable(measure_and_report, monkeypatch):
    measure, _ = measure_and_report
    cores = os.cpu_count()
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 1.5, 0.0, 0.0))
    assert measure.load_problem() == f"load average {cores + 1.5:.1f} above {cores} cores"
    budget = measure.Budget(warmup=0, min_reps=2, max_reps=2, budget_s=0.0)
    timing = measure.time_step(lambda: None, torch.device("cpu"), budget)
    assert "above" in timing.unstable
    monkeypatch.setattr(os, "getloadavg", lambda: (cores - 0.5, 0.0, 0.0))
    assert measure.load_problem() is None


def _entry(name, median_s, unstable=None, vs_eager=None):
    return {
        "name": name, "kind": "backend", "status": "ok", "reason": None, "reps": 5,
        "median_s": median_s, "iqr_s": median_s / 10, "unstable": unstable,
        "peak_extra_bytes": 0, "gbps": None, "of_copy": None,
        "speedup_vs_eager": vs_eager, "speedup_vs_compile": None,
    }


def test_ratios_from_unstable_timings_carry_the_warning(measure_and_report):
    _, report = measure_and_report
    run = {
        "date": "today", "schema_version": 1,
        "machine": {"device": "cpu", "device_name": "test cpu", "threads": 1, "cores": 2,
                    "load_average_1min": 7.0},
        "software": {"sokd": "0", "torch": "0", "python": "3"},
        "settings": {"dtype": "float32", "quick": True},
        "backends_available": ["reference"],
        "results": [{
            "preset": "p", "case": "kd_loss", "status": "ok", "has_backward": True,
            "copy": None, "bytes": None,
            "shape": {"n": 1, "k": 2, "c": None, "h": None, "w": None, "dense": False},
            "contenders": [
                _entry("eager", 2e-3, unstable="load average 7.0 above 2 cores", vs_eager=1.0),
                _entry("cpu", 1e-3, vs_eager=2.0),
            ],
        }],
    }
    table = report.text_table(run)
    assert "2.00x !" in table  # a steady contender against an unstable baseline
    assert "! eager: unstable timing, load average 7.0 above 2 cores" in table
    assert "WARNING: load average 7.0 above 2 cores when the run started" in table
    markdown = report.markdown(run, "python benchmarks/run.py")
    assert "| 2.00x ! |" in markdown and "- ! eager: unstable timing" in markdown
    run["results"][0]["contenders"][0]["unstable"] = None
    run["machine"]["load_average_1min"] = 0.5
    calm = report.text_table(run)
    assert " !" not in calm.split("is marked !", 1)[1] and "WARNING" not in calm
    assert "2.00x" in calm


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


@pytest.mark.skipif("cpu" not in sokd.available_backends(), reason="sokd._C was not built")
def test_router_overhead_compares_the_two_cpu_keys():
    """The router benchmark runs the op with and without the router at the CPU key and prints
    one row per call kind (its timings are not asserted)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "router_overhead.py"), "--rows", "2",
         "--classes", "5", "--calls", "20", "--rounds", "1"],
        capture_output=True, text=True, check=True, timeout=300,
    )
    rows = [line.split("|")[1].strip() for line in result.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| call")]
    assert rows == ["forward, no grad", "forward, with grad", "backward"]
