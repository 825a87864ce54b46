"""Backend dispatch: auto picks what is available; an explicit request never falls back silently."""

import pytest
import torch

import fastagg
from fastagg import backends

from conftest import mlp


def test_explicit_unavailable_backend_raises_with_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(backends, "_cache", {})
    if torch.cuda.is_available():
        pytest.skip("a CUDA device makes triton available")
    with pytest.raises(backends.BackendUnavailable, match="no CUDA device"):
        fastagg.Aggregator(mlp(), fastagg.FedBuff(1), backend="triton")


def test_auto_on_cpu_never_picks_triton():
    assert backends.resolve("auto", "cpu") in ("cpp", "numba", "torch")
    with pytest.raises(ValueError, match="unknown backend"):
        backends.resolve("cuda-magic", "cpu")
