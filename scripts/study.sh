#!/usr/bin/env bash
# The CPU-sized study of docs/results.md: a synthetic 12-speaker corpus, CPC training on its train split,
# then Table 1 (CPC vs MFCC vs random init, phone and speaker probes) on its held-out test split, and the
# figures. About 2 hours on 2 cores (4000 steps); STEPS overrides the training length.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
steps=${STEPS:-4000}
[ -f data/synth/test_split.txt ] || cpc-synth --out data/synth --speakers 12 --utterances 120
cpc-train --quiet --config config.yaml data.root=data/synth data.train_split=data/synth/train_split.txt \
  model.norm=none model.enc_dim=256 model.ctx_dim=128 train.lr=2e-3 train.warmup_steps=50 \
  train.max_steps="$steps" train.ckpt_every=250 train.log_every=25 data.workers=1 train.out_dir=runs/synth
args=(--root data/synth --train-split data/synth/train_split.txt --test-split data/synth/test_split.txt
      --phones data/synth/converted_aligned_phones.txt --checkpoint runs/synth/checkpoint.pt)
cpc-eval table "${args[@]}" --baselines random,mfcc,mfcc13,mfcc-causal --json runs/synth/table1.json --save-probes runs/synth/probes
cpc-eval plots "${args[@]}" --out runs/synth/figures
