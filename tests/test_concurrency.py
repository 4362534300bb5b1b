"""Ops called from several Python threads at once give the results they give when called one at
a time: no backend keeps mutable state shared between calls."""

from concurrent.futures import ThreadPoolExecutor

import pytest
from backend_matrix import ALL_TARGETS, target_params
from op_workload import assert_bitwise_equal, run_every_op, seeded_inputs

import sokd

THREADS = 4
JOBS_PER_THREAD = 4
# Small calls, so that many of them overlap in time.
SIZES = {"features": (2, 8, 12, 12), "rows": 64, "classes": 20, "dense": (2, 5, 6, 6)}

# The Triton interpreter keeps the launch grid of the running kernel in global state, so two
# threads cannot interpret kernels at once; compiled Triton launches are covered on a GPU.
THREADED_TARGETS = [target for target in ALL_TARGETS if not target.interpreted]


@pytest.mark.parametrize("target", **target_params(THREADED_TARGETS))
def test_ops_from_several_threads_match_serial_results(target):
    jobs = []
    for seed in range(THREADS):
        # Every thread works on its own inputs and shapes, so results that leak from one call
        # into another cannot agree by chance.
        shrunk = dict(SIZES, rows=SIZES["rows"] - seed, classes=SIZES["classes"] - seed)
        jobs.append((seeded_inputs(shrunk, seed, target.device), seed))
    expected = [run_every_op(target.backend, inputs, augment_seed=seed) for inputs, seed in jobs]

    def work(job_index):
        inputs, seed = jobs[job_index % THREADS]
        return job_index, run_every_op(target.backend, inputs, augment_seed=seed)

    # The backend choice is process-wide; with it already set, the threads' own switches (in
    # run_every_op) only ever write this same value.
    sokd.set_backend(target.backend)
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        outcomes = list(pool.map(work, range(THREADS * JOBS_PER_THREAD)))
    for job_index, results in outcomes:
        assert_bitwise_equal(
            results, expected[job_index % THREADS], f"{target.id}, threaded job {job_index}"
        )
