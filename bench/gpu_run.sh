#!/usr/bin/env bash
# The device script, in two calls of under 5 minutes each (one call may run 10 minutes, the
# session has 15 in all, start-up included). Results land in $OUT; copy them to bench/results/.
#   bash bench/gpu_run.sh 1   device/versions, CUDA tests of the grouped-conv kernels and the
#                             engine, the kernels vs cuDNN per layer, `fastagg bench` on `cnn`
#   bash bench/gpu_run.sh 2   `fastagg bench` on resnet18 and lm, and the K sweep
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
part=${1:-1}
if [ "$part" = 1 ]; then
  { nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python3 -c "import torch, triton, platform; print('torch', torch.__version__, 'triton', triton.__version__, 'python', platform.python_version())"
  } | tee "$OUT/device.txt"
  FASTAGG_TEST_DEVICE=cuda timeout 120 python3 -m pytest -q -p no:cacheprovider -p no:warnings \
      tests/test_grouped_conv.py tests/test_correction.py 2>&1 | tail -6 | tee "$OUT/gpu_tests.txt"
  OUT=$OUT timeout 150 python3 bench/gpu_conv.py 2>&1 | grep -v -i warn | tee "$OUT/gpu_conv_log.txt"
  timeout 230 python3 -m fastagg.cli bench --device cuda --models cnn --no-sweep --out "$OUT/gpu_bench_cnn.json" \
      2>&1 | grep -v -i warn | tee "$OUT/gpu_bench_cnn_log.txt"
else
  timeout 290 python3 -m fastagg.cli bench --device cuda --models resnet18,lm --out "$OUT/gpu_bench_rest.json" \
      2>&1 | grep -v -i warn | tee "$OUT/gpu_bench_rest_log.txt"
fi
