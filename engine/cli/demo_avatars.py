"""Generate the two synthetic avatars the engine is developed and benchmarked with.

Both avatars use the seed's folder layout under a models root::

    <root>/<name>/checkpoint/model_best.onnx
    <root>/<name>/frames/frame_0000.png ...
    <root>/<name>/crop_rects.json        one [x1, y1, x2, y2] per frame

``demo``
    1280x720 frames of a drawn, gently moving head and a tiny elementwise network with the exact
    SyncTalk_2D I/O contract. Its output is the reference face with a dark mouth opening whose
    height follows the energy of the audio features, so lip movement is visible without any
    trained weights and the network runs far faster than real time on one CPU core.
``bench``
    The same frames (``frames`` is a relative symlink to ``../demo/frames``) and a network with
    the real SyncTalk_2D architecture (``unet_328.py`` ``Model(6, mode='ave')``) and cost,
    about 12.2 M parameters and 4.9 GMAC per frame, with seeded random weights. Its pictures
    are noise; its timings are the real network's.
``audio_encoder.onnx`` (in the models root itself)
    The audio encoder contract (``mel_spectrogram [N,1,80,16] -> audio_features [N,512]``) with
    a loudness "encoder": silence gives zero features, speech features whose mean magnitude
    follows the loudness of each 200 ms mel window, so the demo mouth moves with speech.

Everything is deterministic (seeded numpy generators, no network access) and every file is
written atomically: to a temporary name in the same folder, then renamed. The ONNX file is
written last, so an avatar whose ONNX file exists is complete.

Command line::

    python -m engine.cli.demo_avatars [--root models] [--only demo|bench] [--frames N] [--force]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
import onnx

from engine.cli.demo_networks import (
    AUDIO_ENCODER_NAME,
    EYE_Y,
    FACE_AXES,
    MOUTH_HALF_W,
    MOUTH_Y,
    NOSE_Y,
    RECT_SIZE,
    RECT_TOP,
    build_bench_network,
    build_demo_audio_encoder,
    build_demo_network,
    count_cost,
)

# --------------------------------------------------------------------------------------------
# Contract and geometry constants
# --------------------------------------------------------------------------------------------

FRAME_W, FRAME_H = 1280, 720
FPS = 25
ONNX_REL = Path("checkpoint") / "model_best.onnx"
FRAMES_DIR = "frames"
RECTS_NAME = "crop_rects.json"
FRAME_NAME = "frame_{:04d}.png"

SCENE_SEED = 1234


# --------------------------------------------------------------------------------------------
# Atomic file helpers
# --------------------------------------------------------------------------------------------


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_png(path: Path, img: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise RuntimeError(f"PNG encoding failed for {path}")
    _atomic_write_bytes(path, buf.tobytes())


def _write_rects(path: Path, rects: Sequence[Sequence[int]]) -> None:
    text = "[\n" + ",\n".join(json.dumps([int(v) for v in r]) for r in rects) + "\n]\n"
    _atomic_write_bytes(path, text.encode())


def _write_model(path: Path, model: onnx.ModelProto) -> None:
    _atomic_write_bytes(path, model.SerializeToString())


def _atomic_symlink(target: str, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


# --------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------


def head_pose(i: int) -> tuple[float, float, float]:
    """Head centre (x, y) and scale of frame ``i``: a smooth sway, bob and slight zoom."""
    t = i / FPS
    cx = FRAME_W / 2 + 24.0 * math.sin(2 * math.pi * t / 4.0) + 6.0 * math.sin(2 * math.pi * t / 1.7 + 1.0)
    cy = 300.0 + 9.0 * math.sin(2 * math.pi * t / 2.3 + 0.5) + 3.0 * math.sin(2 * math.pi * t / 0.9)
    s = 1.0 + 0.025 * math.sin(2 * math.pi * t / 5.0 + 0.3)
    return cx, cy, s


def crop_rect(i: int) -> list[int]:
    """Square crop rectangle [x1, y1, x2, y2] of frame ``i``: nose to below the chin, face width."""
    cx, cy, s = head_pose(i)
    size = int(round(RECT_SIZE * s))
    x1 = int(round(cx - size / 2))
    y1 = int(round(cy + RECT_TOP * s))
    x1 = min(max(x1, 0), FRAME_W - size)
    y1 = min(max(y1, 0), FRAME_H - size)
    return [x1, y1, x1 + size, y1 + size]


_SHIFT = 4  # cv2 fixed-point bits for sub-pixel drawing
_ONE = 1 << _SHIFT


def _pt(x: float, y: float) -> tuple[int, int]:
    return int(round(x * _ONE)), int(round(y * _ONE))


def _ellipse(img, c, axes, color, angle=0.0, start=0, end=360, thickness=-1):
    cv2.ellipse(img, _pt(*c), _pt(*axes), angle, start, end, color, thickness, cv2.LINE_AA, _SHIFT)


def _line(img, p, q, color, thickness):
    cv2.line(img, _pt(*p), _pt(*q), color, thickness, cv2.LINE_AA, _SHIFT)


_background_cache: np.ndarray | None = None


def _background() -> np.ndarray:
    """Static room: vertical gradient, a seeded low-contrast texture, a shelf and a picture."""
    global _background_cache
    if _background_cache is not None:
        return _background_cache
    rng = np.random.default_rng(SCENE_SEED)
    y = np.linspace(0.0, 1.0, FRAME_H, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, FRAME_W, dtype=np.float32)[None, :, None]
    top = np.array([150, 160, 165], np.float32)  # BGR, pale grey-beige wall
    bottom = np.array([95, 110, 120], np.float32)
    img = top * (1 - y) + bottom * y + np.zeros((1, FRAME_W, 1), np.float32)
    img *= (1.0 - 0.25 * (x - 0.5) ** 2 - 0.15 * (y - 0.45) ** 2)  # soft vignette
    # Plaster-like texture: coarse noise, upsampled and blurred (compresses like a real wall).
    coarse = rng.normal(0.0, 1.0, (FRAME_H // 8, FRAME_W // 8)).astype(np.float32)
    tex = cv2.resize(coarse, (FRAME_W, FRAME_H), interpolation=cv2.INTER_CUBIC)
    tex = cv2.GaussianBlur(tex, (0, 0), 2.0)
    img += 6.0 * tex[:, :, None]
    img = np.clip(img, 0, 255).astype(np.uint8)
    # A shelf with books on the left, a framed picture on the right.
    cv2.rectangle(img, (60, 400), (360, 414), (60, 80, 105), -1)
    xb = 70
    while xb < 345:
        w = int(rng.integers(14, 30))
        h = int(rng.integers(70, 120))
        color = tuple(int(v) for v in rng.integers(40, 200, 3))
        cv2.rectangle(img, (xb, 400 - h), (min(xb + w, 350), 399), color, -1)
        cv2.rectangle(img, (xb, 400 - h), (min(xb + w, 350), 399), (30, 30, 30), 1)
        xb += w + int(rng.integers(1, 4))
    cv2.rectangle(img, (930, 110), (1190, 300), (40, 60, 80), -1)
    cv2.rectangle(img, (942, 122), (1178, 288), (175, 150, 120), -1)
    for k in range(7):  # abstract "landscape": sine bands
        pts = np.array(
            [[942 + j, int(200 + 14 * k + 10 * math.sin(j / 23.0 + k))] for j in range(0, 237, 4)], np.int32
        )
        cv2.polylines(img, [pts], False, (90 + 15 * k, 120 + 8 * k, 60 + 10 * k), 3, cv2.LINE_AA)
    _background_cache = img
    return img


def draw_frame(i: int) -> np.ndarray:
    """The 1280x720 BGR frame ``i`` (deterministic)."""
    img = _background().copy()
    cx, cy, s = head_pose(i)
    ax, ay = FACE_AXES[0] * s, FACE_AXES[1] * s
    skin = (150, 182, 226)
    skin_dark = (118, 150, 200)
    # Shoulders and neck follow the head only partly.
    bx = FRAME_W / 2 + 0.4 * (cx - FRAME_W / 2)
    _ellipse(img, (bx, 745.0), (340.0, 190.0), (95, 55, 40))  # shirt
    _ellipse(img, (bx, 562.0), (78.0, 22.0), (75, 45, 32))  # collar shadow
    neck = np.array([_pt(cx - 52 * s, cy + 100 * s), _pt(cx + 52 * s, cy + 100 * s),
                     _pt(bx + 62, 565.0), _pt(bx - 62, 565.0)], np.int32)
    cv2.fillConvexPoly(img, neck, skin_dark, cv2.LINE_AA, _SHIFT)
    # Hair behind the head, ears, face.
    _ellipse(img, (cx, cy - 25 * s), (ax + 14 * s, ay + 10 * s), (30, 42, 62))
    for side in (-1, 1):
        _ellipse(img, (cx + side * (ax - 4 * s), cy + 5 * s), (16 * s, 30 * s), skin_dark)
    _ellipse(img, (cx, cy), (ax, ay), skin)
    _ellipse(img, (cx, cy + 128 * s), (34 * s, 12 * s), (142, 174, 218))  # chin
    for side in (-1, 1):  # cheeks
        _ellipse(img, (cx + side * 62 * s, cy + 55 * s), (22 * s, 14 * s), (140, 165, 225))
    # Fringe over the forehead.
    _ellipse(img, (cx, cy - 118 * s), (ax + 2 * s, 48 * s), (30, 42, 62), start=180, end=360)
    _ellipse(img, (cx - 10 * s, cy - 112 * s), (ax - 10 * s, 30 * s), (30, 42, 62))
    # Eyes with a blink every 3.2 s.
    blink = (i % 80) in (40, 41, 42)
    for side in (-1, 1):
        ex, ey = cx + side * 42 * s, cy + EYE_Y * s
        _line(img, (ex - 24 * s, ey - 24 * s), (ex + 22 * s, ey - 27 * s + side * 2 * s), (35, 45, 60), 5)
        if blink:
            _line(img, (ex - 18 * s, ey), (ex + 18 * s, ey), (70, 90, 120), 3)
        else:
            _ellipse(img, (ex, ey), (19 * s, 10 * s), (240, 245, 245))
            gaze = 3 * math.sin(2 * math.pi * i / FPS / 6.0)
            _ellipse(img, (ex + gaze * s, ey), (8 * s, 8 * s), (70, 95, 60))
            _ellipse(img, (ex + gaze * s, ey), (4 * s, 4 * s), (15, 15, 15))
            _ellipse(img, (ex, ey), (19 * s, 10 * s), (60, 80, 110), thickness=2)
    # Nose: bridge line, tip and nostrils.
    _line(img, (cx + 4 * s, cy - 25 * s), (cx + 8 * s, cy + NOSE_Y * s - 6 * s), (120, 150, 195), 3)
    _ellipse(img, (cx, cy + NOSE_Y * s), (14 * s, 10 * s), (135, 166, 212))
    for side in (-1, 1):
        _ellipse(img, (cx + side * 9 * s, cy + (NOSE_Y + 5) * s), (5 * s, 3 * s), (70, 90, 130))
    # Closed mouth: lips and the line between them.
    my = cy + MOUTH_Y * s
    mw = MOUTH_HALF_W * s
    _ellipse(img, (cx, my - 3 * s), (mw, 7 * s), (105, 110, 185), start=180, end=360)
    _ellipse(img, (cx, my), (mw * 0.9, 10 * s), (110, 118, 195), start=0, end=180)
    _line(img, (cx - mw, my), (cx + mw, my), (50, 50, 110), 3)
    return img


def _frame_path(avatar: Path, i: int) -> Path:
    return avatar / FRAMES_DIR / FRAME_NAME.format(i)


def make_audio_encoder(root: Path, force: bool = False) -> Path:
    """Write ``<root>/audio_encoder.onnx`` (atomically) unless it exists and not ``force``; returns its path."""
    path = Path(root) / AUDIO_ENCODER_NAME
    if force or not path.exists():
        _write_model(path, build_demo_audio_encoder())
    return path


# --------------------------------------------------------------------------------------------
# Avatars
# --------------------------------------------------------------------------------------------


def _read_rects(avatar: Path) -> list[list[int]] | None:
    try:
        rects = json.loads((avatar / RECTS_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rects, list) or not rects:
        return None
    return rects


def _ensure_demo(root: Path, frames: int, rebuild: bool, keep_count: bool) -> list[str]:
    """Write whatever of the demo avatar is missing; returns one line per thing written.

    ``keep_count``: an existing avatar keeps its frame count; otherwise ``frames`` is enforced.
    ``rebuild``: remove and rewrite everything.
    """
    avatar = root / "demo"
    onnx_path = avatar / ONNX_REL
    frames_dir = avatar / FRAMES_DIR
    made: list[str] = []
    rects = None if rebuild else _read_rects(avatar)
    n = len(rects) if (rects is not None and keep_count) else frames
    recount = rects is not None and len(rects) != n
    if rebuild or recount:
        # The ONNX file marks a complete avatar: take it away before the frames change.
        onnx_path.unlink(missing_ok=True)
        rects = None
    if frames_dir.is_symlink():
        frames_dir.unlink()
    if rebuild and frames_dir.exists():
        shutil.rmtree(frames_dir)
    frames_dir.mkdir(parents=True, exist_ok=True)
    if recount:  # frames beyond the new count would be picked up by loaders
        for p in frames_dir.glob("frame_*.png"):
            if p.stem[len("frame_"):].isdigit() and int(p.stem[len("frame_"):]) >= n:
                p.unlink()
    missing = [i for i in range(n) if not _frame_path(avatar, i).exists()]
    for i in missing:
        _write_png(_frame_path(avatar, i), draw_frame(i))
    if missing:
        made.append(f"demo: {len(missing)} frames")
    if rects is None:
        _write_rects(avatar / RECTS_NAME, [crop_rect(i) for i in range(n)])
        made.append(f"demo: {RECTS_NAME} ({n} rects)")
    if not onnx_path.exists():
        _write_model(onnx_path, build_demo_network())
        made.append(f"demo: {ONNX_REL}")
    return made


def _ensure_bench(root: Path, frames: int, rebuild: bool, keep_count: bool) -> list[str]:
    made = _ensure_demo(root, frames, rebuild=False, keep_count=keep_count)
    demo, bench = root / "demo", root / "bench"
    bench.mkdir(parents=True, exist_ok=True)
    onnx_path = bench / ONNX_REL
    if rebuild and onnx_path.exists():
        onnx_path.unlink()
    link = bench / FRAMES_DIR
    target = os.path.join("..", "demo", FRAMES_DIR)
    if not (link.is_symlink() and os.readlink(link) == target):
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)
        try:
            _atomic_symlink(target, link)
            made.append(f"bench: {FRAMES_DIR} -> {target}")
        except OSError:  # no symlinks on this filesystem: copy instead
            shutil.copytree(demo / FRAMES_DIR, link, dirs_exist_ok=True)
            made.append(f"bench: {FRAMES_DIR} (copied)")
    demo_rects = (demo / RECTS_NAME).read_bytes()
    bench_rects = bench / RECTS_NAME
    if rebuild or not bench_rects.exists() or bench_rects.read_bytes() != demo_rects:
        _atomic_write_bytes(bench_rects, demo_rects)
        made.append(f"bench: {RECTS_NAME}")
    if not onnx_path.exists():
        _write_model(onnx_path, build_bench_network())
        made.append(f"bench: {ONNX_REL}")
    return made


def make_demo(root: Path, frames: int = 100, force: bool = False) -> Path:
    """Make avatar ``demo`` with ``frames`` frames under ``root``; returns its folder.

    Parts already there (with that frame count) are kept unless ``force``.
    """
    root = Path(root)
    _ensure_demo(root, frames, rebuild=force, keep_count=False)
    return root / "demo"


def make_bench(root: Path, force: bool = False) -> Path:
    """Make avatar ``bench`` (and the demo frames it links to, 100 if absent); returns its folder."""
    root = Path(root)
    _ensure_bench(root, 100, rebuild=force, keep_count=True)
    return root / "bench"


def ensure_avatars(root: Path, names: Iterable[str] = ("demo", "bench"), frames: int = 100) -> None:
    """Create only what is missing of the named avatars (``frames`` applies to a missing demo),
    and ``<root>/audio_encoder.onnx`` if it is missing."""
    root = Path(root)
    for name in names:
        if name not in ("demo", "bench"):
            raise ValueError(f"unknown avatar {name!r}; expected 'demo' or 'bench'")
    for name in names:
        if name == "demo":
            _ensure_demo(root, frames, rebuild=False, keep_count=True)
        else:
            _ensure_bench(root, frames, rebuild=False, keep_count=True)
    make_audio_encoder(root)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.cli.demo_avatars",
                                 description="Generate the demo and bench avatars (deterministic, offline).")
    ap.add_argument("--root", type=Path, default=Path("models"), help="models root (default: models)")
    ap.add_argument("--only", choices=("demo", "bench"), help="make only this avatar")
    ap.add_argument("--frames", type=int, default=100, help="number of demo frames (default: 100)")
    ap.add_argument("--force", action="store_true", help="remake everything, even what exists")
    args = ap.parse_args(argv)
    if args.frames < 1:
        ap.error("--frames must be at least 1")
    t0 = time.perf_counter()
    made: list[str] = []
    if args.only in (None, "demo"):
        made += _ensure_demo(args.root, args.frames, rebuild=args.force, keep_count=False)
    if args.only in (None, "bench"):
        # The bench avatar links the demo frames; an existing demo keeps its frame count.
        made += _ensure_bench(args.root, args.frames, rebuild=args.force, keep_count=True)
    encoder = args.root / AUDIO_ENCODER_NAME
    if args.force or not encoder.exists():
        make_audio_encoder(args.root, force=True)
        made.append(AUDIO_ENCODER_NAME)
    for line in made or ["nothing to do"]:
        print(line)
    if args.only in (None, "bench"):
        params, macs = count_cost(onnx.load(str(args.root / "bench" / ONNX_REL)))
        print(f"bench network: {params:,} parameters, {macs / 1e9:.2f} GMAC per frame")
    print(f"avatars under {args.root} ready in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
