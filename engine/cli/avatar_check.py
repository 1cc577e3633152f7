"""``engine-ctl avatar check NAME``: everything the engine will check when it loads and serves an
avatar, plus what it will not refuse but a viewer would notice, as a readable report.

Each refusal comes from the function the engine itself calls (:mod:`engine.avatars.disk`,
:func:`engine.avatars.store.over_budget`, :class:`engine.worker.inference.InferenceCore`), so the report
and the engine's error carry the same words. Levels: ``ok``; ``warn`` (served, but look at it:
rectangles that jump, shake or are not square, crops the network upscales a lot, frames that do
not move, no audio encoder so streams are refused); ``error`` (the engine refuses to load the
avatar, or to run its network or its streams). Build folders left under ``models_root`` by an import
that was killed are removed first and reported as ``ok`` items (nothing is wrong with the avatar;
``warn`` when one cannot be removed).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from engine.avatars.crop_rects import JITTER_MIN_PX, JITTER_WARN, rect_jitter, shakes
from engine.avatars.disk import (
    AvatarError,
    avatar_files,
    check_encoder_fits,
    check_frame_size,
    decode_frame,
    describe_graph,
    find_encoder,
    frame_shape,
    read_encoder,
    read_graph,
    read_rects,
    ring_room_error,
)
from engine.avatars.staging import remove_stale
from engine.avatars.store import over_budget, shared_bytes
from engine.runtime.config import EngineConfig

JUMP_WARN = 0.15          # a rectangle moving more than this share of its side between two frames
SPREAD_WARN = 0.30        # rectangle sides spreading more than this share of their median
UPSCALE_WARN = 3.0        # the network's face input over the median crop side: above it the mouth looks soft
MOTION_SAMPLES = 16       # frames sampled across the video to see whether it moves
# the frames do not move when, in every sampled frame, 99 % of the face region (the median rectangle,
# grey, averaged down to 64x64) is within this many grey levels of the first sampled frame: a still
# image encoded as H.264 measures 2, one with heavy sensor noise (+-10 levels) 8, a mouth that opens 100+
STILL_LEVELS = 12.0


@dataclass
class CheckReport:
    name: str
    folder: str = ""
    items: list[tuple[str, str, str]] = field(default_factory=list)   # (level, topic, text)
    figures: dict[str, Any] = field(default_factory=dict)

    def add(self, level: str, topic: str, text: str) -> None:
        self.items.append((level, topic, text))

    @property
    def errors(self) -> list[str]:
        return [f"{topic}: {text}" for level, topic, text in self.items if level == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def text(self) -> str:
        lines = [f"avatar {self.name}  ({self.folder or 'no folder'})"]
        lines += [f"  {level:<6}{topic:<12}{text}" for level, topic, text in self.items]
        if self.ok:
            warns = sum(1 for level, _, _ in self.items if level == "warn")
            lines.append(f"verdict: the engine will serve {self.name}" + (f" ({warns} warning(s))" if warns else ""))
        else:
            lines.append(f"verdict: REFUSED: {self.errors[0]}")
        return "\n".join(lines)

    def as_json(self) -> str:
        return json.dumps({"name": self.name, "folder": self.folder, "ok": self.ok, "errors": self.errors,
                           "items": [{"level": a, "topic": b, "text": c} for a, b, c in self.items],
                           "figures": self.figures}, indent=2)


def _shape(dims: list[int] | tuple[int, ...], batch: str = "B") -> str:
    return "[" + ",".join([batch, *map(str, dims)]) + "]"


def check_avatar(cfg: EngineConfig, name: str, run_network: bool = True,
                 progress: Callable[[int, int], None] | None = None) -> CheckReport:
    rep = CheckReport(name)
    _remove_stale(rep, cfg.models_dir)
    try:
        files = avatar_files(cfg.models_dir, name, cfg.model(name).path)
    except AvatarError as e:
        rep.add("error", "files", str(e))
        return rep
    rep.folder = str(files.folder)
    n = len(files.frames)

    graph = None
    try:
        graph = read_graph(files.onnx)
        g = describe_graph(graph)
        rep.figures["network"] = g
        rep.add("ok", "network", f"{files.onnx.relative_to(files.folder)}: {g['image_input']} {_shape(graph.image_shape)}"
                f" + {g['audio_input']} {_shape(graph.audio_shape)} -> {g['output']} {_shape(graph.output_shape)}, "
                f"batch {g['batch']}")
        room = ring_room_error(graph, cfg.ring.max_face)
        if room:
            rep.add("error", "network", f"avatar {name}'s {room}")
    except AvatarError as e:
        rep.add("error", "network", str(e))
    if graph is not None and run_network:
        _run_network(rep, cfg, name, files.onnx)

    try:
        h, w = frame_shape(files)
    except AvatarError as e:
        rep.add("error", "frames", str(e))
        return rep
    samples = _check_frames(rep, files, h, w, progress)
    rects = _check_rects(rep, files.rects, n, w, h)
    if rects is not None:
        _check_jitter(rep, rects)
        if graph is not None:
            _check_face_size(rep, rects, graph.face)
        _check_still(rep, samples, rects)

    enc_path = find_encoder(files.folder, cfg.models_dir, cfg.streams.audio_encoder)
    if enc_path is None:
        rep.add("warn", "encoder", f"no {cfg.streams.audio_encoder} in {files.folder} nor in {cfg.models_dir}: "
                "streams of this avatar will be refused (composite requests with audio features work)")
    else:
        try:
            enc = read_encoder(enc_path)
            if graph is not None:
                check_encoder_fits(enc, graph)
            rep.add("ok", "encoder", f"{enc_path}: {enc.input} [N,1,80,16] -> {enc.output} [N,{enc.features}]"
                    + (f", 16 x {enc.features} fill the network's audio input {list(graph.audio_shape)}" if graph else ""))
        except AvatarError as e:
            rep.add("error", "encoder", f"{e} (streams of this avatar will fail)")

    if graph is not None:
        try:
            need = shared_bytes(cfg, files, graph.face)
        except AvatarError as e:                 # the rectangles are unusable: reported above
            rep.add("warn", "memory", f"shared memory not estimated: {e}")
            return rep
        budget = cfg.capacity.background_bytes
        rep.figures["shared_memory_bytes"] = need
        too_big = over_budget(name, need, budget)
        if too_big:
            rep.add("error", "memory", too_big)
        else:
            rep.add("ok", "memory", f"{need / 1e6:.1f} MB of shared memory when loaded ({need / n / 1e6:.2f} MB a frame, "
                    f"output.encoder = {cfg.output.encoder}; capacity.background_bytes {budget / 1e9:.2f} GB)")
    return rep


def _run_network(rep: CheckReport, cfg: EngineConfig, name: str, onnx_path) -> None:
    """Load the network as a GPU worker does (CPU provider here) and time one frame."""
    from engine.worker.inference import InferenceCore, InferenceError
    try:
        core = InferenceCore(None, 1, cfg.gpu.intra_op_threads, io_binding=False)
        t0 = time.perf_counter()
        m = core.load(name, onnx_path)
        load_ms = 1000 * (time.perf_counter() - t0)
        g = m.graph
        b = g.fixed_batch or 1
        out = np.empty((b, *g.output_shape), np.float32)
        t0 = time.perf_counter()
        core.run(m, np.zeros((b, *g.image_shape), np.float32), np.zeros((b, *g.audio_shape), np.float32), out)
        run_ms = 1000 * (time.perf_counter() - t0)
        rep.figures.update(network_load_ms=round(load_ms, 1), network_frame_ms=round(run_ms / b, 2))
        rep.add("ok", "runtime", f"ONNX Runtime (CPU provider) loads it in {load_ms:.0f} ms and runs a batch of {b} "
                f"in {run_ms:.1f} ms")
    except (InferenceError, AvatarError) as e:
        rep.add("error", "runtime", str(e))


def _remove_stale(rep: CheckReport, models_dir) -> None:
    """What a killed import left under models_root, removed now (``ok``: the cleanup is done; ``warn``
    for what could not be removed)."""
    for stale in remove_stale(models_dir):
        rep.add("warn" if stale.outcome == "failed" else "ok", "cleanup", stale.text())


def _check_frames(rep: CheckReport, files, h: int, w: int,
                  progress: Callable[[int, int], None] | None) -> list[np.ndarray]:
    """Every frame decodes to the first one's size; returns grey copies of up to ``MOTION_SAMPLES``
    frames spread across the video (for :func:`_check_still`)."""
    n = len(files.frames)
    picks = set(np.linspace(0, n - 1, min(n, MOTION_SAMPLES)).round().astype(int).tolist())
    samples: list[np.ndarray] = []
    bad = None
    for i, path in enumerate(files.frames):
        try:
            img = decode_frame(path)
            check_frame_size(path, img, h, w)
            if i in picks:
                samples.append(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
        except AvatarError as e:
            bad = bad or str(e)
        if progress:
            progress(i + 1, n)
    rep.figures.update(frames=n, width=w, height=h)
    if bad:
        rep.add("error", "frames", bad)
    else:
        rep.add("ok", "frames", f"{n} files {files.frames[0].name} .. {files.frames[-1].name}, {w}x{h}, "
                "every one decodes to that size")
    return samples


def _check_rects(rep: CheckReport, path, n: int, w: int, h: int) -> np.ndarray | None:
    """The rectangles the engine will use (the first ``n``), or None when it refuses them."""
    try:
        rects = read_rects(path, n, w, h).astype(np.int64)
    except AvatarError as e:
        rep.add("error", "rectangles", str(e))
        return None
    total = len(json.loads(path.read_text()))
    rw, rh = rects[:, 2] - rects[:, 0], rects[:, 3] - rects[:, 1]
    med = float(np.median(rw))
    spread = float(rw.max() - rw.min()) / med
    rep.figures.update(rectangles=total, side_min=int(rw.min()), side_median=med, side_max=int(rw.max()))
    rep.add("ok", "rectangles", f"{total} for {n} frames, every one inside its frame; side {rw.min()}..{rw.max()} px "
            f"(median {med:g}, spread {100 * spread:.1f} %)")
    if total > n:
        rep.add("warn", "rectangles", f"{total - n} more rectangles than frames: the engine uses the first {n}")
    skew = np.nonzero(rw != rh)[0]
    if skew.size:
        i = int(skew[np.argmax(np.abs(rw - rh)[skew])])
        rep.add("warn", "rectangles", f"{skew.size} not square (frame {i}: {rw[i]}x{rh[i]}): the network sees "
                "those faces stretched")
    if spread > SPREAD_WARN:
        rep.add("warn", "rectangles", f"sides spread {100 * spread:.0f} % around their median: a face that zooms "
                "that much is unusual for a talking head")
    if n > 1:
        centre = (rects[:, :2] + rects[:, 2:]) / 2
        move = np.hypot(*np.diff(centre, axis=0).T)
        grow = np.abs(np.diff(rw))
        j, k = int(np.argmax(move)), int(np.argmax(grow))
        rep.figures.update(max_move_px=float(move[j]), max_side_change_px=int(grow[k]))
        level = "warn" if move[j] > JUMP_WARN * med or grow[k] > JUMP_WARN * med else "ok"
        rep.add(level, "motion", f"largest move between consecutive frames {move[j]:.1f} px (frame {j} -> {j + 1}), "
                f"largest side change {grow[k]} px (frame {k} -> {k + 1})"
                + (": the pasted face will visibly jump there" if level == "warn" else ""))
    return rects


def _check_jitter(rep: CheckReport, rects: np.ndarray) -> None:
    """The rectangles' frame-to-frame shake (:func:`engine.avatars.crop_rects.rect_jitter`)."""
    if len(rects) < 3:
        return
    jitter = rect_jitter(rects)
    rep.figures["rect_jitter"] = round(jitter, 4)
    text = f"rectangles shake by {100 * jitter:.1f} % of their side (95th percentile, frame to frame)"
    if not shakes(jitter, rects):
        rep.add("ok", "jitter", text + (f" (at most {JITTER_MIN_PX:g} px: whole-pixel rounding)"
                                        if jitter > JITTER_WARN else ""))
        return
    rep.add("warn", "jitter", f"{text}, above {100 * JITTER_WARN:g} % and {JITTER_MIN_PX:g} px: the pasted face "
            "will visibly shake against the head and body around it; re-import with steadier rectangles (for a "
            "SyncTalk_2D dataset: --smooth, or smooth its landmarks)")


def _check_face_size(rep: CheckReport, rects: np.ndarray, face: int) -> None:
    """How much the network's face input (``face`` x ``face``) enlarges the median crop."""
    side = float(np.median(rects[:, 2] - rects[:, 0]))
    factor = face / max(side, 1.0)
    rep.figures.update(upscale=round(factor, 2))
    text = f"median crop side {side:g} px; the network's {face}x{face} face input scales it {factor:.1f}x"
    if factor <= UPSCALE_WARN:
        rep.add("ok", "face size", text)
        return
    rep.add("warn", "face size", f"{text}, more than {UPSCALE_WARN:g}x: the generated mouth is made from so few "
            f"pixels that it will look blurred and soft next to the frame; use a video where the face is larger "
            f"(a crop side of {int(np.ceil(face / UPSCALE_WARN))} px or more: a higher resolution or a closer shot)")


def _check_still(rep: CheckReport, samples: list[np.ndarray], rects: np.ndarray) -> None:
    """A one-frame avatar, or frames whose face region does not change (see ``STILL_LEVELS``)."""
    if len(rects) == 1:
        rep.add("warn", "movement", "1 frame: the avatar is a still image; streams will show it frozen with only "
                "the mouth moving; import a video of the person talking (5 s or more is best)")
        return
    if len(samples) < 2:                        # frames that do not decode: reported above
        return
    x1, y1, x2, y2 = (int(v) for v in np.median(rects, axis=0))
    tiles = [cv2.resize(g[y1:y2, x1:x2], (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32)
             for g in samples]
    change = max(float(np.percentile(np.abs(t - tiles[0]), 99)) for t in tiles[1:])
    rep.figures["face_change_levels"] = round(change, 1)
    text = f"the face region changes by up to {change:.0f} grey levels across {len(samples)} sampled frames"
    if change > STILL_LEVELS:
        rep.add("ok", "movement", text)
        return
    rep.add("warn", "movement", f"{text} (at most {STILL_LEVELS:g}: no movement): the avatar is a still image "
            "repeated, so streams will show it frozen with only the mouth moving; import a video of the person "
            "talking, not a photo or a paused video")
