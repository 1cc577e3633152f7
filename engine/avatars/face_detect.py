"""Face detection for avatar import: one face box per video frame, no sockets, no downloads.

The detector is scikit-image's multi-block LBP cascade (:class:`skimage.feature.Cascade`) with the
frontal-face cascade that scikit-image ships in its wheel (``lbpcascade_frontalface_opencv.xml``,
trained by OpenCV). It was chosen by measurement (``tools/face_detector_bench.py``: a moving,
zooming, turning face photo through H.264, 150 frames 640x360, on this project's 2-core machine):

=============================  =========  ============  ==========  ===========
detector                       found      boxes         ms a frame  installable
                                          elsewhere                 with OpenCV 5
=============================  =========  ============  ==========  ===========
OpenCV 4 Haar (default, alt2)  150, 150   74, 11        38, 41      no
dlib HOG (dlib-bin)            106        9             10          yes (missed turned faces)
scikit-image LBP, whole frame  150        46            110         yes
this module (LBP, tracking)    150        0             5           yes
=============================  =========  ============  ==========  ===========

OpenCV 5 ships neither its Haar cascades nor ``CascadeClassifier``; MediaPipe's wheel no longer
carries its face models and pins ``opencv-contrib-python``.

Speed comes from tracking: the first frame (and any frame after a miss) is searched whole at a
working width of at most 640 pixels (the largest of the best-supported faces wins, see
:meth:`FaceDetector._full`); after that only a window of 1.8 face sides around the last box is
searched, at the scale where the face is about 96 pixels wide, for sizes 0.7x to 1.4x the last one.
The cascade's box depends on the scale and size range searched, so a whole-frame find is measured
again by tracked searches, until its size settles, before it is used.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

SEARCH_WIDTH = 640          # full-frame searches run at most this wide
MIN_FACE = 40               # smallest face searched for in a full-frame search, at SEARCH_WIDTH
TRACK_FACE = 96             # tracked searches scale the frame so that the face is about this wide
TRACK_WINDOW = 1.8          # tracked search window, in face sides


@dataclass(frozen=True)
class Box:
    """A face box in frame pixels (floats: detections are made on scaled frames)."""
    x: float
    y: float
    w: float
    h: float

    @property
    def cx(self) -> float:
        return self.x + self.w / 2

    @property
    def cy(self) -> float:
        return self.y + self.h / 2


def cascade_path() -> str:
    from skimage.data import lbp_frontal_face_cascade_filename
    return lbp_frontal_face_cascade_filename()


class FaceDetector:
    """Finds the face of a talking-head video, frame after frame (keeps the last box as its track)."""

    def __init__(self, neighbours: int = 4) -> None:
        from skimage.feature import Cascade
        self.cascade = Cascade(cascade_path())
        self.neighbours = neighbours
        self.last: Box | None = None

    def _search(self, gray: np.ndarray, scale: float, min_side: float, max_side: float,
                neighbours: int | None = None) -> list[Box]:
        img = gray if scale == 1.0 else cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        lo = max(int(min_side * scale), 24)
        hi = max(int(max_side * scale), lo + 1)
        hi = min(hi, min(img.shape[:2]))
        if hi <= lo:
            return []
        found = self.cascade.detect_multi_scale(img, scale_factor=1.1, step_ratio=1.0, min_size=(lo, lo),
                                                max_size=(hi, hi), min_neighbor_number=neighbours or self.neighbours)
        return [Box(d["c"] / scale, d["r"] / scale, d["width"] / scale, d["height"] / scale) for d in found]

    def detect(self, frame: np.ndarray) -> Box | None:
        """The face in ``frame`` (BGR or grey, uint8), or None; near the last one when tracking."""
        gray = frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        box = None
        if self.last is not None:
            box = self._tracked(gray, self.last)
        if box is None:
            box = self._full(gray)
            for _ in range(4):                 # measured again as tracked searches would, until the
                again = self._tracked(gray, box) if box is not None else None   # size settles, so
                if again is None:              # the first box matches the ones that follow
                    break
                settled = abs(again.w - box.w) < 0.05 * box.w
                box = again
                if settled:
                    break
        self.last = box
        return box

    def _full(self, gray: np.ndarray) -> Box | None:
        """Whole-frame search: the largest of the faces with the most support. The cascade's false
        faces (hair, a collar) pass with a few neighbouring windows; a real face keeps passing as the
        required number of neighbours doubles, so the last non-empty level holds it."""
        h, w = gray.shape
        scale = min(1.0, SEARCH_WIDTH / w)
        best: list[Box] = []
        neighbours = self.neighbours
        while neighbours <= 8 * self.neighbours:
            found = self._search(gray, scale, MIN_FACE / scale, min(h, w), neighbours)
            if not found:
                break
            best, neighbours = found, 2 * neighbours
        return max(best, key=lambda b: b.w, default=None)

    def _tracked(self, gray: np.ndarray, last: Box) -> Box | None:
        h, w = gray.shape
        half = TRACK_WINDOW * last.w / 2
        x0, y0 = int(max(0, last.cx - half)), int(max(0, last.cy - half))
        x1, y1 = int(min(w, last.cx + half)), int(min(h, last.cy + half))
        scale = min(1.0, TRACK_FACE / last.w)
        found = self._search(gray[y0:y1, x0:x1], scale, 0.7 * last.w, 1.4 * last.w)
        if not found:
            return None
        b = min(found, key=lambda b: (b.cx + x0 - last.cx) ** 2 + (b.cy + y0 - last.cy) ** 2)
        return Box(b.x + x0, b.y + y0, b.w, b.h)
