"""cpc-train: fit the causal CPC model with InfoNCE.

    cpc-train --config config.yaml [section.key=value ...]           one process (GPU if present, else CPU)
    torchrun --nproc_per_node=8 -m cpc_training.train --config ...   several GPUs (DDP), several nodes alike

A run lives in train.out_dir: checkpoint.pt (written atomically, so a kill at any moment leaves the last
good one), metrics.jsonl (one JSON object per logged step) and config.yaml (the resolved configuration).
Starting again with the same out_dir resumes exactly: model, optimiser, scheduler and step are restored,
and every random draw after initialisation is a function of (seed, step, rank), so the resumed run sees
the batches and negatives it would have seen.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cpc_stream.errors import UserError, run_cli
from cpc_stream.files import atomic_write

from . import config as config_mod
from .checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from .config import HOP, Config
from .data import WindowBatches, read_split, scan_librispeech, select_ids
from .loss import info_nce, sample_negatives
from .model import CPC


class TrainStep(nn.Module):
    """The model plus its loss in one forward, so that DDP sees every parameter used in forward."""

    def __init__(self, model: CPC):
        super().__init__()
        self.model = model

    def forward(self, wav: torch.Tensor, neg_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, c = self.model(wav)
        return info_nce(self.model, z, c, neg_idx)


def step_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def trim_metrics(path: Path, step: int) -> None:
    """Keep the records of `path` (metrics.jsonl) up to `step`, the checkpoint's: a run killed after its
    last checkpoint logged steps that the resumed run logs again. A line cut short by the kill goes too.
    The file is rewritten atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            kept.append(line + "\n")
    with atomic_write(path) as f:
        f.write("".join(kept).encode())


def validate(cfg: Config) -> None:
    frames = cfg.data.window // HOP
    if cfg.data.window % HOP:
        raise UserError(
            f"config key data.window: {cfg.data.window} is not a multiple of the {HOP}-sample hop"
        )
    if frames <= cfg.model.n_steps:
        raise UserError(
            f"config key data.window: {frames} frames leave nothing to predict {cfg.model.n_steps} steps ahead"
        )
    if cfg.negatives.source == "batch_excl_current" and cfg.data.batch_size < 2:
        raise UserError("negatives.source=batch_excl_current needs data.batch_size >= 2")


def pick_device(cfg: Config, local_rank: int) -> torch.device:
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("config key train.device: cuda asked for, but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def train(cfg: Config, quiet: bool = False) -> dict:
    """Run (or resume) training as configured; returns the final summary."""
    validate(cfg)
    distributed = "RANK" in os.environ
    rank, world, local_rank = 0, 1, 0
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(cfg, local_rank)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    main_proc = rank == 0
    out = Path(cfg.train.out_dir)
    ckpt_path = out / CHECKPOINT
    if main_proc:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create train.out_dir {out}: {e.strerror}") from None

    utts, skipped = scan_librispeech(cfg.data.root, cfg.data.subset)
    if cfg.data.train_split:
        utts = select_ids(utts, read_split(cfg.data.train_split), f"split {cfg.data.train_split}")

    torch.manual_seed(cfg.train.seed)
    model = CPC(cfg.model).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    warmup = max(1, cfg.train.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    step = 0
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, device)
        saved = config_mod.from_dict(ckpt["config"])
        if saved.model_hash() != cfg.model_hash():
            raise UserError(
                f"{ckpt_path} was trained with another model config ({saved.model}); use a new train.out_dir"
            )
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        step = ckpt["step"]
        if main_proc and not quiet:
            print(f"cpc-train: resuming {ckpt_path} at step {step}", file=sys.stderr)
    if main_proc:
        trim_metrics(out / "metrics.jsonl", step)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    net: nn.Module = TrainStep(model)
    if cfg.train.compile:
        net = torch.compile(net)
    if distributed:
        net = DistributedDataParallel(net, device_ids=[local_rank] if device.type == "cuda" else None)
    accum = cfg.train.grad_accum
    data = WindowBatches(utts, cfg.data.window, cfg.data.batch_size, cfg.data.batching, cfg.train.seed, rank)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=None,
        sampler=range(step * accum, cfg.train.max_steps * accum),
        num_workers=cfg.data.workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if cfg.data.workers else None,
    )
    batches = iter(loader)
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and cfg.train.amp == "bf16"
        else nullcontext()
    )
    frames = cfg.data.window // HOP
    log_file = open(out / "metrics.jsonl", "a") if main_proc else None  # noqa: SIM115
    bar = tqdm(total=cfg.train.max_steps, initial=step, disable=not main_proc or quiet, dynamic_ncols=True)
    audio_per_step = cfg.data.batch_size * cfg.data.window * accum * world / config_mod.SAMPLE_RATE
    t_last, step_last, t_start = time.perf_counter(), step, time.perf_counter()
    loss_v, acc = float("nan"), torch.zeros(cfg.model.n_steps)
    model.train()
    while step < cfg.train.max_steps:
        loss_sum = torch.zeros((), device=device)
        acc_sum = torch.zeros(cfg.model.n_steps, device=device)
        for micro in range(accum):
            wav, _speakers = next(batches)
            gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, micro, rank))
            neg = sample_negatives(wav.shape[0], frames, cfg.negatives.count, cfg.negatives.source, gen)
            sync = nullcontext() if not distributed or micro == accum - 1 else net.no_sync()
            with sync, amp:
                loss, acc_k = net(wav.to(device, non_blocking=True), neg.to(device, non_blocking=True))
            with sync:
                (loss / accum).backward()
            loss_sum += loss.detach() / accum
            acc_sum += acc_k / accum
        if distributed:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            dist.all_reduce(acc_sum, op=dist.ReduceOp.AVG)
        loss_v = loss_sum.item()
        if not math.isfinite(loss_v):
            raise UserError(
                f"non-finite loss ({loss_v}) at step {step}; the last good checkpoint is {ckpt_path}. "
                f"Lower train.lr, raise train.warmup_steps or set train.grad_clip"
            )
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        acc = acc_sum.cpu()
        if main_proc:
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                now = time.perf_counter()
                rate = (step - step_last) / (now - t_last)
                t_last, step_last = now, step
                rec = {
                    "step": step,
                    "loss": round(loss_v, 5),
                    "lr": sched.get_last_lr()[0],
                    "acc": [round(a, 4) for a in acc.tolist()],
                    "steps_per_s": round(rate, 4),
                    "audio_s_per_s": round(rate * audio_per_step, 2),
                    "elapsed_s": round(now - t_start, 1),
                }
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
                bar.set_postfix(
                    loss=f"{loss_v:.3f}", k1=f"{acc[0]:.2f}", k12=f"{acc[-1]:.2f}",
                    audio_x=f"{rate * audio_per_step:.1f}",
                )  # fmt: skip
        if main_proc and (step % cfg.train.ckpt_every == 0 or step == cfg.train.max_steps):
            state = {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "step": step,
                "config": cfg.to_dict(),
                "model_hash": cfg.model_hash(),
            }
            save_checkpoint(ckpt_path, state)
    bar.close()
    if log_file:
        log_file.close()
    if distributed:
        dist.destroy_process_group()
    return {
        "step": step,
        "loss": loss_v,
        "acc": acc.tolist(),
        "checkpoint": str(ckpt_path),
        "skipped_files": skipped,
        "seconds": time.perf_counter() - t_start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cpc-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (default: ./config.yaml if present)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="override a config key")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="cpc-train: warning: %(message)s")

    def body() -> int:
        path = args.config or ("config.yaml" if Path("config.yaml").is_file() else None)
        cfg = config_mod.load(path, args.overrides)
        s = train(cfg, quiet=args.quiet)
        if int(os.environ.get("RANK", 0)) == 0:
            accs = " ".join(f"k{i + 1}={a:.3f}" for i, a in enumerate(s["acc"]))
            print(
                f"cpc-train: done: step {s['step']} loss {s['loss']:.4f} acc {accs} "
                f"in {s['seconds']:.0f} s; skipped files {s['skipped_files']}; checkpoint {s['checkpoint']}"
            )
        return 0

    return run_cli("cpc-train", body)


if __name__ == "__main__":
    sys.exit(main())
