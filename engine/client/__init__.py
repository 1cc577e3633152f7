"""Python clients of the engine's front: blocking (:class:`Client`) and asyncio (:class:`AsyncClient`).

Both speak protocol version 1 through a DEALER socket, so many requests can be in flight on one
connection; replies are matched to requests by ``id``.

With ``keys`` (:class:`engine.runtime.keys.ClientKeys`) the socket is a CURVE client: encrypted, and
authenticated by the engine's key allow-list (``docs/protocol.md``, "Security"). A refused client
gets no reply at all, so each client watches its own handshakes on a socket monitor: when the
engine refuses its key it raises :class:`EngineRefused` at once, and a timeout says when the
handshake failed (a wrong server key, or CURVE on one side only).

The public names are here: ``from engine.client import Client`` (or ``from engine import Client``).
The blocking client is in :mod:`engine.client.sync`, the asyncio one in :mod:`engine.client.aio`,
what they share in :mod:`engine.client.common`.

May import: engine.protocol, engine.runtime.
"""
from engine.client.aio import AsyncClient, AsyncStream
from engine.client.common import (
                                  CompositeResult,
                                  Disconnected,
                                  EngineError,
                                  EngineRefused,
                                  EngineTimeout,
                                  StreamClosed,
                                  StreamFrame,
)
from engine.client.sync import Client, Stream

__all__ = ["Client", "Stream", "AsyncClient", "AsyncStream", "CompositeResult", "StreamFrame", "EngineError",
           "EngineTimeout", "Disconnected", "EngineRefused", "StreamClosed"]
