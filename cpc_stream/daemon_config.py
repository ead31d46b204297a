"""The daemon's configuration: the `stream:` section of config.yaml (cpc_stream.settings checks it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import config_file
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
    insecure: bool = False  # allow a routable bind without CURVE (anyone who reaches it can subscribe)


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
        }
    ),
)


def load(path: str | Path | None, overrides: Sequence[str] = ()) -> DaemonConfig:
    cfg = config_file.load(DaemonConfig, path, overrides, RULES)
    parse_endpoint(cfg.stream.bind)  # a malformed endpoint or port is an error before anything starts
    return cfg
