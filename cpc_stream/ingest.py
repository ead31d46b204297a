"""Audio in over the network: a WebSocket endpoint where each connection is one stream of the daemon.

    cpc-stream --model cpc.onnx --listen 127.0.0.1:8765       # beside, or instead of, --mic/--file/--stdin

The ingest protocol (docs/protocol.md, "Audio in"): the client's first message is text, a JSON hello
    {"type": "hello", "stream": "alice", "sample_rate": 48000, "channels": 2, "format": "int16"}
(optional: "realtime": false to be throttled instead of dropped when it sends faster than the daemon
computes; "client_time": its clock at the first sample; "token" when the daemon asks for one). The
daemon answers {"type": "ready", ...} once the stream has a row of the batch; then binary messages of
any number of whole frames of interleaved PCM; then {"type": "end"}. {"type": "reset"} ends the current
run of the stream (eos reason "reset") and starts a new one (epoch + 1, frames from 0). Every refusal is
a WebSocket close code and a reason the client can read; the other streams never notice.

One asyncio event loop in its own thread runs the server (the `websockets` package); the daemon's loop
stays the synchronous one of daemon.py. A connection hands its audio to a NetworkSource, whose buffer
the daemon reads like any other source's, and asks the daemon for a row, a reset or nothing else, through
Daemon.submit (a thread-safe queue answered by futures).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import ssl
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus

import numpy as np

from . import protocol
from .audio import Resampler
from .contract import SAMPLE_RATE
from .errors import UserError
from .sources import Source

log = logging.getLogger("cpc.ingest")
WEBSOCKETS_LOG = logging.getLogger("cpc.ingest.websockets")  # every frame at debug level: kept quiet
WEBSOCKETS_LOG.setLevel(logging.WARNING)

FORMATS = {"int16": np.dtype("<i2"), "float32": np.dtype("<f4")}
MAX_RATE = 384000
MAX_CHANNELS = 8
# Close codes (RFC 6455 section 7.4.1)
NORMAL, GOING_AWAY, BAD_DATA, POLICY, TOO_BIG, INTERNAL, TRY_LATER = 1000, 1001, 1007, 1008, 1009, 1011, 1013


class Refused(Exception):
    """A connection the daemon will not serve: the close code and the reason sent to the client."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass(frozen=True)
class Hello:
    stream: str
    sample_rate: int
    channels: int
    format: str
    realtime: bool = True
    client_time: float | None = None

    @property
    def frame_bytes(self) -> int:
        return FORMATS[self.format].itemsize * self.channels


def parse_hello(text: str | bytes, token: str = "") -> Hello:
    """The client's first message, checked; anything wrong is Refused(POLICY, what is wrong)."""
    if isinstance(text, bytes):
        raise Refused(POLICY, "the first message must be the JSON hello (text), not audio")
    try:
        h = json.loads(text)
    except ValueError:
        raise Refused(POLICY, "hello is not JSON") from None
    if not isinstance(h, dict) or h.get("type") != "hello":
        raise Refused(POLICY, 'hello must be a JSON object with "type": "hello"')
    if token and not (
        isinstance(h.get("token"), str) and hmac.compare_digest(h["token"].encode(), token.encode())
    ):
        raise Refused(POLICY, "bad or missing token")
    name = h.get("stream")
    if not isinstance(name, str) or protocol.stream_name_problem(name):
        problem = protocol.stream_name_problem(name) if isinstance(name, str) else "is not a string"
        raise Refused(POLICY, f"hello stream name {str(name)[:40]!r} {problem}")
    rate, channels, fmt = h.get("sample_rate"), h.get("channels", 1), h.get("format", "int16")
    if type(rate) is not int or not 1000 <= rate <= MAX_RATE:
        raise Refused(
            POLICY, f"hello sample_rate {str(rate)[:20]!r}: expected an integer from 1000 to {MAX_RATE}"
        )
    if type(channels) is not int or not 1 <= channels <= MAX_CHANNELS:
        raise Refused(
            POLICY, f"hello channels {str(channels)[:20]!r}: expected an integer from 1 to {MAX_CHANNELS}"
        )
    if fmt not in FORMATS:
        raise Refused(POLICY, f"hello format {str(fmt)[:20]!r}: expected one of {', '.join(FORMATS)}")
    realtime, client_time = h.get("realtime", True), h.get("client_time")
    if not isinstance(realtime, bool):
        raise Refused(POLICY, "hello realtime: expected true or false")
    if client_time is not None and not (type(client_time) in (int, float) and np.isfinite(client_time)):
        raise Refused(POLICY, "hello client_time: expected a number")
    return Hello(name, rate, channels, fmt, realtime, client_time)


class NetworkSource(Source):
    """A stream fed by an ingest connection: no thread of its own, the connection calls feed()."""

    def __init__(self, hello: Hello):
        super().__init__(hello.stream)
        self.hello = hello
        self.live = hello.realtime  # live: drop when the buffer is full; otherwise the sender waits
        self.resample = Resampler(hello.sample_rate, SAMPLE_RATE)
        self.kind = "websocket"

    def start(self, buffer) -> None:
        self.buffer = buffer

    def stop(self) -> None:
        """The daemon ends this stream (it is stopping): the connection then closes."""
        super().stop()
        if self.buffer is not None and not self.buffer.ended:
            self.buffer.end("stopped")

    def to_float(self, raw: bytes) -> np.ndarray:
        """Whole frames of interleaved PCM -> (frames, channels) float32, full scale +-1."""
        x = np.frombuffer(raw, dtype=FORMATS[self.hello.format]).reshape(-1, self.hello.channels)
        return x.astype(np.float32) / 32768.0 if self.hello.format == "int16" else x.astype(np.float32)

    def room_for(self, samples: int) -> bool:
        return self.buffer.available + samples <= self.buffer.capacity or self.buffer.available == 0


class IngestServer:
    """The WebSocket server in a thread of its own, feeding the daemon's streams."""

    def __init__(self, daemon, host: str, port: int, *, token: str = "", max_message_bytes: int = 1 << 20,
                 hello_timeout: float = 5.0, ssl_context: ssl.SSLContext | None = None):  # fmt: skip
        self.daemon, self.host, self.port, self.token = daemon, host, port, token
        self.max_message_bytes, self.hello_timeout, self.ssl_context = (
            max_message_bytes,
            hello_timeout,
            ssl_context,
        )
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)

    def start(self) -> None:
        """Bind and serve; a port that cannot be bound is a UserError here, in the caller's thread."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise UserError(f"cannot listen on {self.host}:{self.port}: {self._error}")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(lambda: self._stop.done() or self._stop.set_result(None))
        self._thread.join(timeout=10)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        from websockets.asyncio.server import serve

        self._loop = asyncio.get_running_loop()
        self._stop = self._loop.create_future()
        try:
            server = await serve(
                self._connection, self.host, self.port, ssl=self.ssl_context, max_size=self.max_message_bytes,
                process_request=self._http, compression=None, logger=WEBSOCKETS_LOG,
            )  # fmt: skip
        except OSError as e:
            self._error = e.strerror or e
            self._ready.set()
            return
        port = server.sockets[0].getsockname()[1]
        self.url = f"{'wss' if self.ssl_context else 'ws'}://{self.host}:{port}/"
        self._ready.set()
        async with server:
            await self._stop
            server.close(close_connections=False)
            for conn in list(server.connections):  # the daemon is stopping: tell every client why
                await conn.close(GOING_AWAY, "the daemon is stopping")

    def _http(self, connection, request):
        """Plain HTTP on the same port: /healthz; everything that is not a WebSocket upgrade is 404."""
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None
        if request.path.split("?", 1)[0] == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        return connection.respond(
            HTTPStatus.NOT_FOUND, "this is cpc-stream's WebSocket ingest (docs/protocol.md)\n"
        )

    async def _connection(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed

        peer = ws.remote_address[0] if ws.remote_address else "?"
        row = source = None
        try:
            try:
                first = await asyncio.wait_for(ws.recv(), self.hello_timeout)
            except TimeoutError:
                raise Refused(POLICY, f"no hello within {self.hello_timeout:g} s") from None
            hello = parse_hello(first, self.token)
            source = NetworkSource(hello)
            row = await asyncio.wrap_future(self.daemon.submit("join", source))
            await ws.send(json.dumps({
                "type": "ready", "stream": hello.stream, "instance": self.daemon.instance, "epoch": row.epoch,
                "frames_per_call": self.daemon.model.info.frames_per_call, "publish": self.daemon.publisher.endpoint,
            }))  # fmt: skip
            log.info("ingest: stream %s from %s (%d Hz, %d ch, %s)", hello.stream, peer, hello.sample_rate,
                     hello.channels, hello.format)  # fmt: skip
            await self._receive(ws, source, row)
        except Refused as r:
            self.daemon.metrics.refused.labels(cause=r.reason.split(":")[0][:40]).inc()
            log.info("ingest: refused %s: %s", peer, r.reason)
            if source is not None and row is not None:
                source.buffer.end(f"error: {r.reason}")
            await ws.close(r.code, r.reason[:120])
        except ConnectionClosed as e:
            if source is not None and row is not None and not source.buffer.ended:
                if e.rcvd is None and e.sent is not None:  # websockets closed it: a message over max_size
                    source.buffer.end(f"error: closed ({e.sent.code}: {e.sent.reason})")
                else:
                    code = e.rcvd.code if e.rcvd else "none"
                    source.buffer.end(f"client disconnected without end (close code {code})")

    async def _receive(self, ws, source: NetworkSource, row) -> None:
        hello = source.hello
        async for msg in ws:
            if row.ended:  # the daemon ended the stream (an error in the model call, say)
                raise Refused(INTERNAL, f"the stream ended: {row.ended}"[:120])
            if isinstance(msg, bytes):
                if len(msg) % hello.frame_bytes:
                    raise Refused(BAD_DATA, f"binary message of {len(msg)} bytes is not whole {hello.format} "
                                            f"frames of {hello.channels} channel(s) ({hello.frame_bytes} bytes each)")  # fmt: skip
                samples = source.resample(source.to_float(msg))
                if not source.live:  # the sender waits for room: TCP pushes back on it
                    while not source.room_for(len(samples)) and not source.buffer.ended:
                        await asyncio.sleep(0.005)
                source.emit(samples, time.monotonic(), time.time())
                continue
            try:
                command = json.loads(msg).get("type")
            except (ValueError, AttributeError):
                command = None
            if command == "end":
                source.emit(
                    source.resample(np.zeros((0, hello.channels), np.float32), last=True),
                    time.monotonic(),
                    time.time(),
                )
                source.buffer.end("end of input")
                await ws.close(NORMAL, "end of stream")
                return
            if command == "reset":  # the resampler's tail belongs to the run that ends
                source.emit(
                    source.resample(np.zeros((0, hello.channels), np.float32), last=True),
                    time.monotonic(),
                    time.time(),
                )
                source.resample = Resampler(hello.sample_rate, SAMPLE_RATE)
                row = await asyncio.wrap_future(self.daemon.submit("reset", row))
                await ws.send(json.dumps({"type": "ready", "stream": hello.stream, "instance": self.daemon.instance,
                                          "epoch": row.epoch}))  # fmt: skip
                continue
            raise Refused(POLICY, 'text messages are {"type": "end"} or {"type": "reset"}')
        # The client closed the connection (cleanly) without sending end first.
        if not source.buffer.ended:
            source.buffer.end(f"client disconnected without end (close code {ws.close_code})")
