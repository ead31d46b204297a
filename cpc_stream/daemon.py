"""The daemon's loop: sources -> one onnxruntime session (streams on the batch axis) -> the publisher.

One thread runs the loop below; sources fill their buffers from their own threads, and the WebSocket
ingest (ingest.py) from its event loop. Each stream is one row of the batch (`BatchRow`). The batch has
room for the local sources and --max-streams network streams; a network stream takes a free row when it
connects and gives it back when it ends, and a row's computation never depends on the other rows (a
test checks that a stream's frames are the same, bit for bit, whoever joins and leaves meanwhile).

Batching: a call runs the streams that have a whole call of audio. It runs at once if a stream that is
not live (a file read at full speed, stdin) is among them, or if every live stream (microphone, paced
file, network) is; otherwise it waits for the others at most max_wait_ms after the first was ready, so a
stalled client never holds the rest back (max_wait_ms; by default one call's audio, F x 10 ms, so that
streams at real time meet in one call whatever their phase). When only some rows run, their state is gathered into a
smaller batch and scattered back (StreamBatch.step with rows); when rows 0..n-1 run, nothing is copied.

A failure belongs to the stream it happened in: a source that breaks, a model call that fails or a
message that cannot be published ends that stream with an `eos` whose reason is `error: ...`.

Stopping (stop(), on SIGINT/SIGTERM): the sources stop, what they captured is processed, every stream
ends with `eos` and run() returns. A source that does not end within STOP_GRACE_S has its stream ended
for it; stop(now=True) (a second signal) ends every stream at once, dropping the buffered audio. Without
an ingest listener the daemon also returns once every source has ended.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from . import __version__, protocol
from .contract import SAMPLE_RATE
from .daemon_config import StreamSection
from .errors import UserError
from .ingest import GOING_AWAY, POLICY, TRY_LATER, Refused
from .metrics import Metrics
from .onnx_model import OnnxModel, StreamBatch
from .publisher import Publisher
from .sources import Source, SourceBuffer

log = logging.getLogger("cpc.stream")

STOP_GRACE_S = 5.0  # after a stop, how long a source may take to end before its stream is ended for it
SUBSCRIPTION_SETTLE_S = 0.1  # --wait-subscribers: after the count is reached, time for late subscriptions
META_MIN_INTERVAL_S = 0.1  # when streams join and leave, metadata goes out at most this often


@dataclass
class BatchRow:
    """One stream of the daemon: the source that fills its row of the batch, and what was published."""

    source: Source
    buffer: SourceBuffer
    index: int  # its row of the batch
    epoch: int = 0  # incarnation of this stream name within the daemon's run (frames restart at 0)
    frames: int = 0  # frames published in this epoch
    hops: int = 0  # hops run through the model in this epoch (its frames + the model's delay, past its start)
    seq: dict = field(default_factory=lambda: dict.fromkeys(protocol.DATA_KINDS, 0))
    ended: str = ""  # why the stream ended, once its eos is out ("" while it runs)
    ready_since: float | None = None  # when it last got a whole call of audio (monotonic s)
    reset: Future | None = None  # a reset in progress: the tail is processed, then a new epoch starts
    reported: dict = field(default_factory=lambda: {"received": 0, "dropped": 0, "nonfinite": 0})

    @property
    def name(self) -> str:
        return self.source.name


class Daemon:
    """Serve every source as one stream of the batch; publish frames, metadata, statistics and eos."""

    def __init__(
        self,
        cfg: StreamSection,
        model: OnnxModel,
        sources: list[Source],
        wait_subscribers: int = 0,
        max_streams: int = 0,
        metrics: Metrics | None = None,
    ):
        """max_streams: rows kept for network streams (ingest) beside the local sources."""
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
        if not sources and not max_streams:
            raise UserError("no source: give --mic, --file PATH, --stdin or --listen HOST:PORT (see --help)")
        self.cfg, self.model, self.wait_subscribers = cfg, model, wait_subscribers
        self.max_streams = max_streams
        self.instance = secrets.token_hex(8)  # this run of the daemon, in every header
        self.metrics = metrics or Metrics()
        self.wakeup = threading.Event()
        self.stop_requested = threading.Event()
        self.stop_now = threading.Event()
        self.finished = threading.Event()  # run() has returned
        self.requests: queue.SimpleQueue[tuple[str, object, Future]] = queue.SimpleQueue()
        self.batch = StreamBatch(model, len(sources) + max_streams)
        self.rows: list[BatchRow | None] = [None] * self.batch.batch
        self.local: list[BatchRow] = []  # the command line's sources, for the summary at exit
        self.epochs: dict[str, int] = {}  # the last epoch given to each stream name
        self._meta_frames: list[bytes] | None = None
        self._meta_sent = 0.0
        self.publisher = Publisher(cfg, self.meta_frames)
        self.started = time.monotonic()
        self.heartbeat = time.monotonic()  # the loop's last turn: /healthz
        self.compute_s = 0.0
        self.audio_s = 0.0
        self._last_stats = (time.monotonic(), 0.0, 0.0)
        for s in sources:
            self.local.append(self.attach(s))

    # -- streams joining and leaving -----------------------------------------------------------------
    def active(self) -> list[BatchRow]:
        return [r for r in self.rows if r is not None]

    def attach(self, source: Source) -> BatchRow:
        """Give `source` a free row of the batch, with zero state; its epoch follows the name's last."""
        index = self.rows.index(None)
        self.batch.reset([index])
        epoch = self.epochs.get(source.name, -1) + 1
        self.epochs[source.name] = epoch
        capacity = int(self.cfg.queue_seconds * SAMPLE_RATE) + self.model.info.samples_per_call
        row = self.rows[index] = BatchRow(source, SourceBuffer(capacity, self.wakeup), index, epoch)
        self.metrics.streams_total.labels(source=source.kind).inc()
        self._meta_frames = None
        return row

    def submit(self, request: str, payload: object) -> Future:
        """From another thread: ("join", source) -> Future of its BatchRow; ("reset", row) -> Future of
        the row once its new epoch has begun. Refusals are Refused exceptions in the future."""
        future: Future = Future()
        if self.finished.is_set():  # run() has returned: nobody will answer
            future.set_exception(Refused(GOING_AWAY, "the daemon is stopping"))
            return future
        self.requests.put((request, payload, future))
        self.wakeup.set()
        return future

    def handle_requests(self) -> None:
        while True:
            try:
                request, payload, future = self.requests.get_nowait()
            except queue.Empty:
                return
            try:
                if request == "join":
                    future.set_result(self._join(payload))
                else:
                    self._reset(payload, future)
            except Refused as e:
                future.set_exception(e)

    def _join(self, source: Source) -> BatchRow:
        if self.stop_requested.is_set():
            raise Refused(GOING_AWAY, "the daemon is stopping")
        if any(r.name == source.name and not r.ended for r in self.active()):
            raise Refused(POLICY, f"stream name {source.name!r} is in use; choose another")
        network = sum(1 for r in self.active() if r.source.kind == "websocket")
        if network >= self.max_streams or None not in self.rows:
            raise Refused(
                TRY_LATER,
                f"the daemon serves its maximum of {self.max_streams} network streams (--max-streams)",
            )
        row = self.attach(source)
        source.start(row.buffer)
        return row

    def _reset(self, row: BatchRow, future: Future) -> None:
        """End the row's run once its buffered audio is processed; end_row then starts the next run and
        completes `future`."""
        if row.ended or self.rows[row.index] is not row:
            raise Refused(POLICY, f"stream {row.name!r} has ended")
        row.buffer.end("reset")
        row.reset = future

    # -- metadata, statistics ------------------------------------------------------------------------
    def meta_frames(self) -> list[bytes]:
        """The metadata message (built again only when the set of streams changes)."""
        if self._meta_frames is None:
            i = self.model.info
            hidden = ("state_shapes", "state_names", "inplace_state", "outputs")
            rows = self.active()
            self._meta_frames = protocol.encode("meta", "", {
                "instance": self.instance,
                "daemon": f"cpc-stream {__version__}",
                "model": {k: v for k, v in i.__dict__.items() if k not in hidden},
                "streams": [r.name for r in rows],
                "epochs": {r.name: r.epoch for r in rows},
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
        rtf = round((self.compute_s - c0) / audio, 4) if audio > 0 else None
        if rtf is not None:
            self.metrics.rtf.set(rtf)
        self.metrics.subscribers.set(self.publisher.subscribers)
        return {
            "instance": self.instance,
            "uptime_s": round(now - self.started, 3),
            "rtf": rtf,
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
                for r in self.active()
            },
        }

    def count_input(self, r: BatchRow) -> None:
        """Move what r's source received, dropped and replaced since the last count into the metrics."""
        s, seen = r.source.stats, r.reported
        self.metrics.audio_in.inc((s.received_samples - seen["received"]) / SAMPLE_RATE)
        self.metrics.dropped.labels(cause="queue_full").inc(
            (s.dropped_samples - seen["dropped"]) / SAMPLE_RATE
        )
        if s.nonfinite > seen["nonfinite"] and not seen["nonfinite"]:
            log.warning("stream %s: its input holds NaN or Inf samples; they are replaced with 0 "
                        "and counted in stats (nonfinite)", r.name)  # fmt: skip
        self.metrics.nonfinite.inc(s.nonfinite - seen["nonfinite"])
        seen.update(received=s.received_samples, dropped=s.dropped_samples, nonfinite=s.nonfinite)

    # -- the audio path ------------------------------------------------------------------------------
    def step(self) -> bool:
        """Run one batched call over the streams that have a whole call of audio (or the tail of an
        ended stream), if the batching rule (module docstring) says now; publish the results. Returns
        whether any work was done."""
        n, hop, f = self.model.info.samples_per_call, self.model.info.hop, self.model.info.frames_per_call
        now = time.monotonic()
        running = [r for r in self.rows if r is not None and not r.ended]
        ready = []
        for r in running:
            have = r.buffer.available
            if have >= n or (r.buffer.ended and have >= hop):
                r.ready_since = r.ready_since or now
                ready.append(r)
            else:
                r.ready_since = None
        if not ready:
            return False
        waited = now - min(r.ready_since for r in ready)
        max_wait = self.cfg.max_wait_ms / 1000 or f * hop / SAMPLE_RATE  # 0: one call's audio
        live = [r for r in running if r.source.live]
        if not (
            any(not r.source.live or r.buffer.ended for r in ready)
            or len(ready) == len(live)
            or waited >= max_wait
        ):
            return False
        audio, frames, stamps = [], [], []
        for r in ready:
            if r.buffer.available >= n:
                x, t_mono, t_wall = r.buffer.take(n)
                frames.append(f)
            else:  # the tail: whole hops short of a call, zero-padded
                x, t_mono, t_wall = r.buffer.take(r.buffer.available // hop * hop)
                frames.append(len(x) // hop)
                x = np.pad(x, (0, n - len(x)))
            audio.append(x)
            stamps.append((t_mono, t_wall))
            r.ready_since = None
        t0 = time.perf_counter()
        try:
            out = self.batch.step(np.stack(audio), rows=[r.index for r in ready])
        except Exception as e:  # onnxruntime failed on these streams' input: they cannot go on
            for r in ready:
                self.end_row(r, f"error: model call failed: {_first_line(e)}")
            return True
        took = time.perf_counter() - t0
        self.compute_s += took
        self.metrics.call_seconds.observe(took)
        self.metrics.batch_streams.observe(len(ready))
        for k, (r, count, (t_mono, t_wall)) in enumerate(zip(ready, frames, stamps, strict=True)):
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
            self.metrics.latency.observe(max(0.0, time.monotonic() - t_mono))
            self.count_input(r)
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
        self.metrics.frames_out.inc(count)

    def end_row(self, r: BatchRow, reason: str) -> None:
        """End stream r's current run with `reason`: audio still buffered is dropped (and counted in
        dropped_s), eos goes out. A reset then starts its next run in the same row; otherwise its source
        stops and the row is freed."""
        self.count_input(r)
        dropped = r.buffer.available + r.source.stats.dropped_samples
        eos = {
            "instance": self.instance, "epoch": r.epoch, "frames": r.frames, "reason": reason,
            "last_seq": {k: v - 1 for k, v in r.seq.items()}, "dropped_s": round(dropped / SAMPLE_RATE, 4),
            "nonfinite": r.source.stats.nonfinite,
        }  # fmt: skip
        self.metrics.dropped.labels(cause="end_of_stream").inc(r.buffer.available / SAMPLE_RATE)
        try:
            self.publisher.send(protocol.encode("eos", r.name, eos))
        except Exception as e:  # nothing more can be said on the wire about this stream
            log.error("stream %s: cannot publish its end: %s", r.name, _first_line(e))
        (log.error if reason.startswith("error") else log.info)(
            "stream %s ended (%s): %d frames", r.name, reason, r.frames
        )
        if r.reset is not None and reason == "reset":  # the same row, zero state, a new epoch
            self.batch.reset([r.index])
            r.epoch = self.epochs[r.name] = self.epochs[r.name] + 1
            r.frames, r.hops, r.seq = 0, 0, dict.fromkeys(protocol.DATA_KINDS, 0)
            r.buffer.reopen()
            future, r.reset = r.reset, None
            self._meta_frames = None
            future.set_result(r)
            return
        r.source.stop()
        r.ended = reason
        if r.reset is not None:  # a reset asked of a stream that ended otherwise
            r.reset.set_exception(Refused(POLICY, f"stream {r.name!r} ended: {reason}"))
        if r not in self.local:  # a network stream gives its row back; local ones stay for the summary
            self.rows[r.index] = None
            self._meta_frames = None

    def finish_ended(self) -> None:
        """End every stream whose source ended (or that is being reset) and whose buffer holds no
        whole hop."""
        for r in self.active():
            if not r.ended and r.buffer.ended and r.buffer.available < self.model.info.hop:
                self.end_row(r, r.buffer.ended)

    def run(self, serving: bool = False) -> int:
        """Until stop() (serving: an ingest listener may bring streams at any time), or until every
        stream has ended. Returns the exit status: 0, or 1 if a local stream ended with an error."""
        if self.wait_subscribers:
            log.info("waiting for %d subscriber(s) on %s", self.wait_subscribers, self.publisher.endpoint)
            while self.publisher.subscribers < self.wait_subscribers and not self.stop_requested.is_set():
                self.publisher.wait(100)
            # A peer sends all its subscriptions at once when it connects, in byte order ("c." and "eos."
            # before "meta.", "scores." after): let the rest of the last one's arrive before any data.
            settle = time.monotonic() + SUBSCRIPTION_SETTLE_S
            while time.monotonic() < settle:
                self.publisher.wait(10)
        for r in self.local:
            r.source.start(r.buffer)
        # Each subscriber got the metadata when it subscribed; the periodic copy is the heartbeat.
        next_meta, next_stats = time.monotonic() + self.cfg.meta_interval, time.monotonic()
        stop_deadline = None
        while True:
            now = self.heartbeat = time.monotonic()
            self.handle_requests()
            if self.stop_requested.is_set() and stop_deadline is None:
                for r in self.active():
                    r.source.stop()
                stop_deadline = now + STOP_GRACE_S
            if self.stop_now.is_set() or (stop_deadline is not None and now > stop_deadline):
                for r in self.active():
                    if not r.ended:
                        late = not self.stop_now.is_set() and not r.buffer.ended
                        self.end_row(
                            r,
                            f"stopped (its source did not end within {STOP_GRACE_S:g} s)"
                            if late
                            else "stopped",
                        )
            if all(r.ended for r in self.active()) and (not serving or self.stop_requested.is_set()):
                break
            self.publisher.poll()
            if self._meta_frames is None and now - self._meta_sent >= META_MIN_INTERVAL_S:
                next_meta = now  # the set of streams changed: say so soon
            if now >= next_meta:
                self.publisher.send(self.meta_frames())
                self._meta_sent, next_meta = now, now + self.cfg.meta_interval
            if now >= next_stats:
                self.publisher.send(protocol.encode("stats", "", self.stats_header()))
                next_stats = now + self.cfg.stats_interval
            self.metrics.streams_active.set(sum(1 for r in self.active() if not r.ended))
            self.wakeup.clear()  # before the work: a source's set() during step() is not lost
            worked = self.step()
            self.finish_ended()
            if not worked:
                self.wakeup.wait(0.002 if any(r.ready_since for r in self.active()) else 0.01)
        self.publisher.send(protocol.encode("stats", "", self.stats_header(final=True)))
        self.finished.set()
        self.handle_requests()  # joins that came in meanwhile are refused (the daemon is stopping)
        return 1 if any(r.ended.startswith("error") for r in self.local) else 0

    def stop(self, now: bool = False) -> None:
        """Ask the sources to stop; run() then drains what was captured and publishes end of stream.
        now=True: end every stream at once, without draining."""
        self.stop_requested.set()
        if now:
            self.stop_now.set()
        self.wakeup.set()

    def healthy(self) -> bool:
        """The loop turned within the last 5 s (it turns at least every 10 ms when idle)."""
        return time.monotonic() - self.heartbeat < 5.0

    def close(self) -> None:
        for r in self.active():
            r.source.stop()
        self.publisher.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__
