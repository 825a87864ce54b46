"""Event-driven simulation of asynchronous FL: many virtual clients, one real aggregator.

Simulated wall clock. Each client has a speed drawn once from a lognormal(0, sigma) (heavy
tailed, so staleness is real); a job lasts speed * local_steps * jitter. At most
``concurrency`` clients train at once. A client that finishes sends its delta through the
real aggregator API as safetensors bytes, and an idle client pulls the latest model and starts
the next job. Every algorithm sees the same clients, partition, delay trace and seeds: the
schedule uses its own random stream, independent of the models.
"""

from __future__ import annotations

import gzip
import heapq
import json
import math
import os
import struct
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import schedules, staleness
from .aggregator import Aggregator
from .correction import KDCorrection
from .rules import FedAsync, FedBuff
from .wire import encode_update

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


# -- data ----------------------------------------------------------------------------------
def _idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_dataset(name: str, seed: int = 0):
    """(x_train, y_train, x_test, y_test) as float32 / int64 tensors."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = d.data.astype(np.float32) / 16.0, d.target.astype(np.int64)
        perm = np.random.default_rng(seed).permutation(len(y))
        x, y = x[perm], y[perm]
        n_test = len(y) // 5
        return (torch.from_numpy(x[n_test:]), torch.from_numpy(y[n_test:]),
                torch.from_numpy(x[:n_test]), torch.from_numpy(y[:n_test]))
    if name == "fashion-mnist":
        files = {k: os.path.join(FASHION_DIR, f"{k}-ubyte.gz") for k in
                 ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")}
        missing = [p for p in files.values() if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"Fashion-MNIST is not installed ({missing[0]} missing): run "
                                    "`apt-get update && apt-get install -y dataset-fashion-mnist`")
        xtr = torch.from_numpy(_idx(files["train-images-idx3"]).astype(np.float32) / 255.0).unsqueeze(1)
        xte = torch.from_numpy(_idx(files["t10k-images-idx3"]).astype(np.float32) / 255.0).unsqueeze(1)
        return (xtr, torch.from_numpy(_idx(files["train-labels-idx1"]).astype(np.int64)),
                xte, torch.from_numpy(_idx(files["t10k-labels-idx1"]).astype(np.int64)))
    raise ValueError(f"unknown dataset {name!r}; choose 'digits' or 'fashion-mnist'")


def dirichlet_split(labels, n_clients: int, alpha: float, rng: np.random.Generator):
    """Non-IID label split: each class's samples are divided among clients in proportions drawn
    from Dirichlet(alpha). Every sample goes to exactly one client; every client gets >= 1."""
    labels = np.asarray(labels)
    parts = [[] for _ in range(n_clients)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(rng.dirichlet(np.full(n_clients, alpha))) * len(idx)).astype(int)[:-1]
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].extend(chunk.tolist())
    for k in range(n_clients):  # a client with no data takes one sample from the largest
        if not parts[k]:
            donor = max(range(n_clients), key=lambda j: len(parts[j]))
            parts[k].append(parts[donor].pop())
    return [np.array(sorted(p), dtype=np.int64) for p in parts]


def make_model(dataset: str, n_in: int, n_classes: int):
    if dataset == "fashion-mnist":
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 5, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 5, stride=2), torch.nn.ReLU(),
            torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 64), torch.nn.ReLU(), torch.nn.Linear(64, n_classes))
    return torch.nn.Sequential(torch.nn.Linear(n_in, 64), torch.nn.ReLU(), torch.nn.Linear(64, n_classes))


# -- configuration -------------------------------------------------------------------------
@dataclass
class SimConfig:
    dataset: str = "digits"
    clients: int = 100
    concurrency: int = 30
    arrivals: int = 1500
    local_steps: int = 20
    batch_size: int = 16
    lr: float = 0.05
    dirichlet: float = 0.1
    sigma: float = 1.0  # spread of the lognormal client speeds
    jitter: float = 0.2  # per-job multiplicative noise (uniform 1 +- jitter)
    proxy: int = 150
    seed: int = 0
    eval_every: int = 50
    target: float = 0.8
    algorithms: tuple = ("fedasync", "fedbuff", "fedadt-async", "fedadt-buff")


def build_aggregator(algo: str, model, proxy_x, cfg: SimConfig):
    w = staleness.polynomial(0.5)
    corr = None
    if algo.startswith("fedadt"):
        corr = KDCorrection(proxy_x)
    elif algo.startswith("ablation-constant"):
        corr = KDCorrection(proxy_x, schedule=schedules.constant(1.0))
    if algo.endswith("async"):
        return Aggregator(model, FedAsync(alpha=0.6), staleness=w, correction=corr, max_versions=64, backend="torch")
    return Aggregator(model, FedBuff(buffer_size=10), staleness=w, correction=corr, max_versions=64, backend="torch")


# -- the simulation ------------------------------------------------------------------------
@dataclass
class Curve:
    algorithm: str
    time: list = field(default_factory=list)
    arrivals: list = field(default_factory=list)
    accuracy: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)


def _accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def run_one(algo: str, cfg: SimConfig, data=None, progress=None) -> Curve:
    xtr, ytr, xte, yte = data or load_dataset(cfg.dataset, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(len(ytr))
    proxy_idx, train_idx = perm[:cfg.proxy], perm[cfg.proxy:]
    parts = [train_idx[p] for p in dirichlet_split(ytr[train_idx].numpy(), cfg.clients, cfg.dirichlet, rng)]
    speeds = rng.lognormal(0.0, cfg.sigma, cfg.clients)
    torch.manual_seed(cfg.seed)
    n_in = int(np.prod(xtr.shape[1:]))
    model = make_model(cfg.dataset, n_in, int(ytr.max()) + 1)
    agg = build_aggregator(algo, model, xtr[proxy_idx], cfg)
    worker = make_model(cfg.dataset, n_in, int(ytr.max()) + 1)
    spec = agg.spec
    loss_fn = torch.nn.CrossEntropyLoss()

    sched = np.random.default_rng(cfg.seed + 1)  # the delay trace: independent of the models
    now, job_id = 0.0, 0
    events = []
    idle = list(range(cfg.clients))

    def start(t):
        nonlocal job_id
        k = idle.pop(int(sched.integers(len(idle))))
        version, flat = agg.pull(flat=True)
        duration = speeds[k] * cfg.local_steps * (1 + cfg.jitter * (2 * sched.random() - 1))
        heapq.heappush(events, (t + duration, job_id, k, version, flat))
        job_id += 1

    for _ in range(min(cfg.concurrency, cfg.clients)):
        start(0.0)
    curve = Curve(algo)
    for n in range(1, cfg.arrivals + 1):
        now, jid, k, version, base = heapq.heappop(events)
        # local SGD from the model the client pulled
        with torch.no_grad():
            for name, view in spec.unflatten(base).items():
                worker.state_dict()[name].copy_(view)
        opt = torch.optim.SGD(worker.parameters(), lr=cfg.lr)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + jid)
        data_k = parts[k]
        for _ in range(cfg.local_steps):
            b = data_k[torch.randint(len(data_k), (min(cfg.batch_size, len(data_k)),), generator=g).numpy()]
            opt.zero_grad()
            loss_fn(worker(xtr[b]), ytr[b]).backward()
            opt.step()
        delta = {name: worker.state_dict()[name] - view for name, view in spec.unflatten(base).items()}
        agg.submit(encode_update(delta, base_version=version, num_samples=len(data_k), client_id=jid))
        idle.append(k)
        start(now)
        if n % cfg.eval_every == 0 or n == cfg.arrivals:
            curve.time.append(now)
            curve.arrivals.append(n)
            curve.accuracy.append(_accuracy(agg.load_into(), xte, yte))
        if progress is not None:
            progress.update(1)
    st = agg.stats()
    curve.stats = {k: st[k] for k in ("version", "merged", "corrected", "mean_staleness", "lambda", "fallbacks")}
    return curve


def summarize(curves, target):
    rows = []
    for c in curves:
        hit = next((t for t, a in zip(c.time, c.accuracy) if a >= target), None)
        rows.append({"algorithm": c.algorithm, "final": c.accuracy[-1], "best": max(c.accuracy),
                     "time_to_target": hit, "mean_staleness": c.stats.get("mean_staleness")})
    return rows


def run(cfg: SimConfig, seeds=(0,), out_dir=None, show_progress=True):
    """Run every algorithm for every seed; write JSON + PNG under out_dir; return the results."""
    from tqdm.auto import tqdm

    results = {"config": asdict(cfg), "seeds": list(seeds), "runs": []}
    total = len(cfg.algorithms) * len(seeds) * cfg.arrivals
    with tqdm(total=total, disable=not show_progress, desc="simulate", unit="upd", mininterval=2.0) as bar:
        for seed in seeds:
            c = SimConfig(**{**asdict(cfg), "seed": seed})
            data = load_dataset(c.dataset, seed)
            for algo in cfg.algorithms:
                t0 = time.time()
                curve = run_one(algo, c, data, bar)
                results["runs"].append({**asdict(curve), "seed": seed, "wall_s": time.time() - t0})
    results["table"] = table(results, cfg.target)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        plot(results, os.path.join(out_dir, "accuracy.png"))
    return results


def table(results, target):
    rows = []
    for algo in results["config"]["algorithms"]:
        runs = [r for r in results["runs"] if r["algorithm"] == algo]
        finals = np.array([r["accuracy"][-1] for r in runs])
        bests = np.array([max(r["accuracy"]) for r in runs])
        hits = [next((t for t, a in zip(r["time"], r["accuracy"]) if a >= target), math.nan) for r in runs]
        rows.append({"algorithm": algo, "final_mean": float(finals.mean()), "final_std": float(finals.std()),
                     "best_mean": float(bests.mean()), "time_to_target_mean": float(np.mean(hits)),
                     "mean_staleness": float(np.mean([r["stats"]["mean_staleness"] for r in runs]))})
    return rows


def format_table(rows, target):
    lines = [f"{'algorithm':16s} {'final acc':>16s} {'best acc':>9s} {'time to ' + format(target, '.0%'):>14s} {'staleness':>10s}"]
    for r in rows:
        lines.append(f"{r['algorithm']:16s} {r['final_mean']:9.3f} ± {r['final_std']:.3f} {r['best_mean']:9.3f} "
                     f"{r['time_to_target_mean']:14.1f} {r['mean_staleness']:10.2f}")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for algo in results["config"]["algorithms"]:
        runs = [r for r in results["runs"] if r["algorithm"] == algo]
        t = np.mean([r["time"] for r in runs], axis=0)
        acc = np.array([r["accuracy"] for r in runs])
        ax.plot(t, acc.mean(0), label=algo)
        if len(runs) > 1:
            ax.fill_between(t, acc.mean(0) - acc.std(0), acc.mean(0) + acc.std(0), alpha=0.2)
    cfg = results["config"]
    ax.set_xlabel("simulated time")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{cfg['dataset']}: {cfg['clients']} clients, Dirichlet({cfg['dirichlet']}), "
                 f"concurrency {cfg['concurrency']}, {len(results['seeds'])} seed(s)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
