#!/usr/bin/env bash
# The device script. Results land in $OUT; copy them to bench/results/. The session has 15
# minutes of device time in all, start-up included, one call at most 10, and the machine goes
# back 30 s after a call: run `all` in ONE call (timeout_s=600), then part 3 at once if time is left.
#   bash bench/gpu_run.sh all parts 1 and 2 with tighter limits (~570 s), then the summary table
#   bash bench/gpu_run.sh 1   device/versions, CUDA tests of the grouped-conv kernels and the
#                             engine, the kernels vs cuDNN per layer, `fastagg bench` on `cnn`
#   bash bench/gpu_run.sh 2   `fastagg bench` on resnet18 and lm, and the K sweep
#   bash bench/gpu_run.sh 3   if time is left: the distributed aggregator's CUDA tests and HTTP clients
#                             feeding a CUDA aggregator from threads (~40 s), then
#                             `fastagg simulate --device cuda` on Fashion-MNIST,
#                             FedADT through cuDNN and through the Triton conv routes (the data
#                             travels in .carry/fashion-mnist: copy the four .gz files of
#                             /usr/share/datasets/fashion-mnist there and name .carry in `carry`)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
part=${1:-1}
if [ "$part" = all ]; then  # a bench stopped by its timeout saves what it measured (rows marked incomplete)
  T_TESTS=150 T_CONV=80 T_CNN=170 T_REST=170 bash "$0" 1
  T_REST=170 bash "$0" 2
  # printed, not saved: at most 8 files come back from $OUT (this call leaves 7), and the JSONs hold it all
  python3 bench/gpu_summary.py "$OUT/gpu_bench_cnn.json" "$OUT/gpu_bench_rest.json"
  exit 0
fi
if [ "$part" = 1 ]; then
  { nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python3 -c "import torch, triton, platform; print('torch', torch.__version__, 'triton', triton.__version__, 'python', platform.python_version())"
    python3 -c "import torch, torch.nn.functional as F; x, w = torch.randn(2, 3, 8, 8, device='cuda'), torch.randn(4, 5, 3, 3, 3, device='cuda')
with torch.autocast('cuda', dtype=torch.bfloat16): print('conv under vmap + autocast:', torch.func.vmap(lambda ww: F.conv2d(x, ww))(w).dtype)"
  } | tee "$OUT/device.txt"
  # eight pytest workers where pytest-xdist is there (the device image has it): most of the time
  # is Triton compiling each kernel variant, CPU work that the 16 cores share out
  XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
  FASTAGG_TEST_DEVICE=cuda timeout ${T_TESTS:-180} python3 -m pytest -q -p no:cacheprovider -p no:warnings $XDIST \
      tests/test_grouped_conv.py tests/test_correction.py tests/test_simulate_routes.py 2>&1 | tail -6 | tee -a "$OUT/device.txt"
  OUT=$OUT timeout ${T_CONV:-120} python3 bench/gpu_conv.py 2>&1 | grep -v -i warn | tee "$OUT/gpu_conv_log.txt"
  timeout ${T_CNN:-200} python3 -m fastagg.cli bench --device cuda --models cnn --no-sweep --out "$OUT/gpu_bench_cnn.json" \
      2>&1 | grep -v -i warn | tee "$OUT/gpu_bench_cnn_log.txt"
elif [ "$part" = 2 ]; then
  timeout ${T_REST:-290} python3 -m fastagg.cli bench --device cuda --models resnet18,lm --out "$OUT/gpu_bench_rest.json" \
      2>&1 | grep -v -i warn | tee "$OUT/gpu_bench_rest_log.txt"
else
  # the distributed aggregator on the GPU: two gloo ranks sharing it, and NCCL's path on one rank
  FASTAGG_TEST_DEVICE=cuda timeout 90 python3 -m pytest -q -p no:cacheprovider -p no:warnings \
      tests/test_distributed.py tests/test_http.py -k "cuda or nccl or direct_submits or concurrent_clients" \
      2>&1 | tail -4 | tee "$OUT/gpu_distributed_tests.txt"
  FASTAGG_FASHION_DIR=$PWD/.carry/fashion-mnist timeout 200 python3 -m fastagg.cli simulate --device cuda \
      --dataset fashion-mnist --dirichlet 0.1 --arrivals 600 --quiet --out "$OUT/sim" \
      --algorithms "fedbuff,fedadt-buff/conv=native,fedadt-buff/conv=triton,fedadt-buff/conv=triton_cl" \
      2>&1 | grep -v -i warn | tee "$OUT/gpu_simulate_log.txt"
fi
