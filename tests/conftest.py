import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before any test
# module imports sokd.kernels. Without a GPU the interpreter is the only way to run them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sokd


@pytest.fixture(autouse=True)
def restore_backend():
    """Tests that switch backends must not leak the choice into the next test."""
    previous = sokd.get_backend()
    yield
    sokd.set_backend(previous)
