"""What a GPU worker holds per network it has loaded (:class:`LoadedModel`), per architecture whose
session its networks share (:class:`ArchSession`) and per audio encoder (:class:`EncoderSession`):
the session, the bucket policy's sizes, the path its runs take, the weights bound per run."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from engine.avatars.disk import GraphInfo
from engine.worker.buckets import plan
from engine.worker.device_buffers import DeviceBuffers


class InferenceError(Exception):
    """A network could not be loaded or run."""


@dataclass
class EncoderSession:
    path: str
    session: ort.InferenceSession
    sizes: tuple[int, ...] | None
    shapes: set[int] = field(default_factory=set)

    def input_shape(self) -> list[int]:
        return [d if isinstance(d, int) else 1 for d in self.session.get_inputs()[0].shape[1:]]

    def run(self, windows: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.session.get_inputs()[0].name: windows})[0]

    def encode(self, windows: np.ndarray, count: Callable[[int], None]) -> np.ndarray:
        """[N,1,80,16] mel windows -> [N,D] features at the window-count buckets (padded with
        silence rows whose output is dropped; exact counts when not bucketed); ``count(size)`` per run."""
        n = len(windows)
        if not n:
            return np.zeros((0, self.session.get_outputs()[0].shape[-1]), np.float32)
        outs = []
        for start, size in plan(n, self.sizes):
            part = windows[start:start + size]
            if len(part) < size:
                padded = np.zeros((size, *windows.shape[1:]), np.float32)
                padded[:len(part)] = part
                part = padded
            outs.append(self.run(np.ascontiguousarray(part, np.float32))[:n - start])
            count(size)
        return outs[0] if len(outs) == 1 else np.concatenate(outs)


@dataclass
class ArchSession:
    """One session for every network of an architecture (``engine/worker/weights.py``): warmed up
    once, with the first network's weights; the others bind theirs per run."""
    key: str
    file: Path                                  # arch-<key>.onnx
    session: ort.InferenceSession
    graph: GraphInfo
    sizes: tuple[int, ...] | None
    shapes: set[int] = field(default_factory=set)   # shared by its networks: a shape is warm for all
    mode: str = "bind_ring"
    bucket_modes: dict[int, str] = field(default_factory=dict)
    buffers: DeviceBuffers | None = None
    fallback: list[str] = field(default_factory=list)
    build_ms: float = 0.0
    first: str = ""                             # the network it was built (and warmed up) with
    touched: bool = False                       # run once on the serving thread
    adopted: bool = False                       # its device buffers moved to the worker's pool

    def describe(self, networks: int, nbytes: int) -> dict[str, Any]:
        d: dict[str, Any] = {"networks": networks, "weight_bytes": nbytes, "path": self.mode,
                             "buckets": list(self.sizes) if self.sizes else "exact",
                             "build_ms": round(self.build_ms, 1), "first": self.first}
        if self.fallback:
            d["fallback"] = self.fallback
        return d


@dataclass
class LoadedModel:
    name: str
    path: Path                                  # the avatar's network (fp32 source)
    session: ort.InferenceSession
    graph: GraphInfo
    loaded_at: float
    runs: int = 0
    precision: str = "fp32"
    file: Path | None = None                    # what the session runs (the fp16 conversion, or path)
    sizes: tuple[int, ...] | None = None        # bucket policy: the batch sizes it runs at (None: exact)
    shapes: set[int] = field(default_factory=set)   # batch sizes run so far (warm-up included)
    mode: str = "bind_ring"                     # run / bind_ring / device_buffers / cuda_graphs
    bucket_modes: dict[int, str] = field(default_factory=dict)   # per-bucket exceptions (fallbacks)
    buffers: DeviceBuffers | None = None
    run_options: Any = None                     # gpu_graph_id -1 when the session has graphs enabled
    fallback: list[str] = field(default_factory=list)            # why a faster mode was not used
    load_ms: float = 0.0
    fp16_error: dict[str, Any] | None = None
    encoder: EncoderSession | None = None       # the avatar's audio encoder, loaded with it
    scratch: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    todo: list[tuple[str, int, int]] = field(default_factory=list)    # serving-thread steps left (finish_step)
    refs: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)   # outputs a graph's replays must equal
    weight_bytes: int = 0                       # what it holds resident (its weights; the file's size for its own session)
    arch: ArchSession | None = None             # the shared session it runs in (None: its own session)
    weights: dict[str, Any] | None = None       # shared: its weights as OrtValues on the session's device
    host: dict[str, np.ndarray] | None = None   # shared: the same in host memory (the CPU provider's OrtValues view it)
    binding: Any = None                         # shared: its IO binding, weights bound once (bind_ring path)
    token: int = 0                              # shared: which network a device-buffer binding holds

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"precision": self.precision, "path": self.mode,
                             "buckets": list(self.sizes) if self.sizes else "exact",
                             "load_ms": round(self.load_ms, 1), "finishing": len(self.todo),
                             "weight_bytes": self.weight_bytes}
        if self.arch is not None:
            d["architecture"] = self.arch.key[:16]
        if self.buffers is not None and self.buffers.graphs:
            d["graphs_captured"] = sorted(self.buffers.captured)
        if self.bucket_modes:
            d["bucket_paths"] = {str(b): m for b, m in sorted(self.bucket_modes.items())}
        if self.fallback:
            d["fallback"] = self.fallback
        if self.fp16_error is not None:
            d["fp16_error"] = self.fp16_error
        return d
