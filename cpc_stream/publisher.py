"""The daemon's ZeroMQ side: one XPUB socket that publishes without ever blocking, answers each new
subscription with the metadata alone, counts subscribers and enforces the security settings.

- Sends use NOBLOCK, and an XPUB drops a message for a subscriber whose queue is full: a slow or dead
  subscriber never stalls the audio path; sequence numbers show it the gap.
- Late joiners: the socket runs with ZMQ_XPUB_MANUAL_LAST_VALUE. Each subscription is read here, applied
  by hand, and the next message sent reaches only the subscriber that made it: that message is the
  metadata, so a joiner gets it at once and nobody else gets a copy. (A run of unsubscriptions also ends
  with one metadata message, which then goes to every metadata subscriber when it came from a
  disconnect: libzmq cannot tell us which pipe left.)
- Subscribers: a subscriber is a connected peer that subscribed to the metadata (any prefix of the
  metadata topic, "" included); the count is min(connected peers, such subscriptions), from the socket
  monitor and the subscription events, so that one socket subscribing to both "" and "meta." counts once.
- Security (security.py): CURVE with an allow-list, or loopback, or an explicit --insecure. A client
  whose key is not allowed is logged with its address (security.py). A client that fails the CURVE
  handshake itself (no CURVE, a wrong server key) is logged without one (the socket monitor does not
  give it), once a minute per reason; when such a client hangs up first, libzmq may report nothing.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import protocol
from .daemon_config import StreamSection
from .errors import UserError
from .security import LoggingAuthenticator, check_security, start_authenticator

log = logging.getLogger("cpc.stream")

MONITORED = (
    zmq.EVENT_ACCEPTED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
HANDSHAKE_REASONS = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "the client does not use CURVE",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "CURVE handshake failed (a wrong server key?)",
}


class Publisher:
    """Bind, publish, answer joiners with `meta()` (the frames of the current metadata message)."""

    def __init__(self, cfg: StreamSection, meta: Callable[[], list[bytes]]):
        keys = check_security(cfg.bind, cfg.curve_secret_key, cfg.curve_allowed_keys, cfg.insecure)
        self.meta = meta
        self.ctx = zmq.Context()
        self.auth: LoggingAuthenticator | None = start_authenticator(self.ctx, keys) if keys else None
        sock = self.sock = self.ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.SNDHWM, cfg.hwm)
        if cfg.sndbuf:
            sock.setsockopt(zmq.SNDBUF, cfg.sndbuf)
        sock.setsockopt(zmq.LINGER, 500)
        sock.setsockopt(zmq.XPUB_MANUAL_LAST_VALUE, 1)
        if keys:
            sock.curve_secretkey, sock.curve_publickey, sock.curve_server = keys.secret, keys.public, True
        self.monitor = sock.get_monitor_socket(MONITORED)
        try:
            sock.bind(cfg.bind)
        except zmq.ZMQError as e:
            self.close()
            raise UserError(f"cannot bind {cfg.bind}: {e.strerror}") from None
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.connections = 0
        self.meta_subscriptions = 0
        self.messages = 0  # sent (each reaches every matching subscriber whose queue has room)
        self.handshake_failures = 0
        self._logged: dict[str, float] = {}

    @property
    def subscribers(self) -> int:
        return max(0, min(self.connections, self.meta_subscriptions))

    @property
    def rejected(self) -> int:
        """Clients refused: failed handshakes and keys not on the allow-list."""
        return self.handshake_failures + (self.auth.rejected if self.auth else 0)

    def send(self, frames: list[bytes]) -> None:
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK)
            self.messages += 1
        except zmq.Again:  # at the high-water mark for every subscriber: dropped, as for each one alone
            pass

    def poll(self) -> None:
        """Apply pending subscriptions (each answered with the metadata) and monitor events."""
        last = None
        while True:
            try:
                event = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if not event or event[0] not in (0, 1):
                last = 0  # not a subscription; but it still addressed the next send to its sender
                continue
            prefix = event[1:]
            covers_meta = protocol.topic("meta").startswith(prefix)
            if event[0] == 1:
                self.sock.setsockopt(zmq.SUBSCRIBE, prefix)
                self.meta_subscriptions += covers_meta
                self.send(self.meta())  # reaches this subscriber alone, if it asked for metadata
            else:
                self.sock.setsockopt(zmq.UNSUBSCRIBE, prefix)
                self.meta_subscriptions -= covers_meta
            last = event[0]
        if last == 0:  # the next send would go to that pipe alone: make it one that may
            self.send(self.meta())
        while self.monitor.poll(0):
            self._monitor_event(recv_monitor_message(self.monitor))

    def wait(self, timeout_ms: int) -> None:
        """Sleep until a subscription or monitor event arrives (at most timeout_ms), then poll()."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        poller.poll(timeout_ms)
        self.poll()

    def _monitor_event(self, ev: dict) -> None:
        kind = ev["event"]
        if kind == zmq.EVENT_ACCEPTED:
            self.connections += 1
        elif kind == zmq.EVENT_DISCONNECTED:
            self.connections -= 1
        else:  # a failed handshake: the peer's address is not in the event; ZAP rejections carry it
            self.handshake_failures += 1
            if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:  # the value is an errno
                reason = f"handshake failed ({os.strerror(ev['value'])}: a client without CURVE, or a wrong server key?)"
            else:
                reason = HANDSHAKE_REASONS.get(
                    ev["value"], f"handshake failed (ZMTP protocol error {ev['value']:#x})"
                )
            now = time.monotonic()
            if now - self._logged.get(reason, -1e9) >= 60:  # a refused client keeps retrying
                self._logged[reason] = now
                log.info("rejected a connection to %s: %s", self.endpoint, reason)

    def close(self) -> None:
        self.monitor.close(0)
        self.sock.close()
        if self.auth:
            self.auth.stop()
        self.ctx.term()
