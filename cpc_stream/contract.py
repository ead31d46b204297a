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
version: zero state is the start of a stream, and `new_<name>` is fed back as `<name>`. FORMAT_VERSION
changes when a graph written now would be misread by a runtime that accepts the previous version: an
output whose meaning or timing changes, or a required input other than audio and the state. Metadata
keys added later are OPTIONAL_KEYS: absent means the default, which is what earlier graphs did.
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
FORMAT_VERSION = 1
AUDIO = "audio"  # the first input: (B, frames_per_call * HOP) float32
OUTPUT_NAMES = ("z", "c", "scores", "logprob", "valid")  # then new_<state> for each state, in order
WEIGHT_KINDS = ("fp32", "int8")
ONNX_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(float16)": np.float16}
OPTIONAL_KEYS = ("weights", "inplace_state")  # added after format 1 shipped; absent means the default


@dataclass(frozen=True)
class StateTensor:
    """One state input of the graph; its output is `new_<name>`."""

    name: str
    shape: tuple[int | str, ...]  # "B" marks the batch axis
    dtype: str  # numpy dtype name
    inplace: bool = False  # read only by the node that writes new_<name>: may share its buffer
    holds: str = ""


def state_layout(
    enc_dim: int, ctx_dim: int, n_steps: int, frames_per_call: int, neg_window: int, conv1_cache: int = 5
) -> tuple[StateTensor, ...]:
    """The state cpc-export writes, in input order (C = enc_dim, H = ctx_dim, K = n_steps,
    F = frames_per_call, W = neg_window; conv1_cache = conv1's kernel minus its stride)."""
    c, h, k, f, w = enc_dim, ctx_dim, n_steps, frames_per_call, neg_window
    return (
        StateTensor("cache_conv1", ("B", conv1_cache), "float32", holds="the last audio samples, conv1's overlap"),
        *(
            StateTensor(f"cache_conv{i}", ("B", 1, c), "float32", holds=f"conv{i}'s carry into its next output")
            for i in range(2, 6)
        ),
        StateTensor("gru_h", ("B", h), "float32", holds="the GRU's hidden state: c of the last frame"),
        StateTensor("pred_history", ("B", k + f, k, c), "float32", inplace=True,
                    holds="ring: the K predictions of each of the last K+F contexts, in score space"),
        StateTensor("z_history", ("B", w + f, c), "float32", inplace=True,
                    holds="ring: z of the last W+F frames, in score space"),
        StateTensor("frame_index", ("B",), "int64", holds="frames this stream has produced"),
    )  # fmt: skip


STATE_NAMES = tuple(s.name for s in state_layout(1, 1, 1, 1, 1))


@dataclass(frozen=True)
class ModelInfo:
    """Everything a runtime needs from the graph's metadata_props (all stored as strings)."""

    sample_rate: int
    hop: int  # samples per frame
    frames_per_call: int  # F
    enc_dim: int
    ctx_dim: int
    n_steps: int  # K
    neg_window: int  # W: frames of z_history that normalise logprob
    score: str
    temperature: float
    norm: str
    state_shapes: dict[str, list] = field(default_factory=dict)  # "B" marks the batch axis
    config_hash: str = ""
    train_step: int = 0
    exported_by: str = ""
    weights: str = "fp32"  # or "int8": 8-bit matrix weights, outputs within the stated tolerance
    state_names: tuple[str, ...] = STATE_NAMES  # the graph's state inputs, in order
    inplace_state: tuple[str, ...] = ()  # states whose output may share its input's buffer

    def to_metadata(self) -> dict[str, str]:
        meta = {FORMAT_KEY: f"{FORMAT_NAME}/{FORMAT_VERSION}"}
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
        if fmt != f"{FORMAT_NAME}/{FORMAT_VERSION}":
            raise UserError(
                f"{source}: model format {fmt!r} is not supported (this runtime reads {FORMAT_NAME}/{FORMAT_VERSION})"
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
        return cls(**kwargs)

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
        shapes.update({k: [batch, f, self.n_steps] for k in ("scores", "logprob", "valid")})
        for name in self.state_names:
            shapes[name] = shapes[f"new_{name}"] = [batch if d == "B" else d for d in self.state_shapes[name]]
        return shapes

    def zero_outputs(self, *lead: int) -> dict[str, np.ndarray]:
        """Zero arrays shaped like the outputs of one frame, behind the leading axes `lead`:
        {"z": (*lead, enc_dim), "c": (*lead, ctx_dim), "scores"/"logprob"/"valid": (*lead, K)}."""
        dims = {"z": self.enc_dim, "c": self.ctx_dim, "scores": self.n_steps, "logprob": self.n_steps}
        out = {k: np.zeros((*lead, d), np.float32) for k, d in dims.items()}
        out["valid"] = np.zeros((*lead, self.n_steps), bool)
        return out
