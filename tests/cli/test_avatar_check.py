"""engine-ctl avatar check: what the engine refuses (errors) and what a viewer would notice (warnings)."""
from __future__ import annotations

import json
import shutil

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
    assert "streams of this avatar will be refused" in text and "(4 warning(s))" in text


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
