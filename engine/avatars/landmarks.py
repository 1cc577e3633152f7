"""Face landmarks for avatar import: dlib's HOG frontal-face detector and its 68-point shape
predictor, one face per video frame, no sockets, no downloads.

The predictor model is ``shape_predictor_68_face_landmarks.dat`` from the ``face_recognition_models``
package (installed with the ``landmarks`` extra: ``dlib-bin`` and ``face-recognition-models``), or
any dlib 68-point predictor the user trained (``predictor=``). The detector is dlib's own (in the
``dlib-bin`` wheel). Licences: dlib is under the Boost Software License; the 68-point model was
trained on the iBUG 300-W dataset, whose licence excludes commercial use (see the README's
"Avatar import" section for what a commercial user does instead).

**Where the search runs.** A frame is searched whole (the first frame, after a miss, and once a
second to see whether another face has come in) at a fixed working width of 800 pixels, so that
a face a tenth of the frame wide is the detector's 80-pixel window at any resolution, and the cost
is the same at 176x144 and at 1080p. Between those, only a window 2.5 face sides wide around the
last face is searched, scaled so that the face is 100 pixels wide: faces from 0.8x to 2x the last
size are found there, in a few milliseconds. The 68 points are then predicted on a window scaled
so that the face is about 200 pixels wide, which gives sub-pixel landmarks on small videos.

**Which face.** The face followed is the largest of the first frame. A whole-frame search takes a
face for it only near where it was last seen (within ``SAME_MOVE`` of its sides, plus
``SAME_DRIFT`` a frame since, and within ``SAME_SIZE`` of its size) until it has been missing
``FORGET`` frames: someone walking by while the speaker looks away is not followed.

**From 68 points to SyncTalk_2D's crop.** SyncTalk_2D crops with the points 1, 31 and 52 of its
landmark files (110 points from its PFLD detector, or 98 WFLW points; the three are where WFLW's
layout has them, see :mod:`engine.avatars.crop_rects`):
``x1 = lms[1].x``, ``x2 = lms[31].x``, ``y1 = lms[52].y``, square. WFLW's 33
contour points are the 17 of the 68-point scheme with one between each pair (WFLW ``2k`` is 68-point
``k``), and WFLW's nose bridge 51-54 is 68-point 27-30. So WFLW 1 is the midpoint of 68-point 0 and
1, WFLW 31 that of 15 and 16, and WFLW 52 is 68-point 28 (:func:`wflw_crop_points`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from engine.avatars.disk import AvatarError

SEARCH_WIDTH = 800          # whole-frame searches run at this width
TRACK_FACE = 100            # tracked searches scale the frame so that the last face is this wide
TRACK_WINDOW = 2.0          # tracked search window, in face sides
PREDICT_FACE = 200          # landmarks are predicted with the face about this wide
RESCAN_EVERY = 25           # frames between whole-frame searches while a face is tracked
OTHER_FACE = 0.5            # another face at least this fraction of the main one's side counts
# a whole-frame search takes a face for the one last found only when it is within this many of its
# sides of it (plus SAME_DRIFT a frame since) and SAME_SIZE of its size; after FORGET frames without
# it, any face is taken (the largest)
SAME_MOVE, SAME_DRIFT, SAME_SIZE, FORGET = 1.0, 0.1, (0.6, 1.67), 25
EXTRA = "pip install 'lipsync-engine[landmarks]'"


@dataclass
class Face:
    """One frame's face: 68 points in frame pixels (float [68, 2]), the detector's score for it,
    and how many other faces of comparable size a whole-frame search saw (None: not searched)."""
    points: np.ndarray
    score: float
    others: int | None = None

    @property
    def side(self) -> float:
        """Face width at the eyes (68-point 0 to 16), the crop's scale."""
        return float(np.hypot(*(self.points[16] - self.points[0])))

    @property
    def centre(self) -> np.ndarray:
        return self.points.mean(axis=0)


def default_predictor() -> Path:
    try:
        import face_recognition_models
    except ImportError:
        raise AvatarError(f"finding faces in a video needs dlib's landmark model: {EXTRA} "
                          "(or give the rectangles with --rects or the landmarks with --landmarks)") from None
    return Path(face_recognition_models.pose_predictor_model_location())


def _dlib():
    try:
        import dlib
    except ImportError:
        raise AvatarError(f"finding faces in a video needs dlib: {EXTRA} "
                          "(or give the rectangles with --rects or the landmarks with --landmarks)") from None
    return dlib


def wflw_crop_points(points68: np.ndarray) -> tuple[float, float, float]:
    """The three WFLW coordinates SyncTalk_2D's crop reads (lms[1].x, lms[31].x, lms[52].y) from
    68-point landmarks (see the module doc)."""
    p = points68
    return (float(p[0, 0] + p[1, 0]) / 2, float(p[15, 0] + p[16, 0]) / 2, float(p[28, 1]))


class LandmarkFinder:
    """Finds the face and its 68 landmarks frame after frame, tracking the last face."""

    def __init__(self, threshold: float = 0.0, predictor: Path | None = None) -> None:
        dlib = _dlib()
        path = predictor or default_predictor()
        if not Path(path).is_file():
            raise AvatarError(f"{path}: no such landmark model file")
        try:
            self._predict = dlib.shape_predictor(str(path))
        except RuntimeError as e:
            raise AvatarError(f"{path}: not a dlib shape predictor: {e}") from None
        self._detector = dlib.get_frontal_face_detector()
        self._rect = dlib.rectangle
        self.threshold = threshold
        self._last: Face | None = None          # the face being tracked (None after a miss)
        self._seen: Face | None = None          # the face last found, and how many frames ago
        self._age = 0
        self._since_scan = 0
        self.full_searches = 0

    def find(self, bgr: np.ndarray) -> Face | None:
        gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY) if bgr.ndim == 3 else bgr
        face: Face | None = None
        others: int | None = None
        if self._last is not None and self._since_scan < RESCAN_EVERY:
            face = self._tracked(gray, self._last)
            self._since_scan += 1
        self._age += 1
        if face is None:
            found = self._whole(gray)
            self._since_scan = 0
            ref = self._seen if self._age <= FORGET else None
            if found:
                face = self._pick(found, ref)
                others = sum(1 for f in found if f is not face and f.side >= OTHER_FACE * face.side)
                if ref is not None and not self._same(face, ref, self._age):
                    face = None                 # someone else, while the face is not found: not taken for it
        if face is not None:
            face.others = others
            self._seen, self._age = face, 0
        self._last = face
        return face

    @staticmethod
    def _same(face: Face, ref: Face, frames: int) -> bool:
        moved = float(np.hypot(*(face.centre - ref.centre))) / max(ref.side, 1.0)
        ratio = face.side / max(ref.side, 1.0)
        return moved <= SAME_MOVE + SAME_DRIFT * frames and SAME_SIZE[0] <= ratio <= SAME_SIZE[1]

    # -- searches ---------------------------------------------------------------------------------

    def _boxes(self, img: np.ndarray, scale: float, ox: float, oy: float) -> list[tuple[np.ndarray, float]]:
        """Detections in ``img`` (a scaled window whose top-left is (ox, oy) in the frame) as frame
        boxes [x1, y1, x2, y2] with their scores."""
        rects, scores, _ = self._detector.run(np.ascontiguousarray(img), 0, self.threshold)
        return [(np.array([r.left(), r.top(), r.right() + 1, r.bottom() + 1], np.float64) / scale
                 + (ox, oy, ox, oy), float(s)) for r, s in zip(rects, scores)]

    def _whole(self, gray: np.ndarray) -> list[Face]:
        self.full_searches += 1
        h, w = gray.shape
        scale = SEARCH_WIDTH / w
        img = cv2.resize(gray, (SEARCH_WIDTH, max(1, round(h * scale))),
                         interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        return [self._landmarks(gray, box, s) for box, s in self._boxes(img, scale, 0, 0)]

    def _tracked(self, gray: np.ndarray, last: Face) -> Face | None:
        h, w = gray.shape
        lo, hi = last.points.min(axis=0), last.points.max(axis=0)
        side = max(hi - lo)
        cx, cy = (lo + hi) / 2
        half = TRACK_WINDOW * side / 2 + side / 4
        x0, y0 = int(max(0, cx - half)), int(max(0, cy - half))
        x1, y1 = int(min(w, cx + half)), int(min(h, cy + half))
        if x1 - x0 < 8 or y1 - y0 < 8:
            return None
        scale = TRACK_FACE / side
        win = cv2.resize(gray[y0:y1, x0:x1], (max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))),
                         interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        found = [self._landmarks(gray, box, s) for box, s in self._boxes(win, scale, x0, y0)]
        return self._pick(found, last) if found else None

    @staticmethod
    def _pick(found: list[Face], last: Face | None) -> Face:
        """The face nearest the last one (size and place), else the largest."""
        if last is None:
            return max(found, key=lambda f: (f.side, f.score))
        return min(found, key=lambda f: float(np.hypot(*(f.centre - last.centre))) / max(last.side, 1.0)
                   + abs(np.log(max(f.side, 1.0) / max(last.side, 1.0))))

    def _landmarks(self, gray: np.ndarray, box: np.ndarray, score: float) -> Face:
        """68 points for a detector box, predicted with the face ``PREDICT_FACE`` wide."""
        h, w = gray.shape
        bw = box[2] - box[0]
        scale = PREDICT_FACE / max(bw, 1.0)
        pad = 0.6 * bw
        x0, y0 = int(max(0, box[0] - pad)), int(max(0, box[1] - pad))
        x1, y1 = int(min(w, box[2] + pad)), int(min(h, box[3] + pad))
        win = cv2.resize(gray[y0:y1, x0:x1], (max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))),
                         interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
        b = (box - (x0, y0, x0, y0)) * scale
        shape = self._predict(np.ascontiguousarray(win), self._rect(int(b[0]), int(b[1]), int(b[2]) - 1, int(b[3]) - 1))
        pts = np.array([(shape.part(i).x, shape.part(i).y) for i in range(68)], np.float64)
        return Face(pts / scale + (x0, y0), score)
