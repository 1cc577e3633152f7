"""Owned POSIX shared-memory segments.

``multiprocessing.shared_memory.SharedMemory`` registers every segment it opens with the
resource tracker, which unlinks it when *any* process that attached exits (before Python 3.13
there is no ``track=False``). The engine owns its segments explicitly instead: the process that
creates a segment is the only one that unlinks it, and the supervisor removes segments left
behind by a crashed run before it starts (:func:`remove_stale`). Every name starts with the
configured instance prefix, so a cleanup never touches another program's memory.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import numpy as np

SHM_DIR = Path("/dev/shm")


@contextlib.contextmanager
def _untracked() -> Iterator[None]:
    if sys.version_info >= (3, 13):
        yield
        return
    saved = resource_tracker.register
    resource_tracker.register = lambda *a, **k: None  # type: ignore[assignment]
    try:
        yield
    finally:
        resource_tracker.register = saved  # type: ignore[assignment]


class _SharedMemory(shared_memory.SharedMemory):
    def __del__(self) -> None:
        try:
            self.close()
        except BufferError:
            pass            # views still alive: the mapping lives until the process ends


class Segment:
    """A named shared-memory segment; ``owner`` is True in the process that created it.

    Take numpy views with :meth:`array`: each one holds a buffer export, so :meth:`close` can never
    unmap memory a live view still points to (the mapping then stays until the process ends).
    """

    def __init__(self, name: str, size: int = 0, create: bool = False) -> None:
        kwargs = {"track": False} if sys.version_info >= (3, 13) else {}
        with _untracked():
            if create:
                self._shm = _SharedMemory(name=name, create=True, size=max(size, 1), **kwargs)
            else:
                self._shm = _SharedMemory(name=name, create=False, **kwargs)
        self.name = name
        self.owner = create
        self.buf: memoryview = self._shm.buf

    @property
    def size(self) -> int:
        return self._shm.size

    def array(self, shape: tuple[int, ...], dtype, offset: int = 0) -> np.ndarray:
        """A numpy view of ``shape`` at ``offset``; it keeps the mapping alive while it exists."""
        count = int(np.prod(shape))
        return np.frombuffer(self.buf, dtype, count, offset).reshape(shape)

    def close(self) -> None:
        """Unmap (unless views are alive); the owner also unlinks the name."""
        self.buf = None  # type: ignore[assignment]
        try:
            self._shm.close()
        except BufferError:
            # a numpy view is still alive somewhere; the mapping goes with the process
            pass
        if self.owner:
            unlink(self.name)
            self.owner = False


def unlink(name: str) -> bool:
    try:
        os.unlink(SHM_DIR / name)
        return True
    except FileNotFoundError:
        return False


def list_segments(prefix: str) -> list[str]:
    if not SHM_DIR.is_dir():
        return []
    return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(prefix))


def remove_stale(prefix: str) -> list[str]:
    """Unlink every segment whose name starts with ``prefix`` (left by a killed engine)."""
    removed = [n for n in list_segments(prefix) if unlink(n)]
    return removed
