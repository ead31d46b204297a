"""cpc-stream: the real-time daemon. Audio in (microphone, files, stdin), CPC representations out over ZeroMQ.

    cpc-stream --mic                                   default capture device
    cpc-stream --file a.flac --file b.wav --realtime   two streams, paced at real time
    ffmpeg -i talk.mp3 -f s16le -ac 1 -ar 16000 - | cpc-stream --stdin
    cpc-stream --list-devices

Settings come from the `stream:` section of config.yaml; `stream.key=value` arguments (or `--set
stream.key=value`) and the flags override them. SIGINT/SIGTERM stop capture, process what was captured,
publish end of stream and exit (a source that does not stop within 5 s has its stream ended for it; a
second signal ends every stream at once). The daemon exits by itself once every source has ended (files,
stdin). Exit status: 0, 1 if a stream ended with an error, 2 if it could not start.
The wire format is docs/protocol.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import ssl
import sys
from pathlib import Path

from . import daemon_config
from .contract import SAMPLE_RATE
from .daemon import Daemon
from .daemon_config import parse_host_port
from .errors import UserError, run_cli, setup_logging
from .ingest import IngestServer
from .metrics import Metrics
from .onnx_model import OnnxModel
from .security import Endpoint, is_loopback
from .sources import STDIN_FORMATS, FileSource, MicSource, StdinSource, list_devices

log = logging.getLogger("cpc.stream")


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
    p.add_argument("overrides", nargs="*", metavar="stream.key=value", help="override a setting")
    p.add_argument(
        "--set", action="append", default=[], metavar="stream.key=value", help="the same, as an option"
    )
    p.add_argument("--model", help="exported graph (stream.model)")
    p.add_argument("--bind", help="ZeroMQ endpoint to publish on (stream.bind)")
    p.add_argument(
        "--publish-z", action="store_true", default=None, help="also publish z_t (stream.publish_z)"
    )
    p.add_argument("--wait-subscribers", type=int, default=0, metavar="N",
                   help="start the sources only once N subscribers are connected (no frame is lost to a slow joiner)")  # fmt: skip
    net = p.add_argument_group("audio in over the network (WebSocket ingest, docs/protocol.md)")
    net.add_argument("--listen", metavar="HOST:PORT", help="accept streams over WebSocket (stream.listen)")
    net.add_argument(
        "--max-streams", type=int, metavar="N", help="network streams at once (stream.max_streams)"
    )
    net.add_argument("--max-wait-ms", type=float, metavar="MS",
                     help="batching: how long a ready live stream waits for the others (stream.max_wait_ms)")  # fmt: skip
    net.add_argument(
        "--metrics", metavar="HOST:PORT", help="Prometheus /metrics and /healthz (stream.metrics)"
    )
    p.add_argument("--insecure", action="store_true", default=None,
                   help="allow a ZeroMQ bind or ingest listener other machines can reach without CURVE, or "
                        "without an ingest token (stream.insecure)")  # fmt: skip
    p.add_argument("-v", "--verbose", action="store_true", help="debug messages")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


def file_stream_name(path: str, index: int, count: int) -> str:
    """A file's stream name: its stem (`<stem>-<index>` when there are several files), as UTF-8 text
    whatever bytes the file system gave (undecodable bytes become U+FFFD)."""
    stem = os.fsencode(Path(path).stem).decode("utf-8", "replace") or f"file{index}"
    return stem if count == 1 else f"{stem}-{index}"


def sources_from_args(args: argparse.Namespace, queue_seconds: float) -> list:
    sources = []
    if args.mic:
        sources.append(MicSource("mic", None if args.mic == "default" else args.mic, queue_seconds))
    for n, path in enumerate(args.file):
        sources.append(FileSource(file_stream_name(path, n, len(args.file)), path, realtime=args.realtime))
    if args.stdin:
        sources.append(StdinSource("stdin", args.stdin_format, args.stdin_rate, args.stdin_channels))
    return sources


def start_ingest(daemon: Daemon, cfg) -> IngestServer:
    """The WebSocket listener, after the same fail-closed checks as the ZeroMQ bind: a listener other
    machines can reach needs an ingest token (or --insecure), and without TLS it says the token and
    the audio travel in clear."""
    host, port = parse_host_port(cfg.listen, "stream.listen")
    routable = not is_loopback(Endpoint("tcp", host, str(port)))
    if routable and not cfg.ingest_token and not cfg.insecure:
        raise UserError(f"stream.listen {cfg.listen} is reachable from other machines and has no "
                        "stream.ingest_token: set one, or pass --insecure to take audio from anyone")  # fmt: skip
    context = None
    if cfg.tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        except (OSError, ssl.SSLError) as e:
            raise UserError(
                f"stream.tls_cert {cfg.tls_cert} / stream.tls_key {cfg.tls_key}: cannot load ({e})"
            ) from None
    elif routable:
        log.warning("ingest on %s without TLS: the token and the audio travel in clear text", cfg.listen)
    server = IngestServer(daemon, host, port, token=cfg.ingest_token, max_message_bytes=cfg.max_message_bytes,
                          hello_timeout=cfg.hello_timeout, ssl_context=context)  # fmt: skip
    server.start()
    return server


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(
        "cpc-stream", logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    )

    def body() -> int:
        if args.list_devices:
            print(list_devices())
            return 0
        if args.wait_subscribers < 0:
            raise UserError(f"--wait-subscribers {args.wait_subscribers}: expected a count >= 0")
        path = args.config or ("config.yaml" if Path("config.yaml").is_file() else None)
        overrides = [*args.overrides, *args.set]
        for flag in (
            "model",
            "bind",
            "publish_z",
            "insecure",
            "listen",
            "max_streams",
            "max_wait_ms",
            "metrics",
        ):
            value = getattr(args, flag)
            if value is not None:
                overrides.append(f"stream.{flag}={str(value).lower() if isinstance(value, bool) else value}")
        cfg = daemon_config.load(path, overrides).stream
        model = OnnxModel(cfg.model, providers=cfg.providers, threads=cfg.threads, huge_pages=True)
        sources = sources_from_args(args, cfg.queue_seconds)
        metrics = Metrics()
        daemon = Daemon(cfg, model, sources, wait_subscribers=args.wait_subscribers,
                        max_streams=cfg.max_streams if cfg.listen else 0, metrics=metrics)  # fmt: skip
        ingest = metrics_server = None
        signals = []

        def on_signal(*_) -> None:  # the first drains and ends cleanly; a second ends every stream now
            signals.append(1)
            daemon.stop(now=len(signals) > 1)

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        try:
            if cfg.listen:
                ingest = start_ingest(daemon, cfg)
            if cfg.metrics:
                metrics_server = metrics.serve(
                    *parse_host_port(cfg.metrics, "stream.metrics"), daemon.healthy
                )
            names = ", ".join(r.name for r in daemon.local) or "nothing yet"
            i = model.info
            timing = f", look-ahead {i.lookahead} samples: frames {i.delay} hop late" if i.lookahead else ""
            print(f"cpc-stream: publishing {names} on {daemon.publisher.endpoint} "
                  f"({i.frames_per_call} frames per call{timing}, {model.providers[0]})"
                  + (f"; ingest on {ingest.url}" if ingest else "")
                  + (f"; metrics on http://{cfg.metrics}/metrics" if metrics_server else ""), file=sys.stderr, flush=True)  # fmt: skip
            status = daemon.run(serving=ingest is not None)
        finally:
            if ingest:
                ingest.stop()
            if metrics_server:
                metrics_server.shutdown()
            daemon.close()
        for r in daemon.local:
            s = r.source.stats
            extra = f", dropped {s.dropped_samples / SAMPLE_RATE:.2f} s of input" if s.dropped_samples else ""
            extra += f", {s.nonfinite} non-finite input samples replaced with 0" if s.nonfinite else ""
            print(f"cpc-stream: {r.name}: {r.frames} frames, ended: {r.ended}{extra}", file=sys.stderr)
        return status

    return run_cli("cpc-stream", body)


if __name__ == "__main__":
    sys.exit(main())
