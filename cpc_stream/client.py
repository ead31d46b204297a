"""Subscriber library: frames from a cpc-stream daemon as numpy arrays, with gap, restart and silence
detection. No torch.

from cpc_stream.client import Subscriber
with Subscriber("tcp://127.0.0.1:5556", kinds=("c",)) as sub:
    meta = sub.wait_meta(timeout=5)                  # the model's metadata (dims, K, hop, ...)
    while (msg := sub.recv(timeout=1.0)) is not None or sub.silent_for() < 10:
        if msg is None:
            continue                                 # nothing this second; the daemon is still alive
        if msg.kind == "c":
            use(msg.data)                            # (frames, ctx_dim) float32
        elif msg.kind == "eos":
            break
sub.gaps      # [(kind, stream, expected seq, received seq)]: messages lost on the way
sub.restarts  # [(stream, (old instance, epoch), (new instance, epoch))]: the daemon or a stream restarted
sub.malformed # Counter of reasons: messages that broke docs/protocol.md, skipped

Nothing on the wire can crash a Subscriber: a malformed message is counted in .malformed with its reason
and skipped. A daemon that restarts (a new instance id) or a stream that starts over (a new epoch) is a
restart, not a gap: sequence numbers are tracked per run. A daemon that dies sends nothing more; the
metadata it sends every meta_interval seconds is the heartbeat, and silent_for() says how long it has
been quiet.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import zmq
import zmq.auth

from . import protocol
from .errors import UserError
from .protocol import Message

log = logging.getLogger("cpc.client")

DIMS = {"c": "ctx_dim", "z": "enc_dim"}  # a data kind's last axis, as named in meta["model"]


class Subscriber:
    """A SUB socket on a daemon. recv() and iteration yield data messages (c, z, scores), eos and, if
    asked for, stats; metadata is absorbed into .meta."""

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:5556",
        kinds: Sequence[str] = ("c", "scores"),
        streams: Sequence[str] | None = None,
        stats: bool = False,
        server_key: str | None = None,
        client_key: str | None = None,
        hwm: int = 10000,
        rcvbuf: int = 0,
    ):
        """kinds: data kinds to receive; streams: only these stream names (exactly; None: every stream);
        stats: also yield the daemon's statistics messages; server_key / client_key: the daemon's public
        key file and this client's key pair file, for CURVE."""
        unknown = set(kinds) - set(protocol.DATA_KINDS)
        if unknown:
            raise UserError(
                f"unknown kinds {sorted(unknown)}: expected some of {', '.join(protocol.DATA_KINDS)}"
            )
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        # A frame larger than any well-formed message disconnects its sender (the socket reconnects).
        self.sock.setsockopt(zmq.MAXMSGSIZE, 4 * protocol.MAX_PAYLOAD_VALUES + (1 << 20))
        if rcvbuf:
            self.sock.setsockopt(zmq.RCVBUF, rcvbuf)
        self.sock.setsockopt(zmq.LINGER, 0)
        if server_key or client_key:
            self._use_curve(server_key, client_key)
        try:
            self.sock.connect(endpoint)
        except zmq.ZMQError as e:
            self.close()
            raise UserError(f"cannot connect to {endpoint}: {e.strerror}") from None
        # All subscriptions go to the daemon together when the connection is made (docs/protocol.md).
        for kind in [*kinds, "eos"]:
            for name in streams or [None]:
                self.sock.setsockopt(zmq.SUBSCRIBE, protocol.subscription(kind, name))
        if stats:
            self.sock.setsockopt(zmq.SUBSCRIBE, protocol.topic("stats"))
        self.sock.setsockopt(zmq.SUBSCRIBE, protocol.topic("meta"))
        self.meta: dict | None = None
        self.gaps: list[tuple[str, str, int, int]] = []
        self.lost = 0  # messages missed, summed over gaps
        self.malformed: collections.Counter[str] = collections.Counter()
        self.restarts: list[tuple[str, tuple[str, int], tuple[str, int]]] = []
        self._runs: dict[str, tuple[str, int]] = {}  # stream -> the run its last message belonged to
        self._next: dict[tuple[str, str, tuple[str, int]], int] = {}  # (kind, stream, run) -> next seq
        self._heard = time.monotonic()
        self._pending: collections.deque[Message] = collections.deque()  # received while waiting for meta

    def _use_curve(self, server_key: str | None, client_key: str | None) -> None:
        if not (server_key and client_key):
            raise UserError(
                "CURVE needs both the daemon's public key (server_key) and this client's key pair (client_key)"
            )
        try:
            public, secret = zmq.auth.load_certificate(client_key)
            server_public, _ = zmq.auth.load_certificate(server_key)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load CURVE keys: {e}") from None
        if secret is None:
            raise UserError(f"{client_key}: holds no secret key (give this client's .key_secret file)")
        self.sock.curve_secretkey, self.sock.curve_publickey = secret, public
        self.sock.curve_serverkey = server_public

    # -- checks --------------------------------------------------------------------------------------
    def silent_for(self) -> float:
        """Seconds since the daemon was last heard from (any message, metadata included)."""
        return time.monotonic() - self._heard

    def _reject(self, reason: str) -> None:
        self.malformed[reason] += 1
        if self.malformed[reason] == 1:
            log.warning("skipped a malformed message: %s", reason)

    def _fits_meta(self, msg: Message) -> str | None:
        """Why msg contradicts the daemon's metadata (None if it does not, or if it is of another run)."""
        meta = self.meta
        if meta is None or msg.data is None or meta["instance"] != msg.header["instance"]:
            return None
        model = meta["model"]
        want = model["n_steps"] if msg.kind == "scores" else model[DIMS[msg.kind]]
        if msg.data.shape[-1] != want:
            return f"{msg.kind}: {msg.data.shape[-1]} values per frame, the daemon's metadata says {want}"
        if msg.header["count"] > model["frames_per_call"]:
            return f"{msg.kind}: {msg.header['count']} frames, more than frames_per_call {model['frames_per_call']}"
        return None

    def _track(self, msg: Message) -> None:
        run = msg.run
        old = self._runs.get(msg.stream)
        if old is not None and old != run:
            self.restarts.append((msg.stream, old, run))
            what = "the daemon restarted" if old[0] != run[0] else "the stream started over"
            log.warning(
                "stream %s: %s (instance %s epoch %d -> instance %s epoch %d)", msg.stream, what, *old, *run
            )
        self._runs[msg.stream] = run
        if msg.kind in protocol.DATA_KINDS:
            key = (msg.kind, msg.stream, run)
            want = self._next.get(key)
            if want is None and old is not None and old != run:
                want = 0  # a run that started while we listened: its first message is seq 0
            if want is not None and msg.seq != want:
                self.gaps.append((msg.kind, msg.stream, want, msg.seq))
                self.lost += max(0, msg.seq - want)
                log.warning("gap in %s.%s: expected seq %d, got %d", msg.kind, msg.stream, want, msg.seq)
            self._next[key] = msg.seq + 1
        elif msg.kind == "eos":  # messages lost at the very end show up against the final seq
            for kind, last in msg.header["last_seq"].items():
                key = (kind, msg.stream, run)
                have = self._next.get(key, 0)
                if last >= have and key in self._next:
                    self.gaps.append((kind, msg.stream, have, last + 1))
                    self.lost += last + 1 - have

    def _read(self, wait_ms: int | None) -> tuple[bool, Message | None]:
        """Poll once. Returns (False, None) on timeout, else (True, message); metadata is absorbed into
        .meta and malformed messages are skipped, both giving (True, None)."""
        if not self.sock.poll(wait_ms):
            return False, None
        frames = self.sock.recv_multipart()
        try:
            msg = protocol.decode(frames)
        except protocol.ProtocolError as e:
            self._reject(str(e))
            return True, None
        problem = self._fits_meta(msg)
        if problem:
            self._reject(problem)
            return True, None
        self._heard = time.monotonic()
        if msg.kind == "meta":
            if self.meta is not None and self.meta["instance"] != msg.header["instance"]:
                log.warning(
                    "the daemon restarted (instance %s -> %s)", self.meta["instance"], msg.header["instance"]
                )
            self.meta = msg.header
            return True, None
        if msg.kind in protocol.STREAM_KINDS:
            self._track(msg)
        return True, msg

    # -- reading -------------------------------------------------------------------------------------
    def recv(self, timeout: float | None = None) -> Message | None:
        """The next message other than metadata, or None after `timeout` seconds (None: wait forever)."""
        if self._pending:
            return self._pending.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            got, msg = self._read(wait)
            if not got:
                return None
            if msg is not None:
                return msg

    def wait_meta(self, timeout: float = 5.0) -> dict:
        """Block until the daemon's metadata arrived (it is sent to each new subscriber at once).
        Data arriving first is kept for recv()."""
        deadline = time.monotonic() + timeout
        while self.meta is None:
            left = deadline - time.monotonic()
            got, msg = self._read(max(0, int(left * 1000)))
            if not got:
                raise TimeoutError(f"no metadata from the daemon within {timeout} s")
            if msg is not None:
                self._pending.append(msg)
        return self.meta

    def __iter__(self) -> Iterator[Message]:
        """Messages forever (a dead daemon makes this wait forever: use recv(timeout) and silent_for())."""
        while True:
            msg = self.recv()
            if msg is not None:
                yield msg

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- sending audio to a daemon's WebSocket ingest (docs/protocol.md, "Audio in") --------------------------
class IngestError(Exception):
    """The daemon refused the stream or closed it early; the message has its close code and reason."""


def send_audio(
    url: str,
    blocks: Iterable[np.ndarray],
    sample_rate: int,
    channels: int,
    stream: str,
    *,
    fmt: str = "int16",
    paced: bool = False,
    realtime: bool = True,
    token: str = "",
    cafile: str | None = None,
    timeout: float = 10.0,
) -> int:
    """Stream audio to a daemon's --listen address as one stream named `stream`. blocks: (frames,
    channels) float32 arrays at sample_rate, full scale +-1, one WebSocket message each; sent as `fmt`
    ("int16", exact for 16-bit sources, or "float32"). paced: send at real time (a file); realtime=False
    asks the daemon to throttle this stream instead of dropping what it cannot take yet. Returns the
    frames sent once the daemon has accepted the end of the stream; raises IngestError if it refused or
    closed the stream."""
    import ssl

    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
    from websockets.sync.client import connect

    hello = {"type": "hello", "stream": stream, "sample_rate": sample_rate, "channels": channels,
             "format": fmt, "realtime": realtime, "client_time": time.time()}  # fmt: skip
    if token:
        hello["token"] = token
    context = ssl.create_default_context(cafile=cafile) if url.startswith("wss:") else None
    sent = 0
    try:
        with connect(url, open_timeout=timeout, ssl=context, compression=None, max_size=1 << 20) as ws:
            ws.send(json.dumps(hello))
            json.loads(ws.recv(timeout))  # {"type": "ready", ...}, or the close that refuses us
            start = time.monotonic()
            for block in blocks:
                block = np.asarray(block, dtype=np.float32).reshape(-1, channels)
                if fmt == "int16":
                    payload = np.clip(np.round(block * 32768.0), -32768, 32767).astype("<i2").tobytes()
                else:
                    payload = block.astype("<f4").tobytes()
                ws.send(payload)
                sent += len(block)
                if paced:
                    time.sleep(max(0.0, start + sent / sample_rate - time.monotonic()))
            ws.send(json.dumps({"type": "end"}))
            try:
                while True:
                    ws.recv(timeout)
            except ConnectionClosed as e:
                if e.rcvd is None or e.rcvd.code != 1000:
                    raise
    except ConnectionClosed as e:
        code, reason = (e.rcvd.code, e.rcvd.reason) if e.rcvd else ("none", "the connection was lost")
        raise IngestError(f"the daemon closed stream {stream!r} (code {code}): {reason}") from None
    except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as e:
        raise IngestError(f"cannot stream to {url}: {e}") from None
    return sent
