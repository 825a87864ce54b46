#!/usr/bin/env bash
# One device call: GPU tests of the engine and kernels, `fastagg bench` on CUDA, and the merge
# kernel table again. Results land in $OUT (gpu_bench.json, gpu_merge.json, logs).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
FASTAGG_TEST_DEVICE=cuda timeout 120 python3 -m pytest -q -p no:cacheprovider -p no:warnings \
    tests/test_kernels_triton.py tests/test_correction.py -k "cuda or triton or kd or merge or fused" 2>&1 | tail -3
timeout 330 python3 -m fastagg.cli bench --device cuda --out "$OUT/gpu_bench.json" 2>&1 | grep -v -i warn | tee "$OUT/gpu_bench_log.txt"
OUT=$OUT timeout 90 python3 bench/gpu_check.py merge > "$OUT/gpu_merge_log.txt" 2>&1
mv "$OUT/gpu_results.json" "$OUT/gpu_merge.json" 2>/dev/null
grep -E "^merge K" "$OUT/gpu_merge_log.txt"
