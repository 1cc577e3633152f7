"""lipsync-engine: a real-time lip-sync video engine.

Packages by role, imports pointing down (docs/architecture.md has the module map)::

    cli          engine-ctl, benchmarks, render, demo avatars          (entry points)
    supervisor   spawns and watches every process; control, metrics
    front        ZeroMQ ROUTER front, requests, streams, scheduler    \
    worker       GPU worker: ONNX Runtime inference                    | the process roles
    compositor   paste-back and JPEG                                  /
    avatars      avatars on disk and in shared memory, import
    kernels      image and JPEG compute kernels     audio   mel features, speech
    runtime      config, process base, shared memory, ring, logs, metrics, keys

At the package's face: :mod:`engine.protocol` (the wire protocol, docs/protocol.md) and
:mod:`engine.client` (``from engine import Client, AsyncClient``).
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``from engine import Client`` (any name of ``engine.client.__all__``): the client is imported
    on first use, so that importing a subpackage (every engine process does) does not pull it in."""
    if name[:1].isupper():
        from engine import client
        if name in client.__all__:
            return getattr(client, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
