"""Crop rectangles from SyncTalk_2D landmarks: the formula, the files, jitter and smoothing (the
video import's track from landmarks is in test_face_track.py)."""
from __future__ import annotations

import numpy as np
import pytest

from engine.avatars.crop_rects import (
    JITTER_WARN,
    ranges,
    read_lms,
    rect_jitter,
    smooth_squares,
    synctalk_rect,
)
from engine.avatars.disk import AvatarError


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


# -- SyncTalk_2D landmark files: 98 or 110 points -------------------------------------------------------

@pytest.mark.parametrize("n", [98, 110])
def test_wflw_98_and_synctalks_110_points_are_read(tmp_path, n):
    p = tmp_path / "0.lms"
    p.write_text(lms_text({1: (210, 150), 31: (390, 151), 52: (300, 172)}, n=n))
    assert read_lms(p).shape == (n, 2)
    assert synctalk_rect(read_lms(p), 640, 360, str(p)) == [210, 172, 390, 352]


@pytest.mark.parametrize("n, ibug", [(68, True), (106, False), (53, False)])
def test_other_landmark_counts_are_refused_naming_the_format(tmp_path, n, ibug):
    p = tmp_path / "4.lms"
    p.write_text(lms_text({}, n=n))
    with pytest.raises(AvatarError) as err:
        read_lms(p)
    msg = str(err.value)
    assert msg.startswith(f"{p}: {n} landmarks; SyncTalk_2D datasets have 110 points per frame (its data_utils' "
                          "PFLD_GhostOne) or 98 WFLW points")
    assert ("a 68-point (iBUG 300-W) file is not SyncTalk_2D's" in msg) == ibug
    assert "make the landmarks with SyncTalk_2D's data_utils/process.py" in msg


# -- jitter -------------------------------------------------------------------------------------------

def squares_on_a_path(n: int, noise: float, seed: int = 0, side: float = 200.0) -> tuple[np.ndarray, np.ndarray]:
    """Whole-pixel square crops of a head swaying naturally, with +-noise px of landmark jitter on each
    corner coordinate; and the noise-free track (float)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    cx, cy = 640 + 40 * np.sin(t / 20), 360 + 15 * np.sin(t / 13)
    truth = np.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], 1)
    x1 = np.rint(truth[:, 0] + rng.uniform(-noise, noise, n))
    y1 = np.rint(truth[:, 1] + rng.uniform(-noise, noise, n))
    x2 = np.rint(truth[:, 2] + rng.uniform(-noise, noise, n))
    return np.stack([x1, y1, x2, y1 + x2 - x1], 1).astype(np.int64), truth


def test_rect_jitter_measures_the_shake_not_the_head_motion():
    steady, _ = squares_on_a_path(250, 0.0)
    assert rect_jitter(steady) < 0.005                    # whole-pixel rounding of a swaying head
    assert rect_jitter(squares_on_a_path(250, 1.0)[0]) < JITTER_WARN
    assert rect_jitter(squares_on_a_path(250, 4.0)[0]) > JITTER_WARN
    assert rect_jitter(squares_on_a_path(250, 15.0)[0]) > 0.05    # jumps up to 30 px on a 200 px face
    assert rect_jitter(steady[:2]) == 0.0


def test_smoothing_takes_the_shake_out_and_keeps_the_track():
    raw, truth = squares_on_a_path(250, 15.0)
    smooth = smooth_squares(raw, 1280, 720)
    assert smooth.dtype == np.int32 and (smooth[:, 2] - smooth[:, 0] == smooth[:, 3] - smooth[:, 1]).all()
    assert rect_jitter(smooth) < JITTER_WARN < rect_jitter(raw)
    err, raw_err = np.abs(smooth - truth), np.abs(raw - truth)
    assert err.max() <= 12 < raw_err.max() and err.mean() < raw_err.mean() / 2
    assert err[[0, -1]].max() <= 7                       # the end frames too (not left at their raw value)
    edge = smooth_squares(raw - [600, 200, 600, 200], 300, 300)       # runs past the frame's edges
    assert edge[:, :2].min() >= 0 and edge[:, 2].max() <= 300 and edge[:, 3].max() <= 300
