"""engine-ctl avatar check: what the engine refuses (errors) and what a viewer would notice (warnings)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from engine.cli.avatar_check import check_avatar
from engine.runtime.config import config_from_dict


@pytest.fixture
def root(tmp_path, models_root):
    """A copy of the demo avatar (12 frames) and the demo audio encoder."""
    shutil.copytree(models_root / "demo", tmp_path / "a")
    shutil.copy(models_root / "audio_encoder.onnx", tmp_path / "audio_encoder.onnx")
    return tmp_path


def cfg_for(root, **extra):
    return config_from_dict({"models_root": str(root), **extra})


def levels(rep):
    return [(level, topic) for level, topic, _ in rep.items]


def test_a_good_avatar_passes_with_its_figures(root):
    rep = check_avatar(cfg_for(root), "a")
    assert rep.ok, rep.text()
    assert {level for level, _ in levels(rep)} == {"ok"}
    f = rep.figures
    assert (f["frames"], f["width"], f["height"], f["rectangles"]) == (12, 1280, 720, 12)
    assert f["network"]["image_shape"] == [6, 320, 320] and f["network_frame_ms"] > 0
    # the configured layout's size (the spliced form by default: about 0.2 MB per 720p frame)
    assert 0.05e6 * 12 < f["shared_memory_bytes"] < 0.5e6 * 12
    from dataclasses import replace
    cfg = cfg_for(root)
    full = check_avatar(replace(cfg, output=replace(cfg.output, encoder="full")), "a", run_network=False)
    assert full.figures["shared_memory_bytes"] > 12 * 1280 * 720 * 3
    assert "verdict: the engine will serve a" in rep.text()
    assert json.loads(rep.as_json())["ok"] is True


def test_warnings_do_not_refuse(root):
    rects = json.loads((root / "a" / "crop_rects.json").read_text())
    rects[3] = [rects[3][0] + 60, rects[3][1], rects[3][2] + 60, rects[3][3] + 20]   # jumps, not square
    (root / "a" / "crop_rects.json").write_text(json.dumps(rects + [[0, 0, 10, 10]]))   # one too many
    (root / "audio_encoder.onnx").unlink()
    rep = check_avatar(cfg_for(root), "a", run_network=False)
    assert rep.ok, rep.text()
    text = rep.text()
    assert "1 more rectangles than frames: the engine uses the first 12" in text
    assert "1 not square (frame 3:" in text and "visibly jump there" in text
    assert "streams of this avatar will be refused" in text and "(5 warning(s))" in text
    assert "rectangles shake by" in text and "will visibly shake" in text     # the 60 px jump, in 12 frames


@pytest.mark.parametrize("breakage, words", [
    ("too few rects", "crop_rects.json: expected a list of at least 12"),
    ("frame size", "frame_0005.png: 640x360 differs from the first frame's 1280x720"),
    ("encoder", "an audio encoder has one input (mel windows [N,1,80,16])"),
    ("budget", "needs"),
    ("ring", "exceed the ring's room (raise ring.max_face)"),
    ("no network", "model_best.onnx is missing"),
])
def test_what_the_engine_refuses_exits_non_zero(root, breakage, words):
    import cv2
    a = root / "a"
    extra = {}
    if breakage == "too few rects":
        (a / "crop_rects.json").write_text(json.dumps(json.loads((a / "crop_rects.json").read_text())[:5]))
    elif breakage == "frame size":
        cv2.imwrite(str(a / "frames" / "frame_0005.png"), cv2.imread(str(a / "frames" / "frame_0005.png"))[:360, :640])
    elif breakage == "encoder":
        shutil.copy(a / "checkpoint" / "model_best.onnx", a / "audio_encoder.onnx")    # the network as encoder
    elif breakage == "budget":
        extra = {"capacity": {"background_bytes": 1 << 20}}
    elif breakage == "ring":
        extra = {"ring": {"max_face": 160}}
    elif breakage == "no network":
        (a / "checkpoint" / "model_best.onnx").unlink()
    rep = check_avatar(cfg_for(root, **extra), "a", run_network=False)
    assert not rep.ok and any(words in e for e in rep.errors), rep.text()
    assert "verdict: REFUSED: " in rep.text()


# -- what a viewer would notice: small crops, a still avatar, shaking rectangles ----------------------

def set_rects(root, rects):
    (root / "a" / "crop_rects.json").write_text(json.dumps([[int(v) for v in r] for r in rects]))


def warning(rep, topic):
    return next((text for level, t, text in rep.items if level == "warn" and t == topic), None)


def test_a_crop_the_network_upscales_more_than_3x_is_warned_about(root):
    rects = np.array(json.loads((root / "a" / "crop_rects.json").read_text()))
    ok = check_avatar(cfg_for(root), "a", run_network=False)
    assert warning(ok, "face size") is None and ok.figures["upscale"] < 2
    rects[:, 2:] = rects[:, :2] + 100                  # 100 px crops for the demo network's 320x320 face
    set_rects(root, rects)
    rep = check_avatar(cfg_for(root), "a", run_network=False)
    assert rep.ok and rep.figures["upscale"] == 3.2
    text = warning(rep, "face size")
    assert "median crop side 100 px; the network's 320x320 face input scales it 3.2x" in text
    assert "blurred" in text and "a crop side of 107 px or more" in text


def test_a_still_avatar_is_warned_about(root):
    import cv2
    frames = sorted((root / "a" / "frames").iterdir())
    moving = check_avatar(cfg_for(root), "a", run_network=False)
    assert warning(moving, "movement") is None and moving.figures["face_change_levels"] > 50
    for p in frames[1:]:                               # every frame the first one, re-encoded with noise
        noise = np.random.default_rng(len(p.name)).integers(-4, 5, (720, 1280, 3))
        cv2.imwrite(str(p), np.clip(cv2.imread(str(frames[0])) + noise, 0, 255).astype(np.uint8))
    rep = check_avatar(cfg_for(root), "a", run_network=False)
    assert rep.ok and rep.figures["face_change_levels"] <= 12
    assert "no movement): the avatar is a still image repeated, so streams will show it frozen" in warning(rep, "movement")
    for p in frames[1:]:
        p.unlink()
    set_rects(root, json.loads((root / "a" / "crop_rects.json").read_text())[:1])
    one = check_avatar(cfg_for(root), "a", run_network=False)
    assert one.ok and warning(one, "movement").startswith("1 frame: the avatar is a still image")


def test_shaking_rectangles_are_warned_about(root):
    rects = np.array(json.loads((root / "a" / "crop_rects.json").read_text()))
    steady = check_avatar(cfg_for(root), "a", run_network=False)
    assert warning(steady, "jitter") is None and steady.figures["rect_jitter"] < 0.01
    shift = np.array([0, 6, -6, 5, -5, 6, 0, -6, 6, -5, 5, 0])       # +-6 px on a 184 px crop, frame to frame
    rects[:, [0, 2]] += shift[:, None]
    set_rects(root, rects)
    rep = check_avatar(cfg_for(root), "a", run_network=False)
    assert rep.ok and rep.figures["rect_jitter"] > 0.02
    assert ("of their side (95th percentile, frame to frame), above 2 % and 1.5 px: the pasted face will visibly "
            "shake") in warning(rep, "jitter")
    # a pixel of whole-pixel rounding on a small crop is over 2 % of its side, and not a shake anyone sees
    small = rects.copy()
    small[:, [0, 2]] -= shift[:, None]
    small[:, 2:] = small[:, :2] + 45
    small[:, [0, 2]] += np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1])[:, None]
    set_rects(root, small)
    rep = check_avatar(cfg_for(root), "a", run_network=False)
    assert rep.figures["rect_jitter"] > 0.02 and warning(rep, "jitter") is None


def test_check_removes_what_a_killed_import_left(root):
    from ..avatars.test_staging import dead_pid
    pid = dead_pid()
    (root / f".import-b-{pid}" / "frames").mkdir(parents=True)
    (root / f".replaced-c-{pid}").mkdir()                # a --force import killed between its two renames
    (root / f".import-d-{os.getpid()}").mkdir()           # a running import's
    rep = check_avatar(cfg_for(root), "a", run_network=False)
    assert rep.ok
    texts = [text for level, topic, text in rep.items if topic == "cleanup" and level == "ok"]
    assert texts == [f"removed .import-b-{pid}, left by an import that was killed (process {pid} no longer runs)",
                     (f"put .replaced-c-{pid} back as c: an import with --force was killed while replacing that "
                      f"avatar (process {pid} no longer runs)")]
    assert sorted(p.name for p in root.iterdir()) == [f".import-d-{os.getpid()}", "a", "audio_encoder.onnx", "c"]
