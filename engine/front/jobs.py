"""The front's bookkeeping records: a batch in flight, and its view of each worker process."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine import protocol as P
from engine.avatars.store import AvatarEntry
from engine.front.streams import StreamBatch
from engine.runtime.ring import BatchRing


@dataclass(eq=False)
class Job:
    req: P.Request | None                   # None for a batch of stream frames
    model: str
    batch: int
    start: int
    wrap: str | None
    t_recv: float
    entry: AvatarEntry | None = None
    nbytes: int = 0                         # request bytes held while it is queued
    t_queued: float = 0.0                   # when the scheduler queued it (its avatar in memory)
    indices: np.ndarray | None = None
    gpu: GpuHandle | None = None
    slot: int = -1
    seq: int = 0
    infer_ms: float = 0.0
    prep_ms: float = 0.0
    t_start: float = 0.0
    t_comp: float = 0.0
    chunks_left: int = 0
    sizes: list[int] = field(default_factory=list)
    inline: dict[int, Any] = field(default_factory=dict)
    error: tuple[str, str] | None = None
    inferred: bool = False                  # the GPU worker has run it
    done: bool = False                      # a reply (ok or error) has been sent
    streams: list[StreamBatch] | None = None
    idle: list[bool] = field(default_factory=list)     # per frame: silence, no network output needed

    @property
    def preferred_gpu(self) -> int | None:
        return self.entry.model.preferred_gpu if self.entry is not None else None


@dataclass(eq=False)
class GpuHandle:
    idx: int
    device: int | None
    ring: BatchRing
    state: str = "starting"                 # starting, ready, restarting
    provider: str = ""
    restarts: int = 0
    free: list[int] = field(default_factory=list)
    jobs: dict[int, Job] = field(default_factory=dict)
    models: set[str] = field(default_factory=set)
    batches: int = 0
    frames: int = 0
    loading: set[str] = field(default_factory=set)      # networks its loader thread is preparing
    stats: dict[str, Any] = field(default_factory=dict)  # the worker's own report (health), passed through

    @property
    def identity(self) -> bytes:
        return f"g{self.idx}".encode()


@dataclass(eq=False)
class CompHandle:
    idx: int
    state: str = "starting"
    restarts: int = 0
    outstanding: dict[tuple, tuple[Job, dict[str, Any]]] = field(default_factory=dict)
    frames: int = 0

    @property
    def identity(self) -> bytes:
        return f"c{self.idx}".encode()

    @property
    def load(self) -> int:
        return sum(m["count"] for _, m in self.outstanding.values())
