"""Crop rectangles from face boxes (outliers, gaps, smoothing, edges) and from SyncTalk_2D landmarks."""
from __future__ import annotations

import numpy as np
import pytest

from engine.avatars.crop_rects import CROP_SCALE, CROP_TOP, ranges, read_lms, rects_from_boxes, synctalk_rect
from engine.avatars.disk import AvatarError
from engine.avatars.face_detect import Box


def path_boxes(n: int, seed: int = 0, noise: float = 2.0) -> tuple[list[Box | None], np.ndarray]:
    """A face of side 100 moving smoothly, seen with +-noise px jitter; and its noise-free rectangles."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    cx, cy, side = 300 + 60 * np.sin(t / 15), 200 + 10 * np.sin(t / 7), np.full(n, 100.0)
    boxes: list[Box | None] = []
    for i in range(n):
        j = rng.normal(0, noise, 3)
        s = side[i] + j[2]
        boxes.append(Box(cx[i] + j[0] - s / 2, cy[i] + j[1] - s / 2, s, s))
    s = CROP_SCALE * side
    x1, y1 = cx - s / 2, cy - side / 2 + CROP_TOP * side
    return boxes, np.stack([x1, y1, x1 + s, y1 + s], 1)


def test_jitter_is_smoothed_away_and_the_motion_kept():
    boxes, truth = path_boxes(100)
    rects, rep = rects_from_boxes(boxes, 640, 480)
    assert rects.dtype == np.int32 and rects.shape == (100, 4)
    assert np.abs(rects - truth).max() <= 3.0
    centre = (rects[:, :2] + rects[:, 2:]) / 2
    raw = np.array([[b.cx, b.cy] for b in boxes])
    # whole-pixel corners alone allow a second difference of 3 px (4 x 0.75); the raw boxes: about 12
    assert np.abs(np.diff(centre, 2, axis=0)).max() <= 3.0 < np.abs(np.diff(raw, 2, axis=0)).max()
    assert (rects[:, 2] - rects[:, 0] == rects[:, 3] - rects[:, 1]).all()
    assert rep.found == 100 and rep.interpolated == [] and rep.clamped == []


def test_missing_and_wild_detections_are_interpolated_and_reported():
    boxes, truth = path_boxes(60, noise=0.0)
    for i in (10, 11, 12, 0, 59):
        boxes[i] = None
    boxes[30] = Box(20, 20, 100, 100)                     # a false face elsewhere
    boxes[40] = Box(boxes[40].x, boxes[40].y, 180, 180)   # a box twice too big
    rects, rep = rects_from_boxes(boxes, 640, 480)
    assert rep.missed == [0, 10, 11, 12, 59] and rep.rejected == [30, 40]
    assert rep.interpolated == [0, 10, 11, 12, 30, 40, 59] and rep.found == 53
    assert np.abs(rects - truth)[1:-1].max() <= 3.0
    assert np.abs(rects - truth).max() <= 4.5          # a missing first/last frame holds its neighbour's box


def test_a_face_at_the_edge_is_clamped_into_the_frame():
    rects, rep = rects_from_boxes([Box(-40, 300, 100, 100)] * 5, 640, 360)
    assert (rects[:, 0] == 0).all() and (rects[:, 3] <= 360).all() and rep.clamped == [0, 1, 2, 3, 4]


def test_no_face_or_too_few_faces_fail():
    with pytest.raises(AvatarError, match="no face found in any of the 4 frames"):
        rects_from_boxes([None] * 4, 640, 360)
    boxes, _ = path_boxes(10)
    with pytest.raises(AvatarError, match="found in only 3 of 10 frames"):
        rects_from_boxes(boxes[:3] + [None] * 7, 640, 360)


def test_ranges():
    assert ranges([3, 4, 5, 6, 7, 12, 40, 41]) == "3-7, 12, 40-41" and ranges([]) == ""


def synctalk_reference(lms_text: str) -> tuple[int, int, int, int]:
    """SyncTalk_2D inference_328.py, its lines, on one landmark file's text."""
    lms_list = []
    for line in lms_text.splitlines():
        arr = line.split(" ")
        arr = np.array(arr, dtype=np.float32)
        lms_list.append(arr)
    lms = np.array(lms_list, dtype=np.int32)
    xmin = lms[1][0]
    ymin = lms[52][1]
    xmax = lms[31][0]
    width = xmax - xmin
    ymax = ymin + width
    return xmin, ymin, xmax, ymax


def lms_text(points: dict[int, tuple[float, float]], n: int = 98, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    pts = rng.uniform(100, 300, (n, 2))
    for k, v in points.items():
        pts[k] = v
    return "\n".join(f"{x} {y}" for x, y in pts) + "\n"


def test_synctalk_rect_is_synctalk_2ds_crop(tmp_path):
    h, w = 360, 640
    for seed, pts in enumerate([{1: (210.7, 150.2), 31: (389.9, 151.0), 52: (300.4, 171.99)},
                                {1: (100, 50), 31: (280, 55), 52: (190, 100)},
                                {1: (500.2, 10), 31: (620.6, 12), 52: (560, 299.5)}]):   # runs past the bottom
        text = lms_text(pts, seed=seed)
        p = tmp_path / f"{seed}.lms"
        p.write_text(text)
        x1, y1, x2, y2 = synctalk_reference(text)
        img = np.arange(h * w * 3, dtype=np.uint32).reshape(h, w, 3)
        got = synctalk_rect(read_lms(p), w, h, str(p))
        # the same pixels SyncTalk_2D's img[ymin:ymax, xmin:xmax] takes
        assert np.array_equal(img[got[1]:got[3], got[0]:got[2]], img[y1:y2, x1:x2])
        assert got[:3] == [x1, y1, x2] and got[3] == min(y2, h)


def test_bad_landmarks_are_named(tmp_path):
    p = tmp_path / "7.lms"
    p.write_text("1 2\n3 4\n")
    with pytest.raises(AvatarError, match="7.lms: 2 landmarks"):
        read_lms(p)
    p.write_text("a b\n")
    with pytest.raises(AvatarError, match="not a landmark file"):
        read_lms(p)
    p.write_text(lms_text({1: (300, 100), 31: (200, 100), 52: (250, 120)}))
    with pytest.raises(AvatarError, match="empty or outside"):
        synctalk_rect(read_lms(p), 640, 360, str(p))
