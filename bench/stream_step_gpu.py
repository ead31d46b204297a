"""The streaming step (export/streaming.py, the module cpc-export turns into ONNX) on a CUDA GPU with
PyTorch, for many streams at once: how many real-time streams one GPU serves.

    python bench/stream_step_gpu.py [--batches 1,64,512,4096] [--frames 1,4]

onnxruntime's CUDA provider is not installed on the lent GPU machine, so this times the same step in
PyTorch: eager, and replayed from a CUDA graph (the static-shape graph is what makes that possible).
It first checks the GPU step against the offline model on the GPU. Per (F, B): median ms per call, ms per
frame per stream, and the streams that fit in real time (B x F x 10 ms / call time), fp32 with TF32 off.
"""

from __future__ import annotations

import argparse

import torch
from cpc_export.step import CPCStep, zero_state
from cpc_training.config import Config
from cpc_training.model import CPC


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,64,512,4096")
    ap.add_argument("--frames", default="1,4")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    cfg = Config()
    torch.manual_seed(0)
    model = CPC(cfg.model).eval().to(dev)

    # Correctness on the GPU: 50 calls of F=4 for 3 streams against the offline model.
    step = CPCStep(model, 4, 128).to(dev).eval()
    audio = torch.randn(3, 50 * 640, device=dev) * 0.1
    state = [s.to(dev) for s in zero_state(model, 128, 4, 3)]
    cs = []
    for i in range(50):
        out = step(audio[:, i * 640 : (i + 1) * 640], *state)
        cs.append(out[1])
        state = list(out[5:])
    _, c_ref = model(audio)
    print(
        f"check: GPU streaming c vs offline c, 3 streams x 50 calls: max |diff| {(torch.cat(cs, 1) - c_ref).abs().max().item():.2e}"
    )

    print(f"{'F':>3} {'B':>5} {'mode':>6} {'ms/call':>8} {'us/frame/stream':>15} {'real-time streams':>17}")
    for f in (int(x) for x in args.frames.split(",")):
        step = CPCStep(model, f, 128).to(dev).eval()
        for b in (int(x) for x in args.batches.split(",")):
            audio = torch.randn(b, f * 160, device=dev) * 0.1
            state = [s.to(dev) for s in zero_state(model, 128, f, b)]

            def eager(step=step, audio=audio, state=state):
                step(audio, *state)

            for _ in range(3):
                eager()
            results = [("eager", median_ms(eager, args.reps))]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    eager()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                eager()
            results.append(("graph", median_ms(graph.replay, args.reps)))
            for mode, ms in results:
                print(f"{f:>3} {b:>5} {mode:>6} {ms:8.3f} {ms * 1e3 / (f * b):15.2f} {b * f * 10 / ms:17.0f}")
            del graph


if __name__ == "__main__":
    main()
