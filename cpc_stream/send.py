"""cpc-send: stream a file, stdin or the local microphone to a cpc-stream daemon's WebSocket ingest.

    cpc-send --url ws://daemon:8765/ talk.flac                    paced at real time, stream "talk"
    cpc-send --url ws://daemon:8765/ --fast talk.flac             as fast as the daemon takes it
    arecord -f S16_LE -r 48000 -c 2 | cpc-send --url ... --stdin --rate 48000 --channels 2 --name desk
    cpc-send --url ... --mic                                      the default capture device

The daemon publishes the stream's frames over ZeroMQ as for its own sources (docs/protocol.md); this
command only sends. It exits 0 once the daemon has accepted the end of the stream, 1 if the daemon
closed the connection first (the reason is printed), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .client import IngestError, send_audio
from .errors import UserError, run_cli

BLOCK_SECONDS = 0.02  # one message per 20 ms of audio


def file_blocks(path: str) -> tuple[Iterator[np.ndarray], int, int]:
    """(blocks of (frames, channels) float32, sample rate, channels) of any file soundfile reads."""
    import soundfile as sf

    from .audio import open_audio

    f = open_audio(path)

    def blocks() -> Iterator[np.ndarray]:
        with f:
            yield from f.blocks(
                blocksize=max(1, int(f.samplerate * BLOCK_SECONDS)), dtype="float32", always_2d=True
            )

    try:
        return blocks(), f.samplerate, f.channels
    except sf.LibsndfileError as e:  # pragma: no cover - open_audio already decoded the header
        raise UserError(f"cannot read audio file {path}: {e}") from None


def stdin_blocks(rate: int, channels: int) -> Iterator[np.ndarray]:
    """Raw interleaved s16le PCM from standard input, in blocks of BLOCK_SECONDS."""
    frame_bytes = 2 * channels
    want = max(1, int(rate * BLOCK_SECONDS)) * frame_bytes
    pending = b""
    while True:
        raw = (
            sys.stdin.buffer.read1(want)
            if hasattr(sys.stdin.buffer, "read1")
            else sys.stdin.buffer.read(want)
        )
        if not raw:
            return
        pending += raw
        whole = len(pending) // frame_bytes * frame_bytes
        if whole:
            yield np.frombuffer(pending[:whole], "<i2").reshape(-1, channels).astype(np.float32) / 32768.0
            pending = pending[whole:]


def mic_blocks(device: str | None) -> tuple[Iterator[np.ndarray], int, int]:
    """The capture device's blocks at its own rate and channel count, until Ctrl-C."""
    import queue

    from .sources import _sounddevice

    sd = _sounddevice()
    try:
        info = sd.query_devices(device, kind="input")
    except (ValueError, sd.PortAudioError) as e:
        raise UserError(f"audio input device {device!r} not found ({e})") from None
    rate, channels = int(info["default_samplerate"]), max(1, min(int(info["max_input_channels"]), 2))
    q: queue.Queue = queue.Queue()

    def blocks() -> Iterator[np.ndarray]:
        with sd.InputStream(device=device, channels=channels, samplerate=rate, dtype="float32",
                            blocksize=int(rate * BLOCK_SECONDS), callback=lambda b, *_: q.put(b.copy())):  # fmt: skip
            while True:
                yield q.get()

    return blocks(), rate, channels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cpc-send", description=__doc__.split("\n\n")[0])
    ap.add_argument("file", nargs="?", help="audio file (any format soundfile reads)")
    ap.add_argument("--url", default="ws://127.0.0.1:8765/", help="the daemon's --listen address")
    ap.add_argument("--stdin", action="store_true", help="raw s16le PCM on standard input")
    ap.add_argument("--rate", type=int, default=16000, help="--stdin sample rate")
    ap.add_argument("--channels", type=int, default=1, help="--stdin channels")
    ap.add_argument("--mic", nargs="?", const="default", metavar="DEVICE", help="capture device")
    ap.add_argument("--name", help="stream name (default: the file's stem, stdin or mic)")
    ap.add_argument("--fast", action="store_true", help="send as fast as the daemon takes it (files)")
    ap.add_argument("--token", default="", help="the daemon's ingest token, if it asks for one")
    ap.add_argument("--cafile", help="CA certificate to trust for wss:// (a self-signed daemon)")
    args = ap.parse_args(argv)

    def body() -> int:
        chosen = [bool(args.file), args.stdin, args.mic is not None]
        if sum(chosen) != 1:
            raise UserError("give exactly one of: a file, --stdin or --mic")
        if args.file:
            blocks, rate, channels = file_blocks(args.file)
            name = args.name or Path(args.file).stem
        elif args.stdin:
            if not 1000 <= args.rate <= 384000 or not 1 <= args.channels <= 8:
                raise UserError("--rate must be 1000-384000 and --channels 1-8")
            blocks, rate, channels, name = (
                stdin_blocks(args.rate, args.channels),
                args.rate,
                args.channels,
                args.name or "stdin",
            )
        else:
            blocks, rate, channels = mic_blocks(None if args.mic == "default" else args.mic)
            name = args.name or "mic"
        paced = not args.fast and bool(args.file)  # stdin and the microphone come at their own pace
        try:
            sent = send_audio(args.url, blocks, rate, channels, name, paced=paced, realtime=not args.fast,
                              token=args.token, cafile=args.cafile)  # fmt: skip
        except IngestError as e:
            print(f"cpc-send: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("cpc-send: interrupted; the stream was ended", file=sys.stderr)
            return 130
        print(f"cpc-send: {name}: sent {sent / rate:.2f} s of audio to {args.url}", file=sys.stderr)
        return 0

    return run_cli("cpc-send", body)


if __name__ == "__main__":
    sys.exit(main())
