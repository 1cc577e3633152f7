"""The front's guards: CURVE and ZAP (:mod:`engine.front.security`), per-key quotas (:mod:`engine.front.quotas`),
metrics (:mod:`engine.runtime.metrics`) and request-scoped logs (:mod:`engine.runtime.logs`), mixed into
:class:`engine.front.front.Front`. The front calls these at a few fixed points (start-up, its poll loop,
each request, each reply, each finished job); they run on its thread and never block it."""
from __future__ import annotations

import logging
import time

import zmq

from engine import protocol as P
from engine.runtime.logs import set_request
from engine.runtime.metrics import FrontMetrics
from engine.front.quotas import FrontQuotas
from engine.front.security import FrontSecurity

log = logging.getLogger("engine.front")


class Guards:
    """Security, quotas and metrics of the front (a mixin: it uses the front's context and connections)."""

    def _init_guards(self) -> None:
        """In ``init_process``, after the context and ``self.conns``, before the client socket exists."""
        cfg = self.cfg
        self.metrics = FrontMetrics(bool(cfg.server.metrics))
        self.security = FrontSecurity(cfg, self.ctx, self.metrics.connection_refused)
        self.security.configure(self.client)
        self.quotas = FrontQuotas(cfg.quotas, self.conns, cfg.curve, self.metrics.quota_exceeded)
        self.store.on_loaded = self.metrics.avatar_loaded

    def _register_guards(self, poller: zmq.Poller) -> None:
        if self.security.zap is not None:
            poller.register(self.security.zap, zmq.POLLIN)

    def _poll_guards(self, events: dict) -> None:
        if self.security.zap is not None and self.security.zap in events:
            self.security.on_zap()

    def client_label(self, identity: bytes) -> str:
        """How logs name a client: its key's name with CURVE, else its connection's routing identity."""
        conn = self.conns.get(identity)
        return conn.key if conn is not None and conn.key else identity.hex()

    def _replied(self, req: P.Request | None, header: bytes) -> None:
        """Every reply, before it is sent: counted; at DEBUG, one access-log line naming the request."""
        self.metrics.replied(req, header)
        if req is not None and log.isEnabledFor(logging.DEBUG):
            log.debug("reply %s%s", P.reply_code(header),
                      f" after {1000 * (time.monotonic() - req.t_recv):.1f} ms" if req.t_recv else "",
                      extra={"request_id": req.id, "client": self.client_label(req.envelope[0]),
                             "method": req.method})

    def _admit(self, conn, req: P.Request) -> None:
        """A parsed request: name it in the logs, then check its key's quotas (raises ProtocolError)."""
        set_request(req.id, conn.key or conn.identity.hex(), req.method)
        req.t_recv = time.monotonic()            # for the access log
        self.quotas.admit(conn, req)
