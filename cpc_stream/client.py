"""Subscriber library: frames from a cpc-stream daemon as numpy arrays, with gap detection. No torch.

from cpc_stream.client import Subscriber
with Subscriber("tcp://127.0.0.1:5556", kinds=("c",)) as sub:
    meta = sub.wait_meta(timeout=5)                  # the model's metadata (dims, K, hop, ...)
    for msg in sub:                                  # Message(kind, stream, header, data)
        if msg.kind == "c":
            use(msg.data)                            # (frames, ctx_dim) float32
        elif msg.kind == "eos":
            break
sub.gaps                                             # [(kind, stream, expected seq, received seq)]
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterator, Sequence

import zmq
import zmq.auth

from . import protocol
from .errors import UserError
from .protocol import Message

log = logging.getLogger("cpc.client")


class Subscriber:
    """A SUB socket on a daemon. Iterating yields data messages (c, z, scores), eos and, if asked for,
    stats; metadata messages are absorbed into .meta. Sequence jumps are recorded in .gaps."""

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
        unknown = set(kinds) - set(protocol.DATA_KINDS)
        if unknown:
            raise UserError(
                f"unknown kinds {sorted(unknown)}: expected some of {', '.join(protocol.DATA_KINDS)}"
            )
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        if rcvbuf:
            self.sock.setsockopt(zmq.RCVBUF, rcvbuf)
        self.sock.setsockopt(zmq.LINGER, 0)
        if server_key:
            try:
                public, secret = zmq.auth.load_certificate(client_key) if client_key else (None, None)
                server_public, _ = zmq.auth.load_certificate(server_key)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot load CURVE keys: {e}") from None
            if secret is None:
                raise UserError("CURVE needs the client's key pair file (.key_secret) as client_key")
            self.sock.curve_secretkey, self.sock.curve_publickey, self.sock.curve_serverkey = (
                secret,
                public,
                server_public,
            )
        self.sock.connect(endpoint)
        names = list(streams) if streams else [""]
        for kind in [*kinds, "eos", *(["stats"] if stats else [])]:
            for name in names if kind != "stats" else [""]:
                self.sock.setsockopt(zmq.SUBSCRIBE, protocol.topic(kind, name))
        self.sock.setsockopt(zmq.SUBSCRIBE, protocol.topic("meta"))  # last: the daemon counts this one
        self.meta: dict | None = None
        self.gaps: list[tuple[str, str, int, int]] = []
        self.lost = 0  # messages missed, summed over gaps
        self._next: dict[tuple[str, str], int] = {}
        self._pending: collections.deque[Message] = collections.deque()  # received while waiting for meta

    def _track(self, msg: Message) -> None:
        if msg.kind in protocol.DATA_KINDS:
            key = (msg.kind, msg.stream)
            want = self._next.get(key)
            if want is not None and msg.seq != want:
                self.gaps.append((msg.kind, msg.stream, want, msg.seq))
                self.lost += max(0, msg.seq - want)
                log.warning("gap in %s.%s: expected seq %d, got %d", msg.kind, msg.stream, want, msg.seq)
            self._next[key] = msg.seq + 1
        elif msg.kind == "eos":  # messages lost at the very end show up against the final seq
            for kind, last in msg.header.get("last_seq", {}).items():
                key = (kind, msg.stream)
                if key in self._next and last >= self._next[key]:
                    self.gaps.append((kind, msg.stream, self._next[key], last + 1))
                    self.lost += last + 1 - self._next[key]

    def _read(self, wait_ms: int | None) -> tuple[bool, Message | None]:
        """Poll once. Returns (False, None) on timeout, else (True, message); metadata is absorbed into
        .meta and malformed messages are dropped, both giving (True, None)."""
        if not self.sock.poll(wait_ms):
            return False, None
        try:
            msg = protocol.decode(self.sock.recv_multipart())
        except protocol.ProtocolError as e:
            log.warning("dropped a malformed message: %s", e)
            return True, None
        if msg.kind == "meta":
            self.meta = msg.header
            return True, None
        self._track(msg)
        return True, msg

    def recv(self, timeout: float | None = None) -> Message | None:
        """The next message other than metadata, or None after `timeout` seconds."""
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
