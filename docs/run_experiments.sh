#!/usr/bin/env bash
# Regenerates every table and plot of docs/results.md (about 35 minutes on 2 CPU cores;
# two experiments run at a time, one thread each). Needs: pip install -e ".[sim]" mnist1d, and
# apt-get install -y dataset-fashion-mnist.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
R=docs/results
ABL="fedadt-async/schedule=constant,fedadt-async/schedule=linear_warmup,fedadt-async/schedule=exp_saturation,fedadt-async/schedule=sigmoid,fedadt-async/schedule=teacher_accuracy,fedadt-async/factor=none,fedadt-async/student=applied"
MAIN="fedasync,fedbuff,fedadt-async,fedadt-buff"
sim() { fastagg simulate --quiet --seeds 3 "$@"; }
(
  sim --out $R/digits --algorithms "$MAIN,$ABL"
  sim --out $R/digits-harsh --alpha 0.9 --weights constant --sigma 2 \
      --algorithms "$MAIN,fedadt-async/schedule=constant,fedadt-async/factor=none,fedadt-async/student=applied,fedadt-buff/factor=none"
  sim --out $R/synthetic --dataset "synthetic(1,1)" --partition natural --algorithms "$MAIN"
  sim --out $R/mnist1d --dataset mnist1d --algorithms "$MAIN"
) > $R/log-a.txt 2>&1 &
(
  sim --out $R/fmnist-a0.1 --dataset fashion-mnist --dirichlet 0.1 --target 0.7 \
      --algorithms "$MAIN,fedadt-async/schedule=constant,fedadt-async/factor=none,fedadt-async/student=applied,fedadt-buff/factor=none"
  sim --out $R/fmnist-a0.5 --dataset fashion-mnist --dirichlet 0.5 --target 0.7 --algorithms "$MAIN"
) > $R/log-b.txt 2>&1 &
wait
# Sensitivity of the correction where it matters (harsh FedAsync on digits), and FedBuff with a
# constant lambda on both data sets: the runs that chose the defaults.
H="--alpha 0.9 --weights constant --sigma 2"
(
  sim --out $R/sens-strength $H --algorithms "fedasync,fedadt-async/schedule=constant;lam=0.5,fedadt-async/schedule=constant;lam=2,fedadt-async/schedule=constant;rho=0.5,fedadt-async/schedule=constant;steps=1,fedadt-async/schedule=constant;T=1,fedadt-buff/schedule=constant"
  sim --out $R/sens-proxy50 $H --proxy 50 --algorithms "fedasync,fedadt-async/schedule=constant"
  sim --out $R/sens-proxy500 $H --proxy 500 --algorithms "fedasync,fedadt-async/schedule=constant"
  sim --out $R/digits-buff-constant --algorithms "fedbuff,fedadt-buff/schedule=constant"
) > $R/log-c.txt 2>&1 &
(
  sim --out $R/fmnist-a0.1-constant --dataset fashion-mnist --dirichlet 0.1 --target 0.7 \
      --algorithms "fedadt-buff/schedule=constant,fedadt-async/schedule=constant;lam=2"
) > $R/log-d.txt 2>&1 &
wait
# Every ablation on Fashion-MNIST (both splits) and Synthetic too.
SCHED="fedadt-async/schedule=linear_warmup,fedadt-async/schedule=exp_saturation,fedadt-async/schedule=sigmoid,fedadt-async/schedule=teacher_accuracy"
(
  sim --out $R/fmnist-a0.1-schedules --dataset fashion-mnist --dirichlet 0.1 --target 0.7 --algorithms "fedasync,$SCHED"
  sim --out $R/synthetic-ablations --dataset "synthetic(1,1)" --partition natural \
      --algorithms "fedasync,fedadt-async/schedule=constant,$SCHED,fedadt-async/factor=none,fedadt-async/student=applied,fedbuff,fedadt-buff/factor=none"
) > $R/log-e.txt 2>&1 &
(
  sim --out $R/fmnist-a0.5-ablations --dataset fashion-mnist --dirichlet 0.5 --target 0.7 \
      --algorithms "fedasync,fedadt-async/schedule=constant,$SCHED,fedadt-async/factor=none,fedadt-async/student=applied"
) > $R/log-f.txt 2>&1 &
wait
# bf16 correction against fp32 (accuracy parity), three seeds
mkdir -p $R/parity
sim --out $R/parity/fmnist --dataset fashion-mnist --dirichlet 0.1 --target 0.7 \
    --algorithms "fedbuff,fedadt-buff,fedadt-buff/precision=bf16,fedasync,fedadt-async,fedadt-async/precision=bf16" \
    > $R/parity/fmnist_log.txt 2>&1
# bf16 update payloads and buffers (delta_dtype) against fp32, three seeds
mkdir -p $R/wire-bf16
sim --out $R/wire-bf16/fmnist --dataset fashion-mnist --dirichlet 0.1 --target 0.7 \
    --algorithms "fedbuff,fedbuff/updates=bf16,fedadt-buff,fedadt-buff/updates=bf16,fedasync,fedasync/updates=bf16,fedadt-async,fedadt-async/updates=bf16" \
    > $R/wire-bf16/fmnist_log.txt 2>&1
