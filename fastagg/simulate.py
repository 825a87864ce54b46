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
import numbers
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

FASHION_DIR = os.environ.get("FASTAGG_FASHION_DIR", "/usr/share/datasets/fashion-mnist")


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
    if name == "mnist1d":
        return _mnist1d(seed)
    if name.startswith("synthetic"):
        x, y, _users = synthetic_fedprox(*_synthetic_params(name), seed=seed)
        return x["train"], y["train"], x["test"], y["test"]
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")


DATASETS = ("digits", "fashion-mnist", "mnist1d", "synthetic(1,1)")


def _synthetic_params(name):
    if name == "synthetic":
        return 1.0, 1.0
    try:
        a, b = name[len("synthetic("):-1].split(",")
        return float(a), float(b)
    except ValueError:
        raise ValueError(f"write the FedProx synthetic data set as synthetic(alpha,beta), got {name!r}") from None


def _mnist1d(seed):
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise FileNotFoundError("MNIST-1D needs the mnist1d package: pip install mnist1d") from None
    state = np.random.get_state()  # make_dataset reseeds numpy's global generator
    try:
        args = get_dataset_args()
        args.seed = seed
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
    return (torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["y"], dtype=torch.int64),
            torch.tensor(d["x_test"], dtype=torch.float32), torch.tensor(d["y_test"], dtype=torch.int64))


def synthetic_fedprox(alpha=1.0, beta=1.0, users=30, dim=60, classes=10, seed=0):
    """FedProx Synthetic(alpha, beta) (Li et al. 2020), non-IID by construction. Returns
    ({'train','test'} -> x), ({'train','test'} -> y), and each training sample's user."""
    rng = np.random.default_rng(seed)
    sizes = (rng.lognormal(4, 2, users)).astype(int) + 50
    sigma = np.array([(j + 1) ** -1.2 for j in range(dim)])
    xs, ys, us = {"train": [], "test": []}, {"train": [], "test": []}, []
    for k in range(users):
        u_k = rng.normal(0, alpha)
        b_k = rng.normal(0, beta)
        v_k = rng.normal(b_k, 1, dim)
        W = rng.normal(u_k, 1, (dim, classes))
        b = rng.normal(u_k, 1, classes)
        x = rng.normal(v_k, np.sqrt(sigma), (sizes[k], dim))
        y = np.argmax(x @ W + b, axis=1)
        n_train = int(0.9 * sizes[k])
        xs["train"].append(x[:n_train]), ys["train"].append(y[:n_train])
        xs["test"].append(x[n_train:]), ys["test"].append(y[n_train:])
        us.extend([k] * n_train)
    cat = lambda d, dt: {s: torch.tensor(np.concatenate(v), dtype=dt) for s, v in d.items()}
    return cat(xs, torch.float32), cat(ys, torch.int64), np.array(us)


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
    if dataset.startswith("fashion"):
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
    dropout: float = 0.0  # probability that a finished job's update is lost
    alpha: float = 0.6  # FedAsync mixing
    buffer: int = 10  # FedBuff buffer size
    weights: str = "polynomial"  # staleness weights: polynomial (a = 0.5) or constant
    partition: str = "dirichlet"  # or "natural" (FedProx synthetic: one client per user)
    seed: int = 0
    eval_every: int = 50
    target: float = 0.8
    algorithms: tuple = ("fedasync", "fedbuff", "fedadt-async", "fedadt-buff")
    device: str = "cpu"  # where the models, the data and the aggregator live ("cuda": fastagg's GPU kernels)

    def __post_init__(self):
        for name in ("clients", "concurrency", "arrivals", "local_steps", "batch_size", "eval_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name, lo, hi in (("dropout", 0.0, 1.0), ("jitter", 0.0, 1.0)):  # [lo, hi)
            v = getattr(self, name)
            if not lo <= v < hi:
                raise ValueError(f"{name} must be in [{lo}, {hi}), got {v!r}")
        if not 0.0 <= self.target <= 1.0:
            raise ValueError(f"target must be an accuracy in [0, 1], got {self.target!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")


def parse_algorithm(name: str):
    """'fedasync' | 'fedbuff' | 'fedadt-async' | 'fedadt-buff', optionally followed by
    '/key=value,...' overrides. Every algorithm takes ``updates`` (fp32 | bf16 | fp16: the dtype
    clients send their deltas in, and the aggregator's delta_dtype). FedADT also takes the
    correction's: schedule (constant, linear_warmup, exp_saturation, sigmoid, teacher_confidence,
    teacher_accuracy), lam, student, factor (grows | none), step, rho, eta, steps, T, and the
    engine's precision (fp32 | bf16) and conv route (native | loop | triton | triton_cl | torch;
    fastagg.engine lists them all).
    Returns (rule, correction options or None, the update dtype or None)."""
    base, _, opts = name.partition("/")
    if base not in ("fedasync", "fedbuff", "fedadt-async", "fedadt-buff"):
        raise ValueError(f"unknown algorithm {name!r}")
    rule = "async" if base.endswith("async") else "buff"
    kw = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        kw[key] = value
    updates = kw.pop("updates", None)
    if updates not in (None, "fp32", "bf16", "fp16"):
        raise ValueError(f"updates must be fp32, bf16 or fp16, got {updates!r} in {name!r}")
    if not base.startswith("fedadt"):
        if kw:
            raise ValueError(f"{base} takes no correction options: {name!r}")
        return rule, None, updates
    return rule, kw, updates


def _schedule(name, lam, horizon):
    h = max(horizon, 1)
    return {"constant": lambda: schedules.constant(lam),
            "linear_warmup": lambda: schedules.linear_warmup(lam, max(1, h // 4)),
            "exp_saturation": lambda: schedules.exp_saturation(lam, h / 8),
            "sigmoid": lambda: schedules.sigmoid(lam, center=h / 4, k=16.0 / h),
            "teacher_confidence": lambda: schedules.teacher_confidence(lam),
            "teacher_accuracy": lambda: schedules.teacher_accuracy(lam)}[name]()


def build_aggregator(algo: str, model, proxy_x, proxy_y, cfg: SimConfig):
    rule, opts, updates = parse_algorithm(algo)
    w = staleness.polynomial(0.5) if cfg.weights == "polynomial" else staleness.constant()
    corr = None
    if opts is not None:
        horizon = cfg.arrivals if rule == "async" else cfg.arrivals // cfg.buffer
        kw = {}
        if "schedule" in opts or "lam" in opts:
            kw["schedule"] = _schedule(opts.get("schedule", "teacher_confidence"), float(opts.get("lam", 1.0)), horizon)
        for key, name, conv in (("student", "student", str), ("factor", "staleness_factor", str),
                                ("step", "step", str), ("rho", "rho", float), ("eta", "eta", float),
                                ("steps", "steps", int), ("T", "temperature", float),
                                ("precision", "precision", str), ("conv", "conv", str)):
            if key in opts:
                kw[name] = conv(opts[key])
        unknown = set(opts) - {"schedule", "lam", "student", "factor", "step", "rho", "eta", "steps", "T",
                               "precision", "conv"}
        if unknown:
            raise ValueError(f"unknown correction options {sorted(unknown)} in {algo!r}")
        corr = KDCorrection(proxy_x, proxy_labels=proxy_y, **kw)
    # on a CPU the merge runs in plain PyTorch (the reference every result in docs/ was made with);
    # on a GPU through fastagg's kernels, which is what a run there is for
    kw = {"max_versions": 64, "device": cfg.device, "backend": "torch" if cfg.device == "cpu" else "auto",
          "delta_dtype": updates}
    if rule == "async":
        return Aggregator(model, FedAsync(alpha=cfg.alpha), staleness=w, correction=corr, **kw)
    return Aggregator(model, FedBuff(buffer_size=cfg.buffer), staleness=w, correction=corr, **kw)


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
    if cfg.partition == "natural":
        if not cfg.dataset.startswith("synthetic"):
            raise ValueError("partition='natural' exists only for the FedProx synthetic data set")
        users = synthetic_fedprox(*_synthetic_params(cfg.dataset), seed=cfg.seed)[2]
        parts = [p for p in (train_idx[users[train_idx] == u] for u in range(users.max() + 1)) if len(p)]
    else:
        parts = [train_idx[p] for p in dirichlet_split(ytr[train_idx].numpy(), cfg.clients, cfg.dirichlet, rng)]
    n_clients = len(parts)
    speeds = rng.lognormal(0.0, cfg.sigma, n_clients)
    torch.manual_seed(cfg.seed)
    n_in = int(np.prod(xtr.shape[1:]))
    model = make_model(cfg.dataset, n_in, int(ytr.max()) + 1).to(cfg.device)
    xtr, ytr, xte, yte = (t.to(cfg.device) for t in (xtr, ytr, xte, yte))
    agg = build_aggregator(algo, model, xtr[proxy_idx], ytr[proxy_idx], cfg)
    worker = make_model(cfg.dataset, n_in, int(ytr.max()) + 1).to(cfg.device)
    spec = agg.spec
    loss_fn = torch.nn.CrossEntropyLoss()

    curve = Curve(algo)
    bases, n = {}, 0
    for kind, jid, k, now in delay_trace(cfg, speeds):
        if kind == "start":  # an idle client pulls the latest model and starts a job
            bases[jid] = agg.pull(flat=True)
            continue
        version, base = bases.pop(jid)
        if kind == "drop":  # the client vanished: its update never arrives
            continue
        n += 1
        # local SGD from the model the client pulled
        worker_state = worker.state_dict()  # views of the worker's tensors
        with torch.no_grad():
            for name, view in spec.unflatten(base).items():
                worker_state[name].copy_(view)
        opt = torch.optim.SGD(worker.parameters(), lr=cfg.lr)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + jid)
        data_k = parts[k]
        for _ in range(cfg.local_steps):
            b = data_k[torch.randint(len(data_k), (min(cfg.batch_size, len(data_k)),), generator=g).numpy()]
            opt.zero_grad()
            loss_fn(worker(xtr[b]), ytr[b]).backward()
            opt.step()
        delta = {name: worker_state[name] - view for name, view in spec.unflatten(base).items()}
        agg.submit(encode_update(delta, base_version=version, num_samples=len(data_k), client_id=jid,
                                 dtype=agg.delta_dtype))
        if n % cfg.eval_every == 0 or n == cfg.arrivals:
            curve.time.append(now)
            curve.arrivals.append(n)
            curve.accuracy.append(_accuracy(agg.load_into(), xte, yte))
        if progress is not None:
            progress.update(1)
    st = agg.stats()
    curve.stats = {k: st[k] for k in ("version", "merged", "corrected", "mean_staleness", "lambda", "fallbacks")}
    curve.aggregator = agg  # not serialised: for callers that want the final model
    return curve


def delay_trace(cfg: SimConfig, speeds):
    """The simulated clock, independent of the models: yields ("start", job, client, time) when
    an idle client (chosen uniformly) pulls the model, and ("finish" | "drop", job, client, time)
    when its job ends after speed * local_steps * (1 +- jitter). At most ``concurrency`` jobs run;
    every end starts a new job. Stops after ``cfg.arrivals`` finished (not dropped) jobs."""
    sched = np.random.default_rng(cfg.seed + 1)
    idle = list(range(len(speeds)))
    heap, job = [], 0

    def launch(t):
        nonlocal job
        k = idle.pop(int(sched.integers(len(idle))))
        duration = speeds[k] * cfg.local_steps * (1 + cfg.jitter * (2 * sched.random() - 1))
        heapq.heappush(heap, (t + duration, job, k))
        job += 1
        return "start", job - 1, k, t

    for _ in range(min(cfg.concurrency, len(speeds))):
        yield launch(0.0)
    n = 0
    while n < cfg.arrivals:
        t, j, k = heapq.heappop(heap)
        dropped = bool(cfg.dropout) and sched.random() < cfg.dropout
        n += not dropped
        yield ("drop" if dropped else "finish"), j, k, t
        idle.append(k)
        yield launch(t)


def trace_staleness(cfg: SimConfig, speeds, versions_per_arrival=1.0):
    """Staleness of every arrival of the trace when the version advances every 1/versions_per_arrival
    arrivals (FedAsync: 1; FedBuff with buffer K: 1/K)."""
    started, out, n = {}, [], 0
    for kind, j, _, _ in delay_trace(cfg, speeds):
        if kind == "start":
            started[j] = int(n * versions_per_arrival)
        elif kind == "finish":
            out.append(int(n * versions_per_arrival) - started.pop(j))
            n += 1
    return np.array(out)


def summarize(curves, target):
    rows = []
    for c in curves:
        hit = next((t for t, a in zip(c.time, c.accuracy) if a >= target), None)
        rows.append({"algorithm": c.algorithm, "final": c.accuracy[-1], "best": max(c.accuracy),
                     "time_to_target": hit, "mean_staleness": c.stats.get("mean_staleness")})
    return rows


def check_device(device):
    """A device this torch can run on, or a ValueError that says why not (before any run starts)."""
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device {device!r} is not a torch device ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this torch ({torch.__version__}) sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: simulate runs on 'cpu' or 'cuda'")


def run(cfg: SimConfig, seeds=(0,), out_dir=None, show_progress=True):
    """Run every algorithm for every seed; write JSON + PNG under out_dir; return the results."""
    from tqdm.auto import tqdm

    check_device(cfg.device)
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
        # time to target: mean over the seeds that reached it (nan when none did)
        hits = [h for h in hits if not math.isnan(h)] or [math.nan]
        base = "fedasync" if algo.startswith("fedadt-async") else "fedbuff" if algo.startswith("fedadt-buff") else None
        base_runs = {r["seed"]: r for r in results["runs"] if r["algorithm"] == base}
        # paired by seed (same partition and delay trace): the honest measure of the correction
        diffs = [r["accuracy"][-1] - base_runs[r["seed"]]["accuracy"][-1] for r in runs if r["seed"] in base_runs]
        rows.append({"algorithm": algo, "final_mean": float(finals.mean()), "final_std": float(finals.std()),
                     "delta_mean": float(np.mean(diffs)) if diffs else math.nan,
                     "delta_std": float(np.std(diffs)) if diffs else math.nan,
                     "best_mean": float(bests.mean()), "time_to_target_mean": float(np.mean(hits)),
                     "mean_staleness": float(np.mean([r["stats"]["mean_staleness"] for r in runs]))})
    return rows


def format_table(rows, target, markdown=False):
    head = ["algorithm", "final acc", "vs baseline (paired)", "best acc", f"sim. time to {target:.0%}",
            "mean staleness"]
    body = [[r["algorithm"], f"{r['final_mean']:.3f} ± {r['final_std']:.3f}",
             "" if math.isnan(r.get("delta_mean", math.nan)) else f"{r['delta_mean']:+.3f} ± {r['delta_std']:.3f}",
             f"{r['best_mean']:.3f}",
             "not reached" if math.isnan(r["time_to_target_mean"]) else f"{r['time_to_target_mean']:.0f}",
             f"{r['mean_staleness']:.1f}"] for r in rows]
    if markdown:
        return "\n".join("| " + " | ".join(line) + " |" for line in [head, ["---"] * len(head)] + body)
    width = [max(len(line[i]) for line in [head] + body) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, width)))
                     for line in [head] + body)


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
