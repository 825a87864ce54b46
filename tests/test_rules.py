"""FedAsync and FedBuff arithmetic against independent float64 references."""

import random

import pytest
import torch

import fastagg
from fastagg import staleness

from conftest import mlp


def _updates(P, n, gen):
    return [torch.randn(P, dtype=torch.float64, generator=gen) * 0.3 for _ in range(n)]


@pytest.mark.parametrize("K", [1, 3, 7])
def test_fedasync_batch_equals_sequential(K, rng):
    """K arrivals applied together == K sequential FedAsync steps (float64, 1e-12), versions and
    staleness included. Base versions are drawn from versions both servers materialised."""
    alpha = 0.2 + 0.7 * float(torch.rand(1, generator=rng))
    a = float(torch.rand(1, generator=rng))
    model = mlp(dtype=torch.float64)
    kw = dict(staleness=staleness.polynomial(a), max_versions=64)
    batched = fastagg.Aggregator(model, fastagg.FedAsync(alpha, batch_size=K), **kw)
    seq = fastagg.Aggregator(model, fastagg.FedAsync(alpha, batch_size=1), **kw)
    P = batched.spec.numel
    r = random.Random(int(torch.randint(0, 2**31, (1,), generator=rng)))
    n = 5 * K
    for delta in _updates(P, n, rng):
        materialised = [v for v in batched.store.versions if v <= batched.version]
        base = r.choice(materialised[-4:])
        rb = batched.submit(delta, base_version=base)
        rs = seq.submit(delta, base_version=base)
        assert rb.staleness == rs.staleness
    assert batched.version == seq.version == n
    assert batched.stats()["staleness_histogram"] == seq.stats()["staleness_histogram"]
    assert torch.allclose(batched.params, seq.params, rtol=0, atol=1e-12)


def test_fedasync_against_textbook_recursion(rng):
    model = mlp(dtype=torch.float64)
    alpha, a = 0.7, 0.5
    agg = fastagg.Aggregator(model, fastagg.FedAsync(alpha, batch_size=1),
                             staleness=staleness.polynomial(a), max_versions=64)
    theta = agg.params.clone()
    history = {0: theta.clone()}
    P = agg.spec.numel
    for i, delta in enumerate(_updates(P, 12, rng)):
        base = max(0, i - (i % 4))
        agg.submit(delta, base_version=base)
        s = i - base
        ai = alpha * (1 + s) ** -a
        theta = (1 - ai) * theta + ai * (history[base] + delta)
        history[i + 1] = theta.clone()
    assert torch.allclose(agg.params, theta, rtol=0, atol=1e-12)


@pytest.mark.parametrize("normalize", ["weights", "count"])
@pytest.mark.parametrize("sample_weighted", [False, True])
def test_fedbuff_against_hand_computed(normalize, sample_weighted, rng):
    model = mlp(dtype=torch.float64)
    K, lr = 5, 0.8
    w = staleness.hinge(2.0, 1)
    agg2 = fastagg.Aggregator(model, fastagg.FedBuff(K, server_lr=lr, normalize=normalize,
                                                     sample_weighted=sample_weighted), staleness=w)
    P = agg2.spec.numel
    theta = agg2.params.clone()
    for rnd in range(3):
        ds = _updates(P, K, rng)
        bases = [max(0, agg2.version - j) for j in range(K)]
        ns = [int(x) for x in torch.randint(1, 100, (K,), generator=rng)]
        for d, b, n in zip(ds, bases, ns):
            agg2.submit(d, base_version=b, num_samples=n)
        a = [w(rnd - b) * (n if sample_weighted else 1) for b, n in zip(bases, ns)]
        N = sum(a) if normalize == "weights" else K
        theta = theta + lr * sum(ak * d for ak, d in zip(a, ds)) / N
        assert agg2.version == rnd + 1
    assert torch.allclose(agg2.params, theta, rtol=0, atol=1e-12)


def test_fedbuff_server_momentum(rng):
    model = mlp(dtype=torch.float64)
    K, lr, beta = 3, 0.5, 0.9
    agg = fastagg.Aggregator(model, fastagg.FedBuff(K, server_lr=lr, momentum=beta), staleness="constant")
    theta = agg.params.clone()
    m = torch.zeros_like(theta)
    for rnd in range(4):
        ds = _updates(agg.spec.numel, K, rng)
        for d in ds:
            agg.submit(d, base_version=agg.version)
        m = beta * m + sum(ds) / K
        theta = theta + lr * m
    assert torch.allclose(agg.params, theta, rtol=0, atol=1e-12)


def test_flush_merges_partial_buffer(rng):
    model = mlp(dtype=torch.float64)
    agg = fastagg.Aggregator(model, fastagg.FedBuff(10, normalize="count"), staleness="constant")
    theta = agg.params.clone()
    ds = _updates(agg.spec.numel, 4, rng)
    for d in ds:
        assert agg.submit(d, base_version=0).status == "buffered"
    assert agg.version == 0 and agg.stats()["buffered"] == 4
    assert agg.flush() == 1
    assert torch.allclose(agg.params, theta + sum(ds) / 4, rtol=0, atol=1e-12)
    assert agg.stats()["merged"] == 4 and agg.stats()["buffered"] == 0


def test_max_staleness_rejects_and_counts():
    model = mlp(dtype=torch.float64)
    agg = fastagg.Aggregator(model, fastagg.FedAsync(0.5), max_staleness=2)
    for _ in range(3):
        agg.submit(torch.zeros(agg.spec.numel, dtype=torch.float64) + 0.01, base_version=agg.version)
    with pytest.raises(fastagg.errors.StaleUpdateError, match="staleness 3"):
        agg.submit(torch.zeros(agg.spec.numel, dtype=torch.float64), base_version=0)
    assert agg.stats()["rejected"] == {"too_stale": 1}
