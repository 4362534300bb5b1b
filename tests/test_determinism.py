"""Bitwise reproducibility: losses, gradients, interest maps and augmentations (same draws,
same noise seed) are identical from one run to the next.

docs/robustness.md lists which ops are deterministic without
torch.use_deterministic_algorithms; the thread-count test backs its claim for the CPU.
"""

import pytest
import torch
from backend_matrix import ALL_TARGETS, target_params
from op_workload import (
    AUGMENT_SEQUENCES,
    LARGE,
    TINY,
    assert_bitwise_equal,
    run_augmentations,
    run_every_op,
    seeded_inputs,
)

from sokd.augment_ops import AFFINE_OPS

# Native CPU kernels only: PyTorch's own CPU reductions (the reference) split their work by
# thread count, and the Triton interpreter runs on numpy, not on the intra-op thread pool.
NATIVE_CPU_TARGETS = [target for target in ALL_TARGETS if target.backend == "cpu"]


def sizes_for(target):
    return TINY if target.interpreted else LARGE


@pytest.fixture
def deterministic_algorithms():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("target", **target_params(ALL_TARGETS))
def test_every_op_is_bitwise_reproducible_under_deterministic_algorithms(
    target, deterministic_algorithms
):
    inputs = seeded_inputs(sizes_for(target), seed=1, device=target.device)
    first = run_every_op(target.backend, inputs)
    second = run_every_op(target.backend, inputs)
    assert_bitwise_equal(second, first, f"{target.id}, second run")


@pytest.mark.parametrize("target", **target_params(NATIVE_CPU_TARGETS))
def test_cpu_results_do_not_depend_on_the_thread_count(target):
    inputs = seeded_inputs(sizes_for(target), seed=2, device=target.device)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run_every_op(target.backend, inputs)
        torch.set_num_threads(4)
        several = run_every_op(target.backend, inputs)
    finally:
        torch.set_num_threads(threads)
    assert_bitwise_equal(several, single, f"{target.id}, 4 threads against 1")


@pytest.mark.parametrize("target", **target_params(ALL_TARGETS))
def test_a_different_augment_seed_changes_the_random_ops(target):
    """Guards the two tests above: the random ops really draw from the seed they are given."""
    inputs = seeded_inputs(sizes_for(target), seed=3, device=target.device)
    first = run_augmentations(target.backend, inputs, seed=0)
    other = run_augmentations(target.backend, inputs, seed=1)
    for sequence in AUGMENT_SEQUENCES:
        if not set(sequence) <= AFFINE_OPS:
            assert not torch.equal(first[sequence][0], other[sequence][0]), (
                f"{target.id}: augmentation {sequence} ignores its seed"
            )
