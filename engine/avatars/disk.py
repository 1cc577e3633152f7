"""Avatars on disk: the seed's folder layout, and every check the engine makes before serving one.

One place for the checks, used by the engine when it loads an avatar (:mod:`engine.avatars.store`,
:class:`engine.avatars.frames.AvatarView`) and by ``engine-ctl avatar check`` / ``avatar import``, so that
the command and the engine refuse the same avatars with the same messages::

    <models_root>/<name>/checkpoint/model_best.onnx
    <models_root>/<name>/frames/frame_0000.png ...      (frame_%04d or frame_%d; png, jpg or jpeg)
    <models_root>/<name>/crop_rects.json                (one [x1, y1, x2, y2] per frame)
    <models_root>/<name>/audio_encoder.onnx             (optional; else <models_root>/audio_encoder.onnx)
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engine.avatars.graph_io import GraphReadError, read_graph_io

MAX_NAME_BYTES = 128             # an avatar name is a folder name (and part of segment names)
FRAME_RE = re.compile(r"^frame_(\d+)\.(png|jpg|jpeg)$", re.IGNORECASE)
MEL_WINDOW = (1, 80, 16)          # the audio encoder's input per window (REFERENCE.md section 5)
FEATURE_FRAMES = 16               # encoder vectors per network audio input (frames i-8 .. i+7)


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


def _graph_io(path: Path) -> tuple[dict[str, list[int | None]], list[tuple[str, list[int | None]]]]:
    """An ONNX file's inputs (initializers excluded) and outputs, with their dims (read without the
    ``onnx`` package: :mod:`engine.avatars.graph_io` says why)."""
    try:
        return read_graph_io(path)
    except (GraphReadError, OSError, ValueError) as e:
        raise AvatarError(f"{path}: not a readable ONNX model: {e}") from None


def read_graph(path: Path) -> GraphInfo:
    """Find the image input (6 channels), the audio input and the output in an ONNX graph."""
    return graph_info(path, *_graph_io(path))


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


def check_name(name: str) -> None:
    """An avatar name is a folder name under models_root (and part of shared-memory names)."""
    if (not name or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES or "/" in name or "\\" in name
            or name.startswith(".") or name != name.strip() or any(ord(ch) < 32 for ch in name)):
        shown = name if len(name) <= 80 else name[:80] + f"... ({len(name)} characters)"
        raise UnknownAvatar(f"invalid avatar name {shown!r}: 1 to {MAX_NAME_BYTES} bytes, no '/', '\\', control "
                            "characters, leading '.' or surrounding spaces")


def avatar_files(models_dir: Path, name: str, folder: str = "") -> AvatarFiles:
    """Locate an avatar's files; raises AvatarError naming what is missing."""
    check_name(name)
    d = models_dir / (folder or name)
    try:
        found = d.is_dir()
    except OSError as e:
        raise UnknownAvatar(f"unknown avatar {name!r}: {e.strerror}") from None
    if not found:
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
    return sorted(p.name for p in models_dir.iterdir() if not p.name.startswith(".")
                  and (p / "checkpoint" / "model_best.onnx").is_file() and (p / "crop_rects.json").is_file())


def read_rects(path: Path, n: int, width: int, height: int) -> np.ndarray:
    """The first ``n`` rectangles of ``crop_rects.json`` (int32 [n, 4]), each non-empty and inside the frame."""
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


def decode_frame(path: Path) -> np.ndarray:
    """A frame file as BGR uint8."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise AvatarError(f"{path}: cannot be decoded as an image")
    return img


def frame_shape(files: AvatarFiles) -> tuple[int, int]:
    """(height, width) of the avatar's first frame: every frame must have it."""
    img = decode_frame(files.frames[0])
    if img.ndim != 3 or img.shape[2] != 3:
        raise AvatarError(f"{files.frames[0]}: expected a colour image")
    return img.shape[0], img.shape[1]


def check_frame_size(path: Path, img: np.ndarray, height: int, width: int) -> None:
    if img.shape[:2] != (height, width):
        raise AvatarError(f"{path}: {img.shape[1]}x{img.shape[0]} differs from the first frame's {width}x{height}")


@dataclass(frozen=True)
class EncoderInfo:
    """An audio encoder's contract: [N, 1, 80, 16] mel windows in, [N, D] features out."""
    path: Path
    input: str
    output: str
    features: int                 # D (512 for SyncTalk_2D's)


def read_encoder(path: Path) -> EncoderInfo:
    """Check an audio encoder's graph: one input [N, 1, 80, 16], an output [N, D]."""
    inputs, outputs = _graph_io(path)
    if len(inputs) != 1 or not outputs:
        raise AvatarError(f"{path}: an audio encoder has one input (mel windows [N,1,80,16]) and an output, found "
                          f"{list(inputs)} -> {[name for name, _ in outputs]}")
    (in_name, dims), (out_name, out_dims) = next(iter(inputs.items())), outputs[0]
    if tuple(dims[1:]) != MEL_WINDOW:
        raise AvatarError(f"{path}: audio encoder input {in_name} is {dims}, expected [N, 1, 80, 16]")
    if len(out_dims) != 2 or out_dims[1] is None:
        raise AvatarError(f"{path}: audio encoder output {out_name} is {out_dims}, expected [N, D]")
    return EncoderInfo(path, in_name, out_name, int(out_dims[1]))


def check_encoder_fits(enc: EncoderInfo, graph: GraphInfo) -> None:
    """The network's audio input must hold 16 encoder vectors (frames i-8 .. i+7)."""
    need = int(np.prod(graph.audio_shape))
    if FEATURE_FRAMES * enc.features != need:
        raise AvatarError(f"{enc.path}: {FEATURE_FRAMES} x {enc.features} encoder features do not fill the network's "
                          f"audio input {list(graph.audio_shape)} ({need} values)")


def find_encoder(folder: Path, models_dir: Path, name: str) -> Path | None:
    """The audio encoder a stream of this avatar uses: its own folder's first, then models_root's."""
    for cand in (folder / name, models_dir / name):
        if cand.is_file():
            return cand
    return None


def ring_room_error(graph: GraphInfo, face_room: int) -> str | None:
    """Why a network's tensors do not fit rings sized for ``ring.max_face`` (None when they do)."""
    from engine.runtime.ring import RingGeometry
    geo = RingGeometry.for_face(1, 1, face_room)
    if (int(np.prod(graph.image_shape)) * 4 > geo.visual_bytes or int(np.prod(graph.audio_shape)) * 4 > geo.audio_bytes
            or int(np.prod(graph.output_shape)) * 4 > geo.output_bytes):
        return f"network tensors {graph.image_shape}/{graph.audio_shape} exceed the ring's room (raise ring.max_face)"
    return None


def describe_graph(g: GraphInfo) -> dict[str, Any]:
    batch = "dynamic" if g.fixed_batch is None else g.fixed_batch
    return {"image_input": g.image_input, "audio_input": g.audio_input, "output": g.output, "batch": batch,
            "image_shape": list(g.image_shape), "audio_shape": list(g.audio_shape), "output_shape": list(g.output_shape)}
