"""Crop rectangles from SyncTalk_2D landmarks, their jitter, and the zero-lag smoothing that the
video import (:mod:`engine.avatars.face_track`) uses too.

Plain functions, no I/O but :func:`read_lms`.

**From SyncTalk_2D landmarks** (:func:`synctalk_rect`): exactly SyncTalk_2D's inference crop
(``inference_328.py``: ``xmin = lms[1][0]``, ``ymin = lms[52][1]``, ``xmax = lms[31][0]``,
``width = xmax - xmin``, ``ymax = ymin + width``, then ``img[ymin:ymax, xmin:xmax]``), landmarks
parsed as it parses them (float32, then int32: truncation toward zero). numpy slicing clips a
rectangle that runs past the right or bottom edge, so the rectangle is clipped the same way. The
files must hold 110 points (SyncTalk_2D's ``data_utils/get_landmark.py`` runs ``PFLD_GhostOne``,
whose ``landmark_number`` is 110, and writes every point) or 98 (WFLW, the layout the indices 1, 31
and 52 come from: the contour beside each eye and the nose bridge; forks running a WFLW-trained
PFLD write it); any other count (a 68-point iBUG 300-W file, say) is another layout, whose points
1, 31 and 52 are elsewhere on the face, so it is refused.

**Jitter** (:func:`rect_jitter`): SyncTalk_2D crops every frame with its raw landmarks, so a
network trained there saw exactly those rectangles and a dataset import keeps them by default;
it measures how much they shake (the high-frequency part of the track that the zero-lag Gaussian
:func:`_smooth` removes), and :func:`smooth_squares` smooths them when asked.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.avatars.disk import AvatarError

SIGMA_CENTRE = 2.0      # frames: the centre follows real head motion, not the landmarks' jitter
SIGMA_SIZE = 6.0        # frames: the face size changes slowly
LMS_COUNTS = (98, 110)  # landmarks per SyncTalk_2D .lms file: WFLW, or its data_utils' PFLD_GhostOne
# rect_jitter above this (its 95th percentile residual, in crop sides) is reported: landmark noise of
# ~2 px standard deviation on a 200 px face, a visible shake of the pasted face; a smooth track
# measures ~0.3 % (whole-pixel rounding), natural head motion ~1.3 % (a +-20 px nod once a second),
# raw landmarks that jump 30 px frame to frame on a 200 px face ~7 %.
JITTER_WARN = 0.02
# ... and only when that is more than this many pixels: whole-pixel rectangles of a perfectly smooth
# track differ from it by up to about a pixel (2 % of a 45 px crop), which no viewer sees
JITTER_MIN_PX = 1.5


def shakes(jitter: float, rects: np.ndarray) -> bool:
    """Whether a :func:`rect_jitter` figure of ``rects`` is a shake to warn about (see ``JITTER_WARN``)."""
    r = np.asarray(rects, np.float64)
    side = float(np.median(r[:, 2] - r[:, 0])) if len(r) else 0.0
    return jitter > JITTER_WARN and jitter * side > JITTER_MIN_PX


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
    if len(lms) not in LMS_COUNTS:
        raise AvatarError(f"{path}: {len(lms)} landmarks; SyncTalk_2D datasets have 110 points per frame (its "
                          "data_utils' PFLD_GhostOne) or 98 WFLW points (forks with a WFLW-trained PFLD), "
                          "whose points 1, 31 and 52 its crop reads"
                          + ("; a 68-point (iBUG 300-W) file is not SyncTalk_2D's" if len(lms) == 68 else "")
                          + ": make the landmarks with SyncTalk_2D's data_utils/process.py, or import the video")
    return lms


def synctalk_square(lms: np.ndarray) -> tuple[int, int, int, int]:
    """SyncTalk_2D's crop [x1, y1, x2, y2] before numpy's slicing clips it at the frame's edges."""
    xmin, ymin, xmax = int(lms[1][0]), int(lms[52][1]), int(lms[31][0])
    return xmin, ymin, xmax, ymin + xmax - xmin


def synctalk_rect(lms: np.ndarray, width: int, height: int, where: str = "") -> list[int]:
    """SyncTalk_2D's crop rectangle [x1, y1, x2, y2] from one frame's landmarks (see the module doc)."""
    xmin, ymin, xmax, ymax = synctalk_square(lms)
    side = xmax - xmin
    if side < 2 or xmin < 0 or ymin < 0 or xmin >= width or ymin >= height:
        raise AvatarError(f"{where}: landmarks give the crop x {xmin}..{xmax}, y {ymin}..{ymax}, which is empty "
                          f"or outside the {width}x{height} frame (SyncTalk_2D could not crop it either)")
    return [xmin, ymin, min(xmax, width), min(ymax, height)]


# -- jitter ---------------------------------------------------------------------------------------

def rect_jitter(rects: np.ndarray) -> float:
    """How much the rectangles shake, in crop sides: per frame, the largest distance of the centre's
    x, y and the side from their zero-lag smoothed track (:func:`_smooth`, ``SIGMA_CENTRE``), over
    the median side; the 95th percentile over the frames (a typical bad frame, not one outlier:
    ``avatar check`` reports the single largest jump). 0.0 for fewer than 3 frames.

    Smooth head motion passes the Gaussian almost untouched, so what remains is the frame-to-frame
    noise of the landmarks or detections; see ``JITTER_WARN`` for what the numbers mean."""
    r = np.asarray(rects, np.float64)
    if len(r) < 3:
        return 0.0
    side = r[:, 2] - r[:, 0]
    med = float(np.median(side))
    if med <= 0:
        return 0.0
    track = ((r[:, 0] + r[:, 2]) / 2, (r[:, 1] + r[:, 3]) / 2, side)
    residual = np.max([np.abs(x - _smooth(x, SIGMA_CENTRE)) for x in track], axis=0)
    return float(np.percentile(residual, 95)) / med


def smooth_squares(squares: np.ndarray, width: int, height: int) -> np.ndarray:
    """Unclipped square crops (int [N, 4], :func:`synctalk_square`) smoothed over time as
    the video import smooths landmark crops (:mod:`engine.avatars.face_track`): centre with ``SIGMA_CENTRE``, side with
    ``SIGMA_SIZE``, zero-lag; then kept inside the frame's top-left and clipped at its right and
    bottom edges as SyncTalk_2D's slicing clips them. Rectangles a network trained on the raw ones
    did not see: only for landmarks too noisy to use as they are."""
    q = np.asarray(squares, np.float64)
    side = _smooth(_line_ends(q[:, 2] - q[:, 0], SIGMA_SIZE), SIGMA_SIZE)
    cx = _smooth(_line_ends((q[:, 0] + q[:, 2]) / 2, SIGMA_CENTRE), SIGMA_CENTRE)
    cy = _smooth(_line_ends((q[:, 1] + q[:, 3]) / 2, SIGMA_CENTRE), SIGMA_CENTRE)
    s = np.maximum(np.rint(side), 2)
    x1 = np.clip(np.rint(cx - s / 2), 0, width - 2)
    y1 = np.clip(np.rint(cy - s / 2), 0, height - 2)
    return np.stack([x1, y1, np.minimum(x1 + s, width), np.minimum(y1 + s, height)], axis=1).astype(np.int32)


def _line_ends(x: np.ndarray, sigma: float) -> np.ndarray:
    """``x`` with its first and last values replaced by a straight line fitted through the
    ``2 sigma + 1`` values at each end: :func:`_smooth` reflects the series about its end values,
    which would otherwise keep the end frames' own noise (motion there stays: a line follows it)."""
    k = min(len(x), 2 * int(np.ceil(sigma)) + 1)
    if k < 3:
        return x
    out = x.astype(np.float64)
    t = np.arange(k)
    out[0] = np.polyval(np.polyfit(t, x[:k], 1), 0)
    out[-1] = np.polyval(np.polyfit(t, x[-k:], 1), k - 1)
    return out
