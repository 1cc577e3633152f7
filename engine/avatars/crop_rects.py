"""Crop rectangles for an avatar: from per-frame face boxes (smoothed), or from SyncTalk_2D landmarks.

Plain functions, no I/O but :func:`read_lms`.

**From face boxes** (:func:`rects_from_boxes`, used by ``engine-ctl avatar import VIDEO``): boxes
that jump away from their neighbours are dropped, frames without a box are filled by linear
interpolation, the centre and size are smoothed over time with a zero-lag Gaussian (the whole video
is known, so no filter delay), and each box becomes the square SyncTalk_2D-style crop: as wide as
``crop_scale`` x the box, its top ``crop_top`` x the box height below the box's top (the
defaults put it at the nose bridge and make it as wide as the face at the cheekbones, like the
crop SyncTalk_2D takes from its landmarks; calibrated by hand on scikit-image's astronaut photo).

**From SyncTalk_2D landmarks** (:func:`synctalk_rect`): exactly SyncTalk_2D's inference crop
(``inference_328.py``: ``xmin = lms[1][0]``, ``ymin = lms[52][1]``, ``xmax = lms[31][0]``,
``width = xmax - xmin``, ``ymax = ymin + width``, then ``img[ymin:ymax, xmin:xmax]``), landmarks
parsed as it parses them (float32, then int32: truncation toward zero). numpy slicing clips a
rectangle that runs past the right or bottom edge, so the rectangle is clipped the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.avatars.disk import AvatarError
from engine.avatars.face_detect import Box

CROP_SCALE = 0.86       # crop side / face box width
CROP_TOP = 0.43         # crop top below the face box top, in box heights
SIGMA_CENTRE = 2.0      # frames: the centre follows real head motion, not the detector's jitter
SIGMA_SIZE = 6.0        # frames: the face size changes slowly
OUTLIER_SPAN = 3        # detections each side in the running median an outlier is judged against
MIN_FOUND = 0.5         # below this share of frames with a face, the import fails


@dataclass
class TrackReport:
    """What happened to the detections: which frames were filled in and why, which were clamped."""
    frames: int
    found: int = 0
    missed: list[int] = field(default_factory=list)        # no face detected
    rejected: list[int] = field(default_factory=list)      # a face far from its neighbours: dropped
    clamped: list[int] = field(default_factory=list)       # rectangle shifted or shrunk into the frame

    @property
    def interpolated(self) -> list[int]:
        return sorted(self.missed + self.rejected)


def ranges(frames: list[int]) -> str:
    """'3-7, 12, 40-41' for [3,4,5,6,7,12,40,41]."""
    runs: list[list[int]] = []
    for f in sorted(frames):
        if runs and f == runs[-1][1] + 1:
            runs[-1][1] = f
        else:
            runs.append([f, f])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    """Zero-lag Gaussian smoothing; the ends are padded by point reflection so that a head moving
    at the first or last frame is not pulled back toward a constant."""
    if len(x) < 2 or sigma <= 0:
        return x.astype(np.float64)
    r = int(3 * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    p = min(r, len(x) - 1)
    head = 2 * x[0] - x[1:p + 1][::-1]
    tail = 2 * x[-1] - x[-p - 1:-1][::-1]
    padded = np.concatenate([np.full(r - p, head[0] if p else x[0]), head, x, tail,
                             np.full(r - p, tail[-1] if p else x[-1])])
    return np.convolve(padded, k, mode="valid")


def rects_from_boxes(boxes: list[Box | None], width: int, height: int, crop_scale: float = CROP_SCALE,
                     crop_top: float = CROP_TOP) -> tuple[np.ndarray, TrackReport]:
    """One square [x1, y1, x2, y2] per frame (int32 [N, 4]) from per-frame face boxes (None: no face)."""
    n = len(boxes)
    rep = TrackReport(n)
    rep.missed = [i for i, b in enumerate(boxes) if b is None]
    found = np.array([i for i, b in enumerate(boxes) if b is not None], np.int64)
    if found.size == 0:
        raise AvatarError(f"no face found in any of the {n} frames")
    obs = np.array([[boxes[i].cx, boxes[i].cy, boxes[i].w] for i in found], np.float64)   # type: ignore[union-attr]
    keep = np.ones(len(found), bool)
    for j in range(len(found)):             # drop boxes far from the median of the 3 detections each side
        near = obs[max(0, j - OUTLIER_SPAN):j + OUTLIER_SPAN + 1]
        if len(near) < 3:
            continue
        med = np.median(near, axis=0)
        if np.hypot(*(obs[j, :2] - med[:2])) > 0.35 * med[2] or not 0.75 < obs[j, 2] / med[2] < 1.33:
            keep[j] = False
    rep.rejected = [int(i) for i in found[~keep]]
    found, obs = found[keep], obs[keep]
    rep.found = int(found.size)
    if rep.found < MIN_FOUND * n:
        raise AvatarError(f"a face was found in only {rep.found} of {n} frames (missed: {ranges(rep.missed)}; "
                          f"rejected as jumps: {ranges(rep.rejected) or 'none'}): is there one frontal face "
                          "throughout? trim the video with --start/--end")
    t = np.arange(n)
    cx, cy, side = (np.interp(t, found, obs[:, k]) for k in range(3))
    cx, cy, side = _smooth(cx, SIGMA_CENTRE), _smooth(cy, SIGMA_CENTRE), _smooth(side, SIGMA_SIZE)
    s = np.rint(crop_scale * side)
    x1 = np.rint(cx - s / 2)
    y1 = np.rint(cy - side / 2 + crop_top * side)
    limit = min(width, height)
    over = s > limit
    s = np.minimum(s, limit)
    x1c = np.clip(x1, 0, width - s)
    y1c = np.clip(y1, 0, height - s)
    rep.clamped = [int(i) for i in np.nonzero(over | (x1c != x1) | (y1c != y1))[0]]
    rects = np.stack([x1c, y1c, x1c + s, y1c + s], axis=1).astype(np.int32)
    return rects, rep


# -- SyncTalk_2D --------------------------------------------------------------------------------

def read_lms(path: Path) -> np.ndarray:
    """A SyncTalk_2D ``landmarks/<i>.lms`` file ("x y" per line) as int32 [K, 2], parsed as
    SyncTalk_2D parses it: float32 values, then int32 (truncation toward zero)."""
    try:
        rows = [np.array(line.split(), dtype=np.float32) for line in path.read_text().splitlines() if line.strip()]
        lms = np.array(rows, dtype=np.int32)
    except (OSError, ValueError) as e:
        raise AvatarError(f"{path}: not a landmark file of 'x y' lines: {e}") from None
    if lms.ndim != 2 or lms.shape[1] != 2:
        raise AvatarError(f"{path}: not a landmark file of 'x y' lines")
    if len(lms) < 53:
        raise AvatarError(f"{path}: {len(lms)} landmarks; SyncTalk_2D's crop needs points 1, 31 and 52 "
                          "(its 98- or 110-point PFLD landmarks)")
    return lms


def synctalk_rect(lms: np.ndarray, width: int, height: int, where: str = "") -> list[int]:
    """SyncTalk_2D's crop rectangle [x1, y1, x2, y2] from one frame's landmarks (see the module doc)."""
    xmin, ymin, xmax = int(lms[1][0]), int(lms[52][1]), int(lms[31][0])
    side = xmax - xmin
    ymax = ymin + side
    if side < 2 or xmin < 0 or ymin < 0 or xmin >= width or ymin >= height:
        raise AvatarError(f"{where}: landmarks give the crop x {xmin}..{xmax}, y {ymin}..{ymax}, which is empty "
                          f"or outside the {width}x{height} frame (SyncTalk_2D could not crop it either)")
    return [xmin, ymin, min(xmax, width), min(ymax, height)]
