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

    from conftest import need_backend
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
