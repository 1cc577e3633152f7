"""What the front's parts share: each is built by :class:`engine.front.front.Front` in its
``init_process``, works on the front's thread, and reaches the front's state (sockets, store,
scheduler, connections, workers) through it: composition, not a mixin."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.front.front import Front


class FrontPart:
    def __init__(self, front: Front) -> None:
        self.front = front
        self.cfg = front.cfg

    def client_label(self, identity: bytes) -> str:
        """How logs name a client (:func:`engine.runtime.logs.request_scope` asks for it)."""
        return self.front.guards.client_label(identity)
