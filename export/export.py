"""cpc-export: write the streaming ONNX graph of a checkpoint, then prove it equal to the offline model.

    cpc-export --checkpoint runs/cpc/checkpoint.pt --out cpc.onnx [--frames-per-call 4]

After writing, onnxruntime runs the graph (through the runtime's own loader) on several streams for many
consecutive calls with the state threaded through, on random audio and on a real utterance, and compares
z, c, the scores and log-probabilities with the PyTorch model run offline on each whole stream. Above the
tolerance the command fails and leaves no file behind. The graph's inputs, outputs and metadata are
described in docs/onnx-contract.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from cpc_training.config import HOP, SAMPLE_RATE, Config
from cpc_training.model import CPC, prediction_scores
from cpc_training.train import load_checkpoint, model_from_checkpoint

import cpc_stream
from cpc_stream.audio import load_audio
from cpc_stream.engine import OUTPUT_NAMES, STATE_NAMES, ModelInfo, StreamingModel
from cpc_stream.errors import UserError, run_cli

from .streaming import StreamingCPC, state_shapes, zero_state

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CHECK_AUDIO = REPO / "data/librispeech-mini/test-clean/1089/134686/1089-134686-0000.flac"
# Max abs difference allowed between the graph run hop by hop and the model run offline. Measured
# differences are ~1e-6 (z, c) and ~1e-5 (scores, scaled by 1/temperature); see docs/onnx-contract.md.
TOLERANCE = {"z": 1e-4, "c": 1e-4, "scores": 1e-3, "logprob": 1e-3}


def export_onnx(
    model: CPC, cfg: Config, train_step: int, path: Path, frames_per_call: int, window: int
) -> ModelInfo:
    """Export the streaming step of `model` to `path` with its metadata; returns that metadata."""
    step = StreamingCPC(model, frames_per_call, window).eval()
    example = (torch.zeros(2, frames_per_call * HOP), *zero_state(model, window, 2))
    batch = torch.export.Dim("batch", min=1, max=65536)
    dynamic = {"audio": {0: batch}, "state": tuple({0: batch} for _ in STATE_NAMES)}
    # The exporter narrates its passes and warns about GRU weight attributes it handles correctly.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notes
        program = torch.onnx.export(
            step, example, None, dynamo=True, external_data=False, verbose=False,
            input_names=["audio", *STATE_NAMES],
            output_names=[*OUTPUT_NAMES, *(f"new_{n}" for n in STATE_NAMES)],
            dynamic_shapes=dynamic,
        )  # fmt: skip
    proto = program.model_proto
    gru = [n for n in proto.graph.node if n.op_type == "GRU"]
    lbr = [a.i for n in gru for a in n.attribute if a.name == "linear_before_reset"]
    if lbr != [1]:  # pytorch#189225: some exporters dropped it, giving silently wrong numbers
        raise RuntimeError(
            f"exported GRU lacks linear_before_reset=1 (found {lbr}); upgrade onnxscript to >= 0.7.1"
        )
    if any(n.op_type in ("If", "Loop", "Scan") for n in proto.graph.node):
        raise RuntimeError("exported graph has control flow; the streaming step must be a straight graph")
    info = ModelInfo(
        sample_rate=SAMPLE_RATE, hop=HOP, frames_per_call=frames_per_call,
        enc_dim=cfg.model.enc_dim, ctx_dim=cfg.model.ctx_dim, n_steps=cfg.model.n_steps, neg_window=window,
        score=cfg.model.score, temperature=cfg.model.temperature, norm=cfg.model.norm,
        state_shapes=state_shapes(model, window), config_hash=cfg.model_hash(), train_step=train_step,
        exported_by=f"cpc-stream {cpc_stream.__version__}, torch {torch.__version__}",
    )  # fmt: skip
    onnx.helper.set_model_props(proto, info.to_metadata())
    proto.doc_string = "Causal CPC streaming step; see docs/onnx-contract.md of cpc-stream"
    onnx.save(proto, str(path))
    return info


def check_streams(
    model: CPC, audio_file: Path | None, calls: int, samples_per_call: int, seed: int = 0
) -> np.ndarray:
    """The audio the proof runs: 3 streams of `calls` calls each: white noise, a real utterance (looped
    to length), and the same utterance quieter and shifted. (3, calls * samples_per_call) float32."""
    n = calls * samples_per_call
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(n).astype(np.float32) * 0.1
    if audio_file is None:
        return np.stack([noise, rng.standard_normal(n).astype(np.float32), noise[::-1].copy()])
    speech = load_audio(audio_file, SAMPLE_RATE)
    speech = np.resize(speech, n + 4000)
    return np.stack([noise, speech[:n], 0.3 * speech[4000 : 4000 + n]]).astype(np.float32)


@torch.no_grad()
def compare(path: Path, model: CPC, audio: np.ndarray) -> dict[str, float]:
    """Run the graph hop by hop on each row of `audio` (state threaded through) and the model offline
    on the whole rows; return the max abs difference of each output (NaN positions must agree)."""
    runtime = StreamingModel(path, providers="cpu", threads=1)
    n = runtime.info.samples_per_call
    state = runtime.zero_state(audio.shape[0])
    got: dict[str, list[np.ndarray]] = {k: [] for k in OUTPUT_NAMES}
    for i in range(audio.shape[1] // n):
        out, state = runtime.step(audio[:, i * n : (i + 1) * n], state)
        for k in OUTPUT_NAMES:
            got[k].append(out[k])
    stream = {k: np.concatenate(v, axis=1) for k, v in got.items()}
    z, c = model(torch.from_numpy(audio))
    scores, logprob, valid = prediction_scores(model, z, c, runtime.info.neg_window)
    ref = {"z": z.numpy(), "c": c.numpy(), "scores": scores.numpy(), "logprob": logprob.numpy()}
    if not np.array_equal(stream["valid"], np.broadcast_to(valid.numpy(), stream["valid"].shape)):
        raise AssertionError("valid mask differs from the offline model")
    diffs = {}
    for k, r in ref.items():
        s = stream[k]
        if s.shape != r.shape or not np.array_equal(np.isnan(s), np.isnan(r)):
            raise AssertionError(f"{k}: shape or NaN pattern differs from the offline model")
        diffs[k] = float(np.nanmax(np.abs(s - r))) if np.isfinite(r).any() else 0.0
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cpc-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="cpc-train checkpoint.pt")
    parser.add_argument("--out", required=True, help="output .onnx file")
    parser.add_argument(
        "--frames-per-call", type=int, default=1, help="F: 10 ms hops per call (latency/throughput knob)"
    )
    parser.add_argument("--neg-window", type=int, default=128, help="W: recent frames that normalise logprob")
    parser.add_argument(
        "--check-audio", default=str(DEFAULT_CHECK_AUDIO), help="real utterance for the proof"
    )
    parser.add_argument(
        "--check-calls", type=int, default=200, help="consecutive calls per stream in the proof"
    )
    args = parser.parse_args(argv)

    def body() -> int:
        if args.frames_per_call < 1 or args.neg_window < 1 or args.check_calls < 1:
            raise UserError("--frames-per-call, --neg-window and --check-calls must be >= 1")
        out = Path(args.out)
        if not out.parent.is_dir():
            raise UserError(f"output folder {out.parent} does not exist")
        if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
            raise UserError(f"output path {out} is not writable")
        ckpt = load_checkpoint(args.checkpoint)
        model, cfg = model_from_checkpoint(ckpt)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            info = export_onnx(model, cfg, int(ckpt["step"]), tmp, args.frames_per_call, args.neg_window)
            print(
                f"cpc-export: wrote graph: F={info.frames_per_call} W={info.neg_window} "
                f"dims {info.enc_dim}/{info.ctx_dim} K={info.n_steps}, step {info.train_step}, config {info.config_hash}"
            )
            failed = []
            for label, audio_file in (("random", None), ("speech", Path(args.check_audio))):
                audio = check_streams(model, audio_file, args.check_calls, info.samples_per_call)
                diffs = compare(tmp, model, audio)
                print(
                    f"cpc-export: check {label}: 3 streams x {args.check_calls} calls: max |diff| "
                    + " ".join(f"{k}={v:.2e}" for k, v in diffs.items())
                )
                failed += [
                    f"{label} {k} {v:.2e} > {TOLERANCE[k]:.0e}" for k, v in diffs.items() if v > TOLERANCE[k]
                ]
            if failed:
                raise UserError("streaming graph differs from the offline model: " + "; ".join(failed))
            os.replace(tmp, out)
        except AssertionError as e:
            raise UserError(f"streaming graph differs from the offline model: {e}") from None
        finally:
            tmp.unlink(missing_ok=True)
        print(f"cpc-export: ok: {out} ({out.stat().st_size / 1e6:.1f} MB)")
        return 0

    return run_cli("cpc-export", body)


if __name__ == "__main__":
    sys.exit(main())
