"""The streaming graph's contract: what cpc-export writes and every runtime reads (docs/onnx-contract.md).

This module is the one owner of: the audio rate and hop, the format name and version, the names of the
graph's inputs and outputs, the state cpc-export writes (STATE_LAYOUT: names in input order, shapes,
dtypes, which states may be updated in place) and the metadata keys (ModelInfo). The exporter builds its
step and its graph from it, the runtime checks every graph against it, and tests name outputs by it.

    layout = state_layout(enc_dim=512, ctx_dim=256, n_steps=12, frames_per_call=1, neg_window=128)
    [s.name for s in layout]          # cache_conv1 ... frame_index, the graph's inputs after "audio"
    info = ModelInfo.from_metadata(session.get_modelmeta().custom_metadata_map, "cpc.onnx")

Versions. A runtime takes each graph's state names, shapes and dtypes from the graph itself (its
metadata and inputs), so the state may change from one export to the next without a new format
version: zero state is the start of a stream, and `new_<name>` is fed back as `<name>`. The format
version changes when a graph written now would be misread by a runtime that accepts the previous version:
an output whose meaning or timing changes, or a required input other than audio and the state. Metadata
keys added later are OPTIONAL_KEYS: absent means the default, which is what earlier graphs did.

Format 2 is such a change, and only for graphs with look-ahead (a model whose frame t depends on samples
after its hop, like CPC_audio's): frame t comes out ceil(lookahead / hop) calls' hops after the call
that brought its own hop, where a format 1 runtime expects it. Such a runtime would publish an output
that is no frame as frame 0 and every frame under the index of the one before, so these graphs say
format 2, which it refuses in one line. Every other graph still says format 1
(ModelInfo.format_version): older runtimes keep serving them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import UserError

SAMPLE_RATE = 16000  # Hz: what every graph takes
HOP = 160  # samples per frame: one frame every 10 ms

FORMAT_KEY = "cpc_stream.format"
FORMAT_NAME = "cpc-stream-onnx"
FORMAT_VERSIONS = (1, 2)  # what this runtime reads; 2: graphs with look-ahead (module docstring)
AUDIO = "audio"  # the first input: (B, frames_per_call * HOP) float32
OUTPUT_NAMES = ("z", "c", "scores", "logprob", "valid")  # then new_<state> for each state, in order
SCORE_OUTPUTS = OUTPUT_NAMES[2:]  # a model without k-step predictors has none of these three
AR_KINDS = ("gru", "lstm")  # the context network's recurrent cell
WEIGHT_KINDS = ("fp32", "int8")
ONNX_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(float16)": np.float16}
# Added after format 1 shipped; absent means the default: float weights, no in-place state, no look-ahead,
# every output.
OPTIONAL_KEYS = ("weights", "inplace_state", "lookahead", "outputs")


@dataclass(frozen=True)
class StateTensor:
    """One state input of the graph; its output is `new_<name>`."""

    name: str
    shape: tuple[int | str, ...]  # "B" marks the batch axis
    dtype: str  # numpy dtype name
    inplace: bool = False  # read only by the node that writes new_<name>: may share its buffer
    holds: str = ""


def ar_state_names(ar: str, layer: int) -> tuple[str, ...]:
    """The context network's state of `layer` (1, 2, ...): `gru_h` for a GRU, `lstm_h` and `lstm_c` for an
    LSTM; later layers add their number (`gru_h2`, `lstm_h2`, `lstm_c2`)."""
    if ar not in AR_KINDS:
        raise ValueError(f"ar {ar!r}: expected one of {', '.join(AR_KINDS)}")
    suffix = "" if layer == 1 else str(layer)
    return (f"{ar}_h{suffix}",) if ar == "gru" else (f"lstm_h{suffix}", f"lstm_c{suffix}")


def state_layout(
    enc_dim: int,
    ctx_dim: int,
    n_steps: int,
    frames_per_call: int,
    neg_window: int,
    conv1_cache: int = 5,
    ar: str = "gru",
    ar_layers: int = 1,
) -> tuple[StateTensor, ...]:
    """The state cpc-export writes, in input order (C = enc_dim, H = ctx_dim, K = n_steps,
    F = frames_per_call, W = neg_window; conv1_cache = conv1's kernel minus its stride, plus, for a model
    with look-ahead, the samples of each call that its newest frame does not need yet; ar and ar_layers:
    the context network). n_steps = 0 is a model without k-step predictors: no scores, so no rings."""
    c, h, k, f, w = enc_dim, ctx_dim, n_steps, frames_per_call, neg_window
    convs = (
        StateTensor("cache_conv1", ("B", conv1_cache), "float32", holds="the last audio samples, conv1's overlap"),
        *(
            StateTensor(f"cache_conv{i}", ("B", 1, c), "float32", holds=f"conv{i}'s carry into its next output")
            for i in range(2, 6)
        ),
    )  # fmt: skip
    context = []
    for layer in range(1, ar_layers + 1):
        for name in ar_state_names(ar, layer):
            what = "cell state" if name.startswith("lstm_c") else "hidden state: its output at the last frame"
            context.append(
                StateTensor(name, ("B", h), "float32", holds=f"the {ar.upper()}'s layer {layer} {what}")
            )
    rings = (
        StateTensor("pred_history", ("B", k + f, k, c), "float32", inplace=True,
                    holds="ring: the K predictions of each of the last K+F contexts, in score space"),
        StateTensor("z_history", ("B", w + f, c), "float32", inplace=True,
                    holds="ring: z of the last W+F frames, in score space"),
    ) if k else ()  # fmt: skip
    frames = StateTensor("frame_index", ("B",), "int64", holds="hops this stream has consumed")
    return (*convs, *context, *rings, frames)


STATE_NAMES = tuple(s.name for s in state_layout(1, 1, 1, 1, 1))  # cpc-train's models: one GRU layer, scores


def delay_frames(lookahead: int, hop: int = HOP) -> int:
    """Frames by which a graph's outputs lag its audio: output i of a stream's call c (from 0) is frame
    c * F + i - delay, and outputs that come out before frame 0 are not frames (a runtime drops them).
    Frame t comes out of the call that brings the last sample it depends on, 160 (t + 1) + lookahead - 1,
    rounded up to a whole hop: ceil(lookahead / hop) frames late (1 for CPC_audio's 152 samples)."""
    return -(-lookahead // hop)


@dataclass(frozen=True)
class ModelInfo:
    """Everything a runtime needs from the graph's metadata_props (all stored as strings)."""

    sample_rate: int
    hop: int  # samples per frame
    frames_per_call: int  # F
    enc_dim: int
    ctx_dim: int
    n_steps: int  # K; 0: no k-step predictors, no scores
    neg_window: int  # W: frames of z_history that normalise logprob (0 without scores)
    score: str  # the score function; "none" without scores
    temperature: float
    norm: str
    state_shapes: dict[str, list] = field(default_factory=dict)  # "B" marks the batch axis
    config_hash: str = ""
    train_step: int = 0
    exported_by: str = ""
    weights: str = "fp32"  # or "int8": 8-bit matrix weights, outputs within the stated tolerance
    state_names: tuple[str, ...] = STATE_NAMES  # the graph's state inputs, in order
    inplace_state: tuple[str, ...] = ()  # states whose output may share its input's buffer
    lookahead: int = 0  # samples after frame t's hop that frame t depends on (frame timing: module docstring)
    outputs: tuple[str, ...] = OUTPUT_NAMES  # the graph's outputs before the new state: all, or z and c

    @property
    def format_version(self) -> int:
        """The format version this graph's metadata says: 2 with look-ahead, else 1 (module docstring)."""
        return 2 if self.lookahead else 1

    @property
    def delay(self) -> int:
        """Frames by which a call's outputs lag its audio (delay_frames)."""
        return delay_frames(self.lookahead, self.hop)

    @property
    def has_scores(self) -> bool:
        return "scores" in self.outputs

    def to_metadata(self) -> dict[str, str]:
        meta = {FORMAT_KEY: f"{FORMAT_NAME}/{self.format_version}"}
        for k, v in asdict(self).items():
            meta[k] = (
                json.dumps(v) if isinstance(v, dict) else ",".join(v) if isinstance(v, tuple) else str(v)
            )
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str) -> ModelInfo:
        """Parse and check a graph's metadata; anything missing, unknown or inconsistent is a UserError."""
        fmt = meta.get(FORMAT_KEY)
        if fmt is None:
            raise UserError(f"{source}: not a cpc-stream model (no {FORMAT_KEY} in its metadata)")
        readable = [f"{FORMAT_NAME}/{v}" for v in FORMAT_VERSIONS]
        if fmt not in readable:
            raise UserError(
                f"{source}: model format {fmt!r} is not supported (this runtime reads {', '.join(readable)})"
            )
        kwargs = {}
        for f in cls.__dataclass_fields__.values():
            if f.name in OPTIONAL_KEYS and f.name not in meta:
                continue
            if f.name not in meta:
                raise UserError(f"{source}: metadata key {f.name!r} is missing")
            raw = meta[f.name]
            try:
                if f.type.startswith("dict"):
                    kwargs[f.name] = json.loads(raw)
                elif f.type.startswith("tuple"):
                    kwargs[f.name] = tuple(x for x in raw.split(",") if x)
                else:
                    kwargs[f.name] = {"int": int, "float": float}.get(f.type, str)(raw)
            except ValueError:
                raise UserError(f"{source}: metadata key {f.name!r} has a bad value {raw!r}") from None
        if kwargs.get("weights", "fp32") not in WEIGHT_KINDS:
            raise UserError(
                f"{source}: weights {kwargs['weights']!r} unknown (this runtime reads {', '.join(WEIGHT_KINDS)})"
            )
        names = kwargs["state_names"]
        if (
            not isinstance(kwargs["state_shapes"], dict)
            or len(set(names)) != len(names)
            or set(names) != set(kwargs["state_shapes"])
        ):
            raise UserError(f"{source}: state names {','.join(names)} do not match the state shapes' keys")
        unknown = set(kwargs.get("inplace_state", ())) - set(names)
        if unknown:
            raise UserError(f"{source}: inplace_state names {','.join(sorted(unknown))}, not a state")
        outputs = kwargs.get("outputs", OUTPUT_NAMES)
        if outputs not in (OUTPUT_NAMES, OUTPUT_NAMES[:2]):
            raise UserError(
                f"{source}: outputs {','.join(outputs)}: expected {','.join(OUTPUT_NAMES)} or {','.join(OUTPUT_NAMES[:2])}"
            )
        info = cls(**kwargs)
        if info.lookahead < 0:
            raise UserError(f"{source}: metadata lookahead is {info.lookahead}, expected >= 0 samples")
        if info.format_version != int(fmt.rsplit("/", 1)[1]):  # a format 1 runtime would misread its timing
            raise UserError(
                f"{source}: format {fmt} does not fit a look-ahead of {info.lookahead} samples "
                f"(format {info.format_version} does)"
            )
        return info

    @property
    def samples_per_call(self) -> int:
        return self.frames_per_call * self.hop

    def io_shapes(self, batch: int | str = "B") -> dict[str, list]:
        """Every input and output shape the metadata implies, with `batch` for the batch axis."""
        f = self.frames_per_call
        shapes = {
            AUDIO: [batch, self.samples_per_call],
            "z": [batch, f, self.enc_dim],
            "c": [batch, f, self.ctx_dim],
        }
        if self.has_scores:
            shapes.update({k: [batch, f, self.n_steps] for k in SCORE_OUTPUTS})
        for name in self.state_names:
            shapes[name] = shapes[f"new_{name}"] = [batch if d == "B" else d for d in self.state_shapes[name]]
        return shapes

    def zero_outputs(self, *lead: int) -> dict[str, np.ndarray]:
        """Zero arrays shaped like the outputs of one frame, behind the leading axes `lead`:
        {"z": (*lead, enc_dim), "c": (*lead, ctx_dim)} and, with scores, "scores"/"logprob"/"valid":
        (*lead, K)."""
        dims = {"z": self.enc_dim, "c": self.ctx_dim, "scores": self.n_steps, "logprob": self.n_steps}
        out = {k: np.zeros((*lead, dims[k]), np.float32) for k in self.outputs if k != "valid"}
        if self.has_scores:
            out["valid"] = np.zeros((*lead, self.n_steps), bool)
        return out
