"""``engine-ctl avatar import``: make an avatar folder (the seed's layout) from a video or from a
SyncTalk_2D dataset folder, and a network (and an audio encoder).

From a video: decoded with PyAV, resampled to 25 frames/s by nearest timestamp (each output instant
takes the source frame nearest to it in time, as ffmpeg's ``fps`` filter does), turned upright as
its rotation says, the face's 68 landmarks found in
each frame (:mod:`engine.avatars.landmarks`) and made into SyncTalk_2D's crop, smoothed over time, or
the video refused with the reason (:mod:`engine.avatars.face_track`).

From a SyncTalk_2D dataset (``full_body_img/<i>.jpg`` and ``landmarks/<i>.lms``, as its
``data_utils/process.py`` writes them): the JPEGs are copied byte for byte and each rectangle is
the one SyncTalk_2D's inference crops (:func:`engine.avatars.crop_rects.synctalk_rect`).

Everything is checked before the first frame is decoded (the name, the network's I/O contract, the
encoder's) and the folder is built in a hidden folder beside its final place
(``<models_root>/.import-<name>-<pid>``), checked again with the engine's own loading checks, then
renamed into place: a failed or interrupted import leaves nothing under ``models_root``.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engine.avatars.crop_rects import (
    JITTER_MIN_PX,
    JITTER_WARN,
    ranges,
    read_lms,
    rect_jitter,
    shakes,
    smooth_squares,
    synctalk_rect,
    synctalk_square,
)
from engine.avatars.disk import (
    AvatarError,
    EncoderInfo,
    GraphInfo,
    avatar_files,
    check_encoder_fits,
    check_name,
    decode_frame,
    read_encoder,
    read_graph,
    read_rects,
    ring_room_error,
)
from engine.avatars.face_track import (
    TrackReport,
    rects_from_faces,
    rects_from_landmarks,
)
from engine.avatars.landmarks import Face, LandmarkFinder
from engine.avatars.staging import Staging

FPS = 25
Progress = Callable[[int, int], None]          # (done, estimated total)


@dataclass
class ImportResult:
    name: str
    folder: Path
    frames: int
    width: int
    height: int
    source: str                                 # "video" or "synctalk"
    source_fps: float | None = None
    track: TrackReport | None = None
    rects: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int32))
    seconds: float = 0.0
    jitter: float | None = None                 # rect_jitter of the dataset's own (landmark) rectangles
    smoothed_jitter: float | None = None        # and of the smoothed ones written (smooth=True)
    cleaned: list[str] = field(default_factory=list)    # what killed imports had left, removed first

    def summary(self) -> str:
        side = self.rects[:, 2] - self.rects[:, 0]
        lines = [(f"imported {self.name}: {self.frames} frames {self.width}x{self.height} at {FPS} frames/s into "
                  f"{self.folder} in {self.seconds:.1f} s"), *(f"  {text}" for text in self.cleaned)]
        if self.source_fps is not None and abs(self.source_fps - FPS) > 1e-3:
            rate = f"{self.source_fps:.2f}".rstrip("0").rstrip(".")            # 29.97, 30, 12.5
            lines.append(f"  resampled from {rate} frames/s")
        if self.track is not None:
            t = self.track
            lines.append(f"  face found in {t.found} of {t.frames} frames (detector score: lowest {t.score[0]:.2f}, "
                         f"median {t.score[1]:.2f})")
            if t.others:
                lines.append(f"  another face also seen (in under half of the whole-frame searches; the crop stays on "
                             f"the one followed): frames {ranges(t.others)}")
            if t.missed:
                lines.append(f"  no face detected, interpolated: frames {ranges(t.missed)}")
            if t.rejected:
                lines.append(f"  detection jumped away, interpolated: frames {ranges(t.rejected)}")
            if t.clamped:
                lines.append(f"  rectangle moved or shrunk into the frame (face at the edge): frames {ranges(t.clamped)}")
        lines.append(f"  crop rectangles {int(side.min())}..{int(side.max())} px wide")
        return "\n".join(lines + _jitter_lines(self.jitter, self.smoothed_jitter, self.rects))


def _jitter_lines(jitter: float | None, smoothed: float | None, rects: np.ndarray) -> list[str]:
    """The landmarks' jitter, and what to do when it is past ``JITTER_WARN`` (see crop_rects)."""
    if jitter is None:
        return []
    line = (f"  landmark jitter {100 * jitter:.1f} % of the crop side (95th percentile; warned above "
            f"{100 * JITTER_WARN:g} % and {JITTER_MIN_PX:g} px)")
    if smoothed is not None:
        return [line + f"; smoothed rectangles written: {100 * smoothed:.1f} %"]
    if not shakes(jitter, rects):
        return [line]
    return [line, ("  warning: the landmarks shake from frame to frame, so the pasted face will visibly shake. "
                   "SyncTalk_2D trains and infers on these raw rectangles; to steady them import with --smooth (the "
                   "network then sees crops a few px from those it was trained on), or smooth the landmarks before "
                   "training")]


# -- inputs ---------------------------------------------------------------------------------------

def check_target(models_dir: Path, name: str, force: bool) -> Path:
    check_name(name)
    target = models_dir / name
    if (target.exists() or target.is_symlink()) and not force:
        raise AvatarError(f"avatar {name!r} already exists ({target}); pass --force to replace it")
    return target


def check_network(network: Path, encoder: Path | None, face_room: int) -> tuple[GraphInfo, EncoderInfo | None]:
    """The engine's own checks of the network (and encoder) contract, before anything is written."""
    if not network.is_file():
        raise AvatarError(f"{network}: no such network file")
    graph = read_graph(network)
    room = ring_room_error(graph, face_room)
    if room:
        raise AvatarError(f"{network}: {room}")
    enc = None
    if encoder is not None:
        if not encoder.is_file():
            raise AvatarError(f"{encoder}: no such audio encoder file")
        enc = read_encoder(encoder)
        check_encoder_fits(enc, graph)
    return graph, enc


# -- video ----------------------------------------------------------------------------------------

def _open(path: Path):
    import av
    if not path.is_file():
        raise AvatarError(f"{path}: no such file")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise AvatarError(f"{path}: not a readable video: {e}") from None
    if not container.streams.video:
        container.close()
        raise AvatarError(f"{path}: has no video stream")
    return container


def video_info(path: Path) -> dict[str, Any]:
    """Rate, duration, size of a video's first video stream (for the progress estimate and report)."""
    with _open(path) as c:
        s = c.streams.video[0]
        rate = float(s.average_rate) if s.average_rate else None
        dur = float(s.duration * s.time_base) if s.duration and s.time_base else (
            c.duration / 1e6 if c.duration else None)
        return {"fps": rate, "duration": dur, "width": s.codec_context.width, "height": s.codec_context.height}


def video_frames(path: Path, start: float = 0.0, end: float | None = None, fps: int = FPS) -> Iterator[np.ndarray]:
    """BGR frames of ``path`` at ``fps`` frames/s from ``start`` to ``end`` seconds.

    Output frame k shows the instant ``start + k / fps``: the source frame whose display interval
    holds it (the boundary between two source frames is their timestamps' midpoint), so a 25
    frames/s video comes out frame for frame, a 50 frames/s one every other frame and a 30
    frames/s one with 5 of every 6. Frames are turned upright as the video's rotation says.
    """
    import av
    begin = Fraction(start).limit_denominator(10 ** 6)
    stop = None if end is None else Fraction(end).limit_denominator(10 ** 6)
    with _open(path) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        tb = stream.time_base or Fraction(1, 90000)
        rate = stream.average_rate or Fraction(fps)
        t0 = Fraction(stream.start_time or 0) * tb
        k = 0
        decoded = 0
        prev: tuple[Fraction, Any] | None = None

        def until(boundary: Fraction) -> Iterator[np.ndarray]:
            """prev's frame for every output instant before ``boundary``."""
            nonlocal k
            while True:
                t = begin + Fraction(k, fps)
                if t >= boundary or (stop is not None and t >= stop):
                    return
                yield _upright(prev[1])                       # type: ignore[index]
                k += 1
        try:
            if begin > 0:
                c.seek(int((begin + t0) / tb), stream=stream, backward=True)
            for frame in c.decode(stream):
                t = Fraction(frame.pts) * tb - t0 if frame.pts is not None else Fraction(decoded) / rate
                decoded += 1
                if prev is not None:
                    if t <= prev[0]:
                        continue                             # a repeated or out-of-order timestamp
                    yield from until((prev[0] + t) / 2)
                    if stop is not None and begin + Fraction(k, fps) >= stop:
                        return
                prev = (t, frame)
            if prev is not None:                             # the last frame shows for one frame time
                yield from until(prev[0] + 1 / rate)
        except av.FFmpegError as e:
            raise AvatarError(f"{path}: decoding failed after {decoded} frames: {e}") from None


def _upright(frame: Any) -> np.ndarray:
    """A decoded frame as BGR pixels, turned as its display matrix says (a phone's portrait video is
    stored sideways with a rotation of -90 or 90 degrees, which players and ffmpeg apply)."""
    img = frame.to_ndarray(format="bgr24")
    turns = round((getattr(frame, "rotation", 0) or 0) / 90) % 4      # counterclockwise quarter turns
    return np.ascontiguousarray(np.rot90(img, turns)) if turns else img


def _write_rects(path: Path, rects: np.ndarray) -> None:
    path.write_text("[\n" + ",\n".join(json.dumps([int(v) for v in r]) for r in rects) + "\n]\n")


def _finish(st: Staging, rects: np.ndarray, network: Path, encoder: Path | None, encoder_name: str,
            width: int, height: int) -> Path:
    """Write the rectangles and networks, check the folder as the engine will, rename it into place."""
    _write_rects(st.folder / "crop_rects.json", rects)
    if encoder is not None:
        shutil.copyfile(encoder, st.folder / encoder_name)
    shutil.copyfile(network, st.folder / "checkpoint" / "model_best.onnx")
    files = avatar_files(st.models_dir, st.name, st.folder.name)
    if len(files.frames) != len(rects):
        raise AvatarError(f"{len(files.frames)} frames written for {len(rects)} rectangles")
    read_rects(files.rects, len(files.frames), width, height)
    return st.commit()


def _encode(img: np.ndarray, fmt: str) -> bytes:
    ok, buf = cv2.imencode(f".{fmt}", img, [cv2.IMWRITE_PNG_COMPRESSION, 1] if fmt == "png"
                           else [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise AvatarError(f"cannot encode a frame as {fmt}")
    return buf.tobytes()


def read_user_points(path: Path, kind: str) -> np.ndarray:
    """``--rects`` (JSON [[x1, y1, x2, y2], ...]) or ``--landmarks`` (JSON [[[x, y], ...], ...]) as an
    array, one entry per frame."""
    shape = ("a list of [x1, y1, x2, y2], one per frame" if kind == "rects" else
             "a list per frame of [x, y] points (68 or 98 of them, the same number in every frame)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AvatarError(f"{path}: not a JSON file: {e}") from None
    try:
        arr = np.asarray(data, dtype=np.float64)
    except (ValueError, TypeError):
        arr = np.zeros(0)
    if arr.ndim != (2 if kind == "rects" else 3) or arr.shape[-1] != (4 if kind == "rects" else 2) or not len(arr):
        raise AvatarError(f"{path}: expected {shape}")
    if not np.isfinite(arr).all():
        raise AvatarError(f"{path}: {kind} must be finite numbers")
    return arr.astype(np.int32) if kind == "rects" else arr


def _span(info: dict[str, Any], start: float, end: float | None) -> str:
    dur = info["duration"]
    if dur is not None and start >= dur:
        return f"--start {start:g} s is at or past the video's end ({dur:.2f} s)"
    where = f" from {start:g} s" + (f" to {end:g} s" if end is not None else "")
    return "no video frames" + (where if start or end is not None else "")


def _detect(finder: LandmarkFinder | None, img: np.ndarray) -> Face | None:
    return finder.find(img) if finder is not None else None


def import_video(models_dir: Path, name: str, video: Path, network: Path, encoder: Path | None = None, *,
                 start: float = 0.0, end: float | None = None, force: bool = False, frame_format: str = "jpg",
                 encoder_name: str = "audio_encoder.onnx", face_room: int = 320, detect_threshold: float = 0.0,
                 predictor: Path | None = None, rects: np.ndarray | None = None,
                 landmarks: list[np.ndarray] | None = None, progress: Progress | None = None) -> ImportResult:
    """A video: frames at 25 frames/s from ``start`` to ``end``, the face's landmarks found in each
    (:mod:`engine.avatars.landmarks`) and made into SyncTalk_2D crops (:mod:`engine.avatars.face_track`);
    or the user's own ``rects`` or ``landmarks`` (one per output frame), with no detection at all."""
    t0 = time.perf_counter()
    check_target(models_dir, name, force)
    check_network(network, encoder, face_room)
    if start < 0 or (end is not None and end <= start):
        raise AvatarError(f"--start {start:g} / --end {end:g}: expected 0 <= start < end" if end is not None
                          else f"--start {start:g}: expected a time >= 0")
    info = video_info(video)
    total = 0
    if info["duration"]:
        total = max(1, int(((min(end, info["duration"]) if end else info["duration"]) - start) * FPS + 0.5))
    given = rects is not None or landmarks is not None
    finder = None if given else LandmarkFinder(detect_threshold, predictor)
    faces: list[Face | None] = []
    size: tuple[int, int] | None = None
    with Staging(models_dir, name, force) as st, ThreadPoolExecutor(2, thread_name_prefix="import-write") as pool:
        pending: list[Future] = []
        for k, img in enumerate(video_frames(video, start, end)):
            if size is None:
                size = img.shape[:2]
            path = st.folder / "frames" / f"frame_{k:04d}.{frame_format}"
            pending.append(pool.submit(lambda p=path, i=img: p.write_bytes(_encode(i, frame_format))))
            faces.append(_detect(finder, img))
            while len(pending) > 8:
                pending.pop(0).result()
            if progress:
                progress(k + 1, max(total, k + 1))
        for f in pending:
            f.result()
        if not faces or size is None:
            raise AvatarError(f"{video}: {_span(info, start, end)}")
        if len(faces) < 2:
            raise AvatarError(f"{video}: {len(faces)} frame at {FPS} frames/s: an avatar from a still image does not "
                              "move; give a video of the person talking (5 s or more is best)")
        h, w = size
        report = None
        if landmarks is not None:
            rects = rects_from_landmarks(landmarks, w, h)
        if rects is None:
            try:
                rects, report = rects_from_faces(faces, w, h, FPS, start)
            except AvatarError as e:
                raise AvatarError(f"{video}: {e}") from None
        elif len(rects) != len(faces):
            raise AvatarError(f"{len(rects)} rectangles given for the {len(faces)} frames imported at {FPS} "
                              "frames/s; give one per frame")
        folder = _finish(st, rects, network, encoder, encoder_name, w, h)
    return ImportResult(name, folder, len(rects), w, h, "video", info["fps"], report, rects,
                        time.perf_counter() - t0, cleaned=[s.text() for s in st.stale])


# -- SyncTalk_2D dataset --------------------------------------------------------------------------

_NUM = re.compile(r"^(\d+)\.(jpg|lms)$")


def _numbered(folder: Path, ext: str) -> dict[int, Path]:
    out = {}
    for p in folder.iterdir():
        m = _NUM.match(p.name)
        if m and m.group(2) == ext:
            out[int(m.group(1))] = p
    return out


def is_synctalk_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "full_body_img").is_dir() and (path / "landmarks").is_dir()


def import_synctalk(models_dir: Path, name: str, dataset: Path, network: Path, encoder: Path | None = None, *,
                    start: float = 0.0, end: float | None = None, force: bool = False,
                    encoder_name: str = "audio_encoder.onnx", face_room: int = 320, smooth: bool = False,
                    progress: Progress | None = None) -> ImportResult:
    """A SyncTalk_2D dataset folder (``full_body_img/<i>.jpg``, ``landmarks/<i>.lms``): frames copied,
    rectangles as SyncTalk_2D's inference computes them (a network trained on the dataset saw exactly
    those), their jitter measured and reported; ``smooth`` smooths them over time instead
    (:func:`engine.avatars.crop_rects.smooth_squares`); ``start``/``end`` in seconds at 25 frames/s."""
    t0 = time.perf_counter()
    check_target(models_dir, name, force)
    check_network(network, encoder, face_room)
    if not is_synctalk_dataset(dataset):
        raise AvatarError(f"{dataset}: not a SyncTalk_2D dataset folder (expected full_body_img/ and landmarks/)")
    imgs, lms = _numbered(dataset / "full_body_img", "jpg"), _numbered(dataset / "landmarks", "lms")
    if not imgs:
        raise AvatarError(f"{dataset / 'full_body_img'}: no <i>.jpg frames")
    if len(imgs) != len(lms) or set(imgs) != set(lms):
        no_lms, no_img = sorted(set(imgs) - set(lms)), sorted(set(lms) - set(imgs))
        raise AvatarError(f"{dataset}: {len(imgs)} frames in full_body_img but {len(lms)} landmark files in landmarks"
                          + (f"; frames without landmarks: {ranges(no_lms)}" if no_lms else "")
                          + (f"; landmarks without a frame: {ranges(no_img)}" if no_img else ""))
    n = len(imgs)
    if sorted(imgs) != list(range(n)):
        gaps = sorted(set(range(max(imgs) + 1)) - set(imgs))
        raise AvatarError(f"{dataset / 'full_body_img'}: frames must be numbered 0..{n - 1}; missing {ranges(gaps)}")
    first = round(start * FPS)
    last = n if end is None else min(n, round(end * FPS))
    if not 0 <= first < last:
        span = f"--start {start:g}" + (f" / --end {end:g}" if end is not None else "")
        raise AvatarError(f"{span}: no frames of the {n} ({n / FPS:.2f} s) selected")
    with Staging(models_dir, name, force) as st:
        size, squares = _copy_synctalk(imgs, lms, range(first, last), st.folder / "frames", progress)
        h, w = size
        if smooth:
            rects = smooth_squares(squares, w, h)
        else:
            rects = np.minimum(squares, (w, h, w, h)).astype(np.int32)   # clipped as synctalk_rect clips them
        folder = _finish(st, rects, network, encoder, encoder_name, w, h)
    return ImportResult(name, folder, len(rects), w, h, "synctalk", None, None, rects, time.perf_counter() - t0,
                        jitter=rect_jitter(squares), smoothed_jitter=rect_jitter(rects) if smooth else None,
                        cleaned=[s.text() for s in st.stale])


def _copy_synctalk(imgs: dict[int, Path], lms: dict[int, Path], frames: range, into: Path,
                   progress: Progress | None) -> tuple[tuple[int, int], np.ndarray]:
    """Copy the frames (checking each decodes to the first one's size) and read each landmark file:
    the frame size and the unclipped SyncTalk_2D squares [N, 4] (rect_jitter and smoothing need them
    before numpy's slicing clips them at the frame's edges)."""
    squares = np.zeros((len(frames), 4), np.int64)
    size: tuple[int, int] | None = None
    for k, i in enumerate(frames):
        img = decode_frame(imgs[i])
        if size is None:
            size = img.shape[:2]
        elif img.shape[:2] != size:
            raise AvatarError(f"{imgs[i]}: {img.shape[1]}x{img.shape[0]} differs from the first frame's "
                              f"{size[1]}x{size[0]}")
        points = read_lms(lms[i])
        synctalk_rect(points, size[1], size[0], str(lms[i]))           # refuses a crop SyncTalk_2D could not take
        squares[k] = synctalk_square(points)
        shutil.copyfile(imgs[i], into / f"frame_{k:04d}.jpg")
        if progress:
            progress(k + 1, len(frames))
    assert size is not None
    return size, squares
