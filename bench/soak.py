"""Soak: the daemon on an hour of audio faster than real time, with subscribers joining and leaving.

    python bench/soak.py [--minutes 60] [--model cpc.onnx] [--churn 5]

Two streams, as a user would run them: a long file read as fast as possible and the same audio piped
into --stdin. A steady subscriber in this process receives everything and checks it (sequence gaps,
restarts, malformed messages, frame counts against the audio's length); --churn subscribers connect,
subscribe to everything and leave every second, so that the joiners' metadata path runs the whole
time. Every 5 s the daemon's resident memory (VmRSS) and CPU time are sampled from /proc.

Printed: audio minutes, wall time and the speed as a multiple of real time; RSS after the first minute
of audio (the baseline, same run), at the peak and at the end, with the ratio end / baseline; frames
expected and received per stream, gaps, messages lost, malformed messages, restarts; metadata messages
the steady subscriber received (its own, the periodic ones, and those after subscribers left). Without
--model it exports the demo-size model (128/64 channels, random init: cost and memory do not depend on
the weights) at F=4, which needs torch.
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import zmq

from cpc_stream.audio import load_audio
from cpc_stream.client import Subscriber

REPO = Path(__file__).resolve().parent.parent


def export_demo_size(out: Path) -> Path:
    import torch
    from cpc_export.export import export_onnx
    from cpc_training import config
    from cpc_training.model import CPC

    cfg = config.load(None, ["model.enc_dim=128", "model.ctx_dim=64"])
    torch.manual_seed(0)
    export_onnx(CPC(cfg.model).eval(), cfg, 0, out, 4, 128)
    return out


def long_audio(minutes: float) -> np.ndarray:
    parts = [
        load_audio(f, 16000) for f in sorted(glob.glob(str(REPO / "data/librispeech-mini/*/*/*/*.flac")))
    ]
    return np.resize(np.concatenate(parts), int(minutes * 60 * 16000))


def proc_sample(pid: int) -> tuple[float, float]:
    """(resident MB, CPU seconds user + system) of a process."""
    rss = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return rss, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def churn(endpoint: str, per_second: int, stop: threading.Event) -> int:
    """Subscribers that connect, subscribe to everything, take their metadata and leave. Returns how many."""
    ctx, n = zmq.Context(), 0
    while not stop.wait(1.0):
        socks = []
        for _ in range(per_second):
            s = ctx.socket(zmq.SUB)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(endpoint)
            s.subscribe(b"")
            socks.append(s)
        for s in socks:
            s.poll(500)
            s.close(0)
            n += 1
    ctx.term()
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0, help="audio per stream")
    ap.add_argument("--model", help="graph to serve (default: demo-size model, exported here)")
    ap.add_argument("--churn", type=int, default=5, help="subscribers joining and leaving per second")
    ap.add_argument("--port", type=int, default=5581)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(args.model) if args.model else export_demo_size(tmp / "demo.onnx")
        audio = long_audio(args.minutes)
        wav = tmp / "soak.wav"
        sf.write(wav, audio, 16000, subtype="PCM_16")
        pcm = sf.read(str(wav), dtype="int16")[0].tobytes()
        expected = len(audio) // 160
        endpoint = f"tcp://127.0.0.1:{args.port}"
        cmd = [sys.executable, "-m", "cpc_stream.cli", "--model", str(model), "--bind", endpoint,
               "--file", str(wav), "--stdin", "--wait-subscribers", "1", "--quiet"]  # fmt: skip
        daemon = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        frames: dict[str, int] = {}
        ended: dict[str, dict] = {}
        metas, samples, baseline = 0, [], None
        with Subscriber(endpoint, kinds=("c", "scores")) as sub:
            sub.wait_meta(timeout=120)
            feeder = threading.Thread(
                target=lambda: (daemon.stdin.write(pcm), daemon.stdin.close()), daemon=True
            )
            feeder.start()
            stop = threading.Event()
            churned: list[int] = []
            churner = threading.Thread(
                target=lambda: churned.append(churn(endpoint, args.churn, stop)), daemon=True
            )
            if args.churn:
                churner.start()
            start = next_sample = time.monotonic()
            while len(ended) < 2:
                got, msg = sub._read(1000)  # the raw read, to count the metadata it absorbs
                if got and msg is None and sub.meta is not None:
                    metas += 1
                if msg is not None and msg.kind == "c":
                    frames[msg.stream] = frames.get(msg.stream, 0) + msg.header["count"]
                elif msg is not None and msg.kind == "eos":
                    ended[msg.stream] = msg.header
                now = time.monotonic()
                if now >= next_sample and daemon.poll() is None:
                    rss, cpu = proc_sample(daemon.pid)
                    samples.append((now - start, rss, cpu, min(frames.values(), default=0)))
                    if baseline is None and min(frames.values(), default=0) >= 6000:  # a minute of audio each
                        baseline = rss
                    next_sample = now + 5.0
                if daemon.poll() is not None and not got:
                    break
            wall = time.monotonic() - start
            stop.set()
            if args.churn:
                churner.join()
            lost, gaps, malformed, restarts = (
                sub.lost,
                len(sub.gaps),
                sum(sub.malformed.values()),
                len(sub.restarts),
            )
        daemon.wait(timeout=60)
        err = daemon.stderr.read().decode()

    rss = [s[1] for s in samples]
    cpu_share = (
        (samples[-1][2] - samples[0][2]) / (samples[-1][0] - samples[0][0])
        if len(samples) > 1
        else float("nan")
    )
    print(f"soak: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    print(
        f"soak: model {model.name if args.model else 'demo-size 128/64, F=4'}; 2 streams x {args.minutes:g} min of audio"
    )
    print(
        f"soak: wall {wall:.1f} s -> {2 * args.minutes * 60 / wall:.1f}x real time (both streams); daemon CPU {100 * cpu_share:.0f}% of one core"
    )
    base = baseline or (rss[0] if rss else float("nan"))
    print(f"soak: RSS MB after 1 min of audio {base:.1f}, peak {max(rss, default=float('nan')):.1f}, end {rss[-1] if rss else float('nan'):.1f} "
          f"(end / baseline {(rss[-1] / base) if rss else float('nan'):.3f}; {len(samples)} samples)")  # fmt: skip
    for name in sorted(ended):
        print(
            f"soak: {name}: frames expected {expected}, received {frames.get(name, 0)}, eos {ended[name]['frames']} ({ended[name]['reason']})"
        )
    print(f"soak: gaps {gaps}, messages lost {lost}, malformed {malformed}, restarts {restarts}; "
          f"metadata received by the steady subscriber {metas}; churned subscribers {sum(churned)}")  # fmt: skip
    print(f"soak: daemon exit {daemon.returncode}" + (f"; stderr: {err.strip()}" if err.strip() else ""))


if __name__ == "__main__":
    main()
