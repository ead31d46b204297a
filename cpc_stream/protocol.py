"""The wire format (docs/protocol.md): three-frame ZeroMQ messages, readable from any language.

    frame 0  topic    ASCII "<kind>.<stream>": "c.mic", "scores.file0", "eos.file0"; "meta." and "stats."
                      are daemon-wide. Subscribe to a prefix: "c." takes c_t of every stream.
    frame 1  header   UTF-8 JSON object, always with "v" (format version) and "kind"
    frame 2  payload  raw little-endian array bytes described by header "dtype" and "shape" (may be empty)

Data kinds (c, z, scores) carry: stream, seq (per kind and stream, +1 per message: a jump is a gap),
frame (index of the first frame since the stream began), count (frames in the message), t_mono and t_wall
(capture time of the end of the last frame: CLOCK_MONOTONIC seconds of the daemon's host, and Unix time),
dtype "<f4" and shape: c (count, ctx_dim), z (count, enc_dim), scores (count, 2, K) with [:, 0] the raw
score and [:, 1] the log-probability, NaN where t - k < 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

VERSION = 1
DATA_KINDS = ("c", "z", "scores")
KINDS = (*DATA_KINDS, "eos", "meta", "stats")


class ProtocolError(ValueError):
    """A message that does not follow docs/protocol.md."""


@dataclass
class Message:
    kind: str
    stream: str
    header: dict
    data: np.ndarray | None  # None for eos, meta, stats

    @property
    def seq(self) -> int:
        return int(self.header.get("seq", -1))


def topic(kind: str, stream: str = "") -> bytes:
    return f"{kind}.{stream}".encode("ascii")


def encode(kind: str, stream: str, header: dict, data: np.ndarray | None = None) -> list[bytes]:
    """Build the three frames of one message. `data` is sent as little-endian float32."""
    head = {"v": VERSION, "kind": kind, "stream": stream, **header}
    payload = b""
    if data is not None:
        arr = np.ascontiguousarray(data, dtype="<f4")
        head.update(dtype="<f4", shape=list(arr.shape))
        payload = arr.tobytes()
    return [topic(kind, stream), json.dumps(head, separators=(",", ":")).encode(), payload]


def decode(frames: list[bytes]) -> Message:
    """Parse the three frames of one message (raises ProtocolError on anything malformed)."""
    if len(frames) != 3:
        raise ProtocolError(f"expected 3 frames, got {len(frames)}")
    kind, _, stream = bytes(frames[0]).decode("ascii", "replace").partition(".")
    try:
        head = json.loads(bytes(frames[1]))
    except ValueError as e:
        raise ProtocolError(f"header is not JSON: {e}") from None
    if not isinstance(head, dict) or head.get("v") != VERSION:
        raise ProtocolError(
            f"unsupported header version {head.get('v') if isinstance(head, dict) else head!r}"
        )
    data = None
    if "shape" in head:
        if head.get("dtype") != "<f4":
            raise ProtocolError(f"unsupported dtype {head.get('dtype')!r}")
        shape = tuple(int(s) for s in head["shape"])
        payload = bytes(frames[2])
        if len(payload) != 4 * int(np.prod(shape)):
            raise ProtocolError(f"payload of {len(payload)} bytes does not fit shape {shape}")
        data = np.frombuffer(payload, dtype="<f4").reshape(shape)
    return Message(kind, stream, head, data)
