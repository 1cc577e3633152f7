"""Networks as an architecture plus weights: the transformation behind shared sessions.

Avatars trained from one recipe (every SyncTalk_2D avatar) have the same network and differ only in
their weights. :func:`prepare` splits a network file into

- the *architecture*: the graph with its weights turned into graph inputs. Its key is the SHA-256
  of that graph (nodes, attributes, inputs and outputs with their shapes, the initializers that
  stay, the opsets; names of the model and the graph and every doc string left out). Networks with
  the same key run in one ONNX Runtime session (``engine.worker.inference``);
- the *weights*: one raw file, each tensor 64-byte aligned, and a JSON index (the architecture key,
  then per tensor its dtype, shape and offset). Making a network resident is reading that file
  (:func:`read_weights`), no session build and no protobuf parse.

Which initializers become weights: the floating-point ones (fp32, fp16, fp64) with two elements or
more, except inputs an operator needs as constants (Resize's roi/scales/sizes, Upsample's scales,
Pad's pads and value). Everything else (integer shapes, scalars) stays in the graph, and so in the
key: two networks that differ there are two architectures. A graph with subgraphs (If, Loop, Scan)
is not transformed: :class:`NotShareable` says why, and the network gets its own session.

Cache: ``<cache_dir>/shared/<sha256 of the file>.weights`` and ``.json`` per network file (the fp32
source, or its fp16 conversion: the weights are then fp16) and ``<cache_dir>/shared/arch-<key>.onnx``
per architecture. Written to temporary files and renamed, under a file lock, like the fp16 cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.worker.precision import _locked, file_sha256

log = logging.getLogger("engine.weights")

ALIGN = 64
FORMAT = "lse-weights-1"
# (operator, input index) that must stay constants: ONNX Runtime and the exporters treat them so
CONSTANT_INPUTS = {("Resize", 1), ("Resize", 2), ("Resize", 3), ("Upsample", 1), ("Pad", 1), ("Pad", 2),
                   ("Pad", 3)}
_FLOAT_TYPES = {1: np.float32, 10: np.float16, 11: np.float64}     # onnx.TensorProto data types


class NotShareable(Exception):
    """The network cannot run in a shared session; the message says why."""


@dataclass(frozen=True)
class Split:
    """A network file split into its architecture and its weights (all three files exist)."""
    arch: str                       # the architecture key
    graph_file: Path                # arch-<key>.onnx: the graph with the weights as inputs
    weights_file: Path              # raw tensors
    index_file: Path                # the JSON index
    weight_bytes: int


def cache_paths(src: Path, cache_dir: Path) -> tuple[Path, Path]:
    """(weights, index) of network file ``src``."""
    h = file_sha256(src, cache_dir)
    d = cache_dir / "shared"
    return d / f"{h}.weights", d / f"{h}.json"


def prepare(src: Path, cache_dir: Path) -> Split:
    """The cached split of ``src``, made now if it is not there (raises :class:`NotShareable`)."""
    weights, index = cache_paths(src, cache_dir)
    split = _cached(weights, index, cache_dir)
    if split is not None:
        return split
    with _locked(index.with_suffix(".lock")):
        split = _cached(weights, index, cache_dir)
        if split is None:
            t0 = time.perf_counter()
            split = _split(src, weights, index, cache_dir)
            log.info("split %s into architecture %s and %.1f MB of weights in %.0f ms", src, split.arch[:12],
                     split.weight_bytes / 1e6, 1000 * (time.perf_counter() - t0))
    return split


def _cached(weights: Path, index: Path, cache_dir: Path) -> Split | None:
    try:
        meta = json.loads(index.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") != FORMAT:
        return None
    if "not_shareable" in meta:
        raise NotShareable(meta["not_shareable"])
    graph = cache_dir / "shared" / f"arch-{meta['arch']}.onnx"
    if not (graph.is_file() and weights.is_file()):
        return None
    return Split(meta["arch"], graph, weights, index, int(meta["bytes"]))


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def movable(model: Any) -> list[Any]:
    """The initializers of ``model`` that become weights (see the module's doc)."""
    g = model.graph
    pinned = {name for node in g.node for k, name in enumerate(node.input) if (node.op_type, k) in CONSTANT_INPUTS}
    return [t for t in g.initializer
            if t.data_type in _FLOAT_TYPES and int(np.prod(t.dims)) >= 2 and t.name not in pinned]


def _split(src: Path, weights: Path, index: Path, cache_dir: Path) -> Split:
    import onnx
    from onnx import helper, numpy_helper
    try:
        model = onnx.load(str(src))
    except Exception as e:  # noqa: BLE001 - onnx raises many kinds
        raise NotShareable(f"not a readable ONNX model: {e}") from None
    g = model.graph
    why = ""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        why = "the graph has subgraphs (If/Loop/Scan), which are not split"
    moved = [] if why else movable(model)
    if not why and not moved:
        why = "the graph has no floating-point weights to bind"
    if why:
        _atomic(index, lambda fh: fh.write(json.dumps({"format": FORMAT, "not_shareable": why}).encode()))
        raise NotShareable(why)
    declared = {i.name for i in g.input}
    entries, offset, arrays = {}, 0, []
    for t in moved:
        arr = np.ascontiguousarray(numpy_helper.to_array(t))
        offset = -(-offset // ALIGN) * ALIGN
        entries[t.name] = {"dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset}
        arrays.append((offset, arr))
        offset += arr.nbytes
        if t.name not in declared:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    names = set(entries)
    kept = [t for t in g.initializer if t.name not in names]
    del g.initializer[:]
    g.initializer.extend(kept)
    arch = _arch_key(model)
    graph_file = cache_dir / "shared" / f"arch-{arch}.onnx"
    if not graph_file.is_file():
        _atomic(graph_file, lambda fh: fh.write(model.SerializeToString()))

    def write_weights(fh) -> None:
        for off, arr in arrays:
            fh.seek(off)
            fh.write(arr.tobytes())
        fh.truncate(offset)
    _atomic(weights, write_weights)
    meta = {"format": FORMAT, "arch": arch, "bytes": offset, "source": str(src), "tensors": entries}
    _atomic(index, lambda fh: fh.write(json.dumps(meta).encode()))
    return Split(arch, graph_file, weights, index, offset)


def _arch_key(model: Any) -> str:
    """SHA-256 of the graph without its weights, names and doc strings (the model is not changed)."""
    m = type(model)()
    m.CopyFrom(model)
    m.doc_string = m.producer_name = m.producer_version = m.domain = ""
    m.model_version = 0
    del m.metadata_props[:]
    m.graph.name = m.graph.doc_string = ""
    for n in m.graph.node:
        n.doc_string = ""
    return hashlib.sha256(m.SerializeToString(deterministic=True)).hexdigest()


def read_weights(split: Split) -> dict[str, np.ndarray]:
    """The network's weights, read into memory (one read of the file; the arrays are views of it).
    A damaged cache entry raises :class:`NotShareable` and is removed, so the next load splits again."""
    try:
        meta = json.loads(split.index_file.read_text())
        raw = np.fromfile(split.weights_file, dtype=np.uint8)
        if len(raw) != meta["bytes"]:
            raise ValueError(f"{len(raw)} bytes, the index says {meta['bytes']}")
        out = {}
        for name, e in meta["tensors"].items():
            dt = np.dtype(e["dtype"])
            count = int(np.prod(e["shape"], dtype=np.int64))
            out[name] = raw[e["offset"]:e["offset"] + count * dt.itemsize].view(dt).reshape(e["shape"])
        return out
    except (OSError, ValueError, KeyError, TypeError) as e:
        split.index_file.unlink(missing_ok=True)
        raise NotShareable(f"{split.weights_file}: prepared weights unreadable ({e}); removed from the cache") from None
