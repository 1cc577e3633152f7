"""The front's view of each client connection: whether it is still there, what it holds, what it
has not read yet. No sockets here; the front feeds it messages, monitor events and send trackers.

**Going away.** ZeroMQ's ROUTER does not tell the application that a peer left
(``ZMQ_ROUTER_NOTIFY`` is draft API, refused by the libzmq in pyzmq's wheels). The front learns it
from the socket monitor instead: every message says on which connection (file descriptor,
``ZMQ_SRCFD``) it arrived, and the monitor reports ``DISCONNECTED`` with that descriptor as soon as
the TCP or ipc connection closes; TCP keepalive (``server.client_keepalive_s``) turns a connection
to a vanished host into a closed one. An ``ACCEPTED`` event for a descriptor also retires any
identity still recorded on it (the kernel reused the number, so that connection is gone). This relies on the order of events: libzmq's one
I/O thread reports a connection's ``DISCONNECTED`` before it closes the descriptor, and a new
connection's ``ACCEPTED`` before its first message; the front reads the monitor before it records
a new identity, so a descriptor's events are always applied in the order they happened.

**Not reading.** ZeroMQ keeps what a peer has not taken yet, with no limit in bytes. Every sizeable
message to a client is sent with a tracker; its bytes count against the connection until ZeroMQ
has handed them to the kernel. The front stops sending stream frames to a connection over
``server.client_queue_bytes``, refuses its new batch requests with ``busy``, and closes its streams
(``slow_client``) when it stays over for ``server.slow_client_timeout_s``.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import zmq

TRACK_BYTES = 4096                  # messages smaller than this are not tracked (counted as 0)


@dataclass(eq=False)
class Connection:
    identity: bytes
    fd: int = -1
    socket_type: str = ""              # the peer's ZMTP socket type: "DEALER", "REQ", ...
    key: str = ""                      # its CURVE client key's name (ZAP User-Id); "" without CURVE
    queued: int = 0                    # bytes sent to it that ZeroMQ has not handed to the kernel yet
    sends: deque = field(default_factory=deque)     # (tracker, nbytes), oldest first
    requests: int = 0                  # its requests not answered yet
    streams: set[str] = field(default_factory=set)
    over_since: float | None = None    # when ``queued`` went over the cap


class Connections:
    def __init__(self, queue_cap: int) -> None:
        self.queue_cap = queue_cap
        self.by_id: dict[bytes, Connection] = {}
        self.by_fd: dict[int, set[bytes]] = {}
        self.by_key: dict[str, set[bytes]] = {}

    def __len__(self) -> int:
        return len(self.by_id)

    def get(self, identity: bytes) -> Connection | None:
        return self.by_id.get(identity)

    def seen(self, identity: bytes, frame: Any) -> Connection:
        """A message arrived from ``identity`` (``frame``: any of its ``zmq.Frame`` parts)."""
        conn = self.by_id.get(identity)
        if conn is None:
            conn = self.by_id[identity] = Connection(identity)
            try:
                conn.fd = int(frame.get(zmq.SRCFD))
                conn.socket_type = str(frame.get("Socket-Type"))
            except (zmq.ZMQError, AttributeError, TypeError, ValueError):
                pass
            if conn.fd >= 0:
                self.by_fd.setdefault(conn.fd, set()).add(identity)
            try:
                conn.key = str(frame.get("User-Id"))   # set by the ZAP handler (engine.security)
            except (zmq.ZMQError, AttributeError, TypeError, ValueError):
                pass
            if conn.key:
                self.by_key.setdefault(conn.key, set()).add(identity)
        return conn

    def of_key(self, key: str) -> list[Connection]:
        """Every connection of one client key (quotas are per key)."""
        return [self.by_id[i] for i in self.by_key.get(key, ())]

    def on_monitor(self, event: int, value: int) -> list[bytes]:
        """A monitor event; returns the identities whose connection is gone."""
        if event in (zmq.EVENT_DISCONNECTED, zmq.EVENT_ACCEPTED, zmq.EVENT_CLOSED):
            return [i for i in list(self.by_fd.pop(value, ())) if self.forget(i)]
        return []

    def forget(self, identity: bytes) -> bool:
        conn = self.by_id.pop(identity, None)
        if conn is None:
            return False
        ids = self.by_fd.get(conn.fd)
        if ids is not None:
            ids.discard(identity)
            if not ids:
                del self.by_fd[conn.fd]
        ids = self.by_key.get(conn.key)
        if ids is not None:
            ids.discard(identity)
            if not ids:
                del self.by_key[conn.key]
        return True

    # -- outgoing bytes --------------------------------------------------------------------------
    def sent(self, identity: bytes, tracker: zmq.MessageTracker | None, nbytes: int) -> None:
        conn = self.by_id.get(identity)
        if conn is not None and tracker is not None:
            conn.sends.append((tracker, nbytes))
            conn.queued += nbytes

    def reap(self, now: float) -> list[Connection]:
        """Account for what ZeroMQ has handed to the kernel; returns the connections over the cap."""
        over = []
        for conn in self.by_id.values():
            while conn.sends and conn.sends[0][0].done:
                conn.queued -= conn.sends.popleft()[1]
            if conn.queued > self.queue_cap:
                if conn.over_since is None:
                    conn.over_since = now
                over.append(conn)
            else:
                conn.over_since = None
        return over

    def blocked(self, identity: bytes) -> bool:
        conn = self.by_id.get(identity)
        return conn is not None and conn.queued > self.queue_cap
