"""The front's avatar store: which avatars are in shared memory, under a byte budget.

Each avatar is loaded once per host in a loader thread, into a segment this process owns; GPU
workers and compositors attach to it. With ``output.encoder = "splice"`` the segment holds the
spliced form (:class:`~engine.avatars.spliced.SplicedAvatarView`: background JPEGs and face regions,
read from the prepared file beside the avatar when it is current), with ``"full"`` the decoded
frames (:class:`~engine.avatars.frames.AvatarView`). ``capacity.background_bytes`` counts the segments'
real sizes: a load reserves an estimate (exact when the prepared file exists), and once loaded the
avatar counts for what it holds. When the budget would be exceeded, the least recently used
avatars with no batch in flight are unloaded (unlinked, and the other processes are told to drop
their mappings). Everything but the loading runs on the front's thread, budget and eviction
included; the loader thread only fills the segment, sets the entry's state and then wakes the front.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from engine.avatars.disk import (
    AvatarError,
    AvatarFiles,
    GraphInfo,
    avatar_files,
    discover,
    frame_shape,
    read_graph,
    read_rects,
)
from engine.avatars.frames import AvatarView, avatar_bytes
from engine.avatars.spliced import SplicedAvatarView, estimate_bytes, prepared_size
from engine.kernels.splice import JpegError, Settings
from engine.runtime.config import EngineConfig, ModelConfig

log = logging.getLogger("engine.avatar_store")


class CapacityError(Exception):
    """The avatar does not fit the background budget even after evicting idle avatars."""


def shared_bytes(cfg: EngineConfig, files: AvatarFiles, face: int) -> int:
    """The shared memory an avatar takes in the configured layout (``output.encoder``): exact for
    the decoded layout and for a spliced one already prepared on disk, estimated otherwise."""
    h, w = frame_shape(files)
    n = len(files.frames)
    if cfg.output.encoder == "full":
        return avatar_bytes(n, h, w, face)
    out = cfg.output
    size = prepared_size(files, Settings(out.jpeg_quality, out.chroma_subsampling), face)
    if size:
        return size
    return estimate_bytes(n, h, w, face, read_rects(files.rects, n, w, h), out.chroma_subsampling)


def over_budget(name: str, need: int, budget: int) -> str | None:
    """Why an avatar needing ``need`` bytes can never be loaded (also ``engine-ctl avatar check``'s words)."""
    if need > budget:
        return f"avatar {name} needs {need} bytes in shared memory, more than capacity.background_bytes = {budget}"
    return None


@dataclass
class AvatarEntry:
    name: str
    model: ModelConfig
    files: AvatarFiles
    graph: GraphInfo | None = None         # read by the loader thread (checking)
    state: str = "checking"                # checking, loading, loaded, failed
    view: AvatarView | SplicedAvatarView | None = None
    error: str = ""
    capacity_error: bool = False           # failed for want of room (not the avatar's files)
    progress: tuple[int, int] = (0, 0)
    inflight: int = 0
    requests: int = 0
    total_ms: float = 0.0
    loaded_at: float = 0.0
    last_used: float = 0.0
    load_ms: float = 0.0
    reserved: int = 0                      # bytes set aside for it while it loads
    result: tuple | None = None            # the loader thread's outcome, published by finish()
    waiters: list[Callable[[AvatarEntry], None]] = field(default_factory=list)

    @property
    def segment(self) -> str:
        return self.view.segment.name if self.view is not None else ""

    @property
    def nbytes(self) -> int:
        return self.view.nbytes if self.view is not None else self.reserved

    def describe(self) -> dict[str, Any]:
        v = self.view
        return {
            "name": self.name, "loaded": self.state == "loaded", "state": self.state, "error": self.error or None,
            "progress": list(self.progress), "requests": self.requests,
            "total_ms": round(self.total_ms, 3), "mean_ms": round(self.total_ms / self.requests, 3) if self.requests else None,
            "memory_bytes": {"backgrounds": self.nbytes, "network_file": self.files.onnx_bytes,
                             **({"parts": v.memory()} if v else {})},
            "layout": v.layout if v else None,
            "last_used": _iso(self.last_used), "loaded_at": _iso(self.loaded_at), "load_ms": round(self.load_ms, 1),
            "frames": v.n if v else len(self.files.frames), "width": v.width if v else None,
            "height": v.height if v else None, "face": self.graph.face if self.graph else None,
            "image_shape": list(self.graph.image_shape) if self.graph else None,
            "audio_shape": list(self.graph.audio_shape) if self.graph else None, "paste": self.model.paste,
            "wrap": self.model.wrap,
        }


def _iso(t: float) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else None


class AvatarStore:
    def __init__(self, cfg: EngineConfig, wake: Callable[[AvatarEntry], None],
                 on_evict: Callable[[str, str], None]) -> None:
        self.cfg = cfg
        self.wake = wake                   # called from the loader thread: "this entry finished loading"
        self.on_evict = on_evict           # (name, segment) after an avatar left shared memory
        self.on_loaded: Callable[[AvatarEntry], None] = lambda e: None   # after finish (metrics)
        self.entries: dict[str, AvatarEntry] = {}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="avatar-loader")
        self._gen = itertools.count()

    # -- queries -----------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(set(discover(self.cfg.models_dir)) | set(self.cfg.models) | set(self.entries))

    def used_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def loaded(self) -> list[AvatarEntry]:
        return [e for e in self.entries.values() if e.state == "loaded"]

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for name in self.names():
            e = self.entries.get(name)
            if e is not None:
                out.append(e.describe())
                continue
            try:
                files = avatar_files(self.cfg.models_dir, name, self.cfg.model(name).path)
                out.append({"name": name, "loaded": False, "state": "on disk", "frames": len(files.frames),
                            "memory_bytes": {"backgrounds": 0, "network_file": files.onnx_bytes},
                            "requests": 0, "mean_ms": None, "last_used": None})
            except AvatarError as err:
                out.append({"name": name, "loaded": False, "state": "invalid", "error": str(err)})
        return out

    # -- loading -----------------------------------------------------------------------------------
    def acquire(self, name: str, waiter: Callable[[AvatarEntry], None]) -> None:
        """Call ``waiter(entry)`` once the avatar is loaded (or failed); starts loading if needed.

        Raises AvatarError at once when the avatar does not exist or misses files. Everything that
        reads them (the network's graph, the first frame, the size estimate: tens of milliseconds)
        runs in the loader thread, never on the front's, which serves every live stream.
        """
        e = self.entries.get(name)
        if e is None or e.state == "failed":
            mc = self.cfg.model(name)
            files = avatar_files(self.cfg.models_dir, name, mc.path)
            self.entries.pop(name, None)
            e = AvatarEntry(name, mc, files, progress=(0, len(files.frames)))
            self.entries[name] = e
            self.pool.submit(self._check, e)
        if e.state == "loaded":
            waiter(e)
        else:
            e.waiters.append(waiter)

    def _in_loader(self, e: AvatarEntry, step: Callable[[], tuple]) -> None:
        """Loader thread: run one step of a load and leave its outcome in ``e.result`` (never
        anything else: the entry changes on the front's thread, in :meth:`finish`), then wake the front."""
        try:
            e.result = step()
        except (AvatarError, JpegError, OSError, ValueError) as err:
            e.result = ("failed", None, str(err))
        except Exception as err:
            log.exception("loading %s failed", e.name)
            e.result = ("failed", None, f"loading failed: {err}")
        self.wake(e)

    def _check(self, e: AvatarEntry) -> None:
        """Loader thread: the network's graph and the shared memory the avatar will take."""
        def check() -> tuple:
            graph = read_graph(e.files.onnx)
            return "checked", graph, self._estimate(e.files, graph.face)
        self._in_loader(e, check)

    def _start_load(self, e: AvatarEntry, graph: GraphInfo, need: int) -> None:
        """Front thread, once checked: make room (evicting idle avatars), then decode."""
        e.graph = graph
        try:
            self._make_room(need, e.name, e)
        except CapacityError as err:
            e.state, e.error, e.capacity_error = "failed", str(err), True
            return
        e.state, e.reserved = "loading", need
        self.pool.submit(self._load, e, f"{self.cfg.server.instance}_av_{e.name[:40]}_{next(self._gen)}")

    def settings(self) -> Settings:
        out = self.cfg.output
        return Settings(out.jpeg_quality, out.chroma_subsampling)

    def _estimate(self, files: AvatarFiles, face: int) -> int:
        """Bytes to reserve while the avatar loads (the real size replaces it once loaded)."""
        return shared_bytes(self.cfg, files, face)

    def _load(self, e: AvatarEntry, seg: str) -> None:
        """Loader thread: the avatar's frames into a new segment, in the configured layout."""
        def load() -> tuple:
            t0 = time.perf_counter()

            def progress(done: int, total: int) -> None:
                e.progress = (done, total)
            if self.cfg.output.encoder == "full":
                view = AvatarView.create(seg, e.files, e.graph.face, progress)
            else:
                view = SplicedAvatarView.create(seg, e.files, e.graph.face, self.settings(), progress)
            e.load_ms = 1000 * (time.perf_counter() - t0)
            return "loaded", view, ""
        self._in_loader(e, load)

    def finish(self, e: AvatarEntry) -> None:
        """Front thread, after ``wake(e)``: publish the loader's result and hand the entry to its waiters."""
        if e.result is None:
            return
        if e.result[0] == "checked":
            _, graph, need = e.result
            e.result = None
            self._start_load(e, graph, need)
            if e.state != "failed":
                return                                  # decoding now; the waiters wait on
        else:
            e.state, e.view, e.error = e.result
            e.result = None
        if e.state == "loaded":
            e.loaded_at = time.time()
            log.info("avatar %s: %d frames %dx%d in shared memory (%s layout, %.1f MB) in %.0f ms", e.name,
                     e.view.n, e.view.width, e.view.height, e.view.layout, e.nbytes / 1e6, e.load_ms)
            self._enforce_budget(e)
        elif e.state == "failed":
            e.reserved = 0
            log.error("avatar %s failed to load: %s", e.name, e.error)
            if self.entries.get(e.name) is e and e.graph is None:
                self.entries.pop(e.name)                # nothing known but the error: not kept
        self.on_loaded(e)
        waiters, e.waiters = e.waiters, []
        for w in waiters:
            try:
                w(e)
            except Exception:
                log.exception("avatar %s: a waiting request failed", e.name)

    def _make_room(self, need: int, for_name: str, keep: AvatarEntry | None = None) -> None:
        budget = self.cfg.capacity.background_bytes
        too_big = over_budget(for_name, need, budget)
        if too_big:
            raise CapacityError(too_big)
        victims = sorted((e for e in self.entries.values()
                          if e is not keep and e.state in ("loaded", "failed") and e.inflight == 0),
                         key=lambda e: e.last_used)
        if self.used_bytes() - sum(v.nbytes for v in victims) + need > budget:
            # even evicting every idle avatar would not make room: evict none
            raise CapacityError(f"avatar {for_name} needs {need} bytes; {self.used_bytes()} of "
                                f"{budget} are held, most by avatars with batches in flight")
        while self.used_bytes() + need > budget:
            self._evict(victims.pop(0), "budget")

    def _enforce_budget(self, keep: AvatarEntry) -> None:
        """After a load whose real size exceeded its reservation: evict idle avatars (least recently
        used first, never ``keep``) until the budget holds again, or say why it cannot."""
        budget = self.cfg.capacity.background_bytes
        victims = sorted((x for x in self.entries.values()
                          if x is not keep and x.state == "loaded" and x.inflight == 0), key=lambda x: x.last_used)
        while self.used_bytes() > budget and victims:
            self._evict(victims.pop(0), "budget")
        if self.used_bytes() > budget:
            log.warning("avatars hold %d bytes, over capacity.background_bytes = %d (the rest is in use)",
                        self.used_bytes(), budget)

    def _evict(self, e: AvatarEntry, why: str) -> None:
        seg = e.segment
        if e.view is not None:
            e.view.close()
            e.view = None
        self.entries.pop(e.name, None)
        log.info("avatar %s unloaded (%s)", e.name, why)
        self.on_evict(e.name, seg)

    def unload(self, name: str) -> bool:
        e = self.entries.get(name)
        if e is None or e.state in ("checking", "loading"):
            return False
        if e.inflight:
            raise CapacityError(f"avatar {name} has {e.inflight} batches in flight")
        self._evict(e, "unload")
        return True

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for e in list(self.entries.values()):
            if e.result is not None and e.result[0] == "loaded":
                e.result[1].close()                 # loaded, never published
            if e.view is not None:
                e.view.close()
                e.view = None
        self.entries.clear()

