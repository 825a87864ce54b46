"""The fused merge (fastagg.ops.merge): every backend — the Triton kernel, the C++ and numba
kernels, the torch reference — against the sum written out in float64, on awkward sizes, every
row dtype, K = 1 and large K, in place and not; the CPU kernels' refusals of what they would read
or write out of bounds.

On the CPU the Triton kernel runs through TRITON_INTERPRET=1 (grids kept to a few hundred
programs); with FASTAGG_TEST_DEVICE=cuda it runs compiled on the GPU (the CPU kernels' cases are
then skipped: they are CI's).
"""

import pytest
import torch

from fastagg.ops import fused_merge_reference

from conftest import need_backend, rel_err, triton_kernels

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("K", [1, 37])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_fused_merge_matches_reference(K, dtype, rng, device):
    mk = triton_kernels("merge")
    P = 3001  # not a multiple of the block; 12 programs of 256
    theta = torch.randn(P, generator=rng).to(device)
    deltas = torch.randn(K, P, generator=rng).to(device, dtype)
    corr = torch.randn(K, P, generator=rng).to(device, dtype)
    store = torch.randn(5, P, generator=rng).to(device)
    c_d = torch.randn(K, generator=rng).tolist()
    c_c = torch.randn(K, generator=rng).tolist()
    idx = torch.randint(0, 5, (3,), generator=rng).tolist()
    c_v = torch.rand(3, generator=rng).tolist()
    groups = [(deltas, c_d, None), (corr, c_c, None), (store, c_v, idx)]
    out = torch.full_like(theta, float("nan"))  # poisoned: every element must be written
    mk.fused_merge(theta, 0.37, groups, out=out, block=256, unroll=4)  # K=37: 9 unrolled steps + 1
    ref = fused_merge_reference(theta.double(), 0.37, [(r.double(), c, i) for r, c, i in groups])
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-6
    out = torch.full_like(theta, float("nan"))  # the default elements per program (merge_block on CUDA)
    mk.fused_merge(theta, 0.37, groups, out=out)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-6


def test_merge_block_keeps_eight_programs_per_multiprocessor():
    """merge_block: 4096 elements per program where that fills the device 8 programs deep, smaller
    powers of two where it does not (`cnn`'s 1.1M parameters on an H100's 132 multiprocessors), 512
    at least."""
    pytest.importorskip("triton")
    merge_block = triton_kernels("merge").merge_block

    assert merge_block(11_700_000, 132) == 4096
    assert merge_block(1_105_098, 132) == 1024 and 1_105_098 / 1024 >= 8 * 132 > 1_105_098 / 2048
    assert merge_block(4096 * 8 * 132, 132) == 4096 and merge_block(4096 * (8 * 132 - 1), 132) == 2048
    assert merge_block(1000, 132) == 512


def test_triton_fused_merge_in_place_and_empty_groups(rng, device):
    mk = triton_kernels("merge")
    P = 777
    theta = torch.randn(P, generator=rng).to(device)
    rows = torch.randn(2, P, generator=rng).to(device)
    ref = fused_merge_reference(theta.double(), 1.0, [(rows.double(), [0.5, -2.0], None)])
    mk.fused_merge(theta, 1.0, [(rows, [0.5, -2.0], None), (rows, [], None)], out=theta, block=128, unroll=1)
    assert rel_err(theta, ref) < 1e-6


@pytest.mark.parametrize("K", [1, 37, 300])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_fused_merge_matches_reference(cpu_backend, K, dtype, rng):
    P = 10007  # two full 4096 blocks and a tail
    theta = torch.randn(P, generator=rng)
    deltas = torch.randn(K, P, generator=rng).to(dtype)
    corr = torch.randn(K, P, generator=rng).to(dtype)
    store = torch.randn(6, P, generator=rng)
    groups = [(deltas, torch.randn(K, generator=rng).tolist(), None),
              (corr, torch.randn(K, generator=rng).tolist(), None),
              (store, torch.rand(3, generator=rng).tolist(), torch.randint(0, 6, (3,), generator=rng).tolist())]
    out = torch.full_like(theta, float("nan"))
    cpu_backend.fused_merge(theta, -0.81, groups, out=out)
    ref = fused_merge_reference(theta.double(), -0.81, [(r.double(), c, i) for r, c, i in groups])
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-6


def test_cpu_fused_merge_in_place(cpu_backend, rng):
    theta = torch.randn(999, generator=rng)
    rows = torch.randn(3, 999, generator=rng)
    ref = fused_merge_reference(theta.double(), 0.5, [(rows.double(), [1.0, -1.0, 0.25], None)])
    cpu_backend.fused_merge(theta, 0.5, [(rows, [1.0, -1.0, 0.25], None)], out=theta)
    assert rel_err(theta, ref) < 1e-6


def test_cpu_merge_refuses_what_it_would_read_or_write_out_of_bounds(cpu_backend):
    """The kernels take raw pointers: memory elsewhere (a GPU's; "meta" stands in for it), an
    ``out`` of another size or dtype, rows shorter than the parameters are refused before a
    pointer is taken, and nothing is written (the KD and head kernels' checks: in their files)."""
    theta, rows = torch.zeros(10), torch.ones(2, 10)
    elsewhere = torch.empty(2, 10, device="meta")
    for kwargs, groups, words in [
            ({"out": torch.zeros(9)}, [(rows, [1.0], None)], "out has 9 values"),
            ({"out": torch.zeros(10, dtype=torch.float64)}, [(rows, [1.0], None)], "float32 CPU out"),
            ({"out": torch.zeros(20)[::2]}, [(rows, [1.0], None)], "contiguous float32 CPU out"),
            ({}, [(rows[:, :9], [1.0], None)], r"\[R, 10\]"),
            ({}, [(rows, [1.0], [2])], "row index out of range for 2 rows"),
            ({}, [(rows, [1.0], [-1])], "row index out of range"),
            ({}, [(rows.int(), [1.0], None)], "rows must be fp32, bf16 or fp16"),
            ({}, [(elsewhere, [1.0], None)], "meta")]:
        out = kwargs.get("out")
        before = None if out is None else out.clone()
        with pytest.raises((TypeError, ValueError, IndexError), match=words):
            cpu_backend.fused_merge(theta, 1.0, groups, **kwargs)
        assert out is None or torch.equal(out, before)


def _merge_case(r, gen, n_groups):
    """A random fused_merge call: (P, c0, groups) with groups of fp32/bf16/fp16 rows, coefficients
    as a list or a tensor, and either an index (repeats allowed) or fewer coefficients than rows
    (index None: rows 0..n-1)."""
    P = r.choice([1, 7, 1000, 4097, r.randint(1, 30000)])
    groups = []
    for _ in range(n_groups):
        R = r.randint(1, 6)
        rows = (torch.randn(R, P, generator=gen) * r.choice([1e-3, 1.0, 50.0])).to(
            r.choice([torch.float32, torch.bfloat16, torch.float16]))
        index = None if r.random() < 0.5 else [r.randrange(R) for _ in range(r.randint(1, 2 * R))]
        n = len(index) if index is not None else r.randint(1, R)
        coefs = [r.uniform(-3, 3) for _ in range(n)]
        groups.append((rows, torch.tensor(coefs) if r.random() < 0.3 else coefs, index))
    return P, r.uniform(-2, 2), groups


@pytest.mark.parametrize("backend", ["torch", "cpp", "numba", "triton"])
def test_every_backend_merges_random_groups_as_the_contract_says(backend, rng):
    """fused_merge's contract (fastagg/ops/merge.py) on random calls, against the sum written out
    in float64: c0 * theta + sum over groups and coefficients of coef * the row it names. The
    triton kernel runs through the interpreter here. A soak of such calls found the torch
    backend failing where a group had fewer coefficients than rows (index None), which the
    kernels and the argument check allow."""
    import random

    from fastagg.ops.merge import fused_merge

    if backend != "triton":
        need_backend(backend)
    r = random.Random(int(torch.randint(0, 2**31, (1,), generator=rng)))
    for case in range(12):
        P, c0, groups = _merge_case(r, rng, r.randint(0, 3))
        theta = torch.randn(P, generator=rng)
        want = c0 * theta.double()
        scale = 1.0 + float(theta.abs().max())
        for rows, coefs, index in groups:
            for j, c in enumerate([float(c) for c in coefs]):
                want += c * rows[index[j] if index is not None else j].double()
            scale += float(rows.double().abs().max()) * 3 * len(coefs)
        in_place = r.random() < 0.5
        out = fused_merge(theta, c0, groups, out=theta if in_place else None, backend=backend)
        assert (out is theta) == in_place
        err = float((out.double() - want).abs().max())
        assert err <= 1e-6 * scale, (case, P, [(g[0].shape, g[0].dtype, len(g[1]), g[2]) for g in groups], err)
    if backend in ("triton", "numba"):
        P, c0, groups = _merge_case(r, rng, 4)
        theta = torch.randn(P, generator=rng)
        with pytest.raises(ValueError, match="at most 3 row groups"):
            fused_merge(theta, c0, groups, backend=backend)
