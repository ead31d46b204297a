"""Prometheus metrics of the daemon, and /healthz, on their own HTTP port (`cpc-stream --metrics HOST:PORT`).

    metrics = Metrics()                      # one registry per daemon, not the process-wide default
    metrics.frames_out.inc(4)                # the daemon's loop updates them
    server = metrics.serve("127.0.0.1", 9100, healthy=lambda: True)   # GET /metrics, GET /healthz
    server.shutdown()

/metrics is Prometheus' text format (prometheus-client). /healthz answers 200 "ok" while the daemon's
loop is turning (healthy() is true), 503 otherwise. Another path is 404, another method 405.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .errors import UserError

# Latency from the capture stamp of a message's last sample to its publication: 1 ms to 10 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """The daemon's counters, gauges and histograms, in a registry of their own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.streams_active = Gauge("cpc_streams_active", "Streams being served now", registry=r)
        self.streams_total = Counter(
            "cpc_streams", "Streams started, by kind of source", ["source"], registry=r
        )
        self.refused = Counter(
            "cpc_ingest_refused", "Ingest connections refused, by cause", ["cause"], registry=r
        )
        self.audio_in = Counter("cpc_audio_in_seconds", "Seconds of audio received (16 kHz)", registry=r)
        self.frames_out = Counter("cpc_frames_out", "Frames published (10 ms each)", registry=r)
        self.dropped = Counter(
            "cpc_dropped_seconds", "Input seconds dropped, by cause", ["cause"], registry=r
        )
        self.nonfinite = Counter(
            "cpc_nonfinite_samples", "NaN or Inf input samples replaced with 0", registry=r
        )
        self.rtf = Gauge(
            "cpc_real_time_factor", "Compute time over audio time, last stats interval", registry=r
        )
        self.batch_streams = Histogram(
            "cpc_batch_streams", "Streams per model call", buckets=BATCH_BUCKETS, registry=r
        )
        self.call_seconds = Histogram(
            "cpc_call_seconds", "Seconds per model call", buckets=LATENCY_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "cpc_capture_to_publish_seconds",
            "From the capture stamp of a message's last sample to its publication",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.subscribers = Gauge(
            "cpc_subscribers", "ZeroMQ subscribers (as counted for --wait-subscribers)", registry=r
        )

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, host: str, port: int, healthy: Callable[[], bool]) -> ThreadingHTTPServer:
        """Serve /metrics and /healthz from a thread; returns the server (shutdown() stops it)."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, CONTENT_TYPE_LATEST, metrics.text())
                elif path == "/healthz":
                    ok = healthy()
                    self._reply(
                        200 if ok else 503, "text/plain; charset=utf-8", b"ok\n" if ok else b"stalled\n"
                    )
                else:
                    self._reply(404, "text/plain; charset=utf-8", b"not found: /metrics or /healthz\n")

            def _refuse(self) -> None:
                self._reply(405, "text/plain; charset=utf-8", b"only GET /metrics and GET /healthz\n")

            do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse  # noqa: N815

            def _reply(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # scrapes every few seconds: not worth a log line each
                pass

        try:
            server = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise UserError(f"cannot serve metrics on {host}:{port}: {e.strerror}") from None
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        return server
