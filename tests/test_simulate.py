"""The simulator: split, determinism, and the missing-data message."""

import re

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from fastagg import simulate  # noqa: E402


@pytest.mark.parametrize("alpha", [0.05, 0.5, 100.0])
def test_dirichlet_split_covers_every_sample_once(alpha):
    rng = np.random.default_rng(int(np.random.default_rng().integers(1 << 30)))
    labels = rng.integers(0, 10, size=1237)
    parts = simulate.dirichlet_split(labels, 57, alpha, rng)
    allidx = np.concatenate(parts)
    assert len(parts) == 57 and all(len(p) > 0 for p in parts)
    assert np.array_equal(np.sort(allidx), np.arange(len(labels)))


def test_small_dirichlet_alpha_is_non_iid():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=5000)
    skew = lambda parts: np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])
    skewed, even = (skew(simulate.dirichlet_split(labels, 20, a, rng)) for a in (0.1, 100.0))
    assert skewed > 0.5 > even


def test_small_simulation_is_deterministic_and_learns():
    cfg = simulate.SimConfig(clients=12, concurrency=4, arrivals=120, local_steps=10, eval_every=40, proxy=40, lr=0.1,
                             algorithms=("fedbuff", "fedadt-async"))
    a = simulate.run(cfg, seeds=(3,), show_progress=False)
    b = simulate.run(cfg, seeds=(3,), show_progress=False)
    assert [r["accuracy"] for r in a["runs"]] == [r["accuracy"] for r in b["runs"]]
    assert [r["time"] for r in a["runs"]] == [r["time"] for r in b["runs"]]  # the same delay trace
    assert a["runs"][0]["time"] == a["runs"][1]["time"]  # ... for every algorithm
    assert all(r["accuracy"][-1] > 0.3 for r in a["runs"])  # 10 classes: chance is 0.1
    assert a["runs"][1]["stats"]["mean_staleness"] > 0


def test_missing_fashion_mnist_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(simulate, "FASHION_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        simulate.load_dataset("fashion-mnist")


def test_delay_model_staleness_distribution():
    """Closed system with c jobs in flight: every arrival overtakes, on average, the c - 1 others,
    so FedAsync's mean staleness is c - 1 (FedBuff's (c - 1) / K); with equal speeds and no
    jitter every arrival has exactly that staleness; heavier-tailed speeds spread it out."""
    c, n_clients = 20, 300
    base = dict(clients=n_clients, concurrency=c, arrivals=6000, seed=5)
    rng = np.random.default_rng(0)
    speeds = rng.lognormal(0.0, 1.0, n_clients)
    s = simulate.trace_staleness(simulate.SimConfig(**base, sigma=1.0), speeds)[500:]
    assert abs(s.mean() - (c - 1)) < 0.05 * (c - 1)
    p50, p90, p99 = np.percentile(s, [50, 90, 99])
    assert p50 < s.mean() < p90 < p99  # right-skewed: a few very slow jobs see many versions pass
    s_buff = simulate.trace_staleness(simulate.SimConfig(**base, sigma=1.0), speeds, versions_per_arrival=0.1)[500:]
    assert abs(s_buff.mean() - (c - 1) / 10) < 0.1 * (c - 1) / 10
    equal = simulate.trace_staleness(simulate.SimConfig(**base, sigma=0.0, jitter=0.0), np.ones(n_clients))[c:]
    assert np.all(equal == c - 1)
    heavy = simulate.trace_staleness(simulate.SimConfig(**base, sigma=2.0), rng.lognormal(0.0, 2.0, n_clients))[500:]
    assert np.percentile(heavy, 99) / max(np.percentile(heavy, 50), 1) > p99 / max(p50, 1)


def test_fedasync_concurrency_one_zero_delay_is_sequential_sgd():
    """One client at a time, FedAsync with alpha = 1 and constant weights: the global model is
    exactly the result of training the clients one after another (sequential SGD)."""
    cfg = simulate.SimConfig(clients=8, concurrency=1, arrivals=12, local_steps=4, sigma=0.0, jitter=0.0, alpha=1.0,
                             weights="constant", proxy=20, eval_every=12, lr=0.1, algorithms=("fedasync",))
    data = simulate.load_dataset("digits", cfg.seed)
    curve = simulate.run_one("fedasync", cfg, data)
    xtr, ytr = data[0], data[1]
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(len(ytr))
    train_idx = perm[cfg.proxy:]
    parts = [train_idx[p] for p in simulate.dirichlet_split(ytr[train_idx].numpy(), cfg.clients, cfg.dirichlet, rng)]
    speeds = rng.lognormal(0.0, cfg.sigma, len(parts))
    torch.manual_seed(cfg.seed)
    model = simulate.make_model("digits", 64, 10)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    for kind, jid, k, _ in simulate.delay_trace(cfg, speeds):
        if kind != "finish":
            continue
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + jid)
        for _ in range(cfg.local_steps):
            b = parts[k][torch.randint(len(parts[k]), (min(cfg.batch_size, len(parts[k])),), generator=g).numpy()]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xtr[b]), ytr[b]).backward()
            opt.step()
    got = curve.aggregator.pull()[1]
    for name, value in model.state_dict().items():
        assert torch.allclose(got[name], value, atol=1e-6), name
    assert curve.aggregator.stats()["staleness_histogram"] == {0: 12}


def test_two_thousand_clients_run():
    """Scale: N = 2,000 virtual clients, 200 training at once (clients hold only indices)."""
    cfg = simulate.SimConfig(dataset="mnist1d", clients=2000, concurrency=200, arrivals=300, local_steps=2,
                             eval_every=300, proxy=100, algorithms=("fedbuff",))
    res = simulate.run(cfg, show_progress=False)
    run = res["runs"][0]
    assert run["stats"]["merged"] == 300 and run["stats"]["mean_staleness"] > 5


def test_algorithm_options_reach_the_correction_and_typos_are_refused():
    from fastagg.simulate import SimConfig, build_aggregator

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    cfg = SimConfig()
    agg = build_aggregator("fedadt-buff/precision=bf16,conv=native,steps=2,T=2", model, torch.randn(6, 4), None, cfg)
    c = agg.correction
    assert (c.precision, c.conv, c.steps, c.temperature) == ("bf16", "native", 2, 2.0)
    assert c.engine.precision == "bf16"
    with pytest.raises(ValueError, match="unknown correction options"):
        build_aggregator("fedadt-buff/precison=bf16", model, torch.randn(6, 4), None, cfg)
    with pytest.raises(ValueError, match="precision must be"):
        build_aggregator("fedadt-buff/precision=fp16", model, torch.randn(6, 4), None, cfg)



def test_updates_option_sends_and_holds_16_bit_deltas():
    """'/updates=bf16' on any algorithm: the simulated clients encode bf16 and the aggregator
    holds them so; a run through it learns like the fp32 run (same seed, tiny data)."""
    from fastagg.simulate import SimConfig, build_aggregator, run_one

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    cfg = SimConfig()
    for algo, dtype in (("fedbuff/updates=bf16", torch.bfloat16), ("fedadt-async/updates=fp16,steps=2", torch.float16),
                        ("fedasync", torch.float32)):
        agg = build_aggregator(algo, model, torch.randn(6, 4), None, cfg)
        assert agg.delta_dtype == dtype and agg._deltas.dtype == dtype, algo
    agg = build_aggregator("fedadt-async/updates=fp16,steps=2", model, torch.randn(6, 4), None, cfg)
    assert agg.correction.steps == 2
    with pytest.raises(ValueError, match="updates must be fp32, bf16 or fp16"):
        build_aggregator("fedbuff/updates=int8", model, torch.randn(6, 4), None, cfg)
    with pytest.raises(ValueError, match="takes no correction options"):
        build_aggregator("fedbuff/updates=bf16,steps=2", model, torch.randn(6, 4), None, cfg)
    cfg = SimConfig(dataset="digits", clients=20, concurrency=5, arrivals=120, eval_every=60, proxy=50)
    acc = {a: run_one(a, cfg).accuracy[-1] for a in ("fedbuff", "fedbuff/updates=bf16")}
    assert acc["fedbuff/updates=bf16"] > 0.4 and abs(acc["fedbuff/updates=bf16"] - acc["fedbuff"]) < 0.05, acc


@pytest.mark.parametrize("args, words", [(["--clients", "0"], "clients must be an int >= 1"),
                                         (["--concurrency", "0"], "concurrency must be an int >= 1"),
                                         (["--arrivals", "-5"], "arrivals must be an int >= 1"),
                                         (["--dropout", "1.5"], r"dropout must be in \[0.0, 1.0\)"),
                                         (["--seeds", "0"], "seeds must be >= 1"),
                                         (["--target", "2"], "target must be an accuracy")])
def test_simulate_refuses_settings_that_cannot_run_with_a_one_line_error(args, words, capsys):
    """Zero clients, a concurrency of 0 or negative arrivals ended in an IndexError traceback;
    a dropout of 1.5 or no seeds ran nothing. Now: exit 2 and what was wrong, before any work."""
    from fastagg import cli

    assert cli.main(["simulate", *args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert re.search(words, err) and "Traceback" not in err
