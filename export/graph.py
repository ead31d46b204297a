"""The streaming ONNX graph of a CPC model: torch export of export/step.py's CPCStep, then the float
graph's own surgery, the metadata, and (--weights int8) quantize.py.

    info = export_onnx(model, cfg, train_step, "cpc.onnx", frames_per_call=4, window=128)

`model` is a cpc-train model (training/model.py CPC, with its Config as cfg) or a CPC_audio model
(training/cpc_audio.py CPCAudio, with its CPCAudioConfig as cfg): whatever training/checkpoint.py's
load_model returns.

The graph's inputs, outputs, state and metadata are docs/onnx-contract.md; proof.py checks a written
graph against the offline model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch
from cpc_training.config import HOP, SAMPLE_RATE, Config
from cpc_training.cpc_audio import CPCAudioConfig
from torch import nn

import cpc_stream
from cpc_stream.contract import AUDIO, WEIGHT_KINDS, ModelInfo

from .quantize import quantize_int8
from .step import CPCStep, layout, state_shapes, zero_state


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


def export_onnx(
    model: nn.Module,
    cfg: Config | CPCAudioConfig,
    train_step: int,
    path: Path,
    frames_per_call: int,
    window: int,
    weights: str = "fp32",
    source: str = "",
) -> ModelInfo:
    """Export the streaming step of `model` to `path` with its metadata; returns that metadata.
    cfg: the configuration whose model_hash() the graph records; window: W, unused by a model without
    scores; weights: "fp32", or "int8" (the context network spelt out as matrix products, then
    quantize_int8); source: where the weights came from, added to the metadata's exported_by."""
    if weights not in WEIGHT_KINDS:
        raise ValueError(f"weights {weights!r}: expected one of {', '.join(WEIGHT_KINDS)}")
    int8 = weights == "int8"
    step = CPCStep(model, frames_per_call, window, ar_as_matmuls=int8).eval()
    example = (torch.zeros(2, frames_per_call * HOP), *zero_state(model, window, frames_per_call, 2))
    batch = torch.export.Dim("batch", min=1, max=65536)
    dynamic = {"audio": {0: batch}, "state": tuple({0: batch} for _ in step.names)}  # forward's arguments
    # The exporter narrates its passes and warns about GRU weight attributes it handles correctly.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("torch.onnx", "onnxscript", "onnx_ir"):  # notes on every pass and rewrite they apply
            logging.getLogger(name).setLevel(logging.ERROR)
        program = torch.onnx.export(
            step, example, None, dynamo=True, external_data=False, verbose=False,
            input_names=[AUDIO, *step.names],
            output_names=[*step.outputs, *(f"new_{n}" for n in step.names)],
            dynamic_shapes=dynamic,
        )  # fmt: skip
    proto = program.model_proto
    keep_layer_norm_unfused(proto)
    gru = [n for n in proto.graph.node if n.op_type == "GRU"]
    lbr = [a.i for n in gru for a in n.attribute if a.name == "linear_before_reset"]
    # pytorch#189225: some exporters dropped linear_before_reset, giving silently wrong numbers. Only
    # cpc-train's float graph has a GRU node; every other context network is spelt out (step.py).
    if lbr != ([] if step.unrolled else [1]):
        raise RuntimeError(
            f"exported GRU lacks linear_before_reset=1 (found {lbr}); upgrade onnxscript to >= 0.7.1"
        )
    if any(n.op_type in ("If", "Loop", "Scan") for n in proto.graph.node):
        raise RuntimeError("exported graph has control flow; the streaming step must be a straight graph")
    m = model.cfg
    info = ModelInfo(
        sample_rate=SAMPLE_RATE, hop=HOP, frames_per_call=frames_per_call,
        enc_dim=m.enc_dim, ctx_dim=m.ctx_dim, n_steps=step.k, neg_window=step.window,
        score=m.score if step.scores else "none", temperature=m.temperature, norm=m.norm,
        state_shapes=state_shapes(model, window, frames_per_call), config_hash=cfg.model_hash(), train_step=train_step,
        exported_by=f"cpc-stream {cpc_stream.__version__}, torch {torch.__version__}" + (f", from {source}" if source else ""),
        weights=weights, state_names=step.names, lookahead=model.lookahead, outputs=step.outputs,
    )  # fmt: skip
    if int8:
        proto = quantize_int8(proto, frames_per_call)
    declared = tuple(s.name for s in layout(model, window, frames_per_call) if s.inplace)
    if inplace_states(proto, step.names) != declared:  # the contract says so: the graph must allow it
        raise RuntimeError(
            f"the graph does not let {', '.join(declared)} be updated in place (another node reads them)"
        )
    info = dataclasses.replace(info, inplace_state=declared)
    onnx.helper.set_model_props(proto, info.to_metadata())
    proto.doc_string = "Causal CPC streaming step; see docs/onnx-contract.md of cpc-stream"
    onnx.save(proto, str(path))
    return info
