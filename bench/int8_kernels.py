"""Which onnxruntime kernel to use for each 8-bit product of the int8 graph: one product alone, timed.

    python bench/int8_kernels.py [--calls 300] [--copies 8]

For the paper-size graph's products at F=1 (rows x inputs x outputs), one thread: float32 MatMul (the
baseline, same process), MatMulNBits (8-bit weights in blocks of 128, int8 compute: what the int8 graph
uses for few-row products), the row-wise uint8 x int8 MatMulInteger of cpc_export.quantize (what it uses for
convs with >= 4 rows per call), and onnxruntime's quantize_dynamic (one activation scale per call: not
used, see docs/onnx-contract.md). Prints median microseconds per call (best of 3 rounds), the speed-up
over float32 and the error relative to the largest float32 output, on ReLU-like inputs. One product
alone keeps its weights in the core's 2 MB L2 from call to call, which the whole graph (7.1 MB of
weights) never does; with --copies 8 each product is timed as 8 copies called in turn, so that every
call reads its weights from L3 as in the graph.

"all 12 steps" is the predictor, all K = 12 W_k in one product (what the graph runs: it keeps the
predictions in a ring); "predictor step" is one W_k alone, for comparison (the third session's graph
applied each W_k to its own context c_{t-k}, 12 such products).

Then all 7 products of a one-frame call in one graph, quantised by cpc-export's own rule
(quantize_int8), float32 and int8: what a one-frame call costs for its products alone, with every weight
read from beyond the core's caches as in the real graph, against the compute floor of
bench/stream_step.py measured in the same process.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from cpc_export.quantize import INT8_BLOCK, quantize_int8, rowwise_uint8_matmul
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
from stream_step import Floor  # same folder: the floor, measured the same way

SHAPES = {  # name: (rows, inputs, outputs) per call at F=1, B=1; each conv's two kernel halves side by side
    "conv2": (8, 2048, 1024),
    "conv3": (4, 1024, 1024),
    "conv4": (2, 1024, 1024),
    "conv5": (1, 1024, 1024),
    "gru input": (1, 512, 768),
    "gru hidden": (1, 256, 768),
    "predictor step": (1, 256, 512),
    "all 12 steps": (1, 256, 6144),
    "conv2 at F=4": (32, 2048, 1024),
}
CALL = {  # the products of one F=1 call, under the initializer names quantize_int8 decides by
    "conv_w.0": "conv2", "conv_w.1": "conv3", "conv_w.2": "conv4", "conv_w.3": "conv5",
    "gru_w_ih": "gru input", "gru_w_hh": "gru hidden",
    "pred_w": "all 12 steps",
}  # fmt: skip


def matmul_model(w: np.ndarray, rows: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")], "mm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, rows, w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def variants(w: np.ndarray, rows: int) -> dict[str, onnx.ModelProto]:
    out = {"float32": matmul_model(w, rows)}
    q = MatMulNBitsQuantizer(
        matmul_model(w, rows), bits=8, block_size=INT8_BLOCK, is_symmetric=True, accuracy_level=4
    )
    q.process()
    out["MatMulNBits"] = q.model.model
    m = matmul_model(w, rows)
    nodes = rowwise_uint8_matmul(m.graph, m.graph.node[0], w)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    del m.graph.initializer[0]  # the float weight, now unused
    out["row-wise uint8"] = m
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(matmul_model(w, rows), f"{tmp}/f.onnx")
        quantize_dynamic(f"{tmp}/f.onnx", f"{tmp}/q.onnx", per_channel=True, weight_type=QuantType.QInt8)
        out["per-call uint8"] = onnx.load(f"{tmp}/q.onnx")
    return out


def call_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Every product of one F=1 call side by side (inputs a_<weight>), float32."""
    nodes, inputs, outputs, inits = [], [], [], []
    for name, label in CALL.items():
        rows, k, n = SHAPES[label]
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, name))
        nodes.append(helper.make_node("MatMul", [f"a_{name}", name], [f"y_{name}"], name=f"mm_{name}"))
        inputs.append(helper.make_tensor_value_info(f"a_{name}", TensorProto.FLOAT, [1, rows, k]))
        outputs.append(helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "call", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def time_us(runs: list[tuple[ort.InferenceSession, dict[str, np.ndarray]]], calls: int) -> float:
    """Median microseconds per call, best of 3 rounds, calling the sessions in turn; inputs and outputs
    bound once (IOBinding), as the streaming graph runs in the daemon, so that feeding the inputs does not
    count as compute."""
    bound = []
    for sess, feeds in runs:
        binding = sess.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for out, value in zip(sess.get_outputs(), sess.run(None, feeds), strict=True):
            binding.bind_ortvalue_output(out.name, ort.OrtValue.ortvalue_from_numpy(np.empty_like(value)))
        bound.append((sess, binding))
    for i in range(20):
        sess, binding = bound[i % len(bound)]
        sess.run_with_iobinding(binding)
    best = np.inf
    for _ in range(3):
        t = np.empty(calls)
        for i in range(calls):
            sess, binding = bound[i % len(bound)]
            s = time.perf_counter()
            sess.run_with_iobinding(binding)
            t[i] = time.perf_counter() - s
        best = min(best, float(np.median(t)))
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument(
        "--copies", type=int, default=1,
        help="time each product as this many copies with their own weights, called in turn: at 8, every "
        "call finds its weights beyond the core's 2 MB L2, as in the whole graph",
    )  # fmt: skip
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # the quantizers narrate every node
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    rng = np.random.default_rng(0)
    print(
        f"onnxruntime {ort.__version__}, one thread, {args.copies} cop{'y' if args.copies == 1 else 'ies'} "
        "of each product called in turn; microseconds per call (x faster than float32, rel. error)"
    )
    names = ["float32", "MatMulNBits", "row-wise uint8", "per-call uint8"]
    print(f"{'product':>14} {'rows x in x out':>16} " + " ".join(f"{n:>26}" for n in names))
    for label, (rows, k, n) in SHAPES.items():
        a = np.maximum(rng.standard_normal((1, rows, k)), 0).astype(np.float32)
        copies = [
            variants((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), rows)
            for _ in range(args.copies)
        ]
        cells, base, ref = [], None, None
        for name in names:
            sessions = [
                ort.InferenceSession(c[name].SerializeToString(), opts, providers=["CPUExecutionProvider"])
                for c in copies
            ]
            y = sessions[0].run(None, {"a": a})[0]
            us = time_us([(sess, {"a": a}) for sess in sessions], args.calls)
            if base is None:
                base, ref = us, y
            err = float(np.abs(y - ref).max() / np.abs(ref).max())
            cells.append(f"{us:8.1f} ({base / us:4.1f}x, {err:.0e})")
        print(f"{label:>14} {f'{rows} x {k} x {n}':>16} " + " ".join(f"{c:>26}" for c in cells), flush=True)

    rate = Floor(1).rate(30)
    call = call_model(rng)
    macs = sum(np.prod(SHAPES[label]) for label in CALL.values())
    feeds = {
        f"a_{name}": np.maximum(rng.standard_normal((1, *SHAPES[label][:2])), 0).astype(np.float32)
        for name, label in CALL.items()
    }
    print(
        f"\nall products of one F=1 call in one graph ({macs / 1e6:.1f} M multiply-adds); "
        f"floor {rate * 2 / 1e9:.1f} GFLOP/s -> {macs / rate * 1e6:.1f} us"
    )
    quantised = onnx.ModelProto()
    quantised.CopyFrom(call)
    for kind, model in (("float32", call), ("int8 (quantize_int8)", quantize_int8(quantised, 1))):
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        us = time_us([(sess, feeds)], args.calls)
        print(f"{kind:>22}: {us:8.1f} us per call, {us / (macs / rate * 1e6):.2f} x the floor")


if __name__ == "__main__":
    main()
