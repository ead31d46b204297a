"""N network streams at real time into one daemon, over loopback: CPU, real-time factor and latency.

    python bench/ingest.py [--streams 1,4,8,16,24,32] [--seconds 20] [--frames 4] [--weights fp32,int8]

For each weights kind it exports the paper-size model (random init: cost does not depend on the weights)
at F frames per call and starts `cpc-stream --listen` with one onnxruntime thread. For each N, N clients
in this process (one thread each, websockets' sync client) send the bundled speech in 20 ms messages,
paced at real time and started at random phases; a ZeroMQ subscriber in this process receives every
stream's c_t. Printed per N: the daemon's CPU (share of one core, from /proc over the run), its real-time
factor (compute / audio, from its stats), how many streams stayed at real time, frames lost, and the
latency from the client's send of the message that completed a call to the subscriber's receipt of that
call's frames (p50, p99), with the daemon's own batch sizes. The baseline in the same run is N = 1.
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

from cpc_stream.audio import load_audio
from cpc_stream.client import Subscriber, send_audio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from stream_step import export_random_paper_model  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(
    model: Path, n: int, seconds: float, speech: np.ndarray, frames_per_call: int, max_wait_ms: float
) -> dict:
    port, zport, mport = free_port(), free_port(), free_port()
    cmd = [sys.executable, "-m", "cpc_stream.cli", "--model", str(model), "--bind", f"tcp://127.0.0.1:{zport}",
           "--listen", f"127.0.0.1:{port}", "--max-streams", str(n), "--max-wait-ms", str(max_wait_ms), "--quiet", "--metrics", f"127.0.0.1:{mport}",
           "stream.stats_interval=1"]  # fmt: skip
    daemon = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE)
    url = f"ws://127.0.0.1:{port}/"
    hop_samples = 160 * frames_per_call
    send_times: dict[str, list[float]] = {}  # per stream: monotonic send time of each 20 ms message
    latencies, lost, received, rtfs = [], 0, {}, []
    with Subscriber(f"tcp://127.0.0.1:{zport}", kinds=("c",), stats=True) as sub:
        sub.wait_meta(timeout=120)
        rng = np.random.default_rng(n)

        def client(k: int) -> None:
            name = f"s{k}"
            times = send_times.setdefault(name, [])
            time.sleep(rng.uniform(0, 0.04))  # random phase
            start = rng.integers(0, len(speech) - int(seconds * 16000))
            wav = speech[start : start + int(seconds * 16000)]

            def blocks():
                for i in range(0, len(wav), 320):
                    times.append(time.monotonic())
                    yield wav[i : i + 320, None]

            send_audio(url, blocks(), 16000, 1, name, paced=True)

        cpu0, t0 = cpu_seconds(daemon.pid), time.monotonic()
        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(n)]
        for t in threads:
            t.start()
        ended = 0
        while ended < n:
            msg = sub.recv(timeout=seconds + 30)
            if msg is None:
                break
            now = time.monotonic()
            if msg.kind == "stats":
                if msg.header["rtf"] is not None:
                    rtfs.append(msg.header["rtf"])
            elif msg.kind == "eos":
                ended += 1
            else:
                end_sample = (msg.header["frame"] + msg.header["count"]) * 160
                times = send_times[msg.stream]
                message = (end_sample - 1) // 320  # the 20 ms message holding the call's last sample
                if message < len(times) and msg.header["count"] * 160 == hop_samples:
                    latencies.append(now - times[message])
                received[msg.stream] = received.get(msg.stream, 0) + msg.header["count"]
        wall, cpu = time.monotonic() - t0, cpu_seconds(daemon.pid) - cpu0
        lost = sub.lost
        for t in threads:
            t.join(timeout=10)
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
    samples = {
        s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels
    }
    per_call = samples["cpc_batch_streams_sum"] / max(samples["cpc_batch_streams_count"], 1)
    call_ms = 1000 * samples["cpc_call_seconds_sum"] / max(samples["cpc_call_seconds_count"], 1)
    daemon.terminate()
    daemon.communicate(timeout=30)
    lat = np.array(latencies) * 1000
    expected = int(seconds * 16000) // 160
    return {
        "n": n, "cpu": cpu / wall, "rtf": float(np.median(rtfs)) if rtfs else float("nan"),
        "per_call": per_call, "call_ms": call_ms,
        "whole": sum(1 for v in received.values() if v >= expected - frames_per_call), "lost": lost,
        "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", default="1,4,8,16,24,32")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--weights", default="fp32,int8")
    ap.add_argument("--max-wait-ms", type=float, default=0.0, help="the daemon's batching wait (0: one call)")
    args = ap.parse_args()
    speech = np.concatenate(
        [load_audio(f, 16000) for f in sorted(glob.glob(str(REPO / "data/librispeech-mini/*/*/*/*.flac")))]
    )
    print(f"ingest: {platform.machine()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}, paper-size model, "
          f"F={args.frames}, {args.seconds:g} s per stream, one onnxruntime thread, max wait {args.max_wait_ms:g} ms (0: one call)")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for weights in args.weights.split(","):
            model = export_random_paper_model(args.frames, Path(tmp) / f"paper-{weights}.onnx", weights)
            print("| weights | streams | daemon CPU (1 core = 100%) | RTF | streams whole | lost | p50 ms | p99 ms "
                  "| streams per call | ms per call |")  # fmt: skip
            print("|---|---|---|---|---|---|---|---|---|---|")
            for n in (int(x) for x in args.streams.split(",")):
                r = run(model, n, args.seconds, speech, args.frames, args.max_wait_ms)
                print(f"| {weights} | {n} | {100 * r['cpu']:.0f}% | {r['rtf']:.3f} | {r['whole']}/{n} | {r['lost']} | "
                      f"{r['p50']:.1f} | {r['p99']:.1f} | {r['per_call']:.1f} | {r['call_ms']:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
