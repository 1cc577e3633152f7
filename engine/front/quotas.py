"""Per-key quotas: what one client key may hold and ask for, over all of its connections together.

With CURVE on, every connection belongs to a client key: the name of its certificate in
``server.curve_clients``, which the ZAP handler returns as the connection's ``User-Id``
(:mod:`engine.front.security`). The per-connection bounds (``server.max_requests_per_client``,
``streams.max_per_client``, ``server.client_queue_bytes``) stop one socket; a client could open
many. These stop the key: ``[quotas]`` gives every key's limits, ``[quotas.clients.NAME]`` what
differs for NAME.

* ``requests``: requests of the key waiting for their reply (the sum of its connections' counts).
* ``streams``: streams open by the key.
* ``frames_per_second``: frames the key asks for (a ``composite``/``infer`` request's
  ``batch_size``, a ``stream_audio`` push's samples / 640), counted when the request arrives,
  through a token bucket that holds one second of frames: it refills at the rate and holds at most
  that many, so a key may ask for a second's worth at once and then at the rate. 0 = no limit.

A request over a quota gets the error ``quota_exceeded`` (``docs/protocol.md``), is counted
(``lse_quota_exceeded_total``) and logged, rate-limited per key; the key's other requests, and
other keys, are not affected. Without CURVE there are no keys and no quotas.

:class:`Quotas` is the policy, with no sockets and no clock of its own (tested with simulated
time); :class:`FrontQuotas` applies it to the front's connections.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

from engine import protocol as P
from engine.front.connections import Connections
from engine.front.security import RateLimitedLog
from engine.protocol import ProtocolError
from engine.runtime.config import Quota, QuotasConfig

log = logging.getLogger("engine.quotas")

SAMPLES_PER_FRAME = 640                  # 16 kHz / 25 frames per second


class QuotaExceeded(Exception):
    def __init__(self, quota: str, message: str) -> None:
        super().__init__(message)
        self.quota = quota                 # "requests", "streams" or "frames_per_second"
        self.message = message


@dataclass
class _Bucket:
    tokens: float
    at: float


class Quotas:
    """The limits of each key, and each key's frame bucket."""

    def __init__(self, cfg: QuotasConfig) -> None:
        self.cfg = cfg
        self.buckets: dict[str, _Bucket] = {}

    def quota(self, key: str) -> Quota:
        return self.cfg.for_client(key)

    def check_requests(self, key: str, waiting: int) -> None:
        """``waiting``: the key's requests already waiting for a reply."""
        limit = self.quota(key).requests
        if waiting >= limit:
            raise QuotaExceeded("requests", f"client key {key!r} has {waiting} requests waiting for a reply, its "
                                f"quota (quotas.requests = {limit}); wait for replies first")

    def check_streams(self, key: str, open_streams: int) -> None:
        limit = self.quota(key).streams
        if open_streams >= limit:
            raise QuotaExceeded("streams", f"client key {key!r} has {open_streams} streams open, its quota "
                                f"(quotas.streams = {limit}); close one first")

    def take_frames(self, key: str, frames: float, now: float) -> None:
        """Take ``frames`` from the key's bucket, or raise (taking nothing)."""
        rate = self.quota(key).frames_per_second
        if rate <= 0 or frames <= 0:
            return
        b = self.buckets.get(key)
        if b is None:
            b = self.buckets[key] = _Bucket(rate, now)
        b.tokens = min(rate, b.tokens + (now - b.at) * rate)
        b.at = now
        if frames > rate:
            raise QuotaExceeded("frames_per_second", f"{frames:g} frames in one request is more than client key "
                                f"{key!r} may ask for in a second (quotas.frames_per_second = {rate:g}); "
                                "send smaller batches or pushes")
        if frames > b.tokens:
            wait_ms = math.ceil(1000 * (frames - b.tokens) / rate)
            raise QuotaExceeded("frames_per_second", f"client key {key!r} asks for more than its "
                                f"quotas.frames_per_second = {rate:g} frames/s; this request fits in {wait_ms} ms")
        b.tokens -= frames

    def give_back(self, key: str, frames: float) -> None:
        """Return frames taken for a request the engine then did not take (back-pressure)."""
        b = self.buckets.get(key)
        rate = self.quota(key).frames_per_second
        if b is not None and frames > 0 and rate > 0:
            b.tokens = min(rate, b.tokens + frames)


def request_frames(req: P.Request) -> float:
    """Frames a request asks for: a batch's ``batch_size``, a push's samples / 640; else 0."""
    if req.method in ("composite", "infer"):
        b = req.params.get("batch_size")
        return float(b) if isinstance(b, int) and not isinstance(b, bool) and b > 0 else 0.0
    if req.method == "stream_audio":
        buf = req.buffers.get("pcm")
        return math.prod(buf.shape) / SAMPLES_PER_FRAME if buf is not None else 0.0
    return 0.0


class FrontQuotas:
    """The front's side: checks each request of a keyed connection against its key's quotas."""

    def __init__(self, cfg: QuotasConfig, conns: Connections, enabled: bool,
                 on_exceeded: Callable[[str, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = Quotas(cfg)
        self.conns = conns
        self.enabled = enabled
        self.on_exceeded = on_exceeded or (lambda key, quota: None)
        self.clock = clock
        self.log = RateLimitedLog(log)

    def admit(self, conn: Any, req: P.Request) -> None:
        """Before a request is handled (raises ProtocolError ``quota_exceeded``)."""
        key = getattr(conn, "key", "")
        if not self.enabled or not key:
            return
        try:
            waiting = sum(c.requests for c in self.conns.of_key(key))
            self.policy.check_requests(key, waiting)
            self.policy.take_frames(key, request_frames(req), self.clock())
        except QuotaExceeded as e:
            self._exceeded(key, e, req.id)

    def refund(self, conn: Any, req: P.Request) -> None:
        """A request answered ``busy`` for back-pressure (a push beyond the stream's audio bound)
        gives its frames back, so a client that waits and retries is not pushed over its quota."""
        key = getattr(conn, "key", "")
        if self.enabled and key:
            self.policy.give_back(key, request_frames(req))

    def check_streams(self, identity: bytes, req_id: Any = None) -> None:
        """Before a stream opens (and again once its avatar is loaded)."""
        conn = self.conns.get(identity)
        key = getattr(conn, "key", "")
        if not self.enabled or not key:
            return
        try:
            self.policy.check_streams(key, sum(len(c.streams) for c in self.conns.of_key(key)))
        except QuotaExceeded as e:
            self._exceeded(key, e, req_id)

    def _exceeded(self, key: str, e: QuotaExceeded, req_id: Any) -> None:
        self.on_exceeded(key, e.quota)
        self.log.emit(f"{key}/{e.quota}", "quota exceeded: %s", e.message)
        raise ProtocolError(P.QUOTA_EXCEEDED, e.message, req_id) from None
