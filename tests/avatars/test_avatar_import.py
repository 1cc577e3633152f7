"""engine-ctl avatar import: video decoding at 25 frames/s, a talking head imported within pixels of
the truth and served by a real engine, SyncTalk_2D datasets, and bad inputs that leave nothing behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import simplejpeg

from engine.audio.speech import speech_pcm
from engine.avatars.crop_rects import JITTER_WARN
from engine.avatars.disk import AvatarError
from engine.avatars.importer import import_synctalk, import_video, video_frames
from engine.cli.avatar_check import check_avatar
from engine.client import Client, EngineError
from engine.runtime.config import load_config
from engine.runtime.shm import list_segments

from ..conftest import _counter, start_engine, write_config
from .face_videos import background, talking_head, write_video


@pytest.fixture(scope="module")
def nets(models_root):
    """The demo network (SyncTalk_2D I/O contract) and the demo audio encoder."""
    return models_root / "demo" / "checkpoint" / "model_best.onnx", models_root / "audio_encoder.onnx"


@pytest.fixture(scope="module")
def head_video(tmp_path_factory):
    """2.4 s of a talking head at 25 frames/s, 640x360, H.264; and each frame's true crop rectangle."""
    frames, truth = talking_head(60, 25.0)
    return write_video(tmp_path_factory.mktemp("video") / "head.mp4", frames, 25.0), truth


def everything_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# -- decoding -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fps", [25, 30, 50, 12])
def test_frames_come_out_at_25_per_second_by_nearest_timestamp(tmp_path, fps):
    n = int(fps * 0.6)                                    # 0.6 s; source frame i shows i in binary
    video = write_video(tmp_path / "v.mp4", [numbered(i) for i in range(n)], fps)
    got = [number_of(f) for f in video_frames(video)]
    # output frame k shows the instant k / 25: the source frame whose interval holds it
    assert got == [min(int(np.floor(k * fps / 25 + 0.5)), n - 1) for k in range(15)]   # the last one held
    part = [number_of(f) for f in video_frames(video, 0.2, 0.5)]
    assert part == [int(np.floor((0.2 + k / 25) * fps + 0.5)) for k in range(8)]      # 0.2 .. 0.48 s


def numbered(i: int) -> np.ndarray:
    img = np.zeros((32, 96, 3), np.uint8)
    for b in range(6):
        img[:, 16 * b:16 * b + 16] = 255 if i >> b & 1 else 0
    return img


def number_of(img: np.ndarray) -> int:
    return sum(1 << b for b in range(6) if img[8:24, 16 * b + 4:16 * b + 12].mean() > 128)


# -- a talking head video, imported and served --------------------------------------------------------

def test_a_talking_head_is_imported_within_pixels_of_the_truth(tmp_path, head_video, nets):
    video, truth = head_video
    net, enc = nets
    seen = []
    res = import_video(tmp_path / "models", "me", video, net, enc, frame_format="png",
                       progress=lambda d, t: seen.append((d, t)))
    assert res.frames == 60 and (res.width, res.height) == (640, 360)
    assert res.track.found == 60 and res.track.interpolated == []
    assert seen[-1] == (60, 60)
    folder = tmp_path / "models" / "me"
    rects = np.array(json.loads((folder / "crop_rects.json").read_text()))
    assert rects.shape == (60, 4)
    assert np.abs(rects - truth).max() <= 5, np.abs(rects - truth).max(axis=0)
    assert np.abs((rects - truth).mean(axis=0)).max() <= 2.5
    # smooth: the centre accelerates no more than whole-pixel corners allow (3 px; the raw boxes: ~7 px)
    centre = (rects[:, :2] + rects[:, 2:]) / 2
    assert np.abs(np.diff(centre, 2, axis=0)).max() <= 3.0
    assert (rects[:, 2] - rects[:, 0] == rects[:, 3] - rects[:, 1]).all()
    # the frames are the video's, losslessly
    frames = sorted((folder / "frames").iterdir())
    assert [p.name for p in frames[:2]] == ["frame_0000.png", "frame_0001.png"] and len(frames) == 60
    first = next(iter(video_frames(video)))
    assert np.array_equal(cv2.imread(str(frames[0])), first)
    assert (folder / "checkpoint" / "model_best.onnx").read_bytes() == net.read_bytes()
    assert (folder / "audio_encoder.onnx").read_bytes() == enc.read_bytes()
    assert everything_under(tmp_path / "models")[0] == "me"        # no staging folder left


@pytest.fixture(scope="module")
def imported_engine(tmp_path_factory, head_video, nets):
    """A real engine serving an avatar imported from the talking-head video (and a broken copy)."""
    root = tmp_path_factory.mktemp("byo")
    video, _ = head_video
    import_video(root / "models", "me", video, nets[0], nets[1], end=1.0)
    import_video(root / "models", "broken", video, nets[0], end=1.0)
    rects = json.loads((root / "models" / "broken" / "crop_rects.json").read_text())
    rects[7] = [600, 300, 700, 400]                       # past the 640x360 frame
    (root / "models" / "broken" / "crop_rects.json").write_text(json.dumps(rects))
    inst = f"t{os.getpid()}b{next(_counter)}"
    eng = start_engine(write_config(root / "engine.toml", root / "models", root / "run", inst))
    yield eng
    eng.stop()
    assert list_segments(eng.prefix) == []


@pytest.mark.integration
def test_the_imported_avatar_serves_composites_and_a_stream(imported_engine):
    with Client(imported_engine.endpoint, timeout=60) as c:
        info = c.load("me")
        assert (info["frames"], info["width"], info["height"]) == (25, 640, 360)
        r = c.composite("me", np.zeros((4, 32, 16, 16), np.float32), start_frame=3)
        assert r.info["frame_indices"] == [3, 4, 5, 6]
        s = c.open_stream("me", realtime=False)
        s.push(speech_pcm(1.0, seed=3), end=True)
        got = list(s.frames(timeout=60))
    assert len(r.frames) == 4 and simplejpeg.decode_jpeg(r.frames[0]).shape == (360, 640, 3)
    assert [f.number for f in got] == list(range(25)) and got[-1].last
    assert len({f.jpeg for f in got}) > 5                 # the mouth moves with the speech


@pytest.mark.integration
def test_check_and_the_engine_refuse_a_broken_avatar_in_the_same_words(imported_engine):
    rep = check_avatar(imported_engine.cfg, "broken", run_network=False)
    assert not rep.ok and "rectangle 7 [600, 300, 700, 400] is empty or outside the 640x360 frame" in rep.errors[0]
    with Client(imported_engine.endpoint, timeout=60) as c, pytest.raises(EngineError) as err:
        c.load("broken")
    assert rep.errors[0].split(": ", 1)[1] in str(err.value)
    assert check_avatar(imported_engine.cfg, "me", run_network=False).ok


# -- SyncTalk_2D dataset ----------------------------------------------------------------------------

def make_dataset(root, n=20, w=320, h=240, skip_lms=None, seed=0):
    """full_body_img/<i>.jpg and landmarks/<i>.lms as SyncTalk_2D's process.py writes them."""
    rng = np.random.default_rng(seed)
    (root / "full_body_img").mkdir(parents=True)
    (root / "landmarks").mkdir()
    bg = background(w, h)
    for i in range(n):
        cv2.imwrite(str(root / "full_body_img" / f"{i}.jpg"), np.roll(bg, 3 * i, axis=1))
        if i == skip_lms:
            continue
        pts = rng.uniform(50, 200, (98, 2))
        pts[1] = (60 + i + rng.uniform(0, 1), 100)
        pts[31] = (160 + i + rng.uniform(0, 1), 102)
        pts[52] = (110, 120 + rng.uniform(0, 1) + (80 if i == n - 1 else 0))   # the last runs past the bottom
        (root / "landmarks" / f"{i}.lms").write_text("\n".join(f"{x} {y}" for x, y in pts) + "\n")
    return root


def test_a_synctalk_dataset_imports_with_synctalks_own_rectangles(tmp_path, nets):
    from .test_crop_rects import synctalk_reference
    ds = make_dataset(tmp_path / "dataset" / "May")
    res = import_synctalk(tmp_path / "models", "may", ds, nets[0], start=0.2)     # from frame 5
    assert res.frames == 15 and (res.width, res.height) == (320, 240)
    rects = json.loads((tmp_path / "models" / "may" / "crop_rects.json").read_text())
    for k, i in enumerate(range(5, 20)):
        x1, y1, x2, y2 = synctalk_reference((ds / "landmarks" / f"{i}.lms").read_text())
        assert rects[k] == [x1, y1, x2, min(y2, 240)]         # numpy's slice clips at the bottom edge
        copied = tmp_path / "models" / "may" / "frames" / f"frame_{k:04d}.jpg"
        assert copied.read_bytes() == (ds / "full_body_img" / f"{i}.jpg").read_bytes()
    assert rects[-1][3] == 240 and rects[-1][3] - rects[-1][1] < rects[-1][2] - rects[-1][0]


# -- bad inputs ---------------------------------------------------------------------------------------

def no_face_video(tmp_path):
    wall = np.linspace(60, 200, 320, dtype=np.float32)[None, :, None] + np.zeros((240, 1, 3), np.float32)
    return write_video(tmp_path / "wall.mp4", [(wall + i).astype(np.uint8) for i in range(25)], 25)


def corrupt_video(tmp_path):
    p = tmp_path / "corrupt.mp4"
    p.write_bytes(os.urandom(20000))
    return p


def truncated_video(tmp_path, head_video):
    p = tmp_path / "truncated.mp4"
    p.write_bytes(head_video[0].read_bytes()[:3000])
    return p


def wrong_network(tmp_path, nets):
    return nets[1]                                        # the audio encoder given as the network


@pytest.mark.parametrize("case, message", [
    ("no face", "no face found in any of the 25 frames"),
    ("corrupt", "corrupt.mp4: not a readable video"),
    ("truncated", "truncated.mp4: "),
    ("wrong network", "expected 2 inputs (image, audio)"),
    ("wrong encoder", "audio encoder has one input"),
    ("missing landmarks", "20 frames in full_body_img but 19 landmark files in landmarks; frames without landmarks: 7"),
    ("exists", "avatar 'demo' already exists"),
    ("bad name", "invalid avatar name '.hidden'"),
])
def test_bad_inputs_get_a_clear_error_and_leave_nothing(tmp_path, head_video, nets, case, message):
    root = tmp_path / "models"
    (root / "demo").mkdir(parents=True)
    before = everything_under(root)
    net, enc = nets
    with pytest.raises(AvatarError) as err:
        if case == "no face":
            import_video(root, "x", no_face_video(tmp_path), net)
        elif case == "corrupt":
            import_video(root, "x", corrupt_video(tmp_path), net)
        elif case == "truncated":
            import_video(root, "x", truncated_video(tmp_path, head_video), net)
        elif case == "wrong network":
            import_video(root, "x", head_video[0], wrong_network(tmp_path, nets))
        elif case == "wrong encoder":
            import_video(root, "x", head_video[0], net, encoder=net)
        elif case == "missing landmarks":
            import_synctalk(root, "x", make_dataset(tmp_path / "ds", skip_lms=7), net)
        elif case == "exists":
            import_video(root, "demo", head_video[0], net)
        elif case == "bad name":
            import_video(root, ".hidden", head_video[0], net)
    assert message in str(err.value)
    assert everything_under(root) == before


def test_an_interrupted_import_leaves_nothing_and_force_replaces(tmp_path, head_video, nets):
    root = tmp_path / "models"

    def interrupt(done, total):
        if done == 10:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        import_video(root, "me", head_video[0], nets[0], progress=interrupt)
    assert everything_under(root) == []
    import_video(root, "me", head_video[0], nets[0], end=0.4)
    import_video(root, "me", head_video[0], nets[0], start=1.0, end=1.2, force=True, frame_format="png")
    assert sorted(p.name for p in (root / "me" / "frames").iterdir()) == [f"frame_{k:04d}.png" for k in range(5)]
    assert [p.name for p in root.iterdir()] == ["me"]


# -- the command ----------------------------------------------------------------------------------

def test_engine_ctl_avatar_import_then_check(tmp_path, head_video, nets):
    cfg = tmp_path / "engine.toml"
    cfg.write_text('models_root = "models"\n')
    ctl = [sys.executable, "-m", "engine.cli", "--config", str(cfg)]
    r = subprocess.run([*ctl, "avatar", "import", str(head_video[0]), "--name", "me", "--network", str(nets[0]),
                        "--audio-encoder", str(nets[1]), "--end", "1.0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "imported me: 25 frames 640x360" in r.stdout and "face found in 25 of 25 frames" in r.stdout
    r = subprocess.run([*ctl, "avatar", "check", "me"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verdict: the engine will serve me" in r.stdout and "25 for 25 frames" in r.stdout
    before = everything_under(tmp_path / "models")
    r = subprocess.run([*ctl, "avatar", "import", str(head_video[0]), "--name", "me", "--network", str(nets[1]),
                        "--force"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "expected 2 inputs" in r.stderr
    assert everything_under(tmp_path / "models") == before             # a failed --force keeps the old one
    (tmp_path / "models" / "me" / "frames" / "frame_0003.png").write_bytes(b"not a png")
    r = subprocess.run([*ctl, "avatar", "check", "me", "--no-run"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "REFUSED: frames: " in r.stdout and "frame_0003.png: cannot be decoded" in r.stdout
    assert load_config(cfg).models_dir == tmp_path / "models"


# -- SyncTalk_2D landmarks: the count, the jitter ------------------------------------------------------

def dataset_on_a_path(root, n=40, points=98, noise=0.0, seed=0):
    """A SyncTalk_2D dataset whose landmarks 1, 31, 52 follow a swaying head (a 120 px crop in 320x240),
    with +-noise px of jitter on each."""
    rng = np.random.default_rng(seed)
    (root / "full_body_img").mkdir(parents=True)
    (root / "landmarks").mkdir()
    jpg = cv2.imencode(".jpg", background(320, 240))[1].tobytes()
    for i in range(n):
        (root / "full_body_img" / f"{i}.jpg").write_bytes(jpg)
        cx, y = 160 + 20 * np.sin(i / 8), 60 + 5 * np.sin(i / 5)
        pts = np.full((points, 2), 150.0)
        pts[1], pts[31], pts[52] = (cx - 60, y), (cx + 60, y), (cx, y)
        pts[[1, 31, 52]] += rng.uniform(-noise, noise, (3, 2))
        (root / "landmarks" / f"{i}.lms").write_text("\n".join(f"{x:.3f} {y:.3f}" for x, y in pts) + "\n")
    return root


def test_a_68_point_dataset_is_refused_naming_the_expected_format(tmp_path, nets):
    root = tmp_path / "models"
    with pytest.raises(AvatarError) as err:
        import_synctalk(root, "x", dataset_on_a_path(tmp_path / "ds", points=68), nets[0])
    assert f"{tmp_path / 'ds' / 'landmarks'}/" in str(err.value)
    assert "68 landmarks; SyncTalk_2D datasets have 110 points per frame (its data_utils' PFLD_GhostOne) or " \
           "98 WFLW points" in str(err.value) and "a 68-point (iBUG 300-W) file is not SyncTalk_2D's" in str(err.value)
    assert everything_under(root) == []


def test_steady_landmarks_import_without_a_warning(tmp_path, nets):
    res = import_synctalk(tmp_path / "models", "may", dataset_on_a_path(tmp_path / "ds", points=110), nets[0])
    assert res.jitter < JITTER_WARN and res.smoothed_jitter is None
    assert "landmark jitter" in res.summary() and "warning" not in res.summary()


def test_jittery_landmarks_are_kept_and_warned_about_or_smoothed_on_request(tmp_path, nets):
    ds = dataset_on_a_path(tmp_path / "ds", noise=12.0)
    raw = import_synctalk(tmp_path / "models", "raw", ds, nets[0])
    written = np.array(json.loads((tmp_path / "models" / "raw" / "crop_rects.json").read_text()))
    from .test_crop_rects import synctalk_reference
    assert [list(r) for r in written] == [list(synctalk_reference((ds / "landmarks" / f"{i}.lms").read_text()))
                                          for i in range(40)]                  # SyncTalk_2D's own, by default
    assert raw.jitter > JITTER_WARN
    assert "warning: the landmarks shake from frame to frame, so the pasted face will visibly shake" in raw.summary()
    assert "import with --smooth" in raw.summary()
    smooth = import_synctalk(tmp_path / "models", "smooth", ds, nets[0], smooth=True)
    assert smooth.jitter == raw.jitter and smooth.smoothed_jitter < raw.jitter / 2
    assert "smoothed rectangles written" in smooth.summary() and "warning" not in smooth.summary()
    steadier = np.array(json.loads((tmp_path / "models" / "smooth" / "crop_rects.json").read_text()))
    i = np.arange(40)
    cx, y = 160 + 20 * np.sin(i / 8), 60 + 5 * np.sin(i / 5)
    truth = np.stack([cx - 60, y, cx + 60, y + 120], 1)              # the head's path, without the jitter
    assert np.array_equal(steadier, smooth.rects)
    assert np.abs(steadier - truth).mean() < np.abs(written - truth).mean() / 2
