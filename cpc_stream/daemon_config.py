"""The daemon's configuration: the `stream:` section of config.yaml (cpc_stream.config_file checks it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import config_file
from .errors import UserError
from .security import parse_endpoint


@dataclass
class StreamSection:
    model: str = "runs/demo/cpc.onnx"  # graph written by cpc-export
    bind: str = "tcp://127.0.0.1:5556"  # PUB endpoint; loopback unless you mean it (then use CURVE)
    publish_z: bool = False  # also publish z_t (512 floats per frame)
    providers: str = "auto"  # auto | cpu | cuda (onnxruntime execution provider)
    threads: int = 1  # onnxruntime intra-op threads
    meta_interval: float = 1.0  # seconds between periodic model-metadata messages
    stats_interval: float = 1.0  # seconds between daemon statistics messages
    hwm: int = 1000  # messages queued per subscriber before ZeroMQ drops (a slow subscriber sees gaps)
    sndbuf: int = 0  # kernel send buffer per connection in bytes (0: the OS default, which autotunes)
    queue_seconds: float = 5.0  # audio buffered per live source before input is dropped and counted
    curve_secret_key: str = ""  # daemon key pair file (cpc-keygen); enables CURVE encryption
    curve_allowed_keys: str = ""  # folder of client public keys allowed to subscribe
    insecure: bool = False  # allow a routable bind (ZeroMQ or ingest) without CURVE / token and TLS
    max_wait_ms: float = (
        0.0  # a ready live stream waits at most this long for the others; 0: one call (F x 10 ms)
    )
    # WebSocket ingest (cpc-stream --listen): audio in over the network, one stream per connection
    listen: str = ""  # HOST:PORT; empty: no ingest
    max_streams: int = 32  # network streams at once (rows of the batch kept for them)
    ingest_token: str = ""  # clients must send it in their hello (empty: no token)
    tls_cert: str = ""  # PEM certificate and key: wss:// (browsers give the microphone to secure pages)
    tls_key: str = ""
    max_message_bytes: int = 1048576  # a bigger WebSocket message closes the connection (1009)
    hello_timeout: float = 5.0  # seconds a client has to send its hello
    metrics: str = ""  # HOST:PORT for Prometheus /metrics and /healthz; empty: off


@dataclass
class DaemonConfig:
    stream: StreamSection = field(default_factory=StreamSection)


RULES = config_file.Rules(
    choices={"stream.providers": ("auto", "cpu", "cuda")},
    positive=frozenset(
        {
            "stream.threads",
            "stream.meta_interval",
            "stream.stats_interval",
            "stream.hwm",
            "stream.queue_seconds",
            "stream.max_streams",
            "stream.max_message_bytes",
            "stream.hello_timeout",
        }
    ),
)


def load(path: str | Path | None, overrides: Sequence[str] = ()) -> DaemonConfig:
    cfg = config_file.load(DaemonConfig, path, overrides, RULES)
    parse_endpoint(cfg.stream.bind)  # a malformed endpoint or port is an error before anything starts
    for key in ("listen", "metrics"):
        if getattr(cfg.stream, key):
            parse_host_port(getattr(cfg.stream, key), f"stream.{key}")
    if bool(cfg.stream.tls_cert) != bool(cfg.stream.tls_key):
        raise UserError("stream.tls_cert and stream.tls_key go together: give both, or neither")
    return cfg


def parse_host_port(value: str, key: str) -> tuple[str, int]:
    """HOST:PORT ([IPv6]:PORT too), PORT 0-65535 (0: any free port)."""
    host, colon, port = value.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"{key} {value!r}: expected HOST:PORT with PORT 0-65535")
    return host.strip("[]"), int(port)
