"""cpc-stream: the real-time daemon. Audio in (microphone, files, stdin), CPC representations out over ZeroMQ.

    cpc-stream --mic                                   default capture device
    cpc-stream --file a.flac --file b.wav --realtime   two streams, paced at real time
    ffmpeg -i talk.mp3 -f s16le -ac 1 -ar 16000 - | cpc-stream --stdin
    cpc-stream --list-devices

Settings come from the `stream:` section of config.yaml; `--set stream.key=value` and the flags override
them. SIGINT/SIGTERM stop capture, process what was captured, publish end of stream and exit 0.
The wire format is docs/protocol.md.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from . import config as config_mod
from .daemon import Daemon
from .engine import StreamingModel
from .errors import UserError, run_cli
from .sources import RATE, STDIN_FORMATS, FileSource, MicSource, StdinSource, list_devices


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpc-stream", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    src = p.add_argument_group("sources (any number; each is one stream)")
    src.add_argument(
        "--mic", nargs="?", const="default", metavar="DEVICE", help="capture device name or index"
    )
    src.add_argument("--file", action="append", default=[], metavar="PATH", help="audio file (repeatable)")
    src.add_argument("--stdin", action="store_true", help="raw PCM on standard input")
    src.add_argument("--stdin-format", default="s16le", choices=sorted(STDIN_FORMATS))
    src.add_argument("--stdin-rate", type=int, default=16000)
    src.add_argument("--stdin-channels", type=int, default=1)
    src.add_argument(
        "--realtime", action="store_true", help="pace files at real time (default: as fast as possible)"
    )
    src.add_argument("--list-devices", action="store_true", help="list capture devices and exit")
    p.add_argument("--config", default=None, help="YAML config (default: ./config.yaml if present)")
    p.add_argument(
        "--set", action="append", default=[], metavar="stream.key=value", help="override a setting"
    )
    p.add_argument("--model", help="exported graph (stream.model)")
    p.add_argument("--bind", help="ZeroMQ endpoint to publish on (stream.bind)")
    p.add_argument(
        "--publish-z", action="store_true", default=None, help="also publish z_t (stream.publish_z)"
    )
    p.add_argument("--wait-subscribers", type=int, default=0, metavar="N",
                   help="start the sources only once N subscribers are connected (no frame is lost to a slow joiner)")  # fmt: skip
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def sources_from_args(args: argparse.Namespace, queue_seconds: float) -> list:
    sources = []
    if args.mic:
        sources.append(MicSource("mic", None if args.mic == "default" else args.mic, queue_seconds))
    for n, path in enumerate(args.file):
        name = Path(path).stem if len(args.file) == 1 else f"{Path(path).stem}-{n}"
        sources.append(FileSource(name, path, realtime=args.realtime))
    if args.stdin:
        sources.append(StdinSource("stdin", args.stdin_format, args.stdin_rate, args.stdin_channels))
    if not sources:
        raise UserError("no source: give --mic, --file PATH or --stdin (see --help)")
    return sources


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="cpc-stream: %(message)s"
    )

    def body() -> int:
        if args.list_devices:
            print(list_devices())
            return 0
        path = args.config or ("config.yaml" if Path("config.yaml").is_file() else None)
        overrides = list(args.set)
        for flag, key in (("model", "model"), ("bind", "bind"), ("publish_z", "publish_z")):
            if getattr(args, flag) is not None:
                overrides.append(
                    f"stream.{key}={str(getattr(args, flag)).lower() if flag == 'publish_z' else getattr(args, flag)}"
                )
        cfg = config_mod.load(path, overrides).stream
        model = StreamingModel(cfg.model, providers=cfg.providers, threads=cfg.threads)
        sources = sources_from_args(args, cfg.queue_seconds)
        daemon = Daemon(cfg, model, sources, wait_subscribers=args.wait_subscribers)
        signal.signal(signal.SIGINT, lambda *_: daemon.stop())
        signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
        print(f"cpc-stream: publishing {', '.join(s.name for s in sources)} on {cfg.bind} "
              f"({model.info.frames_per_call} frames per call, {model.providers[0]})", file=sys.stderr, flush=True)  # fmt: skip
        try:
            daemon.run()
        finally:
            daemon.close()
        for s in daemon.streams:
            dropped = s.source.stats.dropped_samples / RATE
            print(f"cpc-stream: {s.source.name}: {s.frames} frames, ended: {s.buffer.ended}"
                  + (f", dropped {dropped:.2f} s of input" if dropped else ""), file=sys.stderr)  # fmt: skip
        return 0

    return run_cli("cpc-stream", body)


if __name__ == "__main__":
    sys.exit(main())
