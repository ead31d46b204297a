"""Who may subscribe: the bind address, the CURVE keys and the authenticator, checked before anything is
published. Security fails closed:

- a partial or broken CURVE configuration (one of the two keys missing, a key file that is absent,
  unreadable, readable by other users or not a key, an allowed-keys folder that is absent or holds no
  key) is a refusal to start, in one line naming the key;
- a bind that other machines can reach needs CURVE, or `stream.insecure: true` (`--insecure`), which is
  then said in a warning;
- every client that the handshake or the allow-list rejects is logged at info level, with its address
  and the reason (once per address and reason, then counted).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .errors import UserError

log = logging.getLogger("cpc.security")


@dataclass(frozen=True)
class Endpoint:
    transport: str  # "tcp" or "ipc"
    host: str  # tcp: address, name, interface or "*"; ipc: the socket path
    port: str  # tcp: "1".."65535" or "*" (any free port); ipc: ""


def parse_endpoint(endpoint: str, key: str = "stream.bind") -> Endpoint:
    """tcp://HOST:PORT (HOST an address, [IPv6], name, interface or *; PORT 1-65535 or *) or ipc://PATH."""
    expected = f"{key} {endpoint!r}: expected tcp://HOST:PORT (PORT 1-65535) or ipc://PATH"
    transport, sep, rest = endpoint.partition("://")
    if not sep or not rest:
        raise UserError(expected)
    if transport == "ipc":
        return Endpoint("ipc", rest, "")
    if transport != "tcp":
        raise UserError(f"{expected}; transport {transport!r} is not supported")
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        raise UserError(expected)
    if port != "*" and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise UserError(f"{key} {endpoint!r}: port {port!r} is not 1-65535 (or * for any free port)")
    return Endpoint("tcp", host.strip("[]"), port)


def is_loopback(endpoint: Endpoint) -> bool:
    """Whether only this machine can connect: ipc, loopback addresses, localhost, the lo interface."""
    if endpoint.transport == "ipc":
        return True
    host = endpoint.host
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if host == "*":
        return False
    try:  # a name: loopback only if every address it resolves to is
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def _read_key_pair(path: str) -> tuple[bytes, bytes]:
    p = Path(path)
    key = "stream.curve_secret_key"
    if not p.is_file():
        raise UserError(f"{key} {p}: no such file (create a pair with cpc-keygen)")
    mode = p.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UserError(f"{key} {p}: readable by other users (mode {stat.S_IMODE(mode):04o}); chmod 600 {p}")
    try:
        public, secret = zmq.auth.load_certificate(str(p))
    except (OSError, ValueError) as e:
        raise UserError(f"{key} {p}: not a key pair file ({e})") from None
    if not secret:
        raise UserError(f"{key} {p}: holds no secret key (give the .key_secret file of cpc-keygen)")
    return public, secret


def _check_allowed_keys(folder: str) -> int:
    key = "stream.curve_allowed_keys"
    p = Path(folder)
    if not p.is_dir():
        raise UserError(f"{key} {p}: no such folder")
    files = sorted(p.glob("*.key"))
    if not files:
        raise UserError(f"{key} {p}: holds no client public key (*.key), so nobody could subscribe")
    for f in files:
        try:
            public, _ = zmq.auth.load_certificate(str(f))
        except (OSError, ValueError) as e:
            raise UserError(f"{key}: {f} is not a public key file ({e})") from None
        if not public:
            raise UserError(f"{key}: {f} holds no public key")
    return len(files)


@dataclass
class CurveKeys:
    public: bytes
    secret: bytes
    allowed_folder: str


def check_security(bind: str, secret_key: str, allowed_keys: str, insecure: bool) -> CurveKeys | None:
    """Refuse any configuration that would publish more openly than asked. Returns the CURVE keys, or None
    for a plain socket (loopback, or routable with insecure=True, which logs a warning)."""
    endpoint = parse_endpoint(bind)
    if bool(secret_key) != bool(allowed_keys):
        missing, given = (
            ("stream.curve_secret_key", "stream.curve_allowed_keys")
            if allowed_keys
            else ("stream.curve_allowed_keys", "stream.curve_secret_key")
        )
        raise UserError(
            f"{given} is set but {missing} is empty: CURVE needs both (see README, remote subscribers)"
        )
    if secret_key:
        public, secret = _read_key_pair(secret_key)
        n = _check_allowed_keys(allowed_keys)
        log.info("CURVE on: %d allowed client key(s) in %s", n, allowed_keys)
        return CurveKeys(public, secret, allowed_keys)
    if not is_loopback(endpoint):
        if not insecure:
            raise UserError(
                f"stream.bind {bind} is reachable from other machines and CURVE is off: set "
                "stream.curve_secret_key and stream.curve_allowed_keys, or pass --insecure to publish in clear"
            )
        log.warning(
            "publishing on %s in clear text, without CURVE: anyone who can reach it can subscribe", bind
        )
    return None


class LoggingAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP authenticator, logging each client that the allow-list rejects, with its address."""

    _address = "?"
    rejected = 0
    _seen: set

    def __init__(self, context: zmq.Context):
        super().__init__(context, log=logging.getLogger("cpc.security.zap"))
        self._seen = set()

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    def _send_zap_reply(self, request_id, status_code, status_text, user_id="anonymous") -> None:
        if status_code != b"200":
            self.rejected += 1
            reason = status_text.decode("utf-8", "replace")
            if (self._address, reason) not in self._seen:  # a rejected client retries: say it once
                self._seen.add((self._address, reason))
                hint = (
                    " (its public key is not in stream.curve_allowed_keys)" if reason == "Unknown key" else ""
                )
                log.info("rejected subscriber %s: %s%s", self._address, reason, hint)
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


def start_authenticator(ctx: zmq.Context, keys: CurveKeys) -> LoggingAuthenticator:
    auth = LoggingAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=keys.allowed_folder)
    return auth


def write_key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """Create folder/name.key (public, 0644) and folder/name.key_secret (0600, never readable by others,
    even for an instant). Refuses to overwrite an existing pair."""
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for p in (public, secret):
        if p.exists():
            raise UserError(f"{p} already exists; remove it first to make a new key pair")
    old = os.umask(0o077)
    try:
        zmq.auth.create_certificates(str(folder), name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return public, secret
