"""The face detector on a real face: scikit-image's astronaut photo made into a video with motion."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.avatars.face_detect import FaceDetector, cascade_path
from engine.avatars.importer import video_frames

from .face_videos import astronaut_head, background, moving_head, place, write_video


def test_the_cascade_ships_inside_an_installed_package():
    import skimage
    path = Path(cascade_path())
    assert path.is_file() and Path(skimage.__file__).parent in path.parents


def test_a_real_face_moving_zooming_and_turning_is_found_in_every_frame(tmp_path):
    frames, truth = moving_head(60, 30.0)                # 2 s at 30 frames/s, 480x270, H.264
    video = write_video(tmp_path / "photo.mp4", frames, 30.0)
    det = FaceDetector()
    got = list(video_frames(video))
    assert len(got) == 50                                # resampled to 25 frames/s
    for k, img in enumerate(got):
        cx, cy, side = truth[min(round(k * 30 / 25), 59)]
        box = det.detect(img)
        assert box is not None, f"no face in frame {k}"
        assert abs(box.cx - cx) < 0.25 * side and abs(box.cy - cy) < 0.25 * side, (k, box, (cx, cy, side))
        assert 0.7 < box.w / side < 1.4


def test_no_face_no_box():
    det = FaceDetector()
    assert det.detect(background(480, 270)) is None
    # and after a face, a frame without one is a miss, not the old box
    frame, _ = place(astronaut_head(), background(480, 270), 240, 135, 0.6)
    assert det.detect(frame) is not None
    assert det.detect(np.full((270, 480, 3), 128, np.uint8)) is None
