"""A bounds check for the Triton interpreter (CI runs every Triton kernel through it).

On a GPU a masked-off lane never touches memory, and an address past a tensor's end is an illegal
access or, worse, a silent read of a neighbour's bytes; the interpreter turns each load and store
into numpy reads and writes at raw addresses, so the same mistake passes unseen unless the address
happens to be unmapped. ``install()`` wraps the interpreter's masked load, masked store and atomic
read-modify-write so that every address a lane really touches must lie inside the storage of one
of the launch's tensor arguments; anything else raises (the launch fails with an
``InterpreterError`` that says which access and how many lanes). conftest.py installs it whenever
the kernels run through the interpreter; test_interpreter_bounds.py checks that it is active.
"""

from __future__ import annotations

import numpy as np
import torch

_launches: list = []  # per launch in progress: [(first byte, one past the last byte)] of its tensors
_np_dtype = None  # the interpreter's Triton-to-numpy dtype map, bound by install()


def _checked(what, ptrs, mask):
    if not _launches:
        return
    size = np.dtype(_np_dtype(ptrs.get_element_ty())).itemsize
    addrs = ptrs.data if mask is None else ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)]
    addrs = addrs.astype(np.uint64).ravel()
    inside = np.zeros(addrs.shape, dtype=bool)
    for lo, hi in _launches[-1]:
        inside |= (addrs >= lo) & (addrs + size <= hi)
    if not inside.all():
        raise IndexError(f"out-of-bounds {what}: {int((~inside).sum())} of {addrs.size} lanes address memory "
                         f"outside every tensor argument of the kernel (first: {int(addrs[~inside][0]):#x})")


def install():
    """Wrap the interpreter's memory operations (idempotent). Fails loudly if this Triton's
    interpreter no longer has the hooks, so that the check cannot silently stop."""
    global _np_dtype
    from triton.runtime import interpreter as interp

    builder, grid = interp.InterpreterBuilder, interp.GridExecutor
    if getattr(grid, "_fastagg_bounds", False):
        return
    _np_dtype = interp._get_np_dtype
    load, store, rmw, call = (builder.create_masked_load, builder.create_masked_store, builder.create_atomic_rmw,
                              grid.__call__)

    def masked_load(self, ptrs, mask, other, *args, **kwargs):
        _checked("load", ptrs, mask)
        return load(self, ptrs, mask, other, *args, **kwargs)

    def masked_store(self, ptrs, value, mask, *args, **kwargs):
        _checked("store", ptrs, mask)
        return store(self, ptrs, value, mask, *args, **kwargs)

    def atomic_rmw(self, op, ptr, val, mask, *args, **kwargs):
        _checked("atomic", ptr, mask)
        return rmw(self, op, ptr, val, mask, *args, **kwargs)

    def launch(self, *args, **kwargs):
        spans = []
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                storage = a.untyped_storage()
                spans.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
        _launches.append(spans)
        try:
            return call(self, *args, **kwargs)
        finally:
            _launches.pop()

    builder.create_masked_load, builder.create_masked_store, builder.create_atomic_rmw = masked_load, masked_store, atomic_rmw
    grid.__call__ = launch
    grid._fastagg_bounds = True


def active() -> bool:
    from triton.runtime import interpreter as interp

    return getattr(interp.GridExecutor, "_fastagg_bounds", False)
