"""How many updates per second the HTTP front end (fastagg.integrations.http) takes.

    python bench/bench_http.py --out bench/results/cpu_http.json

One ``Aggregator`` (FedBuff, K = 16, no correction: this measures the transport, the ingest
and the merge) takes the same stream of update payloads three ways: ``submit(bytes)`` in the
server's process (no transport), and ``POST /update`` from client processes, over one keep-alive
connection per client process and with ``fastagg.integrations.http.Client`` (urllib, a new
connection per update). Reported: updates/s and payload GB/s of each, the HTTP rates against the
in-process one, and the host's copy bandwidth measured in the same run (a payload is copied at
least once from the socket into the buffer row). Pulls: the time to encode the model once after
a change (``pull_bytes``), and GET /model per second from client processes (served from that
one encoding).
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import platform
import time
import urllib.parse
import zlib

import torch

from fastagg import Aggregator, FedBuff, encode_update
from fastagg import bench as fb
from fastagg.integrations.http import Client, Server


def _model(name):
    if name == "mlp":  # the digits model of `fastagg simulate`
        from fastagg.simulate import make_model
        torch.manual_seed(0)
        return make_model("digits", 64, 10)
    return fb.make(name, "cpu", small=True)[0]


def _payloads(name, n, tag):
    torch.set_num_threads(1)
    shapes = {k: v.shape for k, v in _model(name).state_dict().items()}
    g = torch.Generator().manual_seed(zlib.crc32(tag.encode()))  # hash() of a str differs per process
    return [encode_update({k: 1e-3 * torch.randn(s, generator=g) for k, s in shapes.items()},
                          base_version=0, num_samples=10, client_id=f"{tag}-{i}") for i in range(n)]


def _client(url, name, n, tag, how, ready, go, done):
    payloads = _payloads(name, n, tag) if how != "pull" else [None] * n
    ready.put(1)
    go.wait()
    if how in ("pull", "keepalive"):  # GET /model, or POST /update, over one keep-alive connection
        u = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
        for p in payloads:
            if p is None:
                conn.request("GET", "/model")
            else:
                conn.request("POST", "/update", body=p, headers={"Content-Length": str(len(p))})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200, resp.status
        conn.close()
    else:  # the library's client: urllib, one connection per update
        client = Client(url)
        for p in payloads:
            client._request("POST", "/update", p)
    done.put(time.perf_counter())


def run_http(agg, name, n, procs, how):
    ctx = mp.get_context("spawn")
    ready, done, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    with Server(agg) as server:
        ps = [ctx.Process(target=_client,
                          args=(server.url, name, n // procs, f"{how}{procs}-{r}", how, ready, go, done))
              for r in range(procs)]
        for p in ps:
            p.start()
        for _ in ps:
            ready.get(timeout=300)
        before = agg.stats()["accepted"]
        t0 = time.perf_counter()
        go.set()
        end = max(done.get(timeout=600) for _ in ps)
        for p in ps:
            p.join()
        got = agg.stats()["accepted"] - before
    if how == "pull":
        return n // procs * procs / (end - t0)
    assert got == n // procs * procs, (got, n)
    return got / (end - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mlp,cnn,resnet18")
    ap.add_argument("--updates", type=int, default=0, help="per configuration (default: per model)")
    ap.add_argument("--procs", default="1,2", help="client processes")
    ap.add_argument("--out")
    args = ap.parse_args()
    lim = fb.limits("cpu")
    rows = []
    for name in args.models.split(","):
        n = args.updates or {"mlp": 2000, "cnn": 192, "resnet18": 32}.get(name, 64)
        agg = Aggregator(_model(name), FedBuff(16))
        payloads = _payloads(name, n, "direct")
        nbytes = len(payloads[0])
        t0 = time.perf_counter()
        for p in payloads:
            agg.submit(p)
        direct = n / (time.perf_counter() - t0)
        del payloads
        row = {"model": name, "P": agg.spec.numel, "payload_bytes": nbytes, "updates": n,
               "updates_per_s": {"in_process": direct}}
        for procs in map(int, args.procs.split(",")):
            for how in ("keepalive", "client"):
                row["updates_per_s"][f"http_{how}_{procs}proc"] = run_http(agg, name, n, procs, how)
        row["vs_in_process"] = {k: v / direct for k, v in row["updates_per_s"].items() if k != "in_process"}
        # pulls: the payload is encoded once per change of the parameters, then served from the cache
        times = []
        for _ in range(5):
            agg.set_global(agg.params + 0)  # a change: the next pull encodes
            t0 = time.perf_counter()
            agg.pull_bytes()
            times.append(time.perf_counter() - t0)
        row["pull"] = {"encode_ms": 1e3 * min(times),
                       "http_keepalive_per_s": {p: run_http(agg, name, n, p, "pull") for p in (1, 2)}}
        row["payload_GBps"] = {k: v * nbytes / 1e9 for k, v in row["updates_per_s"].items()}
        rows.append(row)
        print(f"{name}: P={agg.spec.numel} payload {nbytes / 1e6:.2f} MB; updates/s "
              + ", ".join(f"{k} {v:.0f} ({row['payload_GBps'][k]:.2f} GB/s)" for k, v in row["updates_per_s"].items())
              + f"; pull: encode {row['pull']['encode_ms']:.2f} ms, GET /model "
              + ", ".join(f"{v:.0f}/s ({p} proc)" for p, v in row["pull"]["http_keepalive_per_s"].items()),
              flush=True)
    res = {"machine": platform.machine(), "cores": mp.cpu_count(), "torch": torch.__version__,
           "python": platform.python_version(), "copy_GBps": lim["copy_GBps"], "rows": rows}
    print(f"host copy bandwidth (read + write) {lim['copy_GBps']:.1f} GB/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
