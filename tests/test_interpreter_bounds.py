"""The interpreter's bounds check (tests/interpreter_bounds.py), which every Triton test on the
CPU relies on: it must be active, and it must refuse what a GPU would read or write out of
bounds."""

import os

import pytest
import torch


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the bounds check is the interpreter's")
def test_interpreter_refuses_a_lane_that_reads_or_writes_past_its_tensor():
    """Under the interpreter every address a lane touches must lie inside one of the launch's
    tensors (tests/interpreter_bounds.py, installed by conftest): a mask one element too wide
    fails the launch, on a load and on a store, and the same kernel within bounds runs."""
    import triton
    import triton.language as tl
    from interpreter_bounds import active

    @triton.jit
    def copy(x, y, n_load, n_store, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        tl.store(y + o, tl.load(x + o, mask=o < n_load), mask=o < n_store)

    assert active()
    x, y = torch.randn(8), torch.zeros(8)
    copy[(1,)](x, y, 8, 8, BLOCK=16)
    assert torch.equal(x, y)
    for n_load, n_store, what in ((9, 8, "load"), (8, 9, "store")):
        with pytest.raises(Exception, match=f"out-of-bounds {what}: 1 of 9 lanes"):
            copy[(1,)](x, y, n_load, n_store, BLOCK=16)
