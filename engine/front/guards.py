"""The front's guards: CURVE and ZAP (:mod:`engine.front.security`), per-key quotas
(:mod:`engine.front.quotas`), metrics (:mod:`engine.runtime.metrics`) and request-scoped logs
(:mod:`engine.runtime.logs`). The front calls them at a few fixed points (start-up, its poll loop,
each request, each reply, each finished job); they run on its thread and never block it."""
from __future__ import annotations

import logging
import time

import zmq

from engine import protocol as P
from engine.avatars.store import AvatarStore
from engine.front.connections import Connection, Connections
from engine.front.quotas import FrontQuotas
from engine.front.security import FrontSecurity
from engine.runtime.config import EngineConfig
from engine.runtime.logs import set_request
from engine.runtime.metrics import FrontMetrics

log = logging.getLogger("engine.front")


class Guards:
    """Security, quotas and metrics of the front. Built in ``init_process``, after the context and
    the connections, before the client socket binds (CURVE is configured on it here)."""

    def __init__(self, cfg: EngineConfig, ctx: zmq.Context, client: zmq.Socket, conns: Connections,
                 store: AvatarStore) -> None:
        self.conns = conns
        self.metrics = FrontMetrics(bool(cfg.server.metrics))
        self.security = FrontSecurity(cfg, ctx, self.metrics.connection_refused)
        self.security.configure(client)
        self.quotas = FrontQuotas(cfg.quotas, conns, cfg.curve, self.metrics.quota_exceeded)
        store.on_loaded = self.metrics.avatar_loaded

    def register(self, poller: zmq.Poller) -> None:
        if self.security.zap is not None:
            poller.register(self.security.zap, zmq.POLLIN)

    def poll(self, events: dict) -> None:
        if self.security.zap is not None and self.security.zap in events:
            self.security.on_zap()

    def client_label(self, identity: bytes) -> str:
        """How logs name a client: its key's name with CURVE, else its connection's routing identity."""
        conn = self.conns.get(identity)
        return conn.key if conn is not None and conn.key else identity.hex()

    def replied(self, req: P.Request | None, header: bytes, identity: bytes | None = None) -> None:
        """Every reply, before it is sent: counted; at DEBUG, one access-log line naming the request
        (or, for a request that could not be read, its client: ``identity``)."""
        self.metrics.replied(req, header)
        if not log.isEnabledFor(logging.DEBUG):
            return
        if req is not None:
            log.debug("reply %s%s", P.reply_code(header),
                      f" after {1000 * (time.monotonic() - req.t_recv):.1f} ms" if req.t_recv else "",
                      extra={"request_id": req.id, "client": self.client_label(req.envelope[0]),
                             "method": req.method})
        elif identity is not None:
            log.debug("reply %s to a request that could not be read", P.reply_code(header),
                      extra={"request_id": None, "client": self.client_label(identity), "method": None})

    def admit(self, conn: Connection, req: P.Request) -> None:
        """A parsed request: name it in the logs, then check its key's quotas (raises ProtocolError)."""
        set_request(req.id, conn.key or conn.identity.hex(), req.method)
        req.t_recv = time.monotonic()            # for the access log
        self.quotas.admit(conn, req)
