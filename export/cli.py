"""cpc-export: write the streaming ONNX graph of a checkpoint, then prove it equal to the offline model.

    cpc-export --checkpoint runs/cpc/checkpoint.pt --out cpc.onnx [--frames-per-call 4] [--weights int8]
    cpc-export --checkpoint runs/cpc/checkpoint.pt --check cpc.onnx      # prove an existing graph again
    cpc-export --checkpoint 60k_epoch4-d0f474de.pt --out cpc60k.onnx     # a CPC_audio checkpoint

The checkpoint is cpc-train's or CPC_audio's, released ({"config", "weights"}) or training
(checkpoint_N.pt beside checkpoint_args.json): its own keys say which (training/checkpoint.py load_model;
training/cpc_audio.py says what of CPC_audio's is supported). The proof compares a CPC_audio model's
graph with CPC_audio's forward pass, as re-implemented there.

The graph is written and proved in a private temporary folder (proof.py: several streams for many calls
with the state threaded through, on random audio and on a real utterance, against the PyTorch model run
offline on each whole stream); only a proved graph is then copied to --out, atomically. Above the
tolerance the command exits 2 and --out is left as it was. --check runs the same proof on a graph that
exists, after checking that it was exported from this checkpoint. The graph's inputs, outputs and
metadata are described in docs/onnx-contract.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from cpc_training.checkpoint import load_model
from cpc_training.cpc_audio import CPCAudioConfig
from cpc_training.model import MAX_WINDOW

from cpc_stream.audio import open_audio
from cpc_stream.contract import WEIGHT_KINDS, ModelInfo
from cpc_stream.errors import UserError, run_cli
from cpc_stream.files import atomic_write, check_writable
from cpc_stream.onnx_model import OnnxModel

from .graph import export_onnx
from .proof import DEFAULT_CHECK_AUDIO, prove

# Sane ranges of the numeric options: F up to 1 s of audio per call, W as in cpc-features.
LIMITS = {"--frames-per-call": (1, 100), "--neg-window": (1, MAX_WINDOW), "--check-calls": (1, 10000)}


def describe(info: ModelInfo) -> str:
    timing = f", look-ahead {info.lookahead} samples (frames {info.delay} hop late)" if info.lookahead else ""
    return (
        f"{info.weights} graph: F={info.frames_per_call} W={info.neg_window} dims {info.enc_dim}/{info.ctx_dim} "
        f"K={info.n_steps}, step {info.train_step}, config {info.config_hash}{timing}"
        + ("" if info.has_scores else ", no scores")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cpc-export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", required=True,
        help="cpc-train checkpoint.pt, or a CPC_audio checkpoint (released .pt, or checkpoint_N.pt beside checkpoint_args.json)",
    )  # fmt: skip
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="output .onnx file: export, prove, then write it")
    target.add_argument(
        "--check", metavar="ONNX", help="prove an existing graph of this checkpoint; write nothing"
    )
    parser.add_argument(
        "--frames-per-call",
        type=int,
        default=1,
        help="F: 10 ms hops per call, 1..100 (latency/throughput knob)",
    )
    parser.add_argument(
        "--neg-window",
        type=int,
        default=128,
        help=f"W: recent frames that normalise logprob, 1..{MAX_WINDOW}",
    )
    parser.add_argument(
        "--weights", choices=WEIGHT_KINDS, default="fp32",
        help="int8: 8-bit matrix weights, faster on one core, outputs within a looser stated tolerance",
    )  # fmt: skip
    parser.add_argument(
        "--check-audio",
        default=str(DEFAULT_CHECK_AUDIO),
        help="real utterance for the proof (default: one shipped)",
    )
    parser.add_argument(
        "--check-calls", type=int, default=200, help="consecutive calls per stream in the proof, 1..10000"
    )
    args = parser.parse_args(argv)

    def body() -> int:
        for flag, (lo, hi) in LIMITS.items():
            value = getattr(args, flag[2:].replace("-", "_"))
            if not lo <= value <= hi:
                raise UserError(f"{flag} {value}: expected {lo}..{hi}")
        open_audio(args.check_audio).close()  # a bad --check-audio fails now, not after the export
        out = check_writable(args.out, "--out") if args.out else None
        model, cfg, step = load_model(args.checkpoint)
        source = ""
        if isinstance(cfg, CPCAudioConfig):
            source = f"CPC_audio {Path(args.checkpoint).name}"
            print(f"cpc-export: {source}: {cfg.describe()}, look-ahead {model.lookahead} samples")
        if out is None:
            path = Path(args.check)
            info = OnnxModel(path, providers="cpu", threads=1).info
            if (info.config_hash, info.train_step) != (cfg.model_hash(), step):
                raise UserError(
                    f"{path} was exported from config {info.config_hash} step {info.train_step}, not from "
                    f"{args.checkpoint} (config {cfg.model_hash()} step {step})"
                )
            print(f"cpc-export: checking {describe(info)}")
            prove(path, model, Path(args.check_audio), args.check_calls)
            print(f"cpc-export: ok: {path} equals {args.checkpoint}")
            return 0
        with tempfile.TemporaryDirectory(prefix="cpc-export-") as tmp:
            graph = Path(tmp) / out.name
            info = export_onnx(
                model, cfg, step, graph, args.frames_per_call, args.neg_window, args.weights, source
            )
            print(f"cpc-export: wrote {describe(info)}")
            prove(graph, model, Path(args.check_audio), args.check_calls)
            with open(graph, "rb") as src, atomic_write(out) as dst:
                shutil.copyfileobj(src, dst)
        print(f"cpc-export: ok: {out} ({out.stat().st_size / 1e6:.1f} MB)")
        return 0

    return run_cli("cpc-export", body)


if __name__ == "__main__":
    sys.exit(main())
