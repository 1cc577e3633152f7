"""The batch ring: one shared-memory segment per GPU worker, holding whole batches in flight.

The supervisor creates one ring per GPU worker before it spawns anything (it owns and unlinks it),
so a ring outlives the worker that reads it: when a worker is replaced, the batches that were
already inferred are still composited and sent. The front, the GPU worker and the compositors
attach by name and take numpy views; no tensor is ever pickled or copied between processes.

Memory layout (``G`` = :class:`RingGeometry`; every region starts on a 4096-byte boundary)::

    offset 0     +-------------------------------------------------------------+
                 | magic "LSERING1" | nslots | max_batch | visual/audio/output  |  header, 64 B
                 |                  |        |           | bytes per frame      |
    64           +-------------------------------------------------------------+
                 | slot 0 control: state u32 | seq u32 | batch u32 | owner u32 |  64 B per slot
                 | slot 1 control ...                                          |  (one cache line)
    data_offset  +=============================================================+
                 | slot 0  visual  B x visual_bytes  (request input; after the |
                 |                 network ran, reused for the JPEG frames,    |
                 |                 frame i's JPEG at i x visual_bytes)          |
                 |         audio   B x audio_bytes   (request input)            |
                 |         output  B x output_bytes  (network output)           |
                 +-------------------------------------------------------------+
                 | slot 1 ...                                                  |
                 +-------------------------------------------------------------+

Slot state machine (one writer per transition; the front is the only one that allocates and
frees, so no lock is needed; ``seq`` changes at every allocation so a message about an earlier
use of the slot is recognised as stale)::

    FREE --front: alloc, copy request tensors in--> FILLED --front: job to GPU worker--> QUEUED
    QUEUED --gpu: starts Run--> RUNNING --gpu: output written--> INFERRED
    INFERRED --front: jobs to compositors--> COMPOSITING --front: all JPEGs in--> SENDING
    INFERRED --front: "infer" method--> SENDING
    SENDING --front: JPEGs (or the output) copied into the reply--> FREE
    (replies are copied out, so a client that does not read never holds a slot)
    any --front: error reply, or the worker died before INFERRED--> FREE
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from engine.runtime.shm import Segment

MAGIC = b"LSERING1"
HEADER = struct.Struct("<8sIIQQQ")      # magic, nslots, max_batch, visual, audio, output bytes per frame
CONTROL_BYTES = 64
PAGE = 4096


class SlotState(IntEnum):
    FREE = 0
    FILLED = 1
    QUEUED = 2
    RUNNING = 3
    INFERRED = 4
    COMPOSITING = 5
    SENDING = 6


def _align(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


@dataclass(frozen=True)
class RingGeometry:
    nslots: int
    max_batch: int
    visual_bytes: int       # one frame of network image input (6 x F x F float32)
    audio_bytes: int        # one frame of network audio input
    output_bytes: int       # one frame of network output (3 x F x F float32)

    @classmethod
    def for_face(cls, nslots: int, max_batch: int, face: int, audio_floats: int = 32 * 16 * 16 * 4) -> RingGeometry:
        """Size a ring for networks up to ``face`` x ``face`` and ``audio_floats`` audio values per frame.

        The audio room defaults to four times SyncTalk_2D's [32,16,16] so that WeNet-style
        [128,16,32] features also fit.
        """
        return cls(nslots, max_batch, 6 * face * face * 4, audio_floats * 4, 3 * face * face * 4)

    @property
    def data_offset(self) -> int:
        return _align(64 + CONTROL_BYTES * self.nslots)

    @property
    def visual_region(self) -> int:
        return _align(self.max_batch * self.visual_bytes)

    @property
    def audio_region(self) -> int:
        return _align(self.max_batch * self.audio_bytes)

    @property
    def output_region(self) -> int:
        return _align(self.max_batch * self.output_bytes)

    @property
    def slot_bytes(self) -> int:
        return self.visual_region + self.audio_region + self.output_region

    @property
    def total_bytes(self) -> int:
        return self.data_offset + self.nslots * self.slot_bytes


class BatchRing:
    """Views into one GPU worker's ring. ``create`` in the supervisor, ``attach`` elsewhere."""

    def __init__(self, segment: Segment, geometry: RingGeometry) -> None:
        self.segment = segment
        self.geometry = geometry
        self.name = segment.name
        self._control = segment.array((geometry.nslots, CONTROL_BYTES // 4), np.uint32, 64)

    @classmethod
    def create(cls, name: str, geometry: RingGeometry) -> BatchRing:
        seg = Segment(name, geometry.total_bytes, create=True)
        g = geometry
        HEADER.pack_into(seg.buf, 0, MAGIC, g.nslots, g.max_batch, g.visual_bytes, g.audio_bytes, g.output_bytes)
        ring = cls(seg, geometry)
        ring._control[:] = 0
        return ring

    @classmethod
    def attach(cls, name: str) -> BatchRing:
        seg = Segment(name)
        if seg.size < HEADER.size or bytes(seg.buf[:8]) != MAGIC:
            seg.close()
            raise ValueError(f"shared memory {name!r} is not a batch ring")
        magic, nslots, max_batch, vb, ab, ob = HEADER.unpack_from(seg.buf, 0)
        if seg.size < RingGeometry(nslots, max_batch, vb, ab, ob).total_bytes:
            seg.close()
            raise ValueError(f"shared memory {name!r} is not a batch ring")
        return cls(seg, RingGeometry(nslots, max_batch, vb, ab, ob))

    def close(self) -> None:
        self._control = None  # type: ignore[assignment]
        self.segment.close()

    # -- control words ---------------------------------------------------------------------------
    def state(self, slot: int) -> SlotState:
        return SlotState(int(self._control[slot, 0]))

    def seq(self, slot: int) -> int:
        return int(self._control[slot, 1])

    def set_state(self, slot: int, state: SlotState, seq: int | None = None, batch: int | None = None) -> None:
        c = self._control[slot]
        if seq is not None:
            c[1] = seq & 0xFFFFFFFF
        if batch is not None:
            c[2] = batch
        c[0] = int(state)

    def check(self, slot: int, seq: int, state: SlotState) -> bool:
        """True when the slot is still the use ``seq`` refers to and is in ``state``."""
        c = self._control[slot]
        return int(c[1]) == (seq & 0xFFFFFFFF) and int(c[0]) == int(state)

    # -- data views ------------------------------------------------------------------------------
    def _base(self, slot: int) -> int:
        if not 0 <= slot < self.geometry.nslots:
            raise IndexError(f"slot {slot} outside 0..{self.geometry.nslots - 1}")
        return self.geometry.data_offset + slot * self.geometry.slot_bytes

    def _view(self, offset: int, region: int, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        need = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if need > region:
            raise ValueError(f"{need} bytes do not fit the ring's {region}-byte region")
        return self.segment.array(shape, dtype, offset)

    def visual(self, slot: int, shape: tuple[int, ...]) -> np.ndarray:
        return self._view(self._base(slot), self.geometry.visual_region, shape, np.float32)

    def audio(self, slot: int, shape: tuple[int, ...]) -> np.ndarray:
        g = self.geometry
        return self._view(self._base(slot) + g.visual_region, g.audio_region, shape, np.float32)

    def output(self, slot: int, shape: tuple[int, ...]) -> np.ndarray:
        g = self.geometry
        return self._view(self._base(slot) + g.visual_region + g.audio_region, g.output_region, shape, np.float32)

    def jpeg_area(self, slot: int, frame: int) -> memoryview:
        """Room for frame ``frame``'s JPEG: the frame's share of the (consumed) visual region."""
        g = self.geometry
        if not 0 <= frame < g.max_batch:
            raise IndexError(f"frame {frame} outside 0..{g.max_batch - 1}")
        start = self._base(slot) + frame * g.visual_bytes
        return self.segment.buf[start:start + g.visual_bytes]
