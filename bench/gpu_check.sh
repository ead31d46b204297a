#!/usr/bin/env bash
# Everything this project checks on a lent GPU machine, in one run (see docs/benchmarks.md for results).
# Expects torch (CUDA) and onnx there; soundfile/soxr/cffi wheels carried in .whl/ (see the device notes).
set -uo pipefail
out=${OUT:-/tmp/gpu-out}; mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
# The project's packages under their installed names, without an install.
mkdir -p /tmp/site && ln -sfn "$PWD/cpc_stream" /tmp/site/cpc_stream && ln -sfn "$PWD/training" /tmp/site/cpc_training \
  && ln -sfn "$PWD/export" /tmp/site/cpc_export
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, onnxscript; print('torch', torch.__version__, 'onnxscript', onnxscript.__version__)"
echo "== training throughput, batch 8 (the paper's per-GPU batch)"
python3 bench/train_throughput.py --steps 20 --batch 8 --variants fp32,bf16,bf16-compile 2>&1 | grep -v Warning | tee "$out/train8.txt"
echo "== training throughput, batch 64 on one GPU (the paper's effective batch)"
python3 bench/train_throughput.py --steps 10 --batch 64 --variants bf16,bf16-compile 2>&1 | grep -v Warning | tee "$out/train64.txt"
echo "== cpc-train on CUDA (bf16), bundled speech, 40 steps, then resumed to 60"
python3 -m cpc_training.train --quiet train.out_dir=/tmp/gpurun train.max_steps=40 train.log_every=10 data.workers=4 2>&1 | tail -2
python3 -m cpc_training.train --quiet train.out_dir=/tmp/gpurun train.max_steps=60 train.log_every=10 data.workers=4 2>&1 | tail -2
tail -n 2 /tmp/gpurun/metrics.jsonl
echo "== streaming step on GPU (PyTorch)"
python3 bench/stream_step_gpu.py 2>&1 | grep -v Warning | tee "$out/stream_gpu.txt"
