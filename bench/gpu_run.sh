#!/usr/bin/env bash
# The device script. Results land in $OUT; copy them to bench/results/. The session has 15
# minutes of device time in all, start-up included, one call at most 10, and the machine goes
# back 30 s after a call: run `all` in ONE call (timeout_s=600), then part 2 (or 3) at once if time is left.
#   bash bench/gpu_run.sh all part 1 with tighter limits, then the K sweep (~560 s), then the
#                             summary table: device/versions, the CUDA tests of what changed since
#                             the last run (full log in cuda_tests.txt), `fastagg bench` on `cnn`
#                             (the fastest routes of the last run; the chain's and the dense ops'
#                             variants timed per shape; the device-update step with the compute
#                             stream and with submit_many; no figures by backend, measured in the
#                             fifteenth), the K sweep of `cnn` (one pass and passes of 256,
#                             compiled_fused_dense, with the memory of each K); with T_PROF=70 also
#                             bench/gpu_profile.py (the first layer and its chain, the second
#                             layer's variants, the kernels of a pass per route); 6 files in $OUT
#   bash bench/gpu_run.sh 1   device/versions, all CUDA tests of the kernels and the engine, the
#                             grouped-conv kernels vs cuDNN per layer, `fastagg bench` on `cnn`
#   bash bench/gpu_run.sh 2   `fastagg bench` on resnet18 and lm (the routes that won or came close, and
#                             lm's head routes),
#                             then lm's pass profiled against the compiled vmap's and resnet18's
#                             compiled_dense pass (~390 s; T_REST, T_LM_PROF, T_R18_PROF set the limits)
#   bash bench/gpu_run.sh 3   if time is left: the distributed aggregator's CUDA tests and HTTP clients
#                             feeding a CUDA aggregator from threads (~40 s), bench/bench_vocab_head.py
#                             (the LM's head route by vocabulary, ~100 s), bench/bf16_regime.py
#                             (bf16 vs fp32 KD gradients by student-teacher distance, ~20 s), then
#                             `fastagg simulate --device cuda` on Fashion-MNIST,
#                             FedADT through cuDNN and through the Triton conv routes (the data
#                             travels in .carry/fashion-mnist: copy the four .gz files of
#                             /usr/share/datasets/fashion-mnist there and name .carry in `carry`)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
# the C++ host kernels (staging a host update into its pinned row; pybind11 is in the device's
# image): without them the fifteenth session's H200 run staged with numba, one thread, 1.1 ms per
# `cnn` update (torch took 0.51 there), and the host step ran at 613 updates/s
if ! python3 -c "from fastagg import cpu_cpp; assert cpu_cpp.available()[0]" 2>/dev/null; then  # missing or stale
  python3 setup.py build_ext --inplace -q > /tmp/build_ext.txt 2>&1 || tail -3 /tmp/build_ext.txt
fi
part=${1:-1}
if [ "$part" = all ]; then  # a bench stopped by its timeout saves what it measured (rows marked incomplete)
  # Tests: the twentieth session's H100 run passed the dense ops' and the work rows' CUDA tests;
  # here what changed since: every compiled route captured as a CUDA graph (not only the dense
  # ones), the shared chain's forward storing per student (the kernels against float64, the dense
  # routes against native), and the graphed routes' replays. Then cnn in one pass of 128 students
  # (its four fastest routes, now all captured), then the K sweep of cnn through
  # compiled_fused_dense with its memory now measured (the first call's peak, what stays held),
  # K = 1024 in passes of 256 too (one pass of 1024 ran out of memory). About 560 s with the
  # start; lm (its compiled route captured now: predicted 4.8-5.3 ms a pass of 16, from 6.85) and
  # its profile against the compiled vmap in part 2; the kernel profile of cnn with T_PROF=70.
  # The chain's columns kernels (twenty-first session) are in the kernel tests and the two auto
  # tests; the cnn bench's route timing then times them against the others per shape
  # (shared_fwd_ms, shared_wgrad_ms in its JSON), and every per-shape choice (the chain's methods,
  # the dense ops' variants) is now timed as CUDA-graph replays ("timed" in those rows), the dense
  # ops' variants now including one grouped convolution for all students ("grouped"). About 16
  # more tests than the twentieth run's 34 (100 s there), most of them the columns kernels'
  # autotuning: 170 s for the tests. The twenty-second session adds the dense ops' rows kernels
  # (forward, stride-1 data gradient, weight gradient: their float64 tests; the cnn bench times
  # them against cuDNN's ways per shape: "rows", "rows dgrad", " + rows wgrad" in dense_conv_ms)
  # and a choice that survives a way that fails: 190 s for the tests, 170 for the cnn bench. The
  # twenty-third adds tests/test_vocab_head.py (the head route's Triton kernels on the GPU, its
  # CUDA-graph test, the rest CPU cases, two of them compiling): 210 s for the tests.
  TESTS="tests/test_grouped_conv.py::test_rows_weight_gradient_matches_float64 tests/test_grouped_conv.py::test_rows_forward_matches_float64 tests/test_grouped_conv.py::test_rows_data_gradient_matches_float64 tests/test_dense_conv.py::test_a_way_that_fails_is_left_out_of_the_choice_and_the_gradients_stay_right tests/test_dense_conv.py::test_compiled_routes_replayed_as_cuda_graphs_equal_native tests/test_dense_conv.py::test_dense_routes_equal_native tests/test_shared_conv.py::test_shared_chain_kernels_match_float64 tests/test_shared_conv.py::test_window_columns_hold_each_pixels_receptive_field_by_window_position tests/test_shared_conv.py::test_shared_chain_weight_gradient_auto_times_each_method_once_on_a_gpu tests/test_shared_conv.py::test_the_forwards_auto_choice_is_timed_once_per_shape_on_a_gpu tests/test_shared_conv.py::test_loop_routes_replayed_as_cuda_graphs_equal_native tests/test_dense_conv.py::test_time_each_times_captured_graphs_on_a_gpu_and_says_when_it_cannot tests/test_dense_conv.py::test_nothing_is_timed_while_a_cuda_graph_is_captured tests/test_dense_conv.py::test_auto_times_the_grouped_way_too tests/test_work_rows.py tests/test_correction.py::test_cuda_graph_engine_and_pinned_ingest_match_eager tests/test_correction.py::test_the_teachers_forward_replayed_as_a_cuda_graph_equals_eager tests/test_vocab_head.py" \
      T_TESTS=210 T_CONV=0 T_PROF=${T_PROF:-0} T_CNN=170 T_SYNCS=0 \
      CNN_ARGS="--chunk none --no-backends --routes compiled_fused_dense,compiled_fused_cl,compiled_dense,compiled" \
      bash "$0" 1
  timeout 150 python3 -m fastagg.cli bench --device cuda --models "" --sweep-models cnn \
      --sweep-k 1,16,64,256,1024 --sweep-chunks none,256 --routes compiled_fused_dense \
      --out "$OUT/gpu_bench_sweep.json" 2>&1 | grep -v -i warn | tee "$OUT/gpu_bench_sweep_log.txt" | tail -12
  # printed, not saved: the JSONs hold it all (this call leaves 6 files in $OUT)
  python3 bench/gpu_summary.py "$OUT/gpu_bench_cnn.json" "$OUT/gpu_bench_sweep.json"
  exit 0
fi
if [ "$part" = 1 ]; then
  { nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python3 -c "import torch, triton, platform; print('torch', torch.__version__, 'triton', triton.__version__, 'python', platform.python_version())"
    python3 -c "from fastagg import backends; print('host backend', backends.resolve('auto', 'cpu'), 'threads', backends.cpu_threads())"
    python3 -c "import torch, torch.nn.functional as F; x, w = torch.randn(2, 3, 8, 8, device='cuda'), torch.randn(4, 5, 3, 3, 3, device='cuda')
with torch.autocast('cuda', dtype=torch.bfloat16): print('conv under vmap + autocast:', torch.func.vmap(lambda ww: F.conv2d(x, ww))(w).dtype)"
  } | tee "$OUT/device.txt"
  # eight pytest workers where pytest-xdist is there (the device image has it): most of the time
  # is Triton compiling each kernel variant, CPU work that the 16 cores share out
  XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
  # the whole pytest output (which test failed, and why) goes to cuda_tests.txt; -rf lists failures
  # SIGINT at the limit: pytest still prints its summary of what failed (SIGTERM loses it)
  FASTAGG_TEST_DEVICE=cuda timeout -s INT ${T_TESTS:-240} python3 -m pytest -p no:cacheprovider -p no:warnings \
      -p no:benchmark -rf --tb=short $XDIST \
      ${TESTS:-tests/test_grouped_conv.py tests/test_correction.py tests/test_simulate_routes.py tests/test_shared_conv.py} \
      > "$OUT/cuda_tests.txt" 2>&1
  echo "CUDA tests: exit $? ($(tail -1 "$OUT/cuda_tests.txt"))" | tee -a "$OUT/device.txt"
  # where the host waits for the device in the step (sync debug mode; ~20 s), into device.txt
  if [ "${T_SYNCS:-40}" != 0 ]; then
    timeout ${T_SYNCS:-40} python3 bench/gpu_syncs.py 2>&1 | grep -v -i "userwarning" | tail -30 | tee -a "$OUT/device.txt"
  fi
  if [ "${T_CONV:-120}" != 0 ]; then
    OUT=$OUT timeout ${T_CONV:-120} python3 bench/gpu_conv.py 2>&1 | grep -v -i warn | tee "$OUT/gpu_conv_log.txt"
  fi
  # the headline first: the step, and which route wins (route_timings in the JSON)
  timeout ${T_CNN:-200} python3 -m fastagg.cli bench --device cuda --models cnn --no-sweep ${CNN_ARGS:-} \
      --out "$OUT/gpu_bench_cnn.json" \
      2>&1 | grep -v -i warn | tee "$OUT/gpu_bench_cnn_log.txt"
  if [ "${T_CONV:-120}" = 0 ] && [ "${T_PROF:-130}" != 0 ]; then  # `all`: the first layer's alternatives and the kernels of a pass per route
    OUT=$OUT timeout ${T_PROF:-130} python3 bench/gpu_profile.py 2>&1 \
        | grep -v -i warn | tee "$OUT/gpu_profile_log.txt"
  fi
elif [ "$part" = 2 ]; then  # after `all`: ~390 s; the routes that won or came close before
  timeout ${T_REST:-280} python3 -m fastagg.cli bench --device cuda --models ${MODELS_REST:-resnet18,lm} \
      ${REST_ARGS:---no-sweep --no-backends --routes compiled_dense,compiled,native,head,compiled_head} \
      --out "$OUT/gpu_bench_rest.json" \
      2>&1 | grep -v -i warn | tee "$OUT/gpu_bench_rest_log.txt"
  # lm's pass, kernel by kernel, against the compiled bf16 vmap's (which beat the engine on lm in
  # the twentieth session: 3,082 updates/s against 2,336); ~40 s. Then resnet18's compiled_dense
  # pass (its best route, never profiled on the H100: the profile's time ran out at cnn each time)
  OUT=$OUT/profile_lm timeout ${T_LM_PROF:-60} python3 bench/gpu_profile.py --profiles-only --models lm \
      --routes compiled,compiled_vmap_baseline 2>&1 | grep -v -i warn | tee "$OUT/gpu_profile_lm_log.txt"
  OUT=$OUT/profile_resnet18 timeout ${T_R18_PROF:-60} python3 bench/gpu_profile.py --profiles-only \
      --models resnet18 --routes compiled_dense 2>&1 | grep -v -i warn | tee "$OUT/gpu_profile_resnet18_log.txt"
  # the rows kernels against cuDNN's per-student ways pass by pass (twenty-second session), the
  # autotuned configs with them; its JSON is written after each layer (cnn's first); printed, not
  # logged to a file (this part leaves 7 files; at most 8 come back)
  OUT=$OUT timeout ${T_ROWS:-60} python3 bench/gpu_rows.py --models cnn,resnet18 2>&1 | grep -v -i warn | tail -40
else
  # the distributed aggregator on the GPU: two gloo ranks sharing it, and NCCL's path on one rank
  FASTAGG_TEST_DEVICE=cuda timeout 90 python3 -m pytest -q -p no:cacheprovider -p no:warnings \
      tests/test_distributed.py tests/test_http.py -k "cuda or nccl or direct_submits or concurrent_clients" \
      2>&1 | tail -4 | tee "$OUT/gpu_distributed_tests.txt"
  # the LM's head route (twenty-third session) against native and the compiled bf16 vmap by
  # vocabulary, time and peak memory, each method in a process of its own (~100 s)
  timeout 150 python3 bench/bench_vocab_head.py --device cuda --k 16 --vocab 32000,128000 --precision bf16 \
      --methods native,head,compiled_vmap --rounds 1 --out "$OUT/gpu_vocab_head.json" 2>&1 | grep -v -i warn
  # the bf16 correction against fp32 by student-teacher distance, with the GPU's bf16 convolutions (~20 s)
  timeout 60 python3 bench/bf16_regime.py --device cuda --out "$OUT/gpu_bf16_regime.json" 2>&1 \
      | grep -v -i warn  # printed only: the JSON holds it (at most 8 files come back)
  FASTAGG_FASHION_DIR=$PWD/.carry/fashion-mnist timeout 200 python3 -m fastagg.cli simulate --device cuda \
      --dataset fashion-mnist --dirichlet 0.1 --arrivals 600 --quiet --out "$OUT/sim" \
      --algorithms "fedbuff,fedadt-buff/conv=native,fedadt-buff/conv=triton,fedadt-buff/conv=triton_cl" \
      2>&1 | grep -v -i warn | tee "$OUT/gpu_simulate_log.txt"
fi
