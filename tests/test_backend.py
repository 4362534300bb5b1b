"""Backend selection: names, the environment variable, auto fallback, and clear errors."""

import dataclasses
import warnings

import pytest
import torch

import sokd
from sokd import _backend, ops


def not_built():
    raise ImportError("sokd.not_built_here")


def replace_backend(monkeypatch, name, **fields):
    """Swap one record of the backend table for the test, with a fresh load cache."""
    record = dataclasses.replace(_backend.BACKENDS[name], **fields)
    monkeypatch.setitem(_backend.BACKENDS, name, record)
    monkeypatch.setattr(_backend, "_loaded", {})


def kd_call():
    return ops.kd_loss(torch.randn(3, 5), torch.randn(3, 5))


def test_reference_is_always_available():
    assert "reference" in sokd.available_backends()
    assert "auto" not in sokd.available_backends()


def test_environment_variable_selects_the_backend(monkeypatch):
    monkeypatch.setattr(_backend, "_selected", None)
    monkeypatch.setenv("SOKD_BACKEND", "reference")
    assert sokd.get_backend() == "reference"
    assert _backend.resolve("kd_loss", torch.device("cpu")) is sokd.reference


def test_set_backend_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("SOKD_BACKEND", "reference")
    sokd.set_backend("auto")
    assert sokd.get_backend() == "auto"


def test_named_backend_on_the_wrong_device_is_an_error():
    sokd.set_backend("cuda")
    with pytest.raises(ValueError, match="backend 'cuda' cannot run kd_loss on cpu tensors"):
        kd_call()


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    sokd.set_backend("triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kd_call()


def test_unavailable_named_backend_is_an_error_not_a_fallback(monkeypatch):
    replace_backend(monkeypatch, "cpu", load=not_built)
    sokd.set_backend("cpu")
    with pytest.raises(RuntimeError, match="backend 'cpu' is not available"):
        kd_call()
    assert "cpu" not in sokd.available_backends()


def test_auto_falls_back_to_reference_with_one_warning(monkeypatch):
    replace_backend(monkeypatch, "cpu", load=not_built)
    monkeypatch.setattr(_backend, "_warned_fallback", False)
    sokd.set_backend("auto")
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    with pytest.warns(RuntimeWarning, match="reference"):
        loss = ops.kd_loss(s, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.kd_loss(s, t)
    sokd.set_backend("reference")
    torch.testing.assert_close(loss, ops.kd_loss(s, t))


def test_module_missing_an_op_is_unavailable(monkeypatch):
    import sokd.augment_ops

    replace_backend(monkeypatch, "cpu", load=lambda: sokd.augment_ops)
    assert _backend._load("cpu") is None
    assert "does not provide" in _backend._load_errors["cpu"]


def test_dispatch_traces_under_torch_compile_fullgraph():
    sokd.set_backend("reference")
    student = torch.randn(4, 3, 6, 6, requires_grad=True)
    teacher, mask = torch.randn(4, 3, 6, 6), torch.rand(4, 6, 6)

    def losses(s, t, m):
        logits = s.mean(dim=(2, 3))
        count = ops.interest_map(t[:, :1], t[:, 1:].abs(), t[:, 1:].abs(), k=3)[0]
        return ops.masked_feature_loss(s, t, m * count) + ops.kd_loss(logits, t.mean(dim=(2, 3)))

    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(student, teacher, mask), losses(student, teacher, mask))


def test_available_backends_are_the_built_ones_that_run_here(monkeypatch):
    built = sokd.built_backends()
    assert "reference" in built and "auto" not in built
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert sokd.available_backends() == [n for n in built if n in ("reference", "cpu")]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    expected = [n for n in built if n in ("reference", "cpu", "triton")]
    assert sokd.available_backends() == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert sokd.available_backends() == built


def test_backend_table_names_every_backend_and_its_sources():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    assert tuple(_backend.BACKENDS) == _backend.BACKEND_NAMES[1:]
    for name, backend in _backend.BACKENDS.items():
        assert backend.name == name
        for path in backend.registered_in:
            assert (root / path).exists(), f"{name} cites missing {path}"
    for op, order in _backend.AUTO_ORDER["cuda"].items():
        assert op in _backend.OPS and set(order) <= set(_backend.BACKENDS)


def test_backend_devices_follow_the_table(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _backend.BACKENDS["reference"].runs_on("meta")
    assert not _backend.BACKENDS["cpu"].runs_on("cuda")
    assert not _backend.BACKENDS["triton"].runs_on("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.BACKENDS["triton"].runs_on("cpu")
    assert not _backend.BACKENDS["cuda"].runs_on("cpu")
