#!/usr/bin/env bash
# Create .venv and install cpc-stream with the CPU runtime, training and test tools.
# torch: the CPU build 2.13.0 (see README, "Dependencies"); a torch already in .venv is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[cpu,train,eval,dev]"
echo "setup: ok ($(.venv/bin/python -c 'import torch, onnxruntime; print("torch", torch.__version__, "onnxruntime", onnxruntime.__version__)'))"
