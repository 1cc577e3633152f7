"""From each frame's face landmarks to one crop rectangle per frame, or an honest refusal.

Plain functions over :class:`engine.avatars.landmarks.Face` lists; no I/O.

1. **One face, the same face.** A detection whose place, size or landmark geometry jumps away from
   the detections around it (the 3 each side) is dropped as a false find or another person. When
   whole-frame searches see another face of comparable size (:data:`landmarks.OTHER_FACE`) in at
   least half of them, the video is refused: an avatar is one person.
2. **Enough of it.** The face must be found in at least :data:`MIN_FOUND` of the frames, and no gap
   may last longer than :data:`MAX_GAP_S`; shorter gaps are filled by interpolation (held at the
   ends). A refusal names the gaps in seconds and, where there is one (1 s or more, the face found
   in ``MIN_FOUND`` of it), the longest part of the video that would import.
3. **SyncTalk_2D's crop.** Each frame's crop comes from the WFLW points SyncTalk_2D reads
   (:func:`engine.avatars.landmarks.wflw_crop_points`): left ``x1``, right ``x2``, top ``y1``,
   square, side ``x2 - x1``. The three series are smoothed over time with a zero-lag Gaussian (the
   whole video is known, so no filter delay: the crop follows the head without trailing it; the
   centre with sigma :data:`SIGMA_CENTRE` frames, the side with :data:`SIGMA_SIZE`), then rounded
   and shifted (or shrunk) into the frame where the face is at its edge.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.avatars.crop_rects import _smooth, ranges
from engine.avatars.disk import AvatarError
from engine.avatars.landmarks import OTHER_FACE, Face, wflw_crop_points

SIGMA_CENTRE = 1.5          # frames: on carphone at 720p, 1.5/4 keeps every crop within 4.1 % of its own
SIGMA_SIZE = 4.0            # frame's landmark crop (2/6 reached 6.5 %), with whole-pixel-level smoothness
MIN_FOUND = 0.8             # share of frames the face must be found in
MAX_GAP_S = 0.5             # longest run of frames without the face that is filled in
JUMP = 0.35                 # a centre this many sides from its neighbours' median is a jump
SIZE_JUMP = (0.75, 1.33)    # a side outside this ratio to its neighbours' median is a jump
SHAPE_JUMP = 0.12           # normalised landmark geometry this far from its neighbours' is another face
SPAN = 3                    # detections each side a detection is judged against


@dataclass
class TrackReport:
    """What happened to the detections: which frames were filled in and why, which were clamped."""
    frames: int
    found: int = 0
    missed: list[int] = field(default_factory=list)        # no face detected
    rejected: list[int] = field(default_factory=list)      # a face that jumped away: dropped
    clamped: list[int] = field(default_factory=list)       # rectangle shifted or shrunk into the frame
    others: list[int] = field(default_factory=list)        # frames where another face was seen
    score: tuple[float, float] = (0.0, 0.0)                 # the detector's score: lowest, median

    @property
    def interpolated(self) -> list[int]:
        return sorted(self.missed + self.rejected)


def _shape(points: np.ndarray) -> np.ndarray:
    q = points - points.mean(axis=0)
    return q / max(float(np.sqrt((q ** 2).sum())), 1e-9)


def _shape_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Distance of two normalised 68-point shapes after the best rotation (Procrustes)."""
    u, _, vt = np.linalg.svd(b.T @ a)
    return float(np.sqrt(((a - b @ (u @ vt)) ** 2).sum()))


def _jumps(obs: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """True where a detection (cx, top, side) or its shape jumps away from its neighbours'."""
    bad = np.zeros(len(obs), bool)
    for j in range(len(obs)):
        lo, hi = max(0, j - SPAN), j + SPAN + 1
        if hi - lo < 3 or len(obs) < 3:
            continue
        med = np.median(obs[lo:hi], axis=0)
        ratio = obs[j, 2] / med[2]
        moved = np.hypot(obs[j, 0] - med[0], obs[j, 1] - med[1]) / med[2]
        ref = _shape(np.median(shapes[lo:hi], axis=0))
        bad[j] = moved > JUMP or not SIZE_JUMP[0] < ratio < SIZE_JUMP[1] or _shape_distance(shapes[j], ref) > SHAPE_JUMP
    return bad


def _seconds(frames: list[int], fps: float, offset: float) -> str:
    runs = ranges(frames).split(", ")
    out = []
    for r in runs:
        a, _, b = r.partition("-")
        t0, t1 = offset + int(a) / fps, offset + (int(b or a) + 1) / fps
        out.append(f"{t0:.2f}-{t1:.2f} s")
    return ", ".join(out)


def _gaps(have: np.ndarray) -> list[tuple[int, int]]:
    """Runs [a, b) of frames without the face."""
    out, a = [], None
    for i, h in enumerate(have):
        if not h and a is None:
            a = i
        elif h and a is not None:
            out.append((a, i))
            a = None
    if a is not None:
        out.append((a, len(have)))
    return out


def _refuse_gaps(have: np.ndarray, rep: TrackReport, fps: float, offset: float) -> None:
    n = len(have)
    max_gap = int(MAX_GAP_S * fps)
    long = [(a, b) for a, b in _gaps(have) if b - a > max_gap]
    if rep.found >= MIN_FOUND * n and not long:
        return
    without = [i for i in range(n) if not have[i]]
    # the longest stretch whose gaps are all short enough to fill in
    cuts = [0, *[x for a, b in long for x in (a, b)], n]
    parts = [(cuts[k], cuts[k + 1]) for k in range(0, len(cuts), 2)]
    a, b = max(parts, key=lambda p: p[1] - p[0])
    while a < b and not have[a]:
        a += 1
    while b > a and not have[b - 1]:
        b -= 1
    hint = ""
    if b - a >= fps and have[a:b].sum() >= MIN_FOUND * (b - a):         # a part that would import
        hint = (f"; the longest part with the face throughout is {offset + a / fps:.2f}-{offset + b / fps:.2f} s: "
                f"import it with --start {offset + a / fps:.2f} --end {offset + b / fps:.2f}")
    if rep.found < MIN_FOUND * n:
        what = (f"a face was found in only {rep.found} of {n} frames ({100 * rep.found / n:.0f} %; at least "
                f"{100 * MIN_FOUND:.0f} % are needed)")
    else:
        longest = max(b - a for a, b in long) / fps
        what = (f"a face was found in {rep.found} of {n} frames, but it is missing for {longest:.2f} s at once "
                f"(gaps of up to {MAX_GAP_S} s are filled in)")
    raise AvatarError(
        f"{what}; no face at {_seconds(without, fps, offset)}" + hint
        + ". Is there one frontal face throughout? Lower --detect-threshold to find faces the detector "
        "scores low, or give the rectangles with --rects")


def rects_from_faces(faces: list[Face | None], width: int, height: int, fps: float = 25.0,
                     offset: float = 0.0) -> tuple[np.ndarray, TrackReport]:
    """One square [x1, y1, x2, y2] per frame (int32 [N, 4]) from per-frame faces (None: no face);
    ``offset`` is the first frame's time in the source, for the messages."""
    n = len(faces)
    rep = TrackReport(n)
    rep.missed = [i for i, f in enumerate(faces) if f is None]
    idx = np.array([i for i, f in enumerate(faces) if f is not None], np.int64)
    if idx.size == 0:
        raise AvatarError(f"no face found in any of the {n} frames (dlib's frontal-face detector): is the face "
                          "frontal and at least a tenth of the frame wide? Lower --detect-threshold to find "
                          "faces it scores low, or give the rectangles with --rects")
    scanned = [f for f in faces if f is not None and f.others is not None]
    rep.others = [i for i, f in enumerate(faces) if f is not None and f.others]
    if len(scanned) >= 2 and sum(1 for f in scanned if f.others) >= 0.5 * len(scanned):
        raise AvatarError(f"more than one face: another face at least {OTHER_FACE:g} times as wide as the one "
                          f"followed was seen in {sum(1 for f in scanned if f.others)} of {len(scanned)} whole-frame "
                          f"searches, at "
                          f"{_seconds(rep.others, fps, offset)}; an avatar is one person: crop the video to one "
                          "face, or give the rectangles with --rects")
    got = [faces[i] for i in idx]
    obs = np.array([[(x1 + x2) / 2, y1, x2 - x1] for x1, x2, y1 in (wflw_crop_points(f.points) for f in got)])
    shapes = np.array([_shape(f.points) for f in got])
    bad = _jumps(obs, shapes)
    rep.rejected = [int(i) for i in idx[bad]]
    idx, obs = idx[~bad], obs[~bad]
    rep.found = int(idx.size)
    scores = np.array([faces[i].score for i in idx]) if idx.size else np.zeros(1)
    rep.score = (float(scores.min()), float(np.median(scores)))
    have = np.zeros(n, bool)
    have[idx] = True
    _refuse_gaps(have, rep, fps, offset)
    t = np.arange(n)
    cx, top, side = (np.interp(t, idx, obs[:, k]) for k in range(3))
    cx, top, side = _smooth(cx, SIGMA_CENTRE), _smooth(top, SIGMA_CENTRE), _smooth(side, SIGMA_SIZE)
    s = np.rint(side)
    x1 = np.rint(cx - s / 2)
    y1 = np.rint(top)
    limit = min(width, height)
    over = s > limit
    s = np.minimum(s, limit)
    x1c = np.clip(x1, 0, width - s)
    y1c = np.clip(y1, 0, height - s)
    rep.clamped = [int(i) for i in np.nonzero(over | (x1c != x1) | (y1c != y1))[0]]
    return np.stack([x1c, y1c, x1c + s, y1c + s], axis=1).astype(np.int32), rep


def rects_from_landmarks(landmarks: list[np.ndarray], width: int, height: int) -> np.ndarray:
    """The user's own landmarks (one [68, 2] or [98, 2] array per frame) as SyncTalk_2D crops, exactly
    (no smoothing, as SyncTalk_2D's inference crops its dataset's landmarks): 98 WFLW points through
    its formula, 68 points through the same WFLW points (:func:`wflw_crop_points`), truncated to
    whole pixels as SyncTalk_2D truncates."""
    from engine.avatars.crop_rects import synctalk_rect
    out = np.zeros((len(landmarks), 4), np.int32)
    for k, pts in enumerate(landmarks):
        if pts.shape == (68, 2):
            x1, x2, y1 = wflw_crop_points(pts)
            wflw = np.zeros((53, 2), np.int32)
            wflw[1, 0], wflw[31, 0], wflw[52, 1] = int(x1), int(x2), int(y1)
        elif pts.shape == (98, 2):
            wflw = pts.astype(np.float32).astype(np.int32)
        else:
            raise AvatarError(f"--landmarks: frame {k} has {pts.shape[0]} points; expected 68 (iBUG 300-W) "
                              "or 98 (WFLW, as SyncTalk_2D's datasets) [x, y] points per frame")
        out[k] = synctalk_rect(wflw, width, height, f"--landmarks frame {k}")
    return out
