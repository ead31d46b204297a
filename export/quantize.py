"""The int8 variant of the streaming graph: 8-bit weights for its big matrix products.

    proto = quantize_int8(proto, frames_per_call)   # an exported float graph -> the int8 graph

Each product gets the onnxruntime kernel measured fastest for its shape (bench/int8_kernels.py,
docs/onnx-contract.md "The int8 variant"): row-wise uint8 x int8 MatMulInteger where a product has
several rows per call, MatMulNBits (blocks of INT8_BLOCK inputs) elsewhere. cpc-export proves the result
against the float model within proof.TOLERANCE_INT8.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from cpc_training.config import HOP, STRIDES

INT8_BLOCK = 128  # weights share one scale per block of 128 along the input axis
ROWWISE_MIN_ROWS = 4  # products with at least this many rows per stream and call use the row-wise kernel
# The row-wise kernel's weights use 7 bits. On x86 CPUs without VNNI (AVX2 only), onnxruntime's uint8 x
# int8 GEMM adds pairs of products in 16 bits with saturation (vpmaddubsw): 2 x 255 x 127 overflows and
# the graph's error grew 5-fold (z 0.31 against 0.07 on speech, tests/test_export.py). With 63,
# 2 x 255 x 63 = 32130 fits, on every CPU (onnxruntime's quantizer calls this reduce_range).
WEIGHT_MAX = 63.0


def rowwise_uint8_matmul(graph: onnx.GraphProto, node: onnx.NodeProto, weight: np.ndarray) -> list:
    """Nodes computing node's MatMul(a, weight) for a >= 0 (a ReLU output) in 8 bits: each row of `a`
    quantised to uint8 with its own scale (max / 255; one QuantizeLinear block per row, opset 21),
    weight to 7 bits (int8 in [-WEIGHT_MAX, WEIGHT_MAX]) with one scale per output column,
    onnxruntime's integer GEMM, then both scales applied. Adds the constants to `graph`."""
    from onnx import TensorProto, helper, numpy_helper

    a, name = node.input[0], node.name
    w_scale = np.maximum(np.abs(weight).max(axis=0), 1e-30) / WEIGHT_MAX  # (N,)
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
