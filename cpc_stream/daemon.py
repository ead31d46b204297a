"""The engine: sources -> one onnxruntime session (streams on the batch axis) -> ZeroMQ publisher.

One thread runs the loop below; sources fill their buffers from their own threads. The PUB socket (an
XPUB, to see subscriptions arrive) sends with NOBLOCK: ZeroMQ drops messages for a subscriber whose queue
is full, so a slow or dead subscriber never stalls the audio path; sequence numbers let it see the gap.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from . import __version__, protocol
from .config import StreamSection
from .engine import StreamBatch, StreamingModel
from .errors import UserError
from .sources import RATE, Source, SourceBuffer

log = logging.getLogger("cpc.stream")


@dataclass
class StreamState:
    source: Source
    buffer: SourceBuffer
    frames: int = 0  # frames published so far
    seq: dict = field(default_factory=lambda: dict.fromkeys(protocol.DATA_KINDS, 0))
    done: bool = False


def make_publisher(ctx: zmq.Context, cfg: StreamSection) -> tuple[zmq.Socket, object | None]:
    """Bind the XPUB socket, with CURVE when configured. Returns the socket and the authenticator."""
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.SNDHWM, cfg.hwm)
    if cfg.sndbuf:
        sock.setsockopt(zmq.SNDBUF, cfg.sndbuf)
    sock.setsockopt(zmq.LINGER, 500)
    sock.setsockopt(zmq.XPUB_VERBOSER, 1)  # report every subscription, so each new one gets metadata
    auth = None
    if cfg.curve_secret_key:
        try:
            public, secret = zmq.auth.load_certificate(cfg.curve_secret_key)
        except (OSError, ValueError) as e:
            raise UserError(
                f"stream.curve_secret_key {cfg.curve_secret_key}: cannot load key pair ({e})"
            ) from None
        if secret is None:
            raise UserError(
                f"stream.curve_secret_key {cfg.curve_secret_key}: holds no secret key (use the .key_secret file)"
            )
        if not cfg.curve_allowed_keys:
            raise UserError(
                "stream.curve_allowed_keys must name a folder of client public keys when CURVE is on"
            )
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=cfg.curve_allowed_keys)
        sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True
    try:
        sock.bind(cfg.bind)
    except zmq.ZMQError as e:
        sock.close(0)
        if auth:
            auth.stop()
        raise UserError(f"cannot bind {cfg.bind}: {e.strerror}") from None
    return sock, auth


class Daemon:
    """Serve every source as one stream of the batch; publish frames, metadata, statistics and EOS."""

    def __init__(
        self, cfg: StreamSection, model: StreamingModel, sources: list[Source], wait_subscribers: int = 0
    ):
        if model.info.sample_rate != RATE:
            raise UserError(
                f"the model expects {model.info.sample_rate} Hz audio; the sources deliver {RATE} Hz"
            )
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise UserError(f"stream names must be unique, got {names}")
        self.cfg, self.model, self.wait_subscribers = cfg, model, wait_subscribers
        self.wakeup = threading.Event()
        self.stop_requested = threading.Event()
        self.streams = [
            StreamState(
                s, SourceBuffer(int(cfg.queue_seconds * RATE) + model.info.samples_per_call, self.wakeup)
            )
            for s in sources
        ]
        self.batch = StreamBatch(model, len(sources))
        self.ctx = zmq.Context()
        self.sock, self.auth = make_publisher(self.ctx, cfg)
        self.subscribers = 0
        self.started = time.monotonic()
        self.compute_s = 0.0
        self.audio_s = 0.0
        self.messages = 0
        self._last_stats = (time.monotonic(), 0.0, 0.0)

    # -- metadata, statistics ------------------------------------------------------------------------
    def meta_header(self) -> dict:
        i = self.model.info
        return {
            "daemon": f"cpc-stream {__version__}",
            "model": {k: v for k, v in i.__dict__.items() if k not in ("state_shapes", "state_names")},
            "streams": [s.source.name for s in self.streams],
            "kinds": ["c", "scores", *(["z"] if self.cfg.publish_z else [])],
            "providers": self.model.providers,
        }

    def send(self, frames: list[bytes]) -> None:
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK)
            self.messages += 1
        except zmq.Again:  # XPUB at its high-water mark for everyone: the message is dropped
            pass

    def stats_header(self) -> dict:
        now, c0, a0 = time.monotonic(), *self._last_stats[1:]
        self._last_stats = (now, self.compute_s, self.audio_s)
        audio = self.audio_s - a0
        return {
            "uptime_s": round(now - self.started, 3),
            "rtf": round((self.compute_s - c0) / audio, 4) if audio > 0 else None,
            "messages": self.messages,
            "subscribers": self.subscribers,
            "streams": {
                s.source.name: {
                    "frames": s.frames,
                    "queued_s": round(s.buffer.available / RATE, 3),
                    "dropped_s": round(s.source.stats.dropped_samples / RATE, 3),
                    "overflows": s.source.stats.overflows,
                    "ended": s.buffer.ended or None,
                }
                for s in self.streams
            },
        }

    def poll_subscriptions(self) -> None:
        """Read XPUB subscription events; a new subscriber to metadata gets it at once."""
        while True:
            try:
                event = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not event:
                continue
            if event[0] == 1:
                self.subscribers += 1 if event[1:] in (b"", b"meta.") else 0
                if protocol.topic("meta").startswith(event[1:]):
                    self.send(protocol.encode("meta", "", self.meta_header()))
            elif event[0] == 0 and event[1:] in (b"", b"meta."):
                self.subscribers -= 1

    # -- the audio path ------------------------------------------------------------------------------
    def step(self) -> bool:
        """Run one batched call over every stream with a full call of audio (or the tail of an ended
        stream); publish the results. Returns whether any work was done."""
        n = self.model.info.samples_per_call
        hop = self.model.info.hop
        ready, real_frames, audio, stamps = [], [], [], []
        for i, s in enumerate(self.streams):
            if s.done:
                continue
            have = s.buffer.available
            if have >= n:
                x, t_mono, t_wall = s.buffer.take(n)
                frames = self.model.info.frames_per_call
            elif s.buffer.ended and have >= hop:  # the tail: whole hops short of a call, zero-padded
                x, t_mono, t_wall = s.buffer.take(have // hop * hop)
                frames = len(x) // hop
                x = np.pad(x, (0, n - len(x)))
            else:
                continue
            ready.append(i)
            real_frames.append(frames)
            audio.append(x)
            stamps.append((t_mono, t_wall))
        if not ready:
            return False
        t0 = time.perf_counter()
        if len(ready) == len(self.streams):  # the common case: the state stays bound, nothing is copied
            out = self.batch.step(np.stack(audio))
        else:  # some streams wait for audio: run the others on a gathered copy of their state
            idx = np.array(ready)
            state = self.batch.state
            out, new_state = self.model.step(np.stack(audio), {k: v[idx] for k, v in state.items()})
            for k, v in new_state.items():
                state[k][idx] = v
        self.compute_s += time.perf_counter() - t0
        for row, (i, frames, (t_mono, t_wall)) in enumerate(zip(ready, real_frames, stamps, strict=True)):
            s = self.streams[i]
            self.audio_s += frames * hop / RATE
            # Stamped with the capture time of the last real frame's last sample.
            base = {
                "frame": s.frames,
                "count": frames,
                "t_mono": round(t_mono, 6),
                "t_wall": round(t_wall, 6),
            }
            payloads = {
                "c": out["c"][row, :frames],
                "scores": np.stack([out["scores"][row, :frames], out["logprob"][row, :frames]], axis=1),
            }
            if self.cfg.publish_z:
                payloads["z"] = out["z"][row, :frames]
            for kind, data in payloads.items():
                self.send(protocol.encode(kind, s.source.name, {**base, "seq": s.seq[kind]}, data))
                s.seq[kind] += 1
            s.frames += frames
        return True

    def finish_ended(self) -> None:
        """Publish end of stream for every source that ended and has no whole hop left."""
        hop = self.model.info.hop
        for s in self.streams:
            if not s.done and s.buffer.ended and s.buffer.available < hop:
                dropped = s.buffer.available + s.source.stats.dropped_samples
                self.send(protocol.encode("eos", s.source.name, {
                    "frames": s.frames, "reason": s.buffer.ended, "last_seq": {k: v - 1 for k, v in s.seq.items()},
                    "dropped_s": round(dropped / RATE, 4),
                }))  # fmt: skip
                s.done = True
                log.info("stream %s ended (%s): %d frames", s.source.name, s.buffer.ended, s.frames)

    def run(self) -> None:
        """Until every stream has ended (or stop() and the buffers are drained)."""
        if self.wait_subscribers:
            log.info("waiting for %d subscriber(s) on %s", self.wait_subscribers, self.cfg.bind)
            while self.subscribers < self.wait_subscribers and not self.stop_requested.is_set():
                if self.sock.poll(100, zmq.POLLIN):
                    self.poll_subscriptions()
        for s in self.streams:
            s.source.start(s.buffer)
        next_meta = next_stats = time.monotonic()
        while not all(s.done for s in self.streams):
            if self.stop_requested.is_set():
                for s in self.streams:
                    s.source.stop()
            self.poll_subscriptions()
            now = time.monotonic()
            if now >= next_meta:
                self.send(protocol.encode("meta", "", self.meta_header()))
                next_meta = now + self.cfg.meta_interval
            if now >= next_stats:
                self.send(protocol.encode("stats", "", self.stats_header()))
                next_stats = now + self.cfg.stats_interval
            self.wakeup.clear()  # before the work: a source's set() during step() is not lost
            worked = self.step()
            self.finish_ended()
            if not worked:
                self.wakeup.wait(0.01)
        self.send(protocol.encode("stats", "", self.stats_header()))

    def stop(self) -> None:
        """Ask the sources to stop; run() then drains what was captured and publishes end of stream."""
        self.stop_requested.set()
        self.wakeup.set()

    def close(self) -> None:
        for s in self.streams:
            s.source.stop()
        self.sock.close()
        if self.auth:
            self.auth.stop()
        self.ctx.term()
