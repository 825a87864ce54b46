"""Command line: ``fastagg simulate`` (the main job) and ``fastagg info``."""

from __future__ import annotations

import argparse
import sys


def _simulate(args):
    from .simulate import SimConfig, format_table, run

    try:
        cfg = SimConfig(dataset=args.dataset, clients=args.clients, concurrency=args.concurrency,
                        arrivals=args.arrivals, dirichlet=args.dirichlet, sigma=args.sigma, proxy=args.proxy,
                        local_steps=args.local_steps, target=args.target, alpha=args.alpha, buffer=args.buffer,
                        weights=args.weights, dropout=args.dropout, partition=args.partition,
                        algorithms=tuple(a.replace(";", ",") for a in args.algorithms.split(",")),
                        device=args.device)
        if args.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {args.seeds}")
        results = run(cfg, seeds=tuple(range(args.seed, args.seed + args.seeds)), out_dir=args.out,
                      show_progress=not args.quiet)
    except (FileNotFoundError, ValueError) as exc:
        print(f"fastagg simulate: {exc}", file=sys.stderr)
        return 2
    print(format_table(results["table"], cfg.target))
    if args.out:
        print(f"curves: {args.out}/results.json   plot: {args.out}/accuracy.png")
    return 0


def _chunk(value):
    """--chunk: "auto", "none" (all K in one pass) or a positive int."""
    if value in ("auto", "none"):
        return None if value == "none" else value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"expected auto, none or a positive int, got {value!r}")


def _bench(args):
    from . import bench
    from .engine import ROUTE_NAMES

    models = [m for m in args.models.split(",") if m] + [m for m in args.sweep_models.split(",") if m]
    unknown = [m for m in models if m not in bench.MODELS] + [
        r for r in (args.routes or "").split(",") if r and r not in ROUTE_NAMES]
    if unknown:  # before any model is built or timed
        print(f"fastagg bench: unknown model or route {unknown}; models: {', '.join(bench.MODELS)}; "
              f"routes: {', '.join(ROUTE_NAMES)}", file=sys.stderr)
        return 2
    res = bench.run(device=args.device, models=tuple(m for m in args.models.split(",") if m), K=args.k,
                    sweep=not args.no_sweep, small=args.small, out=args.out, compile_baseline=not args.no_compile,
                    sweep_models=tuple(args.sweep_models.split(",")),
                    sweep_ks=tuple(int(k) for k in args.sweep_k.split(",")),
                    chunk=args.chunk, backend_rows=not args.no_backends,
                    routes=tuple(r for r in args.routes.split(",") if r) if args.routes else None,
                    sweep_settings=tuple(_chunk(c) for c in args.sweep_chunks.split(",")))
    if args.out:
        print(f"results: {args.out}")
    failed = [r["model"] for r in res["models"] if "error" in r]
    if failed:
        print(f"failed: {', '.join(failed)} (the error is in each one's row)")
    return 1 if failed else 0


def _info(args):
    from . import backends

    for name, (ok, why) in backends.available().items():
        print(f"{name:7s} {'yes' if ok else 'no ':3s}  {why}")
    return 0


def _cuda():
    import torch

    return torch.cuda.is_available()


def main(argv=None):
    p = argparse.ArgumentParser(prog="fastagg", description="fast aggregator for asynchronous federated learning")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("simulate", help="run FedAsync, FedBuff and FedADT on the same simulated clients")
    s.add_argument("--dataset", default="digits", help="digits | fashion-mnist | mnist1d | synthetic(a,b)")
    s.add_argument("--clients", type=int, default=100)
    s.add_argument("--concurrency", type=int, default=30)
    s.add_argument("--arrivals", type=int, default=1500, help="client updates per algorithm")
    s.add_argument("--local-steps", type=int, default=20)
    s.add_argument("--dirichlet", type=float, default=0.1, help="Dirichlet alpha of the label split")
    s.add_argument("--sigma", type=float, default=1.0, help="spread of the lognormal client speeds")
    s.add_argument("--proxy", type=int, default=150, help="unlabeled server-side proxy inputs")
    s.add_argument("--alpha", type=float, default=0.6, help="FedAsync mixing weight")
    s.add_argument("--buffer", type=int, default=10, help="FedBuff buffer size")
    s.add_argument("--weights", default="polynomial", choices=["polynomial", "constant"], help="staleness weights")
    s.add_argument("--dropout", type=float, default=0.0, help="probability that a job's update is lost")
    s.add_argument("--partition", default="dirichlet", choices=["dirichlet", "natural"])
    s.add_argument("--target", type=float, default=0.8, help="accuracy for the time-to-target column")
    s.add_argument("--algorithms", default="fedasync,fedbuff,fedadt-async,fedadt-buff",
                   help="comma list; options after a slash, separated by ;, e.g. fedbuff/updates=bf16 or "
                        "fedadt-async/schedule=constant;student=applied")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--seeds", type=int, default=1, help="number of seeds (mean ± std)")
    s.add_argument("--out", default="fastagg-sim", help="folder for results.json and accuracy.png")
    s.add_argument("--device", default="cpu", help="cpu | cuda: where models, data and the aggregator run")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=_simulate)
    b = sub.add_parser("bench", help="server-step throughput (updates/s) by stage, against baselines and limits")
    b.add_argument("--device", default="cuda" if _cuda() else "cpu")
    b.add_argument("--models", default="cnn,resnet18,lm", help='comma-separated; "" for the K sweep alone')
    b.add_argument("--k", type=int, default=None, help="buffer size (default per model)")
    b.add_argument("--small", action="store_true", default=None, help="tiny proxy sets (default on CPU)")
    b.add_argument("--full", action="store_false", dest="small",
                   help="the GPU's sizes on any device (e.g. the LM's 32k vocabulary on a CPU)")
    b.add_argument("--no-sweep", action="store_true")
    b.add_argument("--sweep-models", default="cnn", help="models of the K sweep (comma-separated)")
    b.add_argument("--sweep-k", default="1,16,64,256,1024", help="buffer sizes of the K sweep")
    b.add_argument("--sweep-chunks", default="auto,none,64",
                   help="the engine's students per pass in the K sweep: auto | none | an int, comma-separated")
    b.add_argument("--no-compile", action="store_true",
                   help="skip the torch.compile baseline (and the engine's compiled routes in the K sweep)")
    b.add_argument("--no-backends", action="store_true",
                   help="skip the rows by backend (the step, staging, merge and KD loss per backend)")
    b.add_argument("--chunk", default="auto", type=_chunk, help="students per pass of the engine: auto | none | an int")
    b.add_argument("--routes", default=None,
                   help="comma-separated: the engine's route choice times only these of its candidates "
                        "(a device run's time is short); default all")
    b.add_argument("--out", default="fastagg-bench.json")
    b.set_defaults(fn=_bench)
    i = sub.add_parser("info", help="which kernel backends are available here, and why not")
    i.set_defaults(fn=_info)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
