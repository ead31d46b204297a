"""The exported streaming CPC graph in an onnxruntime session, behind three small classes.

    model = OnnxModel("cpc.onnx")                  # refuses a graph that breaks the contract (contract.py)
    state = model.zero_state(batch=2)              # a zero state is the start of a stream
    out, state = model.step(audio, state)          # audio (2, frames_per_call * 160) float32
    out["c"]                                       # (2, frames_per_call, ctx_dim)
    model.reset(state, rows=[1])                   # stream 1 starts over

    batch = StreamBatch(model, 2)                  # the same, with the state kept inside and bound once:
    out = batch.step(audio)                        # what the daemon runs (no state copies per call)
    out = batch.step(audio[:1], rows=[1])          # only stream 1 has audio: the other waits

    stream = ChunkedStream(model)                  # one stream fed in chunks of any size
    frames = stream.feed(samples)                  # {"c": (n, ctx_dim), ...} for every whole call
    frames = stream.finish()                       # the end of the stream: its last whole hops

A model with look-ahead (model.info.lookahead > 0 samples, CPC_audio's) returns each frame `delay` frames
later: output i of a stream's call c is frame c * F + i - delay (contract.ModelInfo.delay). StreamBatch
returns what the graph returns; ChunkedStream and the daemon drop the outputs before frame 0.

The contract (inputs, outputs, state, metadata) is docs/onnx-contract.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .contract import AUDIO, ONNX_DTYPES, OUTPUT_NAMES, ModelInfo
from .errors import UserError
from .hugepages import collapse_anonymous_memory


def choose_providers(requested: str = "auto") -> list[str]:
    """onnxruntime providers: 'cpu', 'cuda' (an error if this onnxruntime has no CUDA), or 'auto'
    (CUDA when available, else CPU)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested == "cpu":
        return ["CPUExecutionProvider"]
    if requested == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise UserError(
                f"CUDA provider asked for, but this onnxruntime offers only {', '.join(available)} (install the 'gpu' extra)"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if requested != "auto":
        raise UserError(f"provider {requested!r}: expected auto, cpu or cuda")
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxModel:
    """A cpc-stream ONNX graph in an onnxruntime session, with its metadata checked."""

    def __init__(self, path: str | Path, providers: str = "auto", threads: int = 1, huge_pages: bool = False):
        """huge_pages: once the session is built, move the process's memory, the weights included, into
        2 MB pages where Linux allows it (hugepages.py; one-frame int8 calls measured ~9 % faster)."""
        import onnxruntime as ort

        p = Path(path)
        if p.is_dir():
            raise UserError(f"model file {p} is a folder; give the .onnx file cpc-export wrote")
        if not p.is_file():
            raise UserError(f"model file {p} not found")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # A daemon shares the machine: threads sleep between calls instead of spinning.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(p), opts, providers=choose_providers(providers))
        except UserError:
            raise
        except Exception as e:  # onnxruntime raises its own types for a damaged file
            raise UserError(
                f"model file {p} is not a loadable ONNX graph ({str(e).splitlines()[0][:200]})"
            ) from None
        self.huge_page_bytes = collapse_anonymous_memory() if huge_pages else 0
        self.info = ModelInfo.from_metadata(self.session.get_modelmeta().custom_metadata_map, str(p))
        names = self.info.state_names
        inputs = [i.name for i in self.session.get_inputs()]
        if inputs != [AUDIO, *names]:
            raise UserError(f"{p}: graph inputs {inputs} are not {AUDIO} + {', '.join(names)}")
        self._outputs = [*self.info.outputs, *(f"new_{n}" for n in names)]
        graph_outputs = {o.name for o in self.session.get_outputs()}
        missing = set(self._outputs) - graph_outputs
        if missing:
            raise UserError(f"{p}: graph outputs lack {', '.join(sorted(missing))}")
        unlisted = [n for n in OUTPUT_NAMES if n in graph_outputs and n not in self.info.outputs]
        if unlisted:
            raise UserError(
                f"{p}: graph outputs {', '.join(unlisted)}, which its metadata (outputs "
                f"{','.join(self.info.outputs)}) says it has not"
            )
        self._dtypes = {}  # the state's dtypes are the graph's own
        for i in self.session.get_inputs()[1:]:
            if i.type not in ONNX_DTYPES:
                raise UserError(
                    f"{p}: state input {i.name} has type {i.type}, not one of {', '.join(ONNX_DTYPES)}"
                )
            self._dtypes[i.name] = ONNX_DTYPES[i.type]
        self.providers = self.session.get_providers()
        self._check_against_graph(str(p))

    def _check_against_graph(self, source: str) -> None:
        """Refuse metadata that contradicts the graph (a runtime that trusted it would fail mid-stream):
        the declared shapes against the graph's static dimensions, then one call on two zero streams
        against the shapes it really returns."""
        i = self.info
        counts = ("n_steps", "neg_window")  # 0 exactly when the graph has no scores
        for key in ("sample_rate", "hop", "frames_per_call", "enc_dim", "ctx_dim", *counts):
            value = getattr(i, key)
            if key in counts and not i.has_scores:
                if value != 0:
                    raise UserError(
                        f"{source}: metadata {key} is {value}, expected 0: the graph has no scores"
                    )
            elif value < 1:
                raise UserError(f"{source}: metadata {key} is {value}, expected >= 1")
        for name, dims in i.state_shapes.items():
            if not (
                isinstance(dims, list) and dims and all(d == "B" or (type(d) is int and d >= 1) for d in dims)
            ):
                raise UserError(f"{source}: metadata state_shapes[{name!r}] = {dims!r} is not a shape")
        want = i.io_shapes()
        for node in [*self.session.get_inputs(), *self.session.get_outputs()]:
            if node.name not in want:
                continue
            declared, graph = want[node.name], node.shape
            static_ok = len(graph) == len(declared) and all(
                not isinstance(g, int) or d == "B" or g == d for g, d in zip(graph, declared, strict=True)
            )
            if not static_ok:
                raise UserError(
                    f"{source}: metadata implies {node.name} of shape {declared}, the graph has {graph}"
                )
        try:
            out, state = self.step(np.zeros((2, i.samples_per_call), np.float32), self.zero_state(2))
        except Exception as e:  # onnxruntime's own error types
            raise UserError(f"{source}: the graph fails on two zero streams as its metadata describes them "
                            f"({str(e).strip().splitlines()[0][:160]})") from None  # fmt: skip
        got = {
            **{k: list(v.shape) for k, v in out.items()},
            **{f"new_{k}": list(v.shape) for k, v in state.items()},
        }
        for name, shape in got.items():
            if shape != i.io_shapes(2)[name]:
                raise UserError(
                    f"{source}: metadata implies {name} of shape {i.io_shapes(2)[name]}, the graph returns {shape}"
                )

    def zero_state(self, batch: int) -> dict[str, np.ndarray]:
        """Fresh state for `batch` streams: every stream at its start."""
        shapes = self.info.state_shapes
        return {
            name: np.zeros([batch if d == "B" else d for d in shapes[name]], dtype=self._dtypes[name])
            for name in self.info.state_names
        }

    @staticmethod
    def reset(state: dict[str, np.ndarray], rows: Sequence[int]) -> None:
        """Restart the given streams (rows of the batch) in place."""
        for arr in state.values():
            arr[list(rows)] = 0

    def step(
        self, audio: np.ndarray, state: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """audio (B, frames_per_call * hop) float32 -> outputs {z, c, scores, logprob, valid} (the
        graph's: info.outputs), each (B, F, ...), and the new state."""
        if audio.ndim != 2 or audio.shape[1] != self.info.samples_per_call:
            raise ValueError(f"audio must be (batch, {self.info.samples_per_call}), got {audio.shape}")
        feeds = {AUDIO: np.ascontiguousarray(audio, dtype=np.float32), **state}
        values = self.session.run(self._outputs, feeds)
        n = len(self.info.outputs)
        return dict(zip(self.info.outputs, values[:n], strict=True)), dict(
            zip(self.info.state_names, values[n:], strict=True)
        )


class StreamBatch:
    """The state of `batch` streams kept in preallocated buffers, bound to the session (onnxruntime
    IOBinding). A call copies only its audio in and its outputs out, never the state, and makes no
    Python-side allocations for it. The graph's in-place states (its rings, 0.58 MB per stream for the
    paper's model at F=1) have one buffer, both input and output, so that a call writes only its new
    slots; the rest of the state (a few KB) has two sets, each call reading one and writing the other.
    `step` equals OnnxModel.step with the state threaded through.

    A call may advance only some streams (`rows`): rows 0..n-1 run on views of the same buffers (bound
    once per n; the other rows' small state is carried to the next set, a few KB each), any other choice
    of rows on a gathered copy of their state, scattered back (which copies the rings too)."""

    def __init__(self, model: OnnxModel, batch: int):
        self.model, self.batch = model, batch
        self._audio = np.zeros((batch, model.info.samples_per_call), np.float32)
        self._sets = [model.zero_state(batch), model.zero_state(batch)]
        for name in model.info.inplace_state:  # one buffer, read and written by every call
            self._sets[1][name] = self._sets[0][name]
        self._small = [n for n in model.info.state_names if n not in model.info.inplace_state]
        self._outputs = model.info.zero_outputs(batch, model.info.frames_per_call)
        self._bindings: dict[int, list] = {}  # rows 0..n-1 -> [binding reading set 0, reading set 1]
        self._current = 0

    def _prefix_bindings(self, n: int) -> list:
        """Binding k reads rows 0..n-1 of set k and writes them in set 1 - k."""
        if n not in self._bindings:
            bindings = []
            for k in range(2):
                b = self.model.session.io_binding()
                b.bind_cpu_input(AUDIO, self._audio[:n])
                for name in self.model.info.state_names:
                    b.bind_cpu_input(name, self._sets[k][name][:n])
                    _bind_output(b, f"new_{name}", self._sets[1 - k][name][:n])
                for name, arr in self._outputs.items():
                    _bind_output(b, name, arr[:n])
                bindings.append(b)
            self._bindings[n] = bindings
        return self._bindings[n]

    @property
    def state(self) -> dict[str, np.ndarray]:
        """The current state, as arrays owned by the batch: they may be read or written in place (that
        is how rows are reset). The next call updates the in-place states (the rings) where they lie;
        the call after next overwrites the rest."""
        return self._sets[self._current]

    def reset(self, rows: Sequence[int]) -> None:
        """Restart the given streams."""
        OnnxModel.reset(self.state, rows)

    def step(self, audio: np.ndarray, rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """audio (batch, frames_per_call * hop) -> outputs {z, c, scores, logprob, valid}, each
        (batch, F, ...), as new arrays. With `rows`, only those streams advance: audio is
        (len(rows), F * hop) in the order of `rows`, the outputs (len(rows), F, ...), and the other
        streams' state is untouched."""
        rows = list(range(self.batch)) if rows is None else list(rows)
        n = len(rows)
        if audio.shape != (n, self._audio.shape[1]):
            raise ValueError(f"audio must be ({n}, {self._audio.shape[1]}), got {audio.shape}")
        if rows != list(range(n)):
            return self._step_rows(audio, rows)
        np.copyto(self._audio[:n], audio)
        self.model.session.run_with_iobinding(self._prefix_bindings(n)[self._current])
        if n < self.batch:  # the rows that did not run keep their small state in the next set
            old, new = self._sets[self._current], self._sets[1 - self._current]
            for name in self._small:
                new[name][n:] = old[name][n:]
        self._current = 1 - self._current
        return {k: v[:n].copy() for k, v in self._outputs.items()}

    def _step_rows(self, audio: np.ndarray, rows: list[int]) -> dict[str, np.ndarray]:
        idx = np.asarray(rows, dtype=np.int64)
        if len(set(rows)) != len(rows) or (len(idx) and not 0 <= idx.min() <= idx.max() < self.batch):
            raise ValueError(f"rows must be distinct rows of the batch (0..{self.batch - 1}), got {rows}")
        state = self.state
        out, new_state = self.model.step(audio, {k: v[idx] for k, v in state.items()})
        for k, v in new_state.items():
            state[k][idx] = v
        return out


def _bind_output(binding, name: str, arr: np.ndarray) -> None:
    binding.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)


class ChunkedStream:
    """One audio stream fed in chunks of any size: buffers samples until whole calls are available.

    feed(samples) returns the frames of every complete call, concatenated ({name: (frames, ...)}, the
    graph's outputs); samples short of a call wait for the next feed. finish() ends the stream: its last
    whole hops, short of a call, run zero-padded (as the daemon runs them) and their frames come out; a
    final partial hop makes no frame. For a model with look-ahead the outputs before frame 0 are dropped,
    so frame i is always row i of the concatenated results; its last `delay` hops are heard only as the
    look-ahead of earlier frames (n hops give n - delay frames).
    """

    def __init__(self, model: OnnxModel):
        self.model = model
        self._batch = StreamBatch(model, 1)
        self._pending = np.zeros(0, dtype=np.float32)
        self._hops = 0  # hops run through the model

    def feed(self, samples: np.ndarray) -> dict[str, np.ndarray]:
        n = self.model.info.samples_per_call
        buf = np.concatenate([self._pending, np.asarray(samples, dtype=np.float32).ravel()])
        calls = len(buf) // n
        self._pending = buf[calls * n :]
        return self._run([buf[i * n : (i + 1) * n] for i in range(calls)])

    def finish(self) -> dict[str, np.ndarray]:
        """The frames of the whole hops still pending (fewer than a call); the stream then starts over."""
        info = self.model.info
        hops = len(self._pending) // info.hop
        audio = np.zeros(info.samples_per_call, np.float32)
        audio[: hops * info.hop] = self._pending[: hops * info.hop]
        out = self._run([audio] if hops else [], last_hops=hops)
        self._batch.reset([0])
        self._pending, self._hops = np.zeros(0, dtype=np.float32), 0
        return out

    def _run(self, calls: list[np.ndarray], last_hops: int | None = None) -> dict[str, np.ndarray]:
        """Run each call's audio; keep the outputs that are frames: not before frame 0 (look-ahead), and
        of the last call only its first `last_hops` (the rest ran on padding)."""
        info = self.model.info
        outs = []
        for i, audio in enumerate(calls):
            out = self._batch.step(audio[None])
            real = info.frames_per_call if last_hops is None or i < len(calls) - 1 else last_hops
            first = max(0, info.delay - self._hops)
            self._hops += real
            outs.append({k: v[0, first:real] for k, v in out.items()})
        if not outs:
            return info.zero_outputs(0)
        return {k: np.concatenate([o[k] for o in outs]) for k in info.outputs}
