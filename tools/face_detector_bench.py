"""Face detector candidates for ``engine-ctl avatar import``, measured side by side (not installed).

(A) scikit-image's astronaut photo moving, zooming and turning over a textured background, 150
frames 640x360 through H.264; (B) scikit-image's LFW subset (100 faces, 25x25, upscaled 4x). Prints
the share of frames whose face is found (box centre within 0.3 face of the truth), the boxes found
elsewhere, the median centre error and the time per frame. Candidates that need a package this
environment lacks (OpenCV 4's Haar cascades, dlib) are skipped.

    .venv/bin/python tools/face_detector_bench.py
"""
from __future__ import annotations

import io
import math
import time

import av
import cv2
import numpy as np
from skimage import data
from skimage.data import lbp_frontal_face_cascade_filename
from skimage.feature import Cascade

W, H, N = 640, 360, 150
HEAD = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)[0:300, 90:390]
FACE = np.array([87.0, 66.0, 95.0, 95.0])        # the face box in HEAD (OpenCV Haar on the still photo)


def clip() -> tuple[list[np.ndarray], list[tuple[float, float, float]]]:
    rng = np.random.default_rng(1)
    bg = cv2.resize(rng.integers(60, 200, (H // 20, W // 20, 3), dtype=np.uint8), (W, H), interpolation=cv2.INTER_CUBIC)
    frames, truth = [], []
    for i in range(N):
        t = i / 25
        s = 0.75 + 0.2 * math.sin(2 * math.pi * t / 3.0)
        m = cv2.getRotationMatrix2D((150, 150), 8 * math.sin(2 * math.pi * t / 2.1), s)
        m[:, 2] += (W / 2 + 120 * math.sin(2 * math.pi * t / 4.0) - 150, H / 2 + 20 * math.sin(2 * math.pi * t / 1.7) - 150)
        img = bg.copy()
        cv2.warpAffine(HEAD, m, (W, H), dst=img, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_TRANSPARENT)
        gain = 1.0 + 0.2 * math.sin(2 * math.pi * t / 2.5)
        frames.append(np.clip(img.astype(np.float32) * gain, 0, 255).astype(np.uint8))
        c = m @ np.array([FACE[0] + FACE[2] / 2, FACE[1] + FACE[3] / 2, 1.0])
        truth.append((c[0], c[1], FACE[2] * s))
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        st = out.add_stream("libx264", rate=25)
        st.width, st.height, st.pix_fmt = W, H, "yuv420p"
        for f in frames:
            for p in st.encode(av.VideoFrame.from_ndarray(f, format="bgr24")):
                out.mux(p)
        for p in st.encode():
            out.mux(p)
    buf.seek(0)
    with av.open(buf) as inp:
        return [f.to_ndarray(format="bgr24") for f in inp.decode(video=0)], truth


def candidates() -> dict:
    out = {}
    if hasattr(cv2, "CascadeClassifier") and hasattr(cv2, "data"):
        for name in ("default", "alt2"):
            c = cv2.CascadeClassifier(cv2.data.haarcascades + f"haarcascade_frontalface_{name}.xml")
            out[f"haar {name} (OpenCV 4)"] = lambda g, c=c: [tuple(b) for b in c.detectMultiScale(g, 1.1, 4, minSize=(40, 40))]
    lbp = Cascade(lbp_frontal_face_cascade_filename())
    out["lbp (scikit-image)"] = lambda g: [(d["c"], d["r"], d["width"], d["height"]) for d in lbp.detect_multi_scale(
        g, scale_factor=1.1, step_ratio=1, min_size=(40, 40), max_size=(300, 300), min_neighbor_number=4)]
    try:
        import dlib
        hog = dlib.get_frontal_face_detector()
        out["dlib HOG"] = lambda g: [(r.left(), r.top(), r.width(), r.height()) for r in hog(g, 0)]
    except ImportError:
        pass
    return out


def main() -> None:
    from engine.avatars.face_detect import FaceDetector
    video, truth = clip()
    lfw = [cv2.copyMakeBorder(cv2.resize((f * 255).astype(np.uint8), (100, 100), interpolation=cv2.INTER_CUBIC),
                              50, 50, 50, 50, cv2.BORDER_REPLICATE) for f in data.lfw_subset()[:100]]
    tracker = FaceDetector()
    cands = candidates()
    cands["engine FaceDetector (tracking)"] = lambda g: [(b.x, b.y, b.w, b.h) for b in [tracker.detect(g)] if b]
    print(f"{'detector':<32}{'A found':>9}{'A elsewhere':>13}{'A centre err px':>17}{'A ms/frame':>12}"
          f"{'B found':>9}{'B ms':>7}")
    for name, det in cands.items():
        hits = false = 0
        errs = []
        t = time.perf_counter()
        for img, (tx, ty, ts) in zip(video, truth):
            boxes = det(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
            good = [b for b in boxes if abs(b[0] + b[2] / 2 - tx) < 0.3 * ts and abs(b[1] + b[3] / 2 - ty) < 0.3 * ts]
            hits += bool(good)
            false += len(boxes) - len(good)
            if good:
                errs.append(math.hypot(good[0][0] + good[0][2] / 2 - tx, good[0][1] + good[0][3] / 2 - ty))
        ta = (time.perf_counter() - t) / len(video) * 1000
        tracker.last = None
        t = time.perf_counter()
        found_b = 0
        for g in lfw:
            tracker.last = None
            found_b += bool(det(g))
        tb = (time.perf_counter() - t) / len(lfw) * 1000
        print(f"{name:<32}{hits:>5}/{len(video)}{false:>13}{np.median(errs) if errs else float('nan'):>17.1f}"
              f"{ta:>12.1f}{found_b:>6}/100{tb:>7.1f}")


if __name__ == "__main__":
    main()
