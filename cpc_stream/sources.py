"""Audio sources for the daemon: a microphone, files and stdin, each turned into 16 kHz mono float32.

Each source runs in its own thread and writes into its SourceBuffer, which the daemon reads from. Live
sources (a microphone, a file paced with --realtime) never wait: when the buffer is full the new audio is
dropped and counted. Files read as fast as possible and stdin wait for room instead, so nothing is lost.
The microphone callback only copies the block into a deque: it never blocks, never waits on the model.

Every source stops within a bounded time of stop(): no call blocks for longer than STOP_POLL_S without
looking at the stop flag (stdin is read only when select() says it is readable).
"""

from __future__ import annotations

import collections
import os
import select
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from .audio import Resampler, open_audio
from .contract import SAMPLE_RATE
from .errors import UserError

STOP_POLL_S = 0.1  # the longest a source thread waits without looking at its stop flag


@dataclass
class SourceStats:
    dropped_samples: int = 0  # 16 kHz samples thrown away because the buffer was full
    overflows: int = 0  # capture overflows reported by the audio driver
    received_samples: int = 0
    nonfinite: int = 0  # input samples that were NaN or Inf, replaced with 0 (audio.Resampler)


@dataclass
class SourceBuffer:
    """Thread-safe FIFO of 16 kHz samples with the capture time of every chunk's last sample."""

    capacity: int  # samples
    wakeup: threading.Event
    _chunks: collections.deque = field(default_factory=collections.deque)
    _marks: collections.deque = field(default_factory=collections.deque)  # (end sample index, t_mono, t_wall)
    _start: int = 0  # absolute index of the first buffered sample
    _size: int = 0
    _last_stamp: tuple[float, float] = (float("-inf"), float("-inf"))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _room: threading.Condition = field(init=False)
    ended: str = ""  # why the source ended ("end of file", "stopped", "error: ..."); "" while live

    def __post_init__(self) -> None:
        self._room = threading.Condition(self._lock)

    @property
    def available(self) -> int:
        return self._size

    def push(
        self,
        samples: np.ndarray,
        t_mono: float,
        t_wall: float,
        wait: bool = False,
        stop: threading.Event | None = None,
    ) -> bool:
        """Append samples captured up to (t_mono, t_wall). Returns False (nothing added) when full and
        not waiting; with wait=True blocks until there is room or `stop` is set."""
        n = len(samples)
        if n == 0:
            return True
        with self._lock:
            while self._size + n > self.capacity and self._size > 0:
                if not wait or (stop is not None and stop.is_set()):
                    return False
                self._room.wait(0.05)
            self._chunks.append(np.asarray(samples, dtype=np.float32))
            self._size += n
            self._marks.append((self._start + self._size, t_mono, t_wall))
        self.wakeup.set()
        return True

    def take(self, n: int) -> tuple[np.ndarray, float, float]:
        """Remove the first n samples (n <= available); returns them and the capture time of the last one.
        Stamps never go backwards: a source read faster than real time stamps a block when it was read,
        which can be earlier than the previous block's last sample would have been captured."""
        with self._lock:
            parts, need = [], n
            while need:
                head = self._chunks[0]
                if len(head) <= need:
                    parts.append(self._chunks.popleft())
                    need -= len(head)
                else:
                    parts.append(head[:need])
                    self._chunks[0] = head[need:]
                    need = 0
            end = self._start + n
            while self._marks and self._marks[0][0] < end:
                self._marks.popleft()
            mark_end, t_mono, t_wall = self._marks[0] if self._marks else (end, time.monotonic(), time.time())
            lag = (mark_end - end) / SAMPLE_RATE  # the last taken sample was captured this much earlier
            t_mono = max(t_mono - lag, self._last_stamp[0])
            t_wall = max(t_wall - lag, self._last_stamp[1])
            self._last_stamp = (t_mono, t_wall)
            self._start, self._size = end, self._size - n
            self._room.notify_all()
        return np.concatenate(parts) if len(parts) > 1 else parts[0], t_mono, t_wall

    def end(self, reason: str) -> None:
        self.ended = reason
        self.wakeup.set()

    def reopen(self) -> None:
        """Empty the buffer and take audio again (a stream's next run: its reset)."""
        with self._lock:
            self._chunks.clear()
            self._marks.clear()
            self._start, self._size, self.ended = self._start + self._size, 0, ""


class Source:
    """Base: a named thread that fills self.buffer until it ends or stop() is called."""

    live = False  # live sources drop when full; others wait for room
    kind = "local"  # file, stdin, mic, websocket: for the metrics

    def __init__(self, name: str):
        self.name = name
        self.resample: Resampler | None = None  # set by each source for its input rate
        self.stats = SourceStats()
        self._stop = threading.Event()
        self.buffer: SourceBuffer | None = None
        self._thread: threading.Thread | None = None

    def start(self, buffer: SourceBuffer) -> None:
        self.buffer = buffer
        self._thread = threading.Thread(target=self._guarded, name=f"source-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _guarded(self) -> None:
        try:
            reason = self.run()
        except Exception as e:  # a broken source ends its own stream, not the daemon
            reason = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        self.buffer.end("stopped" if self._stop.is_set() and reason.startswith("end") else reason)

    def emit(self, samples: np.ndarray, t_mono: float, t_wall: float) -> None:
        self.stats.received_samples += len(samples)
        if self.resample is not None:
            self.stats.nonfinite = self.resample.nonfinite
        if not self.buffer.push(samples, t_mono, t_wall, wait=not self.live, stop=self._stop):
            self.stats.dropped_samples += len(samples)

    def run(self) -> str:
        raise NotImplementedError


class FileSource(Source):
    """Any file soundfile reads (any rate, channels, sample width); as fast as possible or paced."""

    kind = "file"

    def __init__(
        self, name: str, path: str | Path, realtime: bool = False, block_seconds: float | None = None
    ):
        super().__init__(name)
        self.path = str(path)
        self.file = open_audio(path)
        self.live = realtime
        # Paced: 10 ms blocks, like a microphone's; otherwise large blocks for throughput.
        block_seconds = block_seconds or (0.01 if realtime else 0.25)
        self.block = max(1, int(self.file.samplerate * block_seconds))
        self.resample = Resampler(self.file.samplerate, SAMPLE_RATE)

    def run(self) -> str:
        start, done, rate = time.monotonic(), 0, self.file.samplerate
        with self.file:
            while not self._stop.is_set():
                try:
                    block = self.file.read(self.block, dtype="float32", always_2d=True)
                except sf.LibsndfileError as e:  # damaged or truncated: keep what still decodes
                    tail = self._salvage(done)
                    self.emit(self.resample(tail, last=True), time.monotonic(), time.time())
                    return (
                        f"error: {self.path} is damaged after {(done + len(tail)) / rate:.2f} s "
                        f"({str(e).strip().removeprefix('Error : ')}); the audio before was processed"
                    )
                last = len(block) < self.block
                done += len(block)
                if self.live:  # pace: this block is "captured" when its audio would have ended
                    delay = start + done / rate - time.monotonic()
                    if delay > 0:
                        self._stop.wait(delay)
                self.emit(self.resample(block, last=last), time.monotonic(), time.time())
                if last:
                    return "end of file"
        return "stopped"

    def _salvage(self, position: int) -> np.ndarray:
        """The samples from `position` that decode before the damage, read in small blocks (a large read
        that fails loses all of its block). (frames, channels) float32."""
        parts = []
        try:
            with sf.SoundFile(os.fsencode(self.path)) as f:
                f.seek(position)
                while True:
                    block = f.read(16, dtype="float32", always_2d=True)
                    parts.append(block)
                    if len(block) < 16:
                        break
        except (sf.LibsndfileError, RuntimeError, OSError):
            pass
        return np.concatenate(parts) if parts else np.zeros((0, self.file.channels), np.float32)


STDIN_FORMATS = {"s16le": "<i2", "s32le": "<i4", "f32le": "<f4", "u8": "u1"}


class StdinSource(Source):
    """Raw interleaved PCM on standard input: `ffmpeg -f s16le -ac 1 -ar 16000 - | cpc-stream --stdin`."""

    kind = "stdin"

    def __init__(
        self, name: str, fmt: str, rate: int, channels: int, stream=None, block_seconds: float = 0.05
    ):
        super().__init__(name)
        if fmt not in STDIN_FORMATS:
            raise UserError(f"--stdin-format {fmt!r}: expected one of {', '.join(STDIN_FORMATS)}")
        if rate <= 0 or channels <= 0:
            raise UserError(f"--stdin-rate and --stdin-channels must be > 0, got {rate} and {channels}")
        self.dtype, self.channels = np.dtype(STDIN_FORMATS[fmt]), channels
        self.frame_bytes = self.dtype.itemsize * channels
        self.block_bytes = max(1, int(rate * block_seconds)) * self.frame_bytes
        self.resample = Resampler(rate, SAMPLE_RATE)
        self.stream = stream or sys.stdin.buffer
        try:
            self.fd: int | None = self.stream.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
            self.fd = None

    def _to_float(self, raw: bytes) -> np.ndarray:
        x = np.frombuffer(raw, dtype=self.dtype).reshape(-1, self.channels)
        if self.dtype.kind == "f":
            return x.astype(np.float32)
        if self.dtype.kind == "u":  # unsigned 8-bit is offset binary
            return (x.astype(np.float32) - 128.0) / 128.0
        return x.astype(np.float32) / float(2 ** (8 * self.dtype.itemsize - 1))

    def _read(self) -> bytes | None:
        """Up to block_bytes of input, b"" at its end, or None if none came within STOP_POLL_S (a pipe
        held open by an idle writer must not keep the source from seeing stop())."""
        if self.fd is None:  # a file object without a descriptor (tests)
            return self.stream.read(self.block_bytes)
        ready, _, _ = select.select([self.fd], [], [], STOP_POLL_S)
        return os.read(self.fd, self.block_bytes) if ready else None

    def run(self) -> str:
        pending = b""
        while not self._stop.is_set():
            raw = self._read()
            if raw is None:
                continue
            last = not raw
            pending += raw
            whole = len(pending) // self.frame_bytes * self.frame_bytes
            block, pending = pending[:whole], pending[whole:]
            self.emit(self.resample(self._to_float(block), last=last), time.monotonic(), time.time())
            if last:
                return "end of input" + (
                    f" ({len(pending)} trailing bytes of a partial sample dropped)" if pending else ""
                )
        return "stopped"


def _sounddevice():
    """sounddevice needs the PortAudio library, which its Linux wheels do not bundle."""
    try:
        import sounddevice
    except OSError as e:
        raise UserError(f"audio capture needs PortAudio ({e}): apt-get install libportaudio2") from None
    return sounddevice


def list_devices() -> str:
    return str(_sounddevice().query_devices())


class MicSource(Source):
    """A capture device through sounddevice, at its native rate and channel count."""

    live = True
    kind = "mic"

    def __init__(self, name: str, device: str | int | None, queue_seconds: float = 5.0):
        super().__init__(name)
        self.sd = sd = _sounddevice()
        try:
            dev = int(device) if isinstance(device, str) and device.isdigit() else device
            info = sd.query_devices(dev, kind="input")
        except (ValueError, sd.PortAudioError) as e:
            raise UserError(
                f"audio input device {device!r} not found ({e}); see cpc-stream --list-devices"
            ) from None
        self.device = info["index"] if isinstance(info, dict) and "index" in info else dev
        self.rate = int(info["default_samplerate"])
        self.channels = max(1, min(int(info["max_input_channels"]), 2))
        self.resample = Resampler(self.rate, SAMPLE_RATE)
        self.raw: collections.deque = collections.deque()
        self.max_raw_blocks = max(4, int(queue_seconds * 100))  # blocks of ~10 ms
        self.device_name = info["name"]

    def _callback(self, indata, frames, time_info, status) -> None:
        # Runs on PortAudio's thread: copy and return. Never block here.
        if status.input_overflow:
            self.stats.overflows += 1
        if len(self.raw) >= self.max_raw_blocks:
            self.stats.dropped_samples += frames * SAMPLE_RATE // self.rate
            return
        self.raw.append((indata.copy(), time.monotonic(), time.time()))

    def run(self) -> str:
        try:
            stream = self.sd.InputStream(device=self.device, channels=self.channels, samplerate=self.rate,
                                         dtype="float32", callback=self._callback, blocksize=self.rate // 100)  # fmt: skip
        except self.sd.PortAudioError as e:
            return f"error: cannot open input device {self.device_name!r}: {e}"
        with stream:
            while not self._stop.is_set():
                if not self.raw:
                    self._stop.wait(0.005)
                    continue
                block, t_mono, t_wall = self.raw.popleft()
                self.emit(self.resample(block), t_mono, t_wall)
        while self.raw:  # what was captured before the stop is still processed
            block, t_mono, t_wall = self.raw.popleft()
            self.emit(self.resample(block), t_mono, t_wall)
        return "stopped"
