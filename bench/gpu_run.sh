#!/usr/bin/env bash
# One device call (~8 minutes on an H100): the grouped-convolution kernels and the engine tested
# without the interpreter, the kernels against cuDNN layer by layer, then `fastagg bench` on CUDA
# (both conv routes timed per pass size, baselines, limits, K sweep). Results land in $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton, platform; print('torch', torch.__version__, 'triton', triton.__version__, 'python', platform.python_version())"
} | tee "$OUT/device.txt"
FASTAGG_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider -p no:warnings \
    tests/test_grouped_conv.py tests/test_correction.py 2>&1 | tail -4 | tee "$OUT/gpu_tests.txt"
OUT=$OUT timeout 120 python3 bench/gpu_conv.py 2>&1 | grep -v -i warn | tee "$OUT/gpu_conv_log.txt"
timeout 330 python3 -m fastagg.cli bench --device cuda --out "$OUT/gpu_bench.json" 2>&1 | grep -v -i warn \
    | tee "$OUT/gpu_bench_log.txt"
