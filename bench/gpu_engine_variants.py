"""Device check: does cuDNN's algorithm search (benchmark mode) or a channels-last layout speed
up the vmap'd (grouped) convolutions of the correction engine? CNN of `fastagg bench`, bf16."""

import json
import os

import torch

from fastagg import bench
from fastagg.aggregator import Aggregator
from fastagg.correction import KDCorrection
from fastagg.rules import FedBuff

OUT = os.environ.get("OUT", "out")
dev = torch.device("cuda")
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
for K in (16, 64):
    for benchmark in (False, True):
        for channels_last in (False, True):
            model, proxy = bench.make("cnn", dev)
            if channels_last:
                proxy = proxy.contiguous(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = benchmark
            corr = KDCorrection(proxy, precision="bf16", schedule=1.0, cuda_graphs=False)
            agg = Aggregator(model, FedBuff(1), correction=corr, device=dev)
            teacher = corr.teacher(agg.params, 0)
            students = agg.params + 1e-3 * torch.randn(K, agg.spec.numel, device=dev)
            out = torch.empty_like(students)
            t = bench.timeit(lambda: corr.engine(students, teacher.probs, out=out), dev, reps=3, warmup=2)
            row = {"K": K, "cudnn_benchmark": benchmark, "channels_last": channels_last, "ms": t * 1e3,
                   "updates_per_s": K / t}
            res["rows"].append(row)
            print(row, flush=True)
            del students, out, agg, corr
            torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "gpu_engine_variants.json"), "w"), indent=1)
