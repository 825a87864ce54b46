"""Backend dispatch for the fused ops (DESIGN.md section 3).

``backend="auto"``: triton for CUDA tensors, else cpp if the extension was built, else numba,
else torch. Asking for a backend that is not available raises ``BackendUnavailable`` with the
reason; fastagg never falls back silently from an explicitly requested backend.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("torch", "triton", "cpp", "numba")
_OPS = ("fused_merge", "kd_loss_grad", "stage_row")
_MODULES = {"fused_merge": "merge", "kd_loss_grad": "kd_loss", "stage_row": "stage"}  # fastagg.ops / .kernels


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def _probe(name):
    """(available, reason) for a backend on this machine."""
    if name == "torch":
        return True, "always available"
    if name == "triton":
        try:
            importlib.import_module("triton")
        except Exception as exc:  # ImportError, or a broken install
            return False, f"triton cannot be imported: {exc}"
        if torch.cuda.is_available():
            return True, "CUDA device present"
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, "CPU tensors through TRITON_INTERPRET=1 (slow; for tests)"
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU for tests)"
    if name in ("cpp", "numba"):
        try:
            mod = importlib.import_module(f"fastagg.cpu_{name}")
        except Exception as exc:
            return False, f"fastagg.cpu_{name} cannot be imported: {exc}"
        return mod.available()
    return False, f"unknown backend {name!r}"


def available() -> dict:
    return {name: _probe(name) for name in BACKENDS}


_warned: set = set()


def resolve(backend: str, device, dtype=torch.float32) -> str:
    """The concrete backend for ``backend`` on ``device``. "auto" warns once when it has to pass
    over the C++ kernels on a CPU (naming why), and uses torch for float64 parameters (the
    kernels accumulate in fp32)."""
    device = torch.device(device)
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {('auto',) + BACKENDS}")
        return backend
    if dtype == torch.float64:
        return "torch"
    order = ("triton", "torch") if device.type == "cuda" else ("cpp", "numba", "torch")
    for name in order:
        ok, _ = _probe(name)
        if ok:
            if name != order[0] and order[0] not in _warned:
                _warned.add(order[0])
                warnings.warn(f"fastagg: {order[0]} kernels unavailable ({_probe(order[0])[1]}); using {name}",
                              RuntimeWarning, stacklevel=3)
            return name
    return "torch"


def _impl(op, name):
    if name == "torch":
        return getattr(importlib.import_module(f"fastagg.ops.{_MODULES[op]}"), f"{op}_reference")
    if name == "triton":
        if op == "stage_row":  # host memory: the CPU backends' op
            raise BackendUnavailable("stage_row stages host memory: use a CPU backend (cpp, numba or torch)")
        return getattr(importlib.import_module(f"fastagg.kernels.{_MODULES[op]}"), op)
    mod = importlib.import_module(f"fastagg.cpu_{name}")
    return getattr(mod, op)


_cache: dict = {}


def cpu_threads() -> int:
    """The C++ kernels' OpenMP threads (1 when the extension is not built)."""
    ok, _ = _probe("cpp")
    return importlib.import_module("fastagg.cpu_cpp").max_threads() if ok else 1


def get(op: str, backend: str, device):
    name = resolve(backend, device)
    key = (op, name)
    if key not in _cache:
        ok, why = _probe(name)
        if not ok:
            raise BackendUnavailable(f"backend {name!r} is not available: {why}")
        _cache[key] = _impl(op, name)
    return _cache[key]
