"""The backend dispatcher: environment variable, context manager, errors."""

import pytest
import torch
from memcomp.kernels import backend


def test_default_is_auto(monkeypatch):
    monkeypatch.delenv("MEMCOMP_BACKEND", raising=False)
    assert backend.current_backend() == "auto"


def test_env_var_and_context_manager_nesting(monkeypatch):
    monkeypatch.setenv("MEMCOMP_BACKEND", "reference")
    assert backend.current_backend() == "reference"
    with backend.use_backend("triton"):
        assert backend.current_backend() == "triton"
        with backend.use_backend("auto"):
            assert backend.current_backend() == "auto"
        assert backend.current_backend() == "triton"
    assert backend.current_backend() == "reference"


def test_unknown_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="not a memcomp backend"):
        with backend.use_backend("cuda"):
            pass
    monkeypatch.setenv("MEMCOMP_BACKEND", "fast")
    with pytest.raises(ValueError, match="MEMCOMP_BACKEND='fast'"):
        backend.current_backend()


def test_resolution_rules(monkeypatch):
    cpu = torch.zeros(1)
    with backend.use_backend("reference"):
        assert backend.resolve("op", cpu) == "reference"
    with backend.use_backend("auto"):
        assert backend.resolve("op", cpu) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with backend.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.resolve("op", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with backend.use_backend("triton"):
        assert backend.resolve("op", cpu) == "triton"
