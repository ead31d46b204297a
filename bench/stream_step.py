"""Per-call cost of the streaming ONNX graph on onnxruntime's CPU provider, against the compute floor.

    python bench/stream_step.py [--model cpc.onnx] [--threads 1] [--calls 300] [--weights fp32,int8]
    python bench/stream_step.py --models paper,cpc-audio-60k --frames 1,4 --batches 1,16 --weights fp32

Without --model it exports, for each F and each weight kind (fp32, and the int8 variant of `cpc-export
--weights int8`), each of --models at random init (the weights' values do not change the cost): `paper`,
the paper-size model (512/256, GRU, K=12, W=128), and `cpc-audio-60k`, the configuration of CPC_audio's
Libri-light 60k model as cpc-export imports it (256/256, LSTM, channel norm, look-ahead 152 samples, no
scores: training/cpc_audio.py). For F in {1, 2, 4, 10} and B in {1, 4, 16} streams it times StreamBatch.step (what the
daemon runs: the state bound once through IOBinding) back to back and paced at real time (a call every
F x 10 ms, as the daemon runs), and prints median / p99 ms per call, ms per frame per stream, the
real-time factor of the whole batch, and the ratio to the compute floor: the model's multiply-adds per
frame at the rate of a large float32 matrix product measured in this process with the same onnxruntime
and thread count. The machine's speed drifts over minutes (shared cores and L3), so each row's floor is
measured right around it: the best of 10 products just before the row and 10 just after (the faster
moment of the two sets the floor, so the ratio is the stricter one).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from cpc_stream.onnx_model import OnnxModel, StreamBatch


class Floor:
    """Multiply-adds per second of an n x n x n float32 MatMul in onnxruntime: rate() is the best of
    `reps` runs, so that a noisy neighbour makes the floor lower (the ratios stricter), never higher."""

    def __init__(self, threads: int, n: int = 1024):
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["a", "b"], ["y"])], "mm",
            [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in ("a", "b")],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
        )  # fmt: skip
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(
            helper.make_model(graph).SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
        rng = np.random.default_rng(0)
        self.feeds = {k: rng.standard_normal((n, n)).astype(np.float32) for k in ("a", "b")}
        self.n = n
        for _ in range(3):
            self.sess.run(None, self.feeds)

    def rate(self, reps: int) -> float:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            self.sess.run(None, self.feeds)
            times.append(time.perf_counter() - t)
        return self.n**3 / float(np.min(times))


def macs_per_frame(m: OnnxModel) -> int:
    """Multiply-adds the model needs per 10 ms frame and stream (convs, GRU or LSTM layers, predictors,
    scores); the context network's kind and depth are read from the graph's state names."""
    i = m.info
    per_hop_out = [32, 8, 4, 2, 1]  # conv outputs per 160-sample hop
    cin = [1, i.enc_dim, i.enc_dim, i.enc_dim, i.enc_dim]
    kernels = [10, 8, 4, 4, 4]
    conv = sum(o * k * c * i.enc_dim for o, k, c in zip(per_hop_out, kernels, cin, strict=True))
    gates = 4 if "lstm_h" in i.state_names else 3
    layers = sum(n.startswith(("gru_h", "lstm_h")) for n in i.state_names)
    ar = gates * (
        i.enc_dim * i.ctx_dim + (layers - 1) * i.ctx_dim * i.ctx_dim + layers * i.ctx_dim * i.ctx_dim
    )
    pred = i.n_steps * i.ctx_dim * i.enc_dim
    scores = i.n_steps * i.enc_dim * (1 + i.neg_window)
    return conv + ar + pred + scores


def time_calls(m: OnnxModel, batch: int, calls: int, paced: bool) -> np.ndarray:
    """Seconds per call of StreamBatch.step, the daemon's path (state bound once, never copied)."""
    rng = np.random.default_rng(1)
    audio = [rng.standard_normal((batch, m.info.samples_per_call)).astype(np.float32) * 0.1 for _ in range(8)]
    streams = StreamBatch(m, batch)
    for a in audio:  # warm-up
        streams.step(a)
    period = m.info.frames_per_call * m.info.hop / m.info.sample_rate
    times = np.empty(calls)
    start = time.perf_counter()
    for n in range(calls):
        if paced:
            delay = start + n * period - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        t = time.perf_counter()
        streams.step(audio[n % len(audio)])
        times[n] = time.perf_counter() - t
    return times


def export_random_model(kind: str, frames_per_call: int, out: Path, weights: str = "fp32") -> Path:
    """kind "paper": our paper-size model; "cpc-audio-60k": CPC_audio's 60k configuration as imported."""
    import torch
    from cpc_export.graph import export_onnx
    from cpc_training.config import Config
    from cpc_training.cpc_audio import CPCAudio, CPCAudioConfig
    from cpc_training.model import CPC

    torch.manual_seed(0)
    if kind == "paper":
        cfg = Config()
        export_onnx(CPC(cfg.model).eval(), cfg, 0, out, frames_per_call, 128, weights)
    else:
        cfg = CPCAudioConfig(enc_dim=256, ctx_dim=256, norm="channel", ar="lstm", ar_layers=1, n_steps=0)
        export_onnx(CPCAudio(cfg).eval(), cfg, 0, out, frames_per_call, 128, weights)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="an exported graph (its own F); default: export the paper model per F")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--frames", default="1,2,4,10")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--weights", default="fp32,int8", help="weight kinds to export (without --model)")
    ap.add_argument(
        "--models", default="paper", help="paper, cpc-audio-60k: what to export (without --model)"
    )
    args = ap.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {platform.system()}, python {platform.python_version()}, "
        f"onnxruntime {ort.__version__}, threads {args.threads}"
    )
    floor = Floor(args.threads)
    rate = floor.rate(30)
    print(
        f"floor: 1024^3 float32 MatMul in onnxruntime: {rate * 2 / 1e9:.1f} GFLOP/s ({rate / 1e9:.1f} G multiply-adds/s) "
        "at the start; each row's own in its last column"
    )
    tmp = Path(tempfile.mkdtemp())
    paths = (
        [Path(args.model)]
        if args.model
        else [
            export_random_model(kind, int(f), tmp / f"{kind}_f{f}_{w}.onnx", w)
            for kind in args.models.split(",")
            for w in args.weights.split(",")
            for f in args.frames.split(",")
        ]
    )
    print(
        f"{'model':>13} {'weights':>7} {'F':>3} {'B':>3} {'mode':>7} {'med ms/call':>11} {'p99 ms/call':>11} {'ms/frame/stream':>15} {'RTF':>6} {'x floor':>7} {'floor GFLOP/s':>13}"
    )
    for path in paths:
        m = OnnxModel(path, providers="cpu", threads=args.threads, huge_pages=True)
        f = m.info.frames_per_call
        for b in (int(x) for x in args.batches.split(",")):
            for paced in (False, True):
                before = floor.rate(10)
                t = time_calls(m, b, args.calls, paced) * 1e3
                row_rate = max(before, floor.rate(10))
                floor_ms = macs_per_frame(m) / row_rate * 1e3
                med, p99 = float(np.median(t)), float(np.percentile(t, 99))
                per_frame = med / (f * b)
                print(
                    f"{path.stem.split('_f')[0]:>13} {m.info.weights:>7} {f:>3} {b:>3} {'paced' if paced else 'b2b':>7} {med:11.3f} {p99:11.3f} {per_frame:15.3f} "
                    f"{med / (f * 10):6.3f} {per_frame / floor_ms:7.2f} {row_rate * 2 / 1e9:13.1f}"
                )
        print(
            f"    (F={f}: {macs_per_frame(m) / 1e6:.1f} M multiply-adds per frame; floor at the start {macs_per_frame(m) / rate * 1e3:.3f} ms/frame)"
        )


if __name__ == "__main__":
    main()
