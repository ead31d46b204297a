"""The wire format, version 2 (docs/protocol.md): three-frame ZeroMQ messages, readable from any language.

    frame 0  topic    UTF-8 "<kind>.<stream>" and a NUL byte: b"c.mic\\0", b"scores.talk-0\\0"; the
                      daemon-wide kinds have no stream: b"meta.\\0", b"stats.\\0". A stream name never
                      holds a NUL, so subscribing to b"c.mic\\0" takes stream "mic" alone (not "mic2"),
                      and b"c." takes c of every stream.
    frame 1  header   UTF-8 JSON object: "v" (2), "kind", "stream", "instance" (one daemon run) and the
                      kind's own keys (below)
    frame 2  payload  raw little-endian float32 array bytes described by "dtype" and "shape"; empty for
                      eos, meta and stats

`decode` checks every message against the kind's schema (types, ranges, payload size against shape,
finite values, NaN exactly where a score is undefined) and raises ProtocolError with the reason: a
subscriber skips and counts such a message instead of crashing on it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

VERSION = 2
DATA_KINDS = ("c", "z", "scores")  # per stream, with a float32 payload
STREAM_KINDS = (*DATA_KINDS, "eos")
DAEMON_KINDS = ("meta", "stats")  # daemon-wide: no stream
KINDS = (*STREAM_KINDS, *DAEMON_KINDS)
MAX_NAME_BYTES = 255  # a stream name in UTF-8 (a file name's limit on Linux)
MAX_PAYLOAD_VALUES = 1 << 24  # 64 MB of float32: far above any real message, far below a memory bomb


class ProtocolError(ValueError):
    """A message that does not follow docs/protocol.md."""


@dataclass
class Message:
    kind: str
    stream: str  # "" for meta and stats
    header: dict
    data: np.ndarray | None  # None for eos, meta, stats

    @property
    def seq(self) -> int:
        return int(self.header.get("seq", -1))

    @property
    def run(self) -> tuple[str, int]:
        """(daemon instance, stream epoch): one uninterrupted run of a stream, frames counted from 0."""
        return self.header["instance"], int(self.header.get("epoch", 0))


def stream_name_problem(name: str) -> str | None:
    """Why `name` cannot be a stream name (None if it can): non-empty, valid UTF-8 of at most
    MAX_NAME_BYTES bytes, and no NUL (the byte that ends the name in a topic)."""
    if not name:
        return "is empty"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if size > MAX_NAME_BYTES:
        return f"is {size} bytes long, more than {MAX_NAME_BYTES}"
    if "\0" in name:
        return "contains a NUL character"
    return None


def topic(kind: str, stream: str = "") -> bytes:
    """The exact topic of a message: b"c.mic\\0"; daemon-wide kinds b"meta.\\0", b"stats.\\0"."""
    return f"{kind}.{stream}".encode() + b"\0"


def subscription(kind: str = "", stream: str | None = None) -> bytes:
    """What to subscribe to: one kind of one stream (exact), one kind of every stream (stream=None:
    b"c."), or everything (b"")."""
    if not kind:
        return b""
    return topic(kind, stream) if stream is not None else f"{kind}.".encode()


def encode(kind: str, stream: str, header: dict, data: np.ndarray | None = None) -> list[bytes]:
    """Build the three frames of one message. `data` is sent as little-endian float32."""
    head = {"v": VERSION, "kind": kind, "stream": stream, **header}
    payload = b""
    if data is not None:
        arr = np.ascontiguousarray(data, dtype="<f4")
        head.update(dtype="<f4", shape=list(arr.shape))
        payload = arr.tobytes()
    return [topic(kind, stream), json.dumps(head, separators=(",", ":"), allow_nan=False).encode(), payload]


# -- checking -----------------------------------------------------------------------------------------
MAX_INT = 2**53  # integers beyond what a double holds exactly (JavaScript's limit too) are malformed


def _int(lo: int = 0) -> Callable[[object], bool]:
    return lambda v: type(v) is int and lo <= v < MAX_INT


def _number(v: object) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _nonneg_number(v: object) -> bool:
    return _number(v) and v >= 0


def _positive_number(v: object) -> bool:
    return _number(v) and v > 0


def _str(v: object) -> bool:
    return isinstance(v, str)


def _nonempty_str(v: object) -> bool:
    return isinstance(v, str) and bool(v)


def _last_seq(v: object) -> bool:
    return isinstance(v, dict) and all(
        k in DATA_KINDS and type(s) is int and -1 <= s < MAX_INT for k, s in v.items()
    )


def _str_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _kinds(v: object) -> bool:
    return _str_list(v) and set(v) <= set(DATA_KINDS)


MODEL_KEYS = {  # the part of meta["model"] a subscriber needs; more keys may come (lookahead: docs/protocol.md)
    "sample_rate": _int(1), "hop": _int(1), "frames_per_call": _int(1), "enc_dim": _int(1),
    "ctx_dim": _int(1), "n_steps": _int(0),  # 0: a model without scores (meta kinds lacks "scores")
}  # fmt: skip


def _epochs(v: object) -> bool:
    return isinstance(v, dict) and all(type(e) is int and e >= 0 for e in v.values())


def _model(v: object) -> bool:
    return isinstance(v, dict) and all(k in v and ok(v[k]) for k, ok in MODEL_KEYS.items())


def _stream_stats(v: object) -> bool:
    return isinstance(v, dict) and all(isinstance(s, dict) for s in v.values())


def _rtf(v: object) -> bool:
    return v is None or _nonneg_number(v)


# Required header keys of each kind and what their values must be. A reader ignores keys it does not know.
DATA_HEADER = {
    "instance": _nonempty_str, "epoch": _int(), "seq": _int(), "frame": _int(), "count": _int(1),
    "t_mono": _number, "t_wall": _number,
}  # fmt: skip
SCHEMAS: dict[str, dict[str, Callable[[object], bool]]] = {
    "c": DATA_HEADER,
    "z": DATA_HEADER,
    "scores": DATA_HEADER,
    "eos": {"instance": _nonempty_str, "epoch": _int(), "frames": _int(), "reason": _str,
            "last_seq": _last_seq, "dropped_s": _nonneg_number, "nonfinite": _int()},
    "meta": {"instance": _nonempty_str, "model": _model, "streams": _str_list, "epochs": _epochs,
             "kinds": _kinds, "meta_interval": _positive_number, "stats_interval": _positive_number},
    "stats": {"instance": _nonempty_str, "uptime_s": _nonneg_number, "rtf": _rtf, "streams": _stream_stats},
}  # fmt: skip


def _reject_constant(name: str) -> None:
    raise ProtocolError(f"header holds {name}, which JSON does not allow")


def _check_payload(kind: str, head: dict, payload: bytes) -> np.ndarray:
    if head.get("dtype") != "<f4":
        raise ProtocolError(f"{kind}: dtype {head.get('dtype')!r}, expected '<f4'")
    shape = head.get("shape")
    ndim = 3 if kind == "scores" else 2
    if not isinstance(shape, list) or len(shape) != ndim or not all(type(s) is int and s >= 1 for s in shape):
        raise ProtocolError(f"{kind}: shape {shape!r} is not {ndim} positive integers")
    if shape[0] != head["count"] or (kind == "scores" and shape[1] != 2):
        want = "[count, 2, K]" if kind == "scores" else "[count, dim]"
        raise ProtocolError(f"{kind}: shape {shape} does not match {want} with count {head['count']}")
    values = math.prod(shape)
    if values > MAX_PAYLOAD_VALUES:
        raise ProtocolError(f"{kind}: shape {shape} holds {values} values, more than {MAX_PAYLOAD_VALUES}")
    if len(payload) != 4 * values:
        raise ProtocolError(f"{kind}: payload of {len(payload)} bytes does not fit shape {shape}")
    data = np.frombuffer(payload, dtype="<f4").reshape(shape)
    if kind != "scores":
        if not np.isfinite(data).all():
            raise ProtocolError(f"{kind}: payload holds NaN or Inf")
        return data
    # scores[i, :, k - 1] is undefined (NaN) exactly where frame + i - k < 0: no context k frames back
    t = head["frame"] + np.arange(shape[0])[:, None]
    undefined = np.broadcast_to((t - np.arange(1, shape[2] + 1)[None, :] < 0)[:, None, :], shape)
    if not np.array_equal(np.isnan(data), undefined) or np.isinf(data).any():
        raise ProtocolError("scores: NaN or Inf where a score is defined, or a value where it is not")
    return data


def decode(frames: list[bytes]) -> Message:
    """Parse and check the three frames of one message; raises ProtocolError saying what is wrong (and
    nothing else, whatever the bytes)."""
    try:
        return _decode(frames)
    except ProtocolError:
        raise
    except Exception as e:  # a check this module lacks must not crash a subscriber either
        raise ProtocolError(f"malformed message ({type(e).__name__}: {str(e)[:80]})") from None


def _decode(frames: list[bytes]) -> Message:
    if len(frames) != 3:
        raise ProtocolError(f"expected 3 frames, got {len(frames)}")
    raw_topic, raw_head, payload = (bytes(f) for f in frames)
    if not raw_topic.endswith(b"\0"):
        raise ProtocolError(f"topic {raw_topic[:40]!r} does not end with NUL (a version 1 daemon?)")
    try:
        kind, dot, stream = raw_topic[:-1].decode("utf-8").partition(".")
    except UnicodeDecodeError:
        raise ProtocolError(f"topic {raw_topic[:40]!r} is not UTF-8") from None
    if not dot or kind not in KINDS:
        raise ProtocolError(f"topic {raw_topic[:40]!r}: unknown kind {kind!r}")
    if (kind in DAEMON_KINDS) != (stream == ""):
        raise ProtocolError(
            f"topic {raw_topic[:40]!r}: a {kind} message {'has no' if stream else 'needs a'} stream"
        )
    if stream and stream_name_problem(stream):
        raise ProtocolError(f"topic {raw_topic[:40]!r}: stream name {stream_name_problem(stream)}")
    try:
        head = json.loads(raw_head, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(f"header is not JSON: {str(e)[:80]}") from None
    if not isinstance(head, dict):
        raise ProtocolError(f"header is a JSON {type(head).__name__}, not an object")
    if head.get("v") != VERSION:
        raise ProtocolError(f"header version {head.get('v')!r}; this reader reads version {VERSION}")
    if head.get("kind") != kind or head.get("stream") != stream:
        raise ProtocolError(
            f"header kind/stream {head.get('kind')!r}/{head.get('stream')!r} differ from the topic's {kind!r}/{stream!r}"
        )
    for key, ok in SCHEMAS[kind].items():
        if key not in head:
            raise ProtocolError(f"{kind}: header lacks {key!r}")
        if not ok(head[key]):
            raise ProtocolError(f"{kind}: header {key!r} has a bad value {str(head[key])[:60]!r}")
    if kind in DATA_KINDS:
        return Message(kind, stream, head, _check_payload(kind, head, payload))
    if payload or "shape" in head:
        raise ProtocolError(f"{kind}: carries a payload, expected none")
    return Message(kind, stream, head, None)
