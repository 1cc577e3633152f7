"""The front's connection records (engine/front/connections.py): going away, unread bytes."""
from __future__ import annotations

import zmq

from engine.front.connections import Connections


class FakeFrame:
    def __init__(self, fd: int, kind: str = "DEALER") -> None:
        self.fd, self.kind = fd, kind

    def get(self, what):
        return self.fd if what == zmq.SRCFD else self.kind


class Tracker:
    def __init__(self) -> None:
        self.done = False


def test_disconnect_of_a_descriptor_retires_its_identities():
    c = Connections(queue_cap=100)
    c.seen(b"a", FakeFrame(7))
    c.seen(b"b", FakeFrame(8, "REQ"))
    assert c.get(b"b").socket_type == "REQ"
    assert c.on_monitor(zmq.EVENT_DISCONNECTED, 7) == [b"a"]
    assert c.get(b"a") is None and c.get(b"b") is not None and len(c) == 1
    assert c.on_monitor(zmq.EVENT_DISCONNECTED, 7) == []


def test_a_reused_descriptor_retires_the_old_identity_only():
    """The kernel gives a closed connection's number to the next one: its ACCEPTED (read before
    the new client's first message) retires the identity that used it before."""
    c = Connections(queue_cap=100)
    c.seen(b"old", FakeFrame(9))
    assert c.on_monitor(zmq.EVENT_ACCEPTED, 9) == [b"old"]
    c.seen(b"new", FakeFrame(9))
    assert c.get(b"new").fd == 9 and c.on_monitor(zmq.EVENT_HANDSHAKE_SUCCEEDED, 9) == []


def test_unread_bytes_count_until_released_and_block_over_the_cap():
    c = Connections(queue_cap=100)
    c.seen(b"a", FakeFrame(3))
    t1, t2 = Tracker(), Tracker()
    c.sent(b"a", t1, 80)
    c.sent(b"a", t2, 80)
    assert c.reap(1.0)[0].identity == b"a" and c.blocked(b"a") and c.get(b"a").over_since == 1.0
    assert c.reap(2.0) and c.get(b"a").over_since == 1.0          # over since the first time
    t1.done = True
    assert c.reap(3.0) == [] and not c.blocked(b"a") and c.get(b"a").queued == 80
    t2.done = True
    c.reap(4.0)
    assert c.get(b"a").queued == 0 and not c.get(b"a").sends
