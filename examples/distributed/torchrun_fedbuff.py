"""FedADT-FedBuff served by several processes: each rank takes its own clients' updates.

    torchrun --standalone --nproc_per_node=2 examples/distributed/torchrun_fedbuff.py

Each rank holds a ``fastagg.DistributedAggregator``. Virtual clients (scikit-learn digits, a
Dirichlet label split, trained in the rank's own process) belong to rank ``client % world``.
Each pass of a rank's server loop, the jobs that finish submit their deltas as wire bytes, idle
clients pull the model and start a job that lasts a random number of passes (so updates are
stale), and every rank calls ``agg.step()``: once ``--buffer`` updates are buffered over all
ranks, each rank KD-corrects its own and one all-reduce merges them. Rank 0 prints the test
accuracy; at the end every rank prints a digest of its parameters (identical on every rank).
Gloo on CPUs; ``--backend nccl --device cuda`` puts rank r on GPU r.
"""

import argparse
import hashlib
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from fastagg import DistributedAggregator, FedBuff, KDCorrection, encode_update, errors, staleness
from fastagg.simulate import dirichlet_split, load_dataset, make_model


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=60)
    p.add_argument("--concurrency", type=int, default=8, help="clients training at once, per rank")
    p.add_argument("--passes", type=int, default=160, help="server-loop passes per rank")
    p.add_argument("--buffer", type=int, default=8, help="FedBuff buffer size, over all ranks")
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="gloo")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group: NCCL's collectives use the current device
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    # every rank builds the same data, split and model (same seed); each serves its own clients
    xtr, ytr, xte, yte = load_dataset("digits", args.seed)
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(ytr))
    proxy, train = perm[:150], perm[150:]
    parts = [train[q] for q in dirichlet_split(ytr[train].numpy(), args.clients, 0.1, rng)]
    mine = [c for c in range(len(parts)) if c % world == rank]
    torch.manual_seed(args.seed)
    model = make_model("digits", xtr.shape[1], 10).to(device)
    worker = make_model("digits", xtr.shape[1], 10).to(device)
    xtr, ytr, xte, yte = (t.to(device) for t in (xtr, ytr, xte, yte))
    agg = DistributedAggregator(model, FedBuff(buffer_size=args.buffer), staleness=staleness.polynomial(0.5),
                                correction=KDCorrection(xtr[proxy]), device=device, max_staleness=20,
                                local_capacity=args.buffer + args.concurrency)

    jobs = {}  # client -> (pass it finishes, job id, version, flat base parameters)
    job_rng = np.random.default_rng(args.seed * 1000 + rank)
    loss_fn = torch.nn.CrossEntropyLoss()
    for t in range(args.passes):
        for c in [c for c, job in jobs.items() if job[0] <= t]:
            _, job, version, base = jobs.pop(c)
            delta = train_client(worker, agg.spec, base, xtr[parts[c]], ytr[parts[c]], args, loss_fn,
                                 torch.Generator().manual_seed(args.seed * 100_003 + t * 1009 + c))
            try:  # the job id: a client may finish two jobs on one version
                agg.submit(encode_update(delta, base_version=version, num_samples=len(parts[c]), client_id=job))
            except errors.InvalidUpdate as exc:
                print(f"rank {rank}: rejected job {job}: {exc}", flush=True)
        idle = [c for c in mine if c not in jobs]
        for c in job_rng.choice(idle, size=min(len(idle), args.concurrency - len(jobs)), replace=False):
            jobs[int(c)] = (t + 1 + int(job_rng.geometric(0.3)), f"{c}@{t}", *agg.pull(flat=True))
        agg.step()  # collective: every rank calls it each pass
        if rank == 0 and (t + 1) % 40 == 0:
            print(f"pass {t + 1}: version {agg.version}, test accuracy {accuracy(agg, xte, yte):.3f}", flush=True)
    st = agg.stats()  # what is still buffered stays for the next step (a stopping server checkpoints it)
    digest = hashlib.sha256(agg.params.cpu().numpy().tobytes()).hexdigest()[:16]
    for r in range(world):  # one rank at a time, so that the lines do not interleave
        dist.barrier()
        if r == rank:
            print(f"rank {rank}: version {agg.version}, merged {st['merged']} of its updates "
                  f"({st['corrected']} corrected), params {digest}", flush=True)
    dist.barrier()
    if rank == 0:
        print(f"final test accuracy {accuracy(agg, xte, yte):.3f}", flush=True)
    if args.backend != "gloo":  # NCCL asks for it, and warns without
        dist.destroy_process_group()
        return
    # gloo's group is not torn down: with torch 2.13 on this project's 2-core machine, destroying it
    # aborted a rank now and then as it exited (SIGABRT, "terminate called without an active
    # exception": 2 of 22 runs under load with a barrier before it, 1 of 5 without), which torchrun
    # reports as a failed job; left to the interpreter's exit it still did, in one of the
    # twenty-fourth session's first three CI runs. The work is done and printed here, so the rank
    # leaves without running the C++ teardown at all.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def train_client(worker, spec, base, x, y, args, loss_fn, gen):
    """Local SGD from the flat base parameters; returns the delta as {name: tensor}."""
    state = worker.state_dict()
    with torch.no_grad():
        for name, view in spec.unflatten(base).items():
            state[name].copy_(view)
    opt = torch.optim.SGD(worker.parameters(), lr=args.lr)
    for _ in range(args.local_steps):
        b = torch.randint(len(y), (min(16, len(y)),), generator=gen).to(y.device)
        opt.zero_grad()
        loss_fn(worker(x[b]), y[b]).backward()
        opt.step()
    return {name: state[name] - view for name, view in spec.unflatten(base).items()}


def accuracy(agg, x, y):
    with torch.no_grad():
        return float((agg.load_into()(x).argmax(-1) == y).float().mean())


if __name__ == "__main__":
    main()
