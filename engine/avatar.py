"""Avatars: the seed's folder layout on disk, and their decoded frames in shared memory.

On disk (REFERENCE.md section 6)::

    <models_root>/<name>/checkpoint/model_best.onnx
    <models_root>/<name>/frames/frame_0000.png ...      (frame_%04d or frame_%d; png, jpg or jpeg)
    <models_root>/<name>/crop_rects.json                (one [x1, y1, x2, y2] per frame)

In shared memory, one segment per loaded avatar, created and unlinked by the front's
:class:`~engine.avatar_store.AvatarStore`, attached read-only by every other process::

    0            JSON header (name, n, h, w, face, offsets), padded to 4096 bytes
    rects_off    int32   [n, 4]                 crop rectangles
    frames_off   uint8   [n, h, w, 3]           backgrounds, BGR, 3 bytes per pixel
    crops_off    uint8   [n, F+8, F+8, 3]       each frame's bicubic crop (the network face is
                                                its inner F x F), so neither inference nor paste-back
                                                cuts and resizes it again
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx

from .kernels import cut_crop
from .shm import Segment

FRAME_RE = re.compile(r"^frame_(\d+)\.(png|jpg|jpeg)$", re.IGNORECASE)
HEADER_BYTES = 4096


class AvatarError(Exception):
    """An avatar's files are missing or inconsistent; the message names the file and the problem."""


class UnknownAvatar(AvatarError):
    """No avatar of that name under models_root."""


@dataclass(frozen=True)
class GraphInfo:
    """Names and per-frame shapes of a lip-sync network, read from its graph."""
    image_input: str
    audio_input: str
    output: str
    image_shape: tuple[int, ...]      # (6, F, F)
    audio_shape: tuple[int, ...]      # (32, 16, 16) for SyncTalk_2D
    output_shape: tuple[int, ...]     # (3, F, F)
    fixed_batch: int | None           # None when the batch axis is dynamic

    @property
    def face(self) -> int:
        return self.image_shape[1]


def _dims(value_info: Any) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def read_graph(path: Path) -> GraphInfo:
    """Find the image input (6 channels), the audio input and the output in an ONNX graph."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - onnx raises many kinds
        raise AvatarError(f"{path}: not a readable ONNX model: {e}") from None
    inits = {i.name for i in model.graph.initializer}
    return graph_info(path, {i.name: _dims(i) for i in model.graph.input if i.name not in inits},
                      [(o.name, _dims(o)) for o in model.graph.output])


def session_graph(session: Any, path: Path) -> GraphInfo:
    """:func:`read_graph` from an ONNX Runtime session's metadata. A GPU worker's loader thread uses
    it: parsing a large network's protobuf in Python holds the interpreter lock (40-80 ms), which
    would stall the thread serving the other networks."""
    def dims(arg: Any) -> list[int | None]:
        return [d if isinstance(d, int) else None for d in arg.shape]
    return graph_info(path, {i.name: dims(i) for i in session.get_inputs()},
                      [(o.name, dims(o)) for o in session.get_outputs()])


def graph_info(path: Path, inputs: dict[str, list[int | None]], outputs: list[tuple[str, list[int | None]]]) -> GraphInfo:
    """Check a network's inputs and outputs against the lip-sync contract; name the problem."""
    if len(inputs) != 2 or len(outputs) < 1:
        raise AvatarError(f"{path}: expected 2 inputs (image, audio) and an output, found "
                          f"{list(inputs)} -> {[name for name, _ in outputs]}")
    shapes = inputs
    image = next((n for n, s in shapes.items() if len(s) == 4 and s[1] == 6), None)
    if image is None:
        raise AvatarError(f"{path}: no input of shape [B, 6, F, F] among {shapes}")
    audio = next(n for n in shapes if n != image)
    out_name, out_dims = outputs[0]
    for name, dims in [*shapes.items(), (out_name, out_dims)]:
        if any(d is None for d in dims[1:]):
            raise AvatarError(f"{path}: {name} has a dynamic non-batch axis {dims}")
    img_dims = shapes[image]
    if img_dims[2] != img_dims[3] or len(out_dims) != 4 or out_dims[1:] != [3, img_dims[2], img_dims[3]]:
        raise AvatarError(f"{path}: image input {img_dims} and output {out_dims} do not match [B,6,F,F] -> [B,3,F,F]")
    return GraphInfo(image, audio, out_name, tuple(img_dims[1:]), tuple(shapes[audio][1:]),  # type: ignore[arg-type]
                     tuple(out_dims[1:]), img_dims[0])  # type: ignore[arg-type]


@dataclass(frozen=True)
class AvatarFiles:
    name: str
    folder: Path
    onnx: Path
    frames: tuple[Path, ...]
    rects: Path

    @property
    def onnx_bytes(self) -> int:
        return self.onnx.stat().st_size


def find_frames(folder: Path) -> tuple[Path, ...]:
    found = []
    for p in folder.iterdir() if folder.is_dir() else []:
        m = FRAME_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    found.sort()
    return tuple(p for _, p in found)


def avatar_files(models_dir: Path, name: str, folder: str = "") -> AvatarFiles:
    """Locate an avatar's files; raises AvatarError naming what is missing."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise UnknownAvatar(f"invalid avatar name {name!r}")
    d = models_dir / (folder or name)
    if not d.is_dir():
        raise UnknownAvatar(f"unknown avatar {name!r}: no folder {d}")
    onnx_path = d / "checkpoint" / "model_best.onnx"
    if not onnx_path.is_file():
        raise AvatarError(f"{onnx_path} is missing")
    rects = d / "crop_rects.json"
    if not rects.is_file():
        raise AvatarError(f"{rects} is missing")
    frames = find_frames(d / "frames")
    if not frames:
        raise AvatarError(f"{d / 'frames'} holds no frame_NNNN.png/.jpg files")
    return AvatarFiles(name, d, onnx_path, frames, rects)


def discover(models_dir: Path) -> list[str]:
    """Names of every folder under ``models_dir`` that looks like an avatar."""
    if not models_dir.is_dir():
        return []
    return sorted(p.name for p in models_dir.iterdir()
                  if (p / "checkpoint" / "model_best.onnx").is_file() and (p / "crop_rects.json").is_file())


def read_rects(path: Path, n: int, width: int, height: int) -> np.ndarray:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AvatarError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, list) or len(data) < n:
        raise AvatarError(f"{path}: expected a list of at least {n} [x1, y1, x2, y2] rectangles, "
                          f"got {len(data) if isinstance(data, list) else type(data).__name__}")
    try:
        rects = np.array(data[:n], dtype=np.int64)
    except (TypeError, ValueError):
        raise AvatarError(f"{path}: every entry must be 4 integers [x1, y1, x2, y2]") from None
    if rects.shape != (n, 4):
        raise AvatarError(f"{path}: every entry must be 4 integers [x1, y1, x2, y2]")
    bad = np.nonzero((rects[:, 0] < 0) | (rects[:, 1] < 0) | (rects[:, 2] > width) | (rects[:, 3] > height)
                     | (rects[:, 2] - rects[:, 0] < 2) | (rects[:, 3] - rects[:, 1] < 2))[0]
    if bad.size:
        raise AvatarError(f"{path}: rectangle {int(bad[0])} {rects[bad[0]].tolist()} is empty or outside "
                          f"the {width}x{height} frame")
    return rects.astype(np.int32)


def _decode(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise AvatarError(f"{path}: cannot be decoded as an image")
    return img


def _layout(n: int, h: int, w: int, face: int) -> dict[str, int]:
    side = face + 8
    rects_off = HEADER_BYTES
    frames_off = (rects_off + n * 16 + 4095) // 4096 * 4096
    crops_off = (frames_off + n * h * w * 3 + 4095) // 4096 * 4096
    total = crops_off + n * side * side * 3
    return {"rects_off": rects_off, "frames_off": frames_off, "crops_off": crops_off, "total": total}


def avatar_bytes(n: int, h: int, w: int, face: int) -> int:
    return _layout(n, h, w, face)["total"]


class AvatarView:
    """Numpy views of one avatar in shared memory (any process)."""

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        raw = bytes(segment.buf[:HEADER_BYTES]).rstrip(b"\0")
        meta = json.loads(raw)
        self.meta = meta
        self.name: str = meta["name"]
        n, h, w, face = meta["n"], meta["h"], meta["w"], meta["face"]
        side = face + 8
        lay = _layout(n, h, w, face)
        self.n, self.height, self.width, self.face = n, h, w, face
        self.rects = segment.array((n, 4), np.int32, lay["rects_off"])
        self.frames = segment.array((n, h, w, 3), np.uint8, lay["frames_off"])
        self.crops = segment.array((n, side, side, 3), np.uint8, lay["crops_off"])

    @property
    def nbytes(self) -> int:
        return self.segment.size

    @classmethod
    def attach(cls, segment_name: str) -> AvatarView:
        return cls(Segment(segment_name))

    @classmethod
    def create(cls, segment_name: str, files: AvatarFiles, face: int,
               progress: Callable[[int, int], None] | None = None, threads: int = 4) -> AvatarView:
        """Decode the avatar's frames once, straight into a new segment (the caller owns it)."""
        first = _decode(files.frames[0])
        if first.ndim != 3 or first.shape[2] != 3:
            raise AvatarError(f"{files.frames[0]}: expected a colour image")
        h, w = first.shape[:2]
        n = len(files.frames)
        rects = read_rects(files.rects, n, w, h)
        lay = _layout(n, h, w, face)
        seg = Segment(segment_name, lay["total"], create=True)
        try:
            header = json.dumps({"name": files.name, "n": n, "h": h, "w": w, "face": face}).encode()
            seg.buf[:len(header)] = header
            view = cls(seg)
            view.rects[:] = rects
            done = 0

            def load(i: int) -> None:
                img = first if i == 0 else _decode(files.frames[i])
                if img.shape != first.shape:
                    raise AvatarError(f"{files.frames[i]}: {img.shape[1]}x{img.shape[0]} differs from the first "
                                      f"frame's {w}x{h}")
                view.frames[i] = img
                view.crops[i] = cut_crop(img, tuple(rects[i]), face)

            with ThreadPoolExecutor(max(1, threads)) as pool:
                for _ in pool.map(load, range(n)):
                    done += 1
                    if progress:
                        progress(done, n)
            return view
        except BaseException:
            seg.close()
            raise

    def close(self) -> None:
        self.rects = self.frames = self.crops = None  # type: ignore[assignment]
        self.segment.close()


class AttachedAvatars:
    """The avatar segments a worker process has mapped: attached on first use, dropped on request
    (the front evicted or unloaded that avatar)."""

    def __init__(self) -> None:
        self.views: dict[str, AvatarView] = {}

    def get(self, segment: str) -> AvatarView:
        view = self.views.get(segment)
        if view is None:
            view = self.views[segment] = AvatarView.attach(segment)
        return view

    def drop(self, segment: str) -> None:
        view = self.views.pop(segment, None)
        if view is not None:
            view.close()

    def close(self) -> None:
        for segment in list(self.views):
            self.drop(segment)
