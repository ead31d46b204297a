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
import dataclasses
import io
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from cpc_training.config import HOP, SAMPLE_RATE, STRIDES, Config
from cpc_training.model import CPC, prediction_scores
from cpc_training.train import load_checkpoint, model_from_checkpoint

import cpc_stream
from cpc_stream.audio import load_audio
from cpc_stream.engine import OUTPUT_NAMES, STATE_NAMES, WEIGHT_KINDS, ModelInfo, StreamBatch, StreamingModel
from cpc_stream.errors import UserError, run_cli

from .streaming import StreamingCPC, state_shapes, zero_state

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CHECK_AUDIO = REPO / "data/librispeech-mini/test-clean/1089/134686/1089-134686-0000.flac"
# Max abs difference allowed between the graph run hop by hop and the model run offline. Measured
# differences are ~1e-6 (z, c) and ~1e-5 (scores, scaled by 1/temperature); see docs/onnx-contract.md.
TOLERANCE = {"z": 1e-4, "c": 1e-4, "scores": 1e-3, "logprob": 1e-3}
# The int8 variant's weights are 8-bit: its outputs are held to a looser, stated bound (onnx-contract.md).
TOLERANCE_INT8 = {"z": 0.1, "c": 0.05, "scores": 0.1, "logprob": 0.1}
INT8_BLOCK = 128  # weights share one scale per block of 128 along the input axis
ROWWISE_MIN_ROWS = 4  # products with at least this many rows per stream and call use the row-wise kernel


def rowwise_uint8_matmul(graph: onnx.GraphProto, node: onnx.NodeProto, weight: np.ndarray) -> list:
    """Nodes computing node's MatMul(a, weight) for a >= 0 (a ReLU output) in 8 bits: each row of `a`
    quantised to uint8 with its own scale (max / 255; one QuantizeLinear block per row, opset 21),
    weight to int8 with one scale per output column, onnxruntime's integer GEMM, then both scales
    applied. Adds the constants to `graph`."""
    from onnx import TensorProto, helper, numpy_helper

    a, name = node.input[0], node.name
    w_scale = np.maximum(np.abs(weight).max(axis=0), 1e-30) / 127.0  # (N,)
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.round(weight / w_scale).astype(np.int8), f"{name}_w_int8"),
            numpy_helper.from_array(w_scale.astype(np.float32), f"{name}_w_scale"),
            numpy_helper.from_array(np.array([-1], np.int64), f"{name}_last_axis"),
            numpy_helper.from_array(np.array(1e-30 * 255.0, np.float32), f"{name}_tiny"),
            numpy_helper.from_array(np.array(255.0, np.float32), f"{name}_u8_max"),
        ]
    )
    t = f"{name}_rowq"
    return [
        helper.make_node("ReduceMax", [a, f"{name}_last_axis"], [f"{t}_max"], keepdims=1),
        helper.make_node("Max", [f"{t}_max", f"{name}_tiny"], [f"{t}_max_safe"]),
        helper.make_node("Div", [f"{t}_max_safe", f"{name}_u8_max"], [f"{t}_scale"]),  # (..., rows, 1)
        # uint8 (no zero point), rounding half to even like the float Round it replaces
        helper.make_node(
            "QuantizeLinear", [a, f"{t}_scale"], [f"{t}_u8"], axis=-1, block_size=weight.shape[0]
        ),
        helper.make_node("MatMulInteger", [f"{t}_u8", f"{name}_w_int8"], [f"{t}_i32"]),
        helper.make_node("Cast", [f"{t}_i32"], [f"{t}_f32"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{t}_scale", f"{name}_w_scale"], [f"{t}_scales"]),
        helper.make_node("Mul", [f"{t}_f32", f"{t}_scales"], list(node.output)),
    ]


def keep_layer_norm_unfused(proto: onnx.ModelProto) -> int:
    """Spell the Add in front of each LayerNormalization as the equivalent Sum, so that onnxruntime does
    not fuse the pair into SkipLayerNormalization, which measured several times slower than the two
    nodes it replaces at the encoder's shapes (docs/benchmarks.md). Returns how many were changed."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    changed = 0
    for node in proto.graph.node:
        add = producers.get(node.input[0]) if node.op_type == "LayerNormalization" else None
        if add is not None and add.op_type == "Add":
            add.op_type = "Sum"
            changed += 1
    return changed


def inplace_states(proto: onnx.ModelProto, names: tuple[str, ...]) -> tuple[str, ...]:
    """The states a runtime may update in place: those whose input is read by one node only, a ScatterND
    that writes new_<name> (onnxruntime's ScatterND skips its copy when its output is its input's
    buffer). Any other reader could run after the write and see the new values."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for i in set(node.input):
            readers.setdefault(i, []).append(node)
    return tuple(
        n
        for n in names
        if [(r.op_type, r.input[0], r.output[0]) for r in readers.get(n, [])]
        == [("ScatterND", n, f"new_{n}")]
    )


def quantize_int8(proto: onnx.ModelProto, frames_per_call: int) -> onnx.ModelProto:
    """8-bit weights for every MatMul with a constant weight of at least INT8_BLOCK input rows, with the
    onnxruntime kernel that is fastest for its shape (measured, docs/benchmarks.md):
    - convs 2-5 where they produce >= ROWWISE_MIN_ROWS rows per stream and call: each input row
      quantised to uint8 with its own scale (the inputs are ReLU outputs), int8 weights with one scale
      per output column, and onnxruntime's integer GEMM (MatMulInteger), fast for several rows;
    - the rest (few-row products: the later convs at small F, the GRU, the predictor): MatMulNBits,
      symmetric 8-bit weights with one scale per block of INT8_BLOCK inputs, int8 compute.
    conv1 (10 inputs per window, fewer than INT8_BLOCK) stays float32."""
    from onnx import numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it logs every node
    graph = proto.graph
    weights = {i.name: i for i in graph.initializer}
    rows_per_hop = [HOP // int(np.prod(STRIDES[: i + 1])) for i in range(len(STRIDES))]  # 32 8 4 2 1
    many_rows = {  # conv_w.{i - 1} is conv layer i + 1's weight (conv1 has its own, conv1_w)
        f"conv_w.{i - 1}"
        for i in range(1, len(STRIDES))
        if rows_per_hop[i] * frames_per_call >= ROWWISE_MIN_ROWS
    }
    nodes = []
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in many_rows:
            nodes += rowwise_uint8_matmul(graph, node, numpy_helper.to_array(weights[node.input[1]]))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    small = [
        n.name
        for n in graph.node
        if n.op_type == "MatMul" and n.input[1] in weights and weights[n.input[1]].dims[0] < INT8_BLOCK
    ]
    quantizer = MatMulNBitsQuantizer(
        proto, bits=8, block_size=INT8_BLOCK, is_symmetric=True, accuracy_level=4, nodes_to_exclude=small
    )
    quantizer.process()
    model = quantizer.model.model
    for opset in model.opset_import:  # blocked QuantizeLinear (one scale per row) is opset 21
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, 21)
    return model


def export_onnx(
    model: CPC,
    cfg: Config,
    train_step: int,
    path: Path,
    frames_per_call: int,
    window: int,
    weights: str = "fp32",
) -> ModelInfo:
    """Export the streaming step of `model` to `path` with its metadata; returns that metadata.
    weights: "fp32", or "int8" (the GRU spelt out as matrix products, then quantize_int8)."""
    if weights not in WEIGHT_KINDS:
        raise ValueError(f"weights {weights!r}: expected one of {', '.join(WEIGHT_KINDS)}")
    int8 = weights == "int8"
    step = StreamingCPC(model, frames_per_call, window, gru_as_matmuls=int8).eval()
    example = (torch.zeros(2, frames_per_call * HOP), *zero_state(model, window, frames_per_call, 2))
    batch = torch.export.Dim("batch", min=1, max=65536)
    dynamic = {"audio": {0: batch}, "state": tuple({0: batch} for _ in STATE_NAMES)}
    # The exporter narrates its passes and warns about GRU weight attributes it handles correctly.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("torch.onnx", "onnxscript", "onnx_ir"):  # notes on every pass and rewrite they apply
            logging.getLogger(name).setLevel(logging.ERROR)
        program = torch.onnx.export(
            step, example, None, dynamo=True, external_data=False, verbose=False,
            input_names=["audio", *STATE_NAMES],
            output_names=[*OUTPUT_NAMES, *(f"new_{n}" for n in STATE_NAMES)],
            dynamic_shapes=dynamic,
        )  # fmt: skip
    proto = program.model_proto
    keep_layer_norm_unfused(proto)
    gru = [n for n in proto.graph.node if n.op_type == "GRU"]
    lbr = [a.i for n in gru for a in n.attribute if a.name == "linear_before_reset"]
    # pytorch#189225: some exporters dropped linear_before_reset, giving silently wrong numbers. The int8
    # graph has no GRU node: its GRU is spelt out as products and gates.
    if lbr != ([] if int8 else [1]):
        raise RuntimeError(
            f"exported GRU lacks linear_before_reset=1 (found {lbr}); upgrade onnxscript to >= 0.7.1"
        )
    if any(n.op_type in ("If", "Loop", "Scan") for n in proto.graph.node):
        raise RuntimeError("exported graph has control flow; the streaming step must be a straight graph")
    info = ModelInfo(
        sample_rate=SAMPLE_RATE, hop=HOP, frames_per_call=frames_per_call,
        enc_dim=cfg.model.enc_dim, ctx_dim=cfg.model.ctx_dim, n_steps=cfg.model.n_steps, neg_window=window,
        score=cfg.model.score, temperature=cfg.model.temperature, norm=cfg.model.norm,
        state_shapes=state_shapes(model, window, frames_per_call), config_hash=cfg.model_hash(), train_step=train_step,
        exported_by=f"cpc-stream {cpc_stream.__version__}, torch {torch.__version__}", weights=weights,
    )  # fmt: skip
    if int8:
        proto = quantize_int8(proto, frames_per_call)
    info = dataclasses.replace(info, inplace_state=inplace_states(proto, STATE_NAMES))
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
    """Run the graph hop by hop on each row of `audio` as the daemon does (StreamBatch: state bound once,
    rings updated in place) and the model offline on the whole rows; return the max abs difference of
    each output (NaN positions must agree)."""
    runtime = StreamingModel(path, providers="cpu", threads=1)
    n = runtime.info.samples_per_call
    streams = StreamBatch(runtime, audio.shape[0])
    got: dict[str, list[np.ndarray]] = {k: [] for k in OUTPUT_NAMES}
    for i in range(audio.shape[1] // n):
        out = streams.step(audio[:, i * n : (i + 1) * n])
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
        "--weights", choices=WEIGHT_KINDS, default="fp32",
        help="int8: 8-bit matrix weights, faster on one core, outputs within a looser stated tolerance",
    )  # fmt: skip
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
            info = export_onnx(
                model, cfg, int(ckpt["step"]), tmp, args.frames_per_call, args.neg_window, args.weights
            )
            tolerance = TOLERANCE_INT8 if info.weights == "int8" else TOLERANCE
            print(
                f"cpc-export: wrote {info.weights} graph: F={info.frames_per_call} W={info.neg_window} "
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
                    f"{label} {k} {v:.2e} > {tolerance[k]:.0e}" for k, v in diffs.items() if v > tolerance[k]
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
