"""Training throughput of the paper's configuration: forward + backward + Adam step on batches of 8
windows of 20480 samples (512/256 model, K=12, 128 negatives from the batch), random audio in memory.

    python bench/train_throughput.py [--steps 10] [--batch 8] [--variants fp32,bf16,bf16-compile]

Prints the machine, then per variant: seconds per step, steps/s, audio seconds per second, the ratio to
the first variant (the baseline, fp32 eager, run in the same process) and how long one epoch of
LibriSpeech train-clean-100 (100.6 h) would take at that rate. Also times the data path alone
(WindowBatches decoding FLAC windows of the bundled speech) to show whether loading keeps up.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time
from pathlib import Path

import torch
from cpc_training.config import Config
from cpc_training.data import WindowBatches, scan_librispeech
from cpc_training.loss import sample_negatives
from cpc_training.model import CPC
from cpc_training.train import TrainStep

EPOCH_AUDIO_S = 100.6 * 3600  # train-clean-100
REPO = Path(__file__).resolve().parent.parent


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    text = f"{cpu}, {os.cpu_count()} cpus, torch {torch.__version__}, threads {torch.get_num_threads()}"
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text


def time_variant(variant: str, device: torch.device, batch: int, steps: int, warmup: int) -> float:
    cfg = Config()
    torch.manual_seed(0)
    model = CPC(cfg.model).to(device)
    net = TrainStep(model)
    if "compile" in variant:
        net = torch.compile(net)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if "bf16" in variant else contextlib.nullcontext()
    frames = cfg.data.window // 160
    wav = torch.randn(batch, cfg.data.window, device=device) * 0.1
    neg = sample_negatives(batch, frames, cfg.negatives.count, "batch").to(device)

    def step() -> None:
        with amp:
            loss, _ = net(wav, neg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--variants", default=None, help="fp32, bf16, fp32-compile, bf16-compile (first is the baseline)"
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    variants = (args.variants or ("fp32,bf16,bf16-compile" if device.type == "cuda" else "fp32")).split(",")
    print(f"machine: {machine(device)}")
    print(
        f"config: paper model 512/256 K=12, batch {args.batch} x 20480 samples, 128 negatives, {args.steps} timed steps"
    )
    base = None
    for v in variants:
        sec = time_variant(v, device, args.batch, args.steps, args.warmup)
        base = base or sec
        audio = args.batch * 20480 / 16000 / sec
        print(
            f"{v:>14}: {sec * 1e3:8.1f} ms/step  {1 / sec:7.2f} steps/s  {audio:8.1f} audio-s/s  "
            f"x{base / sec:5.2f} vs {variants[0]}  epoch of train-clean-100: {EPOCH_AUDIO_S / audio / 3600:6.2f} h"
        )
    utts, _ = scan_librispeech(REPO / "data/librispeech-mini", "train-clean-100")
    data = WindowBatches(utts, 20480, args.batch, "mixed", seed=0)
    t = time.perf_counter()
    for s in range(20):
        data[s]
    per = (time.perf_counter() - t) / 20
    print(
        f"data: one worker decodes a batch of {args.batch} FLAC windows in {per * 1e3:.1f} ms "
        f"({args.batch * 20480 / 16000 / per:.0f} audio-s/s per worker)"
    )


if __name__ == "__main__":
    main()
