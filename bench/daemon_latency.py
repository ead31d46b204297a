"""End-to-end latency and throughput of the cpc-stream daemon over ZeroMQ on loopback.

    python bench/daemon_latency.py [--seconds 60] [--frames 1,4]

For each F (frames per call) it exports the paper-size model (random init: the cost does not depend on
the weights), writes --seconds of real speech (the bundled utterances, repeated), and:
1. runs `cpc-stream --file --realtime` (10 ms blocks, like a microphone) with a subscriber in this
   process, and prints the capture-to-receipt latency of the c_t messages (p50, p99, max);
2. runs the daemon as fast as possible and compares its throughput with the bare model loop
   (OnnxModel.step over the same audio in this process): the ratio is what the daemon adds.
"""

from __future__ import annotations

import argparse
import glob
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from cpc_stream.audio import load_audio
from cpc_stream.client import Subscriber
from cpc_stream.onnx_model import OnnxModel

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from stream_step import export_random_model  # noqa: E402


def speech(seconds: float, out: Path) -> Path:
    parts = [
        load_audio(f, 16000) for f in sorted(glob.glob(str(REPO / "data/librispeech-mini/*/*/*/*.flac")))
    ]
    wav = np.resize(np.concatenate(parts), int(seconds * 16000))
    sf.write(out, wav, 16000, subtype="PCM_16")
    return out


def run_daemon(model: Path, audio: Path, port: int, realtime: bool) -> tuple[list[float], float, int]:
    """Latencies (s) of every c message, seconds from start to end of stream, frames received."""
    cmd = [sys.executable, "-m", "cpc_stream.cli", "--model", str(model), "--bind", f"tcp://127.0.0.1:{port}",
           "--file", str(audio), "--wait-subscribers", "1", *(["--realtime"] if realtime else [])]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.DEVNULL)
    lat, frames = [], 0
    with Subscriber(f"tcp://127.0.0.1:{port}", kinds=("c",)) as sub:
        sub.wait_meta(timeout=60)
        start = time.monotonic()
        for msg in sub:
            now = time.monotonic()
            if msg.kind == "eos":
                break
            lat.append(now - msg.header["t_mono"])
            frames += msg.header["count"]
        took = time.monotonic() - start
        assert not sub.gaps, f"lost messages: {sub.gaps[:3]}"
    proc.wait(timeout=30)
    return lat, took, frames


def bare_loop(model: Path, audio: Path) -> float:
    m = OnnxModel(model, providers="cpu", threads=1, huge_pages=True)
    wav = sf.read(str(audio), dtype="float32")[0]
    n = m.info.samples_per_call
    state = m.zero_state(1)
    t = time.perf_counter()
    for i in range(len(wav) // n):
        _, state = m.step(wav[None, i * n : (i + 1) * n], state)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--frames", default="1,4")
    ap.add_argument("--port", type=int, default=5599)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {platform.system()}, python {platform.python_version()}; "
          f"{args.seconds:.0f} s of speech, paper-size model, onnxruntime CPU 1 thread")  # fmt: skip
    tmp = Path(tempfile.mkdtemp())
    audio = speech(args.seconds, tmp / "speech.wav")
    for f in (int(x) for x in args.frames.split(",")):
        model = export_random_model("paper", f, tmp / f"f{f}.onnx")
        lat, took, frames = run_daemon(model, audio, args.port, realtime=True)
        ms = np.array(lat) * 1e3
        print(f"F={f:<2} real time: {frames} frames in {took:.1f} s; latency p50 {np.percentile(ms, 50):.2f} ms, "
              f"p99 {np.percentile(ms, 99):.2f} ms, max {ms.max():.2f} ms")  # fmt: skip
        fast, bare = [], []
        for _ in range(args.repeats):  # alternate, so that machine noise hits both alike
            fast.append(run_daemon(model, audio, args.port, realtime=False)[1])
            bare.append(bare_loop(model, audio))
        fast_s, bare_s = float(np.median(fast)), float(np.median(bare))
        print(f"F={f:<2} as fast as possible (median of {args.repeats}): daemon {args.seconds / fast_s:.1f}x real time "
              f"({fast_s:.2f} s), bare model loop {args.seconds / bare_s:.1f}x ({bare_s:.2f} s); "
              f"daemon/bare time ratio {fast_s / bare_s:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
