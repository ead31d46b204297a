#!/usr/bin/env bash
# The README's first command: set up, train a CPU-sized CPC model on the bundled LibriSpeech utterances
# (about 3 minutes on 2 cores), export it to a streaming ONNX graph with its equality proof, and extract
# offline features of a held-out utterance, then serve it live through cpc-stream to cpc-listen.
# Everything lands in runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
run=runs/demo
steps=${DEMO_STEPS:-300}
echo "== cpc-train: $steps steps of a 128/64 model on data/librispeech-mini (train-clean-100 part)"
cpc-train --config config.yaml train.out_dir=$run model.enc_dim=128 model.ctx_dim=64 train.lr=2e-3 \
  train.warmup_steps=20 train.max_steps="$steps" train.ckpt_every=100 data.workers=1 train.log_every=10
echo "== cpc-export: streaming graph, F=4 hops per call, proven against the offline model"
cpc-export --checkpoint $run/checkpoint.pt --out $run/cpc.onnx --frames-per-call 4
echo "== cpc-features: offline z, c and k-step scores of a test-clean utterance"
cpc-features --checkpoint $run/checkpoint.pt --out $run/features \
  data/librispeech-mini/test-clean/1089/134686/1089-134686-0000.flac
echo "== cpc-stream: the daemon streams a test-clean utterance at real time; cpc-listen shows and records it"
cpc-listen --until-eos --record $run/listened.npz &
listener=$!
cpc-stream --model $run/cpc.onnx --file data/librispeech-mini/test-clean/1089/134686/1089-134686-0001.flac \
  --realtime --wait-subscribers 1
wait $listener
echo "demo: done. Model $run/cpc.onnx, metrics $run/metrics.jsonl, features $run/features/, stream $run/listened.npz"
