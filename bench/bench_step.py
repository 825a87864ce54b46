"""pytest-benchmark suites of the server step's correction stage: fastagg's engine against the
stock-PyTorch baselines of `fastagg bench`, on the same models.

    pytest bench/bench_step.py                              # CPU, small proxy sets
    FASTAGG_BENCH_DEVICE=cuda pytest bench/bench_step.py    # GPU, the full sizes

Each case times one correction of K students; compare rows of the same model (pytest-benchmark
groups them by model). `fastagg bench` gives the same figures as a table with the limits.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastagg import bench
from fastagg.aggregator import Aggregator
from fastagg.correction import KDCorrection
from fastagg.rules import FedBuff

DEVICE = torch.device(os.environ.get("FASTAGG_BENCH_DEVICE", "cpu"))
SMALL = DEVICE.type == "cpu"
K = {"cnn": 8, "resnet18": 4, "lm": 4} if SMALL else {"cnn": 128, "resnet18": 32, "lm": 16}


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module", params=["cnn", "resnet18", "lm"])
def case(request):
    name = request.param
    model, proxy = bench.make(name, DEVICE, SMALL)
    model.eval()
    corr = KDCorrection(proxy, schedule=1.0, precision="bf16" if DEVICE.type == "cuda" else "fp32",
                        cuda_graphs=DEVICE.type == "cuda")
    agg = Aggregator(model, FedBuff(1), correction=corr, device=DEVICE)
    teacher = corr.teacher(agg.params, 0)
    g = torch.Generator().manual_seed(0)
    students = agg.params + 1e-3 * torch.randn(K[name], agg.spec.numel, generator=g).to(DEVICE)
    return name, model, agg.spec, proxy, corr, teacher.probs, students


@pytest.mark.parametrize("impl", ["engine", "per_client_eager", "vmap_fp32", "vmap_bf16"])
def test_bench_correction(benchmark, case, impl):
    name, model, spec, proxy, corr, probs, students = case
    benchmark.group = f"correction {name} K={students.shape[0]} ({DEVICE.type})"
    if impl == "engine":
        out = torch.empty_like(students)
        fn = lambda: corr.engine(students, probs, out=out)  # noqa: E731
    elif impl == "per_client_eager":
        fn = lambda: bench.per_client_eager(model, spec, proxy, probs.float(), 3.0, students)  # noqa: E731
    else:
        vm = bench.vmap_baseline(model, spec, proxy, probs.float(), 3.0, bf16=impl == "vmap_bf16")
        fn = lambda: vm(students)  # noqa: E731
    fn()  # warm-up (CUDA-graph capture, autotuning, conv route choice)
    benchmark.pedantic(lambda: (fn(), _sync()), rounds=3, iterations=1)
