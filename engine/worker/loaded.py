"""What a GPU worker holds per network it has loaded (:class:`LoadedModel`) and per audio encoder
(:class:`EncoderSession`): the session, the bucket policy's sizes, the path its runs take."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from engine.avatars.disk import GraphInfo
from engine.worker.device_buffers import DeviceBuffers


@dataclass
class EncoderSession:
    path: str
    session: ort.InferenceSession
    sizes: tuple[int, ...] | None
    shapes: set[int] = field(default_factory=set)


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

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"precision": self.precision, "path": self.mode,
                             "buckets": list(self.sizes) if self.sizes else "exact",
                             "load_ms": round(self.load_ms, 1), "finishing": len(self.todo)}
        if self.buffers is not None and self.buffers.graphs:
            d["graphs_captured"] = sorted(self.buffers.captured)
        if self.bucket_modes:
            d["bucket_paths"] = {str(b): m for b, m in sorted(self.bucket_modes.items())}
        if self.fallback:
            d["fallback"] = self.fallback
        if self.fp16_error is not None:
            d["fp16_error"] = self.fp16_error
        return d
