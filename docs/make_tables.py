"""Print the markdown tables of docs/results.md from docs/results/*/results.json."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
from fastagg.simulate import format_table, table  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "results")
for name in sys.argv[1:] or sorted(os.listdir(ROOT)):
    path = os.path.join(ROOT, name, "results.json")
    if not os.path.exists(path):
        continue
    res = json.load(open(path))
    cfg = res["config"]
    print(f"### {name}\n")
    print(f"`{cfg['dataset']}`, {cfg['clients']} clients ({cfg['partition']}"
          + (f", Dirichlet {cfg['dirichlet']}" if cfg["partition"] == "dirichlet" else "")
          + f"), concurrency {cfg['concurrency']}, {cfg['arrivals']} updates per run, speed spread σ = {cfg['sigma']},"
          f" FedAsync α = {cfg['alpha']}, {cfg['weights']} staleness weights, FedBuff K = {cfg['buffer']},"
          f" {cfg['proxy']} proxy inputs, seeds {res['seeds']}. Plot: `results/{name}/accuracy.png`.\n")
    print(format_table(table(res, cfg["target"]), cfg["target"], markdown=True))
    print()
