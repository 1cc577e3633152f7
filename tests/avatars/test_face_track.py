"""From per-frame landmarks to crop rectangles: smoothing without lag, gaps, jumps, a second face,
edges; the user's own landmarks. The faces are one real 68-point shape (dlib's, of the astronaut
photo) moved, scaled and jittered."""
from __future__ import annotations

import numpy as np
import pytest

from engine.avatars.disk import AvatarError
from engine.avatars.face_track import rects_from_faces, rects_from_landmarks
from engine.avatars.landmarks import Face, LandmarkFinder, wflw_crop_points

from .face_videos import astronaut_head


@pytest.fixture(scope="module")
def shape() -> np.ndarray:
    """The photo's 68 points, centred, for a face whose crop is 100 px wide."""
    pts = LandmarkFinder().find(astronaut_head()).points
    x1, x2, _ = wflw_crop_points(pts)
    return (pts - pts.mean(axis=0)) * (100 / (x2 - x1))


def crop_of(points: np.ndarray) -> np.ndarray:
    x1, x2, y1 = wflw_crop_points(points)
    return np.array([x1, y1, x2, y1 + x2 - x1])


def path(shape: np.ndarray, n: int, noise: float = 0.0, seed: int = 0) -> tuple[list[Face | None], np.ndarray]:
    """A face moving smoothly, seen with +-noise px jitter; and its noise-free crops."""
    rng = np.random.default_rng(seed)
    faces, truth = [], []
    for i in range(n):
        centre = np.array([300 + 60 * np.sin(i / 15), 200 + 10 * np.sin(i / 7)])
        clean = shape + centre
        truth.append(crop_of(clean))
        faces.append(Face(clean + rng.normal(0, noise, 2), 1.0, None))
    return faces, np.array(truth)


def test_jitter_is_smoothed_away_and_the_motion_kept_without_lag(shape):
    faces, truth = path(shape, 100, noise=2.0)
    rects, rep = rects_from_faces(faces, 640, 480)
    assert rects.dtype == np.int32 and rects.shape == (100, 4)
    assert np.abs(rects - truth).max() <= 3.0
    assert abs(np.mean(rects - truth)) < 0.6                              # no lag, no bias
    centre = (rects[:, :2] + rects[:, 2:]) / 2
    raw = np.array([f.centre for f in faces])
    assert np.abs(np.diff(centre, 2, axis=0)).max() <= 2.0 < np.abs(np.diff(raw, 2, axis=0)).max()
    assert (rects[:, 2] - rects[:, 0] == rects[:, 3] - rects[:, 1]).all()
    assert rep.found == 100 and rep.interpolated == [] and rep.clamped == []


def test_short_gaps_and_jumps_are_interpolated_and_reported(shape):
    faces, truth = path(shape, 60)
    for i in (10, 11, 12, 40):
        faces[i] = None
    faces[25] = Face(faces[25].points + (120, 0), 1.0)                    # a false find far away
    faces[30] = Face((faces[30].points - faces[30].centre) * 1.6 + faces[30].centre, 1.0)  # too big at once
    rects, rep = rects_from_faces(faces, 640, 480)
    assert rep.missed == [10, 11, 12, 40] and rep.rejected == [25, 30] and rep.found == 54
    assert np.abs(rects - truth).max() <= 3.0


def test_another_face_in_most_whole_frame_searches_is_refused(shape):
    faces, _ = path(shape, 50)
    for i in range(0, 50, 10):
        faces[i].others = 1
    with pytest.raises(AvatarError, match="more than one face: another face at least 0.5 times as wide"):
        rects_from_faces(faces, 640, 480)
    for i in range(10, 50, 10):                                           # seen once in five: reported
        faces[i].others = 0
    _, rep = rects_from_faces(faces, 640, 480)
    assert rep.others == [0]


def test_long_gaps_and_low_coverage_are_refused_with_times_and_the_part_that_imports(shape):
    faces, _ = path(shape, 100)
    for i in range(40, 60):                                               # 1.6-2.4 s
        faces[i] = None
    with pytest.raises(AvatarError) as err:
        rects_from_faces(faces, 640, 480, offset=1.0)
    msg = str(err.value)
    assert "found in 80 of 100 frames, but it is missing for 0.80 s at once" in msg     # 80 % is enough
    assert "no face at 2.60-3.40 s" in msg
    assert "the longest part with the face throughout is 1.00-2.60 s: import it with --start 1.00 --end 2.60" in msg
    for i in range(20, 40):
        faces[i] = None
    with pytest.raises(AvatarError, match=r"found in only 60 of 100 frames \(60 %; at least 80 % are needed\); no "
                       r"face at 1.80-3.40 s; the longest part .* is 3.40-5.00 s"):
        rects_from_faces(faces, 640, 480, offset=1.0)
    with pytest.raises(AvatarError, match="no face found in any of the 5 frames"):
        rects_from_faces([None] * 5, 640, 480)
    # a face in every other frame: no gap is too long, but no part would import: no --start/--end offered
    faces, _ = path(shape, 100)
    for i in range(0, 100, 2):
        faces[i] = None
    with pytest.raises(AvatarError, match="found in only 50 of 100 frames") as err:
        rects_from_faces(faces, 640, 480)
    assert "--start" not in str(err.value)


def test_a_face_at_the_edge_is_shifted_into_the_frame(shape):
    faces = [Face(shape + (20, 240), 1.0) for _ in range(5)]              # half outside on the left
    rects, rep = rects_from_faces(faces, 640, 360)
    assert (rects[:, 0] == 0).all() and rep.clamped == [0, 1, 2, 3, 4]
    assert (rects[:, 2] - rects[:, 0] == 100).all()


def test_user_landmarks_68_and_98_points(shape):
    pts68 = shape + (300, 200)
    x1, x2, y1 = wflw_crop_points(pts68)
    r = rects_from_landmarks([pts68], 640, 480)
    assert r[0].tolist() == [int(x1), int(y1), int(x2), int(y1) + int(x2) - int(x1)]
    wflw = np.zeros((98, 2))
    wflw[1], wflw[31], wflw[52] = (100.7, 0), (200.2, 0), (0, 150.9)
    assert rects_from_landmarks([wflw], 640, 480)[0].tolist() == [100, 150, 200, 250]
    with pytest.raises(AvatarError, match="frame 0 has 70 points"):
        rects_from_landmarks([np.zeros((70, 2))], 640, 480)
