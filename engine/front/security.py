"""Transport security of the front: CURVE encryption, the client key allow-list (ZAP), and the
rule that keeps a plain-text front off the network.

**CURVE.** With ``server.curve_secret_key`` set, the front's ROUTER is a CURVE server: every
connection is encrypted and the client proves it holds the secret key of the public key it
presents. Which public keys may connect is decided by ZAP (ZeroMQ RFC 27): libzmq asks the handler
bound at ``inproc://zeromq.zap.01`` in the socket's context, once per connection, during the
handshake. The handler here is a REP socket polled by the front's own loop (:class:`ZapHandler`),
not pyzmq's ``ThreadAuthenticator``: a decision is one dictionary lookup, so it never holds the loop
for long, the front keeps its one-thread-owns-every-socket rule, and refusals are counted and logged
where the rest of the front's state is. The allow-list is the folder ``server.curve_clients`` of
public certificates (``NAME.key``), re-read when the folder changes (a file added, removed or
renamed), checked once a second; a connection that was accepted stays accepted. An accepted
connection's messages carry the ZAP ``User-Id``, the certificate's NAME, which the front uses as
the client's key for quotas (:mod:`engine.front.quotas`) and logs.

**Refusals** never reach the front's request handling: an unknown key is denied by ZAP (the client
sees ``HANDSHAKE_FAILED_AUTH`` 400 and libzmq does not reconnect it); a plain-text client fails the
handshake on the mechanism, and a client with the wrong server key fails it on the cryptography
(both reconnect and fail again, as libzmq does). The front learns the last two from its socket
monitor. Each is counted (``lse_connections_refused_total{reason}``) and logged, at most
``LOG_BURST`` lines per reason per ``LOG_WINDOW_S``, then one summary line: a client cannot fill
the log by reconnecting.

**Secure by default.** :func:`preflight` runs before the engine starts: a front bound to anything
but a loopback address or ``ipc://`` needs CURVE, or ``server.allow_plaintext = true`` said
explicitly.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import zmq
from zmq.utils import z85

from engine.runtime import keys
from engine.runtime.config import ConfigError, EngineConfig

log = logging.getLogger("engine.security")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"lse"
LOG_WINDOW_S = 10.0
LOG_BURST = 5

# ZMQ_PROTOCOL_ERROR_ZMTP_* values the monitor reports with HANDSHAKE_FAILED_PROTOCOL
PROTOCOL_CRYPTOGRAPHIC = 0x11000001
PROTOCOL_MECHANISM_MISMATCH = 0x11000002

REASONS = ("unknown_key", "mechanism_mismatch", "bad_handshake", "handshake_failed")
MONITOR_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


class SecurityError(ConfigError):
    """The engine must not start: an unprotected network front, or unusable key files."""


# -- secure by default ---------------------------------------------------------------------------
def is_local(endpoint: str) -> bool:
    """Whether a bind endpoint can only be reached from this host: ``ipc://``, ``inproc://``, or
    ``tcp://`` on a loopback address (an address, ``localhost``/a host name that resolves only to
    loopback addresses, or the interface ``lo``)."""
    transport, _, rest = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp":
        return False
    host = rest.rpartition(":")[0].strip("[]")
    if host in ("", "*"):
        return False
    if host == "lo":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def preflight(cfg: EngineConfig) -> list[str]:
    """Check, before anything starts, that the front may be served as configured; returns warnings.

    Raises SecurityError naming the setting: a network front without CURVE (unless
    ``server.allow_plaintext``), or a CURVE key file or folder that cannot be used."""
    sc = cfg.server
    warnings: list[str] = []
    if not cfg.curve:
        if not is_local(sc.front):
            if not sc.allow_plaintext:
                raise SecurityError(
                    f"server.front = {sc.front!r} is reachable from other hosts and CURVE is off: anyone there could "
                    "use the engine and read its frames. Set server.curve_secret_key and server.curve_clients "
                    "(engine-ctl keygen makes the keys), bind to 127.0.0.1 or ipc://, or set "
                    "server.allow_plaintext = true to serve plain text on the network explicitly")
            warnings.append(f"server.front {sc.front} serves plain text to the network (server.allow_plaintext)")
        return warnings
    try:
        keys.load(cfg.path(sc.curve_secret_key), secret=True)
    except keys.CertificateError as e:
        raise SecurityError(f"server.curve_secret_key: {e}") from None
    mode = cfg.path(sc.curve_secret_key).stat().st_mode
    if mode & 0o077:
        warnings.append(f"server.curve_secret_key {cfg.path(sc.curve_secret_key)} is readable by other users "
                        f"(mode {mode & 0o777:o}); chmod 600 it")
    try:
        allowed = keys.load_allowlist(cfg.path(sc.curve_clients))
    except keys.CertificateError as e:
        raise SecurityError(f"server.curve_clients: {e}") from None
    if not allowed:
        warnings.append(f"server.curve_clients {cfg.path(sc.curve_clients)} holds no *.key file: every client "
                        "will be refused until one is added")
    for p in keys.secret_files(cfg.path(sc.curve_clients)):
        warnings.append(f"{p} is a secret certificate in server.curve_clients; that folder needs public "
                        "certificates (NAME.key) only: move it away")
    unknown = sorted(set(cfg.quotas.clients) - set(allowed.values()))
    if unknown:
        warnings.append(f"quotas.clients names {', '.join(unknown)}, not (yet) in server.curve_clients")
    return warnings


# -- logging refusals ------------------------------------------------------------------------------
@dataclass
class RateLimitedLog:
    """At most ``burst`` lines per kind per ``window`` seconds; what was held back is summed up in
    one line when the window ends (on the next call of :meth:`emit` or :meth:`flush`)."""
    logger: logging.Logger
    window: float = LOG_WINDOW_S
    burst: int = LOG_BURST
    clock: Callable[[], float] = time.monotonic
    _start: dict[str, float] = field(default_factory=dict)
    _count: dict[str, int] = field(default_factory=dict)

    def emit(self, kind: str, msg: str, *args: object) -> None:
        now = self.clock()
        self._roll(kind, now)
        self._start.setdefault(kind, now)
        n = self._count[kind] = self._count.get(kind, 0) + 1
        if n <= self.burst:
            self.logger.warning(msg, *args)

    def flush(self) -> None:
        now = self.clock()
        for kind in list(self._start):
            self._roll(kind, now)

    def _roll(self, kind: str, now: float) -> None:
        start = self._start.get(kind)
        if start is None or now - start < self.window:
            return
        held = self._count.get(kind, 0) - self.burst
        if held > 0:
            self.logger.warning("... and %d more like this (%s) in the last %.0f s", held, kind, now - start)
        del self._start[kind]
        self._count[kind] = 0


# -- ZAP -----------------------------------------------------------------------------------------
class AllowList:
    """The authorised client keys, re-read from their folder when the folder changes."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.keys: dict[bytes, str] = {}
        self.stamp: tuple[int, int] | None = None
        self.reload()

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.folder.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_ino

    def reload(self) -> bool:
        """Read the folder again if it changed; a bad file keeps the previous list (logged)."""
        stamp = self._stamp()
        if stamp == self.stamp:
            return False
        self.stamp = stamp
        try:
            new = keys.load_allowlist(self.folder)
        except keys.CertificateError as e:
            log.error("client keys not reloaded, the previous %d stay authorised: %s", len(self.keys), e)
            return False
        if new != self.keys:
            log.info("%d client key(s) authorised from %s: %s", len(new), self.folder,
                     ", ".join(sorted(set(new.values()))) or "none")
        self.keys = new
        return True

    def name(self, public: bytes) -> str | None:
        return self.keys.get(public)


def zap_reply(request: list[bytes], allow: AllowList) -> tuple[list[bytes], str | None]:
    """The ZAP reply for one request (RFC 27: version, request id, domain, address, identity,
    mechanism, credentials...), and the client's name when accepted."""
    version, req_id = request[0], request[1] if len(request) > 1 else b""
    if version != b"1.0" or len(request) < 6:
        return [b"1.0", req_id, b"500", b"malformed ZAP request", b"", b""], None
    mechanism = request[5]
    if mechanism != b"CURVE" or len(request) < 7 or len(request[6]) != 32:
        return [b"1.0", req_id, b"400", b"CURVE required", b"", b""], None
    name = allow.name(request[6])
    if name is None:
        return [b"1.0", req_id, b"400", b"unknown client key", b"", b""], None
    return [b"1.0", req_id, b"200", b"OK", name.encode(), b""], name


class FrontSecurity:
    """The front's side: configures its client socket, answers ZAP, counts and logs refusals.
    Created in the front process (``init_process``); every method runs on the front's thread."""

    def __init__(self, cfg: EngineConfig, ctx: zmq.Context, on_refused: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.on = cfg.curve
        self.on_refused = on_refused or (lambda reason: None)
        self.refusals = RateLimitedLog(log)
        self.zap: zmq.Socket | None = None
        if not self.on:
            return
        public, secret = keys.load(cfg.path(cfg.server.curve_secret_key), secret=True)
        self.secret = secret
        self.allow = AllowList(cfg.path(cfg.server.curve_clients))
        self.zap = ctx.socket(zmq.REP)
        self.zap.setsockopt(zmq.LINGER, 0)
        self.zap.bind(ZAP_ENDPOINT)             # before the client socket binds: no connection skips ZAP
        log.info("CURVE on: server public key %s, %d client key(s) from %s", public.decode(),
                 len(self.allow.keys), self.allow.folder)

    def configure(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server that asks ZAP (before it binds)."""
        if not self.on:
            return
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)

    def on_zap(self) -> None:
        """Answer every waiting ZAP request."""
        assert self.zap is not None
        for _ in range(256):
            try:
                request = self.zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            reply, name = zap_reply(request, self.allow)
            self.zap.send_multipart(reply)
            if name is None:
                address = request[3].decode(errors="replace") if len(request) > 3 else "?"
                key = z85.encode(request[6]).decode() if len(request) > 6 and len(request[6]) == 32 else "-"
                self._refused("unknown_key", "refused client %s: key %s is not in server.curve_clients (%s)",
                              address, key, self.allow.folder)

    def on_monitor(self, event: int, value: int) -> None:
        """A monitor event of the client socket: handshake failures are refusals too."""
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            if value == PROTOCOL_MECHANISM_MISMATCH:
                self._refused("mechanism_mismatch", "refused a connection: %s", "the client does not use CURVE"
                              if self.on else "the client uses CURVE, this engine does not (server.curve_secret_key)")
            elif value == PROTOCOL_CRYPTOGRAPHIC:
                self._refused("bad_handshake", "refused a connection: its CURVE handshake does not decrypt "
                              "(the client uses another server public key%s)", "" if self.on else ", or none")
            else:
                self._refused("handshake_failed", "refused a connection: ZMTP protocol error 0x%x", value)
        elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            # also a plain TCP connect that closes before the handshake (a port probe): counted, not logged
            self.on_refused("handshake_failed")

    def tick(self) -> None:
        """Once a second: flush held-back log lines, re-read the key folder if it changed."""
        self.refusals.flush()
        if self.on:
            self.allow.reload()

    def _refused(self, reason: str, msg: str, *args: object) -> None:
        self.on_refused(reason)
        self.refusals.emit(reason, msg, *args)

    def close(self) -> None:
        if self.zap is not None:
            self.zap.close(0)


def client_keys(cfg: EngineConfig, client_cert: str | None = None, server_cert: str | None = None
                ) -> keys.ClientKeys | None:
    """The keys engine-ctl connects with: ``client_cert``/``server_cert`` (its options), else
    ``client.secret_key``/``client.server_key``; the server's public key defaults to the one in
    ``server.curve_secret_key`` (engine-ctl on the engine's host). None: plain text."""
    secret = client_cert or (str(cfg.path(cfg.client.secret_key)) if cfg.client.secret_key else "")
    server = server_cert or (str(cfg.path(cfg.client.server_key)) if cfg.client.server_key else "")
    if not server and cfg.curve:
        server = str(cfg.path(cfg.server.curve_secret_key))
    if not secret:
        if server and not cfg.curve:
            raise SecurityError("a server key without a client key: give this client's secret certificate "
                                "(NAME.key_secret) with --client-key FILE or client.secret_key")
        if cfg.curve:
            raise SecurityError("the engine uses CURVE (server.curve_secret_key): give this client's secret "
                                "certificate with --client-key FILE or client.secret_key (engine-ctl keygen NAME "
                                "makes one; its NAME.key goes into server.curve_clients)")
        return None
    if not server:
        raise SecurityError("a client key needs the server's public key: --server-key FILE or client.server_key")
    try:
        return keys.ClientKeys.from_files(server, secret)
    except keys.CertificateError as e:
        raise SecurityError(str(e)) from None
