"""Peak memory of cpc-features against the length of the file: bounded, not proportional.

    python bench/features_memory.py [--minutes 1,10,120] [--chunk-seconds 20] [--small]

Writes a random-init checkpoint of the paper-size model (512/256, K=12; --small: 64/32) and, for each
length, a 16 kHz 16-bit WAV of the bundled test-clean speech looped to that length (written in blocks:
this process never holds it), then runs `python -m cpc_training.features` on it as its own process and
reads that process's peak resident memory (os.wait4). Prints length, WAV and .npz sizes, wall time, peak
RSS and its ratio to the first (shortest) file's, and checks the .npz's shapes without loading it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from cpc_training.checkpoint import save_checkpoint
from cpc_training.config import Config
from cpc_training.model import CPC

REPO = Path(__file__).resolve().parent.parent
SPEECH = REPO / "data/librispeech-mini/test-clean/1089/134686/1089-134686-0000.flac"


def write_long_wav(path: Path, minutes: float) -> None:
    speech, _ = sf.read(str(SPEECH), dtype="float32")
    left = int(minutes * 60 * 16000)
    with sf.SoundFile(str(path), "w", 16000, 1, "PCM_16") as f:
        while left > 0:
            f.write(speech[:left])
            left -= len(speech)


def npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every array in an .npz, read from the .npy headers only."""
    shapes = {}
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            with z.open(name) as m:
                fmt = np.lib.format
                read = fmt.read_array_header_1_0 if fmt.read_magic(m) == (1, 0) else fmt.read_array_header_2_0
                shapes[name[:-4]] = read(m)[0]
    return shapes


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """Run cmd; its peak resident memory (MB) and wall time (s). Fails loudly if it fails."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"features_memory: {' '.join(cmd)} exited {proc.returncode}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", default="1,10,120", help="file lengths, the first is the reference")
    ap.add_argument("--chunk-seconds", type=float, default=None, help="passed on (default: cpc-features')")
    ap.add_argument("--small", action="store_true", help="a 64/32 model instead of the paper-size one")
    args = ap.parse_args()
    cfg = Config()
    if args.small:
        cfg.model.enc_dim, cfg.model.ctx_dim = 64, 32
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="features-memory-") as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "checkpoint.pt"
        save_checkpoint(ckpt, {"model": CPC(cfg.model).state_dict(), "config": cfg.to_dict(), "step": 0})
        extra = ["--chunk-seconds", str(args.chunk_seconds)] if args.chunk_seconds else []
        print(f"model {cfg.model.enc_dim}/{cfg.model.ctx_dim} K={cfg.model.n_steps}, torch threads default")
        print(
            f"{'minutes':>8} {'wav MB':>8} {'npz MB':>8} {'seconds':>8} {'peak RSS MB':>11} {'x first':>7}  c shape"
        )
        first = None
        for minutes in (float(m) for m in args.minutes.split(",")):
            wav = tmp / f"long{minutes:g}.wav"
            write_long_wav(wav, minutes)
            cmd = [sys.executable, "-m", "cpc_training.features", "--checkpoint", str(ckpt)]
            rss, seconds = peak_rss_mb([*cmd, "--out", str(tmp / "feats"), *extra, str(wav)])
            npz = tmp / "feats" / f"long{minutes:g}.npz"
            shapes = npz_shapes(npz)
            assert shapes["c"][0] == int(minutes * 60 * 100), shapes
            first = first or rss
            print(
                f"{minutes:8g} {wav.stat().st_size / 1e6:8.0f} {npz.stat().st_size / 1e6:8.0f} {seconds:8.0f} "
                f"{rss:11.0f} {rss / first:7.2f}  {shapes['c']}"
            )
            wav.unlink()
            npz.unlink()


if __name__ == "__main__":
    main()
