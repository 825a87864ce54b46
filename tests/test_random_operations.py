"""Random sequences of server operations against a float64 reference server written out here.

Each run draws a few hundred operations — submits (valid, or with one of several faults: a
future, too stale or evicted base version, a client's second update on one version, NaN, a
norm over the bound, a wrong length; as a tensor, a state_dict or wire bytes), flushes,
checkpoints (through ``torch.save``) restored into a fresh aggregator, rollbacks of the same
aggregator to its last checkpoint, ``set_global`` and pulls — and after each one checks the
aggregator against the reference: version, parameters, buffered count, counters, staleness
histogram and the versions stored; then the reference goes on from the aggregator's parameters,
version store and momentum, so that each operation is held to its own rounding (1e-12 in
float64, 1e-5 in float32, plus what rounding does to a KD step's direction: RefServer._corrected).
A rejected submit must raise one of the errors its faults allow and change nothing but the
rejection count. The reference knows the rules only as DESIGN.md states them (FedAsync applied
update by update, an evicted base replaced by the model at the start of the batch; FedBuff with
server momentum; FedADT with one or several relative or absolute KD steps from the client's or
the applied student, a constant or teacher-confidence lambda(t), c(s) constant or growing, its
gradients by plain float64 autograd against the model at the batch's start), and the version
store as a ring of the last ``max_versions`` versions pushed.
"""

from __future__ import annotations

import copy
import io
import math
import random

import pytest
import torch

import fastagg
from fastagg import errors, staleness

from conftest import DEVICE, mlp, need_backend


class RefServer:
    """The server in float64 as DESIGN.md states it: the rule, staleness weights ``w``, the bounds
    and the version store; ``kd``: (a KDCorrection bound to a float64 copy of the model, its
    configuration as in KD), or None; ``row_dtype``: the dtype the aggregator buffers deltas in."""

    def __init__(self, rule, w, theta, max_staleness, max_norm, max_versions, on_evicted, kd=None,
                 row_dtype=torch.float64, direction_noise=1e-14):
        self.rule, self.w, self.kd, self.row_dtype = rule, w, kd, row_dtype
        self.direction_noise = direction_noise
        self.theta, self.version = theta.clone(), 0
        self.max_staleness, self.max_norm = max_staleness, max_norm
        self.cap, self.on_evicted = max_versions, on_evicted
        self.store = {0: theta.clone()}  # insertion order: oldest first
        self.pending, self.seen = [], set()
        self.momentum = torch.zeros_like(theta)
        self.accepted = self.merged = self.fallbacks = 0
        self.slack = 0.0
        self.hist = {}

    def _push(self):
        if self.version not in self.store and len(self.store) == self.cap:
            del self.store[next(iter(self.store))]
        self.store[self.version] = self.theta.clone()

    def rounded(self, delta):
        """The update as the server holds it (16-bit rows: rounded to nearest)."""
        return delta.to(self.row_dtype).double()

    def faults(self, delta, base, client, P):
        """The errors this submit may raise (empty: it is accepted)."""
        out = set()
        delta = self.rounded(delta)
        fedasync = isinstance(self.rule, fastagg.FedAsync)
        if base > self.version:
            out.add(errors.FutureVersionError)
        else:
            if client is not None and (client, base) in self.seen:
                out.add(errors.DuplicateUpdateError)
            s = self.version + (len(self.pending) if fedasync else 0) - base
            if self.max_staleness is not None and s > self.max_staleness:
                out.add(errors.StaleUpdateError)
            if self._needs_base() and base not in self.store and self.on_evicted == "reject":
                out.add(errors.EvictedVersionError)
        if delta.numel() != P:
            out.add(errors.UpdateShapeError)
        elif not bool(torch.isfinite(delta).all()):
            out.add(errors.NonFiniteUpdateError)
        elif self.max_norm is not None and float(delta.norm()) > self.max_norm:
            out.add(errors.UpdateNormError)
        return out

    def _needs_base(self):
        """The base version is read: FedAsync's mix, or the correction's client student."""
        return isinstance(self.rule, fastagg.FedAsync) or (self.kd is not None and self.kd[1]["student"] == "client")

    def submit(self, delta, base, n, client):
        fedasync = isinstance(self.rule, fastagg.FedAsync)
        s = self.version + (len(self.pending) if fedasync else 0) - base
        self.pending.append((self.rounded(delta), base, n, s))
        if client is not None:
            self.seen.add((client, base))
        self.accepted += 1
        if len(self.pending) == self.rule.capacity:
            self.flush()
        return s

    def flush(self):
        if not self.pending:
            return
        rule, pend, theta0 = self.rule, self.pending, self.theta.clone()
        if self.kd is not None:  # each stale delta corrected against the model at the batch's start
            pend = [(self._corrected(d, b, s, theta0), b, n, s) for d, b, n, s in pend]
        if isinstance(rule, fastagg.FedAsync):
            for d, b, _, s in pend:  # one by one, each from its base (evicted: the batch's start)
                a = rule.alpha * self.w(s)
                base = self.store.get(b)
                if base is None:
                    self.fallbacks += 1
                    base = theta0
                self.theta = (1 - a) * self.theta + a * (base + d)
            self.version += len(pend)
        else:
            a = [self.w(s) * (n if rule.sample_weighted else 1) for _, _, n, s in pend]
            norm = math.fsum(a) if rule.normalize == "weights" else len(a)
            u = sum(ak * d for ak, (d, _, _, _) in zip(a, pend)) / norm
            self.momentum = rule.momentum * self.momentum + u
            self.theta = self.theta + rule.server_lr * self.momentum
            self.version += 1
            if self._needs_base():
                self.fallbacks += sum(1 for _, b, _, _ in pend if b not in self.store)
        for *_, s in pend:
            self.hist[s] = self.hist.get(s, 0) + 1
        self.merged += len(pend)
        self.pending = []
        self._push()

    def _corrected(self, d, b, s, theta0):
        """DESIGN.md's correction of one delta: lam = lambda(t) * c(s) (0 below min_staleness;
        c = 1 - (1 + s)^-0.5 for "grows"); from the student base + delta ("client"; the batch's
        start where the base is evicted) or theta0 + delta ("applied"), ``steps`` steps of
        eta * lam * g ("absolute") or rho * lam * |delta| / steps along g / |g| ("relative"), g the
        KD gradient by plain float64 autograd against the teacher of theta0; delta minus their
        sum. ``slack`` gathers what the aggregator's arithmetic may miss by: each step's length
        times the relative error of its g's direction, taken as direction_noise / |g| (1e-6 for
        float32, 1e-14 for float64): a gradient near zero, e.g. at saturated probabilities,
        points anywhere once rounded (float32: seen at |g| = 2e-7, a whole step off)."""
        corr, cfg = self.kd
        corr.invalidate()  # the teacher of theta0 (set_global keeps the version number)
        teacher = corr.teacher(theta0, 0)
        if s < cfg["min_staleness"]:
            return d
        p = teacher.probs
        C = p.shape[1]
        lam = cfg["lam"] * (max(0.0, (float(p.max(1).values.mean()) - 1 / C) / (1 - 1 / C))
                            if cfg["schedule"] == "teacher_confidence" else 1.0)
        lam *= 1 - (1 + s) ** -0.5 if cfg["grows"] else 1.0
        student = (self.store.get(b, theta0) if cfg["student"] == "client" else theta0) + d
        total = torch.zeros_like(d)
        for _ in range(cfg["steps"]):
            g = corr._loop_grad(student[None], teacher)[0]
            if cfg["step"] == "absolute":
                step = cfg["eta"] * lam * g
            else:
                step = cfg["rho"] * lam * d.norm() / cfg["steps"] * g / g.norm()
            self.slack += float(step.norm()) * min(2.0, self.direction_noise / float(g.norm()))
            total, student = total + step, student - step
        return d - total

    STATE = ("theta", "version", "store", "pending", "seen", "momentum", "accepted", "merged", "fallbacks", "hist")

    def snapshot(self):
        return copy.deepcopy({k: getattr(self, k) for k in self.STATE})

    def restore(self, snap):
        for k, v in copy.deepcopy(snap).items():
            setattr(self, k, v)

    def set_global(self, theta):
        self.theta = theta.clone()
        self._push()


RULES = {  # "_kd": with FedADT's correction, configured as KD[name] says
    "fedasync": fastagg.FedAsync(0.6),
    "fedasync_batch3": fastagg.FedAsync(0.45, batch_size=3),
    "fedasync_batch3_kd": fastagg.FedAsync(0.45, batch_size=3),
    "fedbuff_kd": fastagg.FedBuff(3, server_lr=0.9),
    "fedbuff_applied_kd": fastagg.FedBuff(2, server_lr=0.7, momentum=0.3),
    "fedasync_absolute_kd": fastagg.FedAsync(0.5, batch_size=2),
    "fedbuff_momentum": fastagg.FedBuff(3, server_lr=0.8, momentum=0.5),
    "fedbuff_samples_count": fastagg.FedBuff(4, sample_weighted=True, normalize="count"),
}
ONE_STEP = dict(schedule="constant", lam=1.5, grows=False, min_staleness=1, student="client", step="relative",
                rho=0.8, steps=1)
KD = {
    "fedasync_batch3_kd": ONE_STEP,
    "fedbuff_kd": ONE_STEP,
    # three relative steps from theta_t + delta, the teacher's confidence as lambda(t), c(s) growing
    "fedbuff_applied_kd": dict(ONE_STEP, schedule="teacher_confidence", lam=2.0, grows=True, min_staleness=2,
                               student="applied", steps=3),
    "fedasync_absolute_kd": dict(ONE_STEP, step="absolute", eta=0.3, steps=2, grows=True),
}


def _correction(cfg, proxy):
    if cfg is None:
        return None
    schedule = (fastagg.schedules.constant(cfg["lam"]) if cfg["schedule"] == "constant"
                else fastagg.schedules.teacher_confidence(cfg["lam"]))
    return fastagg.KDCorrection(proxy, schedule=schedule, step=cfg["step"], rho=cfg["rho"], eta=cfg.get("eta", 0.05),
                                steps=cfg["steps"], student=cfg["student"], min_staleness=cfg["min_staleness"],
                                staleness_factor="grows" if cfg["grows"] else "none")


@pytest.mark.parametrize("on_evicted", ["applied", "reject"])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_random_operations_match_the_reference_server(rule, on_evicted, rng):
    _run(rule, on_evicted, rng)


@pytest.mark.parametrize("rule, backend, delta_dtype", [
    ("fedbuff_kd", "cpp", None), ("fedasync_batch3", "cpp", None), ("fedbuff_momentum", "numba", None),
    ("fedasync_batch3_kd", "numba", None), ("fedbuff_kd", "cpp", torch.bfloat16), ("fedbuff_applied_kd", "cpp", None),
    ("fedasync_batch3", "cpp", torch.float16)])
def test_random_operations_in_float32_on_the_cpu_kernels(rule, backend, delta_dtype, rng):
    """The same with a float32 model, so that the C++ and numba kernels merge (they take float32;
    a float64 model merges through torch), the buffered deltas in float32 or 16 bits (the
    reference rounds each update to that dtype and computes in float64)."""
    need_backend(backend)
    _run(rule, "applied", rng, backend=backend, delta_dtype=delta_dtype, dtype=torch.float32)


@pytest.mark.skipif(DEVICE == "cpu", reason="the GPU aggregator (FASTAGG_TEST_DEVICE=cuda): the CPU's runs above")
@pytest.mark.parametrize("rule, delta_dtype", [("fedbuff_kd", None), ("fedasync_batch3", None),
                                                ("fedbuff_momentum", torch.bfloat16), ("fedasync_batch3_kd", None),
                                                ("fedbuff_applied_kd", None)])
def test_random_operations_on_the_gpu_aggregator(rule, delta_dtype, rng):
    """The same on a GPU aggregator in float32: host updates through the pinned staging rows and
    the ingest stream, device-resident ones (flat tensors sent on the device) written into their
    rows, the Triton merge, the engine on the GPU (TF32 off: it rounds to 10 bits)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        _run(rule, "applied", rng, delta_dtype=delta_dtype, dtype=torch.float32, device=DEVICE)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _run(rule, on_evicted, rng, backend="auto", delta_dtype=None, dtype=torch.float64, seed=None, device="cpu"):
    """One run; ``seed`` (printed with each failure) replays a failed one."""
    seed = int(torch.randint(0, 2**31, (1,), generator=rng)) if seed is None else seed
    r = random.Random(seed)
    model = mlp(d_in=4, hidden=5, classes=3, dtype=dtype)
    # the reference is put back on the aggregator's state after each check (below), so that an
    # operation is held to its own rounding, plus the slack of its KD steps (RefServer._corrected)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    gen = torch.Generator().manual_seed(seed)
    proxy = torch.randn(7, 4, dtype=torch.float64, generator=gen)
    kw = dict(staleness=staleness.polynomial(0.5), max_staleness=6, max_update_norm=10.0, max_versions=4,
              on_evicted=on_evicted, backend=backend, delta_dtype=delta_dtype, device=device)

    def correction():
        return _correction(KD.get(rule), proxy)

    agg = fastagg.Aggregator(model, RULES[rule], correction=correction(), **kw)
    P = agg.spec.numel
    kd = correction()
    if kd is not None:
        # binds the reference's own to the model in float64
        fastagg.Aggregator(mlp(d_in=4, hidden=5, classes=3, dtype=torch.float64), fastagg.FedBuff(3), correction=kd)
    ref = RefServer(RULES[rule], agg.staleness, agg.params.double().cpu(), 6, 10.0, 4, on_evicted,
                    None if kd is None else (kd, KD[rule]),
                    delta_dtype or dtype, 1e-14 if dtype == torch.float64 else 1e-6)
    rejected, saved, tally = 0, None, {"accepted": 0, "rejected": 0, "merges": 0}
    for step in range(250):
        op = r.random()
        where = f"seed {seed}, step {step}"
        if op < 0.72:
            base = max(0, ref.version - r.choice([0, 0, 1, 1, 2, 3, 5, 8]))
            if r.random() < 0.05:
                base = ref.version + 1
            delta = torch.randn(P, dtype=torch.float64, generator=gen) * r.choice([0.05, 0.3, 0.8])
            fault = r.random()
            if fault < 0.04:
                delta[r.randrange(P)] = r.choice([float("nan"), float("inf")])
            elif fault < 0.08:
                delta = delta * 100.0  # over max_update_norm
            elif fault < 0.10:
                delta = delta[:-1]
            client = r.choice([None, "a", "b", "c", "d", "e", "f"])
            n = r.randint(1, 30)
            allowed = ref.faults(delta, base, client, P)
            form = r.choice(["flat", "dict", "bytes"]) if delta.numel() == P else "flat"
            if form == "dict":
                update = agg.spec.unflatten(delta)
            elif form == "bytes":
                update = fastagg.encode_update(agg.spec.unflatten(delta), base_version=base, num_samples=n,
                                               client_id=client)
            else:  # on a GPU aggregator, half of them sent from the device
                update = delta.to(device) if device != "cpu" and r.random() < 0.5 else delta
            try:
                receipt = agg.submit(update, base_version=base, num_samples=n, client_id=client)
            except errors.InvalidUpdate as exc:
                assert type(exc) in allowed, (where, type(exc).__name__, allowed)
                rejected += 1
                tally["rejected"] += 1
            else:
                assert not allowed, (where, allowed)
                assert receipt.staleness == ref.submit(delta, base, n, client), where
                tally["accepted"] += 1
                tally["merges"] += receipt.status == "merged"
        elif op < 0.82:
            assert agg.flush() == (ref.flush() or ref.version), where
        elif op < 0.86:  # a checkpoint, through torch.save, restored into a fresh aggregator
            buf = io.BytesIO()
            torch.save(agg.state_dict(), buf)
            buf.seek(0)
            fresh = fastagg.Aggregator(mlp(d_in=4, hidden=5, classes=3, dtype=dtype, seed=step),
                                       RULES[rule], correction=correction(), **kw)
            fresh.load_state_dict(torch.load(buf, weights_only=False))
            agg = fresh
            saved = (agg.state_dict(), ref.snapshot(), rejected)
        elif op < 0.92 and saved is not None:  # the same aggregator rolled back to the last checkpoint
            agg.load_state_dict(saved[0])
            ref.restore(saved[1])
            rejected = saved[2]
        elif op < 0.96:
            theta = torch.randn(P, dtype=torch.float64, generator=gen).to(dtype)
            agg.set_global(agg.spec.unflatten(theta) if r.random() < 0.5 else theta.to(device))
            ref.set_global(theta.double())
        else:
            version, flat = agg.pull(flat=True)
            assert version == ref.version and torch.allclose(flat.double().cpu(), ref.theta, rtol=0, atol=tol), where
        st = agg.stats()
        assert st["version"] == ref.version and st["buffered"] == len(ref.pending), where
        theta = agg.params.double().cpu().clone()  # a copy also where that is a no-op (float64 on a CPU)
        assert torch.allclose(theta, ref.theta, rtol=0, atol=tol + ref.slack), \
            (where, float((theta - ref.theta).abs().max()))
        assert (st["accepted"], st["merged"], st["rejected_total"], st["fallbacks"]) == \
            (ref.accepted, ref.merged, rejected, ref.fallbacks), where
        assert st["staleness_histogram"] == dict(sorted(ref.hist.items())), where
        assert agg.store.versions == list(ref.store), where
        # the reference goes on from the aggregator's state: each check is of one operation's
        # arithmetic, and rounding does not pile up over the run
        ref.theta = theta
        ref.store = {v: agg.store.get(v).double().cpu().clone() for v in agg.store.versions}
        if agg._momentum is not None:
            ref.momentum = agg._momentum.double().cpu().clone()
        ref.slack = 0.0
    # the run went through merges and rejections (not only a few updates before a rollback)
    assert tally["accepted"] > 40 and tally["merges"] > 5 and tally["rejected"] > 10, tally
