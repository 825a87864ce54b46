"""FedADT-FedBuff behind plain HTTP: clients that know only HTTP and safetensors bytes.

    python examples/http/http_fedadt.py                        # the server and its clients in one process
    python examples/http/http_fedadt.py --serve --port 8080    # the server alone
    python examples/http/http_fedadt.py --connect http://HOST:8080 --clients 16   # clients alone

The server holds a ``fastagg.Aggregator`` (FedBuff, KD correction from a server-side proxy
slice of scikit-learn digits) and serves it with ``fastagg.integrations.http.Server``. Each
client thread owns a Dirichlet share of the training set; it pulls the model (GET /model),
trains a few local steps, takes a random time to "send" (so that updates are stale) and
submits the delta (POST /update). Every process builds the same split from the same seed.
The server prints the test accuracy as versions pass and stops after ``--updates`` merges.
"""

import argparse
import http.client
import threading
import time

import numpy as np
import torch

from fastagg import Aggregator, FedBuff, KDCorrection, errors, staleness
from fastagg.integrations.http import Client, Server
from fastagg.simulate import dirichlet_split, load_dataset, make_model


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--serve", action="store_true", help="run the server alone")
    p.add_argument("--connect", metavar="URL", help="run the clients alone, against this server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port")
    p.add_argument("--token", help="a shared secret every request must carry (Authorization: Bearer)")
    p.add_argument("--clients", type=int, default=8, help="client threads (each its own share of the data)")
    p.add_argument("--updates", type=int, default=320, help="the server stops after merging this many")
    p.add_argument("--buffer", type=int, default=8)
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)  # many small models on threads: one core each

    data = load_dataset("digits", args.seed)
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(data[1]))
    proxy, train = perm[:150], perm[150:]
    parts = [train[q] for q in dirichlet_split(data[1][train].numpy(), args.clients, 0.1, rng)]

    if args.connect:
        return run_clients(args.connect, parts, data, args, stop=threading.Event())
    torch.manual_seed(args.seed)
    model = make_model("digits", data[0].shape[1], 10)
    agg = Aggregator(model, FedBuff(buffer_size=args.buffer), staleness=staleness.polynomial(0.5),
                     correction=KDCorrection(data[0][proxy]), max_staleness=20, max_update_norm=100.0)
    with Server(agg, args.host, args.port, token=args.token) as server:
        print(f"serving on {server.url}", flush=True)
        stop = threading.Event()
        clients = None if args.serve else threading.Thread(target=run_clients,
                                                           args=(server.url, parts, data, args, stop))
        if clients:
            clients.start()
        shown = 0
        while agg.stats()["merged"] < args.updates:
            time.sleep(0.05)
            if agg.version >= shown + 10:
                shown = agg.version
                print(f"version {shown}: test accuracy {accuracy(agg, data[2], data[3]):.3f}", flush=True)
        stop.set()
        if clients:
            clients.join()
        st = agg.stats()
        print(f"merged {st['merged']} updates ({st['corrected']} corrected), mean staleness "
              f"{st['mean_staleness']:.2f}, rejected {st['rejected_total']}, HTTP responses {dict(server.responses)}")
    print(f"final test accuracy {accuracy(agg, data[2], data[3]):.3f}", flush=True)


def run_clients(url, parts, data, args, stop):
    """One thread per client, each looping pull -> train -> (delay) -> submit until ``stop``."""
    threads = [threading.Thread(target=client_loop, args=(url, c, parts[c], data, args, stop))
               for c in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def client_loop(url, c, part, data, args, stop):
    client = Client(url, token=args.token)
    worker = make_model("digits", data[0].shape[1], 10)
    x, y = data[0][part], data[1][part]
    gen = torch.Generator().manual_seed(args.seed * 1000 + c)
    delays = np.random.default_rng(args.seed * 1000 + c)
    job = 0
    while not stop.is_set():
        try:
            version, params = client.pull()
        except (OSError, http.client.HTTPException):  # the server has stopped
            return
        worker.load_state_dict(params)
        opt = torch.optim.SGD(worker.parameters(), lr=args.lr)
        for _ in range(args.local_steps):
            b = torch.randint(len(y), (min(16, len(y)),), generator=gen)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(worker(x[b]), y[b]).backward()
            opt.step()
        delta = {k: v.detach() - params[k] for k, v in worker.state_dict().items()}
        time.sleep(delays.lognormal(-4, 1))  # a slow link or a slow device: other clients' updates land first
        try:
            client.submit(delta, base_version=version, num_samples=len(y), client_id=f"{c}/{job}")
        except errors.InvalidUpdate as exc:  # e.g. too stale: drop it, pull again
            print(f"client {c}: rejected: {exc}", flush=True)
        except (OSError, http.client.HTTPException):
            return
        job += 1


def accuracy(agg, x, y):
    with torch.no_grad():
        return float((agg.load_into()(x).argmax(-1) == y).float().mean())


if __name__ == "__main__":
    main()
