"""The daemon's loop: sources -> one onnxruntime session (streams on the batch axis) -> the publisher.

One thread runs the loop below; sources fill their buffers from their own threads. Each stream is one row
of the batch (`BatchRow`). A failure belongs to the stream it happened in: a source that breaks, a model
call that fails or a message that cannot be published ends that stream with an `eos` whose reason is
`error: ...`, and the others go on.

Stopping (stop(), on SIGINT/SIGTERM): the sources stop, what they captured is processed, every stream
ends with `eos` and run() returns. A source that does not end within STOP_GRACE_S has its stream ended
for it; stop(now=True) (a second signal) ends every stream at once, dropping the buffered audio.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from . import __version__, protocol
from .contract import SAMPLE_RATE
from .daemon_config import StreamSection
from .errors import UserError
from .onnx_model import OnnxModel, StreamBatch
from .publisher import Publisher
from .sources import Source, SourceBuffer

log = logging.getLogger("cpc.stream")

STOP_GRACE_S = 5.0  # after a stop, how long a source may take to end before its stream is ended for it
SUBSCRIPTION_SETTLE_S = 0.1  # --wait-subscribers: after the count is reached, time for late subscriptions


@dataclass
class BatchRow:
    """One stream of the daemon: the source that fills its row of the batch, and what was published."""

    source: Source
    buffer: SourceBuffer
    epoch: int = 0  # incarnation of this stream name within the daemon's run (frames restart at 0)
    frames: int = 0  # frames published so far
    hops: int = 0  # hops run through the model in this epoch (its frames + the model's delay, past its start)
    seq: dict = field(default_factory=lambda: dict.fromkeys(protocol.DATA_KINDS, 0))
    ended: str = ""  # why the stream ended, once its eos is out ("" while it runs)
    nonfinite_reported: int = 0

    @property
    def name(self) -> str:
        return self.source.name


class Daemon:
    """Serve every source as one stream of the batch; publish frames, metadata, statistics and eos."""

    def __init__(
        self, cfg: StreamSection, model: OnnxModel, sources: list[Source], wait_subscribers: int = 0
    ):
        if model.info.sample_rate != SAMPLE_RATE:
            raise UserError(
                f"the model expects {model.info.sample_rate} Hz audio; the sources deliver {SAMPLE_RATE} Hz"
            )
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise UserError(f"stream names must be unique, got {names}")
        for name in names:
            if protocol.stream_name_problem(name):
                raise UserError(f"stream name {name!r} {protocol.stream_name_problem(name)}")
        self.cfg, self.model, self.wait_subscribers = cfg, model, wait_subscribers
        self.instance = secrets.token_hex(8)  # this run of the daemon, in every header
        self.wakeup = threading.Event()
        self.stop_requested = threading.Event()
        self.stop_now = threading.Event()
        capacity = int(cfg.queue_seconds * SAMPLE_RATE) + model.info.samples_per_call
        self.rows = [BatchRow(s, SourceBuffer(capacity, self.wakeup)) for s in sources]
        self.batch = StreamBatch(model, len(sources))
        self._meta_frames: list[bytes] | None = None
        self.publisher = Publisher(cfg, self.meta_frames)
        self.started = time.monotonic()
        self.compute_s = 0.0
        self.audio_s = 0.0
        self._last_stats = (time.monotonic(), 0.0, 0.0)

    # -- metadata, statistics ------------------------------------------------------------------------
    def meta_frames(self) -> list[bytes]:
        """The metadata message (built once; it changes only when the set of streams does)."""
        if self._meta_frames is None:
            i = self.model.info
            hidden = ("state_shapes", "state_names", "inplace_state", "outputs")
            self._meta_frames = protocol.encode("meta", "", {
                "instance": self.instance,
                "daemon": f"cpc-stream {__version__}",
                "model": {k: v for k, v in i.__dict__.items() if k not in hidden},
                "streams": [r.name for r in self.rows],
                "epochs": {r.name: r.epoch for r in self.rows},
                "kinds": ["c", *(["scores"] if i.has_scores else []), *(["z"] if self.cfg.publish_z else [])],
                "providers": self.model.providers,
                "meta_interval": self.cfg.meta_interval,
                "stats_interval": self.cfg.stats_interval,
            })  # fmt: skip
        return self._meta_frames

    def stats_header(self, final: bool = False) -> dict:
        now, c0, a0 = time.monotonic(), *self._last_stats[1:]
        self._last_stats = (now, self.compute_s, self.audio_s)
        audio = self.audio_s - a0
        return {
            "instance": self.instance,
            "uptime_s": round(now - self.started, 3),
            "rtf": round((self.compute_s - c0) / audio, 4) if audio > 0 else None,
            "messages": self.publisher.messages,
            "subscribers": self.publisher.subscribers,
            "rejected_clients": self.publisher.rejected,
            "final": final,
            "streams": {
                r.name: {
                    "epoch": r.epoch,
                    "frames": r.frames,
                    "queued_s": round(r.buffer.available / SAMPLE_RATE, 3),
                    "dropped_s": round(r.source.stats.dropped_samples / SAMPLE_RATE, 3),
                    "overflows": r.source.stats.overflows,
                    "nonfinite": r.source.stats.nonfinite,
                    "ended": r.ended or r.buffer.ended or None,
                }
                for r in self.rows
            },
        }

    # -- the audio path ------------------------------------------------------------------------------
    def step(self) -> bool:
        """Run one batched call over every stream with a full call of audio (or the tail of an ended
        stream); publish the results. Returns whether any work was done."""
        n, hop, f = self.model.info.samples_per_call, self.model.info.hop, self.model.info.frames_per_call
        ready, frames, audio, stamps = [], [], [], []
        for i, r in enumerate(self.rows):
            if r.ended:
                continue
            have = r.buffer.available
            if have >= n:
                x, t_mono, t_wall = r.buffer.take(n)
                frames.append(f)
            elif r.buffer.ended and have >= hop:  # the tail: whole hops short of a call, zero-padded
                x, t_mono, t_wall = r.buffer.take(have // hop * hop)
                frames.append(len(x) // hop)
                x = np.pad(x, (0, n - len(x)))
            else:
                continue
            ready.append(i)
            audio.append(x)
            stamps.append((t_mono, t_wall))
        if not ready:
            return False
        t0 = time.perf_counter()
        try:
            out = self.batch.step(np.stack(audio), rows=ready)
        except Exception as e:  # onnxruntime failed on these streams' input: they cannot go on
            for i in ready:
                self.end_row(self.rows[i], f"error: model call failed: {_first_line(e)}")
            return True
        self.compute_s += time.perf_counter() - t0
        for k, (i, count, (t_mono, t_wall)) in enumerate(zip(ready, frames, stamps, strict=True)):
            r = self.rows[i]
            first = max(0, self.model.info.delay - r.hops)  # a look-ahead model's outputs before frame 0
            r.hops += count
            try:
                if count > first:
                    self.publish_frames(
                        r, {name: v[k, first:count] for name, v in out.items()}, t_mono, t_wall
                    )
            except Exception as e:  # this stream only (a message that cannot be built or sent)
                self.end_row(r, f"error: cannot publish: {_first_line(e)}")
            self.audio_s += count * hop / SAMPLE_RATE
            if r.source.stats.nonfinite > r.nonfinite_reported:
                if not r.nonfinite_reported:
                    log.warning("stream %s: its input holds NaN or Inf samples; they are replaced with 0 "
                                "and counted in stats (nonfinite)", r.name)  # fmt: skip
                r.nonfinite_reported = r.source.stats.nonfinite
        return True

    def publish_frames(self, r: BatchRow, out: dict[str, np.ndarray], t_mono: float, t_wall: float) -> None:
        """Publish one call's frames of stream r: out {z, c, scores, logprob}, each (frames, ...).
        Stamped with the capture time of the call's last sample: the last frame's last sample, plus the
        model's look-ahead rounded up to a hop."""
        count = len(out["c"])
        base = {
            "instance": self.instance, "epoch": r.epoch, "frame": r.frames, "count": count,
            "t_mono": round(t_mono, 6), "t_wall": round(t_wall, 6),
        }  # fmt: skip
        payloads = {"c": out["c"]}
        if self.model.info.has_scores:
            payloads["scores"] = np.stack([out["scores"], out["logprob"]], axis=1)
        if self.cfg.publish_z:
            payloads["z"] = out["z"]
        messages = [
            protocol.encode(kind, r.name, {**base, "seq": r.seq[kind]}, data)
            for kind, data in payloads.items()
        ]
        for kind, frames in zip(payloads, messages, strict=True):
            self.publisher.send(frames)
            r.seq[kind] += 1
        r.frames += count

    def end_row(self, r: BatchRow, reason: str) -> None:
        """End stream r now with `reason`: its source stops, audio still buffered is dropped (and counted
        in dropped_s), eos goes out."""
        r.source.stop()
        dropped = r.buffer.available + r.source.stats.dropped_samples
        r.ended = reason
        eos = {
            "instance": self.instance, "epoch": r.epoch, "frames": r.frames, "reason": reason,
            "last_seq": {k: v - 1 for k, v in r.seq.items()}, "dropped_s": round(dropped / SAMPLE_RATE, 4),
            "nonfinite": r.source.stats.nonfinite,
        }  # fmt: skip
        try:
            self.publisher.send(protocol.encode("eos", r.name, eos))
        except Exception as e:  # nothing more can be said on the wire about this stream
            log.error("stream %s: cannot publish its end: %s", r.name, _first_line(e))
        (log.error if reason.startswith("error") else log.info)(
            "stream %s ended (%s): %d frames", r.name, reason, r.frames
        )

    def finish_ended(self) -> None:
        """End every stream whose source ended and whose buffer holds no whole hop."""
        for r in self.rows:
            if not r.ended and r.buffer.ended and r.buffer.available < self.model.info.hop:
                self.end_row(r, r.buffer.ended)

    def run(self) -> int:
        """Until every stream has ended (by itself, or after stop()). Returns the exit status: 0, or 1 if
        any stream ended with an error."""
        if self.wait_subscribers:
            log.info("waiting for %d subscriber(s) on %s", self.wait_subscribers, self.publisher.endpoint)
            while self.publisher.subscribers < self.wait_subscribers and not self.stop_requested.is_set():
                self.publisher.wait(100)
            # A peer sends all its subscriptions at once when it connects, in byte order ("c." and "eos."
            # before "meta.", "scores." after): let the rest of the last one's arrive before any data.
            settle = time.monotonic() + SUBSCRIPTION_SETTLE_S
            while time.monotonic() < settle:
                self.publisher.wait(10)
        for r in self.rows:
            r.source.start(r.buffer)
        # Each subscriber got the metadata when it subscribed; the periodic copy is the heartbeat.
        next_meta, next_stats = time.monotonic() + self.cfg.meta_interval, time.monotonic()
        stop_deadline = None
        while not all(r.ended for r in self.rows):
            now = time.monotonic()
            if self.stop_requested.is_set() and stop_deadline is None:
                for r in self.rows:
                    r.source.stop()
                stop_deadline = now + STOP_GRACE_S
            if self.stop_now.is_set() or (stop_deadline is not None and now > stop_deadline):
                for r in self.rows:
                    if not r.ended:
                        late = not self.stop_now.is_set() and not r.buffer.ended
                        self.end_row(
                            r,
                            f"stopped (its source did not end within {STOP_GRACE_S:g} s)"
                            if late
                            else "stopped",
                        )
            self.publisher.poll()
            if now >= next_meta:
                self.publisher.send(self.meta_frames())
                next_meta = now + self.cfg.meta_interval
            if now >= next_stats:
                self.publisher.send(protocol.encode("stats", "", self.stats_header()))
                next_stats = now + self.cfg.stats_interval
            self.wakeup.clear()  # before the work: a source's set() during step() is not lost
            worked = self.step()
            self.finish_ended()
            if not worked:
                self.wakeup.wait(0.01)
        self.publisher.send(protocol.encode("stats", "", self.stats_header(final=True)))
        return 1 if any(r.ended.startswith("error") for r in self.rows) else 0

    def stop(self, now: bool = False) -> None:
        """Ask the sources to stop; run() then drains what was captured and publishes end of stream.
        now=True: end every stream at once, without draining."""
        self.stop_requested.set()
        if now:
            self.stop_now.set()
        self.wakeup.set()

    def close(self) -> None:
        for r in self.rows:
            r.source.stop()
        self.publisher.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__
