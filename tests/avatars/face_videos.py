"""Test videos with a real face at a known place: scikit-image's astronaut photo (Eileen Collins,
NASA, public domain), its head moved, scaled and turned over a background, encoded with PyAV."""
from __future__ import annotations

import math
from pathlib import Path

import av
import cv2
import numpy as np

HEAD_ORIGIN = (90, 0)                       # the head crop's top-left corner in the astronaut photo
HEAD_SIZE = 300
FACE_CENTRE = (134.0, 115.0)                # face centre in head-crop pixels
# SyncTalk_2D's crop of the still photo, in head-crop pixels: from dlib's 68 landmarks of the clean
# photo (engine.avatars.landmarks, WFLW points 1, 31 and 52), which agrees within 5 % of the side with
# the same WFLW points placed by eye on the photo at 3x zoom (90, 109, 177, 196)
TRUE_RECT = (89.5, 111.0, 181.25, 202.75)


def astronaut_head() -> np.ndarray:
    from skimage import data
    img = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    x, y = HEAD_ORIGIN
    return np.ascontiguousarray(img[y:y + HEAD_SIZE, x:x + HEAD_SIZE])


def background(w: int, h: int, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(70, 190, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def place(head: np.ndarray, bg: np.ndarray, cx: float, cy: float, scale: float = 1.0,
          angle: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The head with its face centre at (cx, cy), scaled and turned; returns the frame and the 2x3
    matrix from head-crop pixels to frame pixels."""
    m = cv2.getRotationMatrix2D(FACE_CENTRE, angle, scale)
    m[:, 2] += (cx - FACE_CENTRE[0], cy - FACE_CENTRE[1])
    frame = bg.copy()
    cv2.warpAffine(head, m, (bg.shape[1], bg.shape[0]), dst=frame, flags=cv2.INTER_LINEAR,
                   borderMode=cv2.BORDER_TRANSPARENT)
    return frame, m


def talking_head(n: int, fps: float, w: int = 640, h: int = 360) -> tuple[list[np.ndarray], np.ndarray]:
    """A head swaying left and right and bobbing (scale 1, upright), and the true crop rectangle of
    each frame ([n, 4] float: TRUE_RECT moved with the head)."""
    head, bg = astronaut_head(), background(w, h)
    frames, truth = [], []
    for i in range(n):
        t = i / fps
        cx = w / 2 + 90 * math.sin(2 * math.pi * t / 3.0)
        cy = h / 2 - 20 + 12 * math.sin(2 * math.pi * t / 1.3)
        frame, m = place(head, bg, cx, cy)
        frames.append(frame)
        x1, y1, x2, y2 = TRUE_RECT
        truth.append([x1 + m[0, 2], y1 + m[1, 2], x2 + m[0, 2], y2 + m[1, 2]])
    return frames, np.array(truth)


def moving_head(n: int, fps: float, w: int = 480, h: int = 270) -> tuple[list[np.ndarray], list[tuple[float, float, float]]]:
    """The photo with motion: moving, zooming (0.45x to 0.7x) and turning (+-8 degrees), with changing
    light; returns the frames and each frame's face centre and size (x, y, side)."""
    head, bg = astronaut_head(), background(w, h, seed=7)
    frames, truth = [], []
    for i in range(n):
        t = i / fps
        s = 0.575 + 0.125 * math.sin(2 * math.pi * t / 2.2)
        angle = 8 * math.sin(2 * math.pi * t / 1.6)
        cx = w / 2 + 110 * math.sin(2 * math.pi * t / 2.8)
        cy = h / 2 + 25 * math.sin(2 * math.pi * t / 1.1)
        frame, _ = place(head, bg, cx, cy, s, angle)
        gain = 1.0 + 0.15 * math.sin(2 * math.pi * t / 1.9)
        frames.append(np.clip(frame.astype(np.float32) * gain, 0, 255).astype(np.uint8))
        truth.append((cx, cy, 100 * s))
    return frames, truth


def write_video(path: Path, frames: list[np.ndarray], fps: float) -> Path:
    from fractions import Fraction
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        st.options = {"preset": "ultrafast", "crf": "18"}
        for f in frames:
            for p in st.encode(av.VideoFrame.from_ndarray(f, format="bgr24")):
                out.mux(p)
        for p in st.encode():
            out.mux(p)
    return path


if __name__ == "__main__":
    # python -m tests.avatars.face_videos head.mp4 [seconds]: the README's sample talking-head video
    import sys
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "head.mp4")
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 4.0
    write_video(out, talking_head(int(seconds * 25), 25.0)[0], 25.0)
    print(f"{out}: {seconds:g} s, 640x360, 25 frames/s, H.264")
