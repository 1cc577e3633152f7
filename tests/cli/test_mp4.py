"""Tests for engine.cli.mp4: JPEG frames + PCM -> H.264/AAC MP4, probed and decoded back with PyAV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import simplejpeg

from engine.cli.mp4 import probe_mp4, read_mp4_frames, write_mp4

H, W, FPS, SR = 720, 1280, 25, 16000


def _frame(k: int) -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    img = np.empty((H, W, 3), np.uint8)
    img[..., 0] = x * 255 // W
    img[..., 1] = y * 255 // H
    img[..., 2] = (k * 8) % 256
    img[300:420, 100 + 30 * k:220 + 30 * k] = 255  # a white box that moves 30 px per frame
    return img


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[Path, dict, list[bytes], np.ndarray]:
    jpegs = [simplejpeg.encode_jpeg(_frame(k), quality=85, colorspace="RGB") for k in range(30)]
    n = int(1.2 * SR)
    pcm = np.zeros(n, np.float32)
    on = int(0.6 * SR)  # a 100 ms tone burst at 0.6 s (frame 15)
    pcm[on:on + 1600] = 0.5 * np.sin(2 * np.pi * 440 * np.arange(1600) / SR)
    path = tmp_path_factory.mktemp("mp4") / "out.mp4"
    info = write_mp4(path, iter(jpegs), pcm, SR, FPS)
    return path, info, jpegs, pcm


def test_write_mp4_result(clip) -> None:
    path, info, _, _ = clip
    assert info["frames"] == 30
    assert info["duration_s"] == pytest.approx(1.2)
    assert info["video_codec"] in ("libx264", "h264")
    assert info["audio_codec"] is not None
    assert info["bytes"] == path.stat().st_size > 1000
    assert not list(path.parent.glob(".*tmp*"))


def test_probe(clip) -> None:
    path, info, _, _ = clip
    p = probe_mp4(path)
    video = [s for s in p["streams"] if s["type"] == "video"]
    audio = [s for s in p["streams"] if s["type"] == "audio"]
    assert len(video) == 1 and len(audio) == 1
    v, a = video[0], audio[0]
    assert v["codec"] == "h264" and (v["width"], v["height"]) == (W, H) and v["pix_fmt"] == "yuv420p"
    assert p["video_frames"] == 30 and v["packets"] == 30
    assert v["start_s"] == 0.0 and v["duration_s"] == pytest.approx(1.2, abs=1e-6)
    assert a["sample_rate"] == SR and a["channels"] == 1
    assert a["end_s"] == pytest.approx(1.2, abs=0.07)
    assert p["duration_s"] == pytest.approx(1.2, abs=0.07)


def test_decoded_frames_resemble_the_jpegs(clip) -> None:
    path, _, jpegs, _ = clip
    got = read_mp4_frames(path, [0, 10, 29])
    for k in (0, 10, 29):
        ref = simplejpeg.decode_jpeg(jpegs[k], colorspace="RGB").astype(np.int16)
        d = got[k].astype(np.int16)
        assert d.shape == (H, W, 3)
        assert np.abs(d - ref).mean() < 4.0, k
    box = got[10][310:410, 410:510].mean()  # frame 10's box is at x 400..520
    assert box > 230 and got[10][310:410, 110:210].mean() < 200  # not frame 0's box position


def test_audio_is_in_sync(clip) -> None:
    import av

    path, _, _, _ = clip
    with av.open(str(path)) as c:
        frames = list(c.decode(audio=0))
        start = float(frames[0].pts * frames[0].time_base)
        a = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
    onset = start + int(np.argmax(np.abs(a) > 0.1)) / SR
    assert onset == pytest.approx(0.6, abs=0.005)  # where the PCM put it, i.e. at frame 15


def test_video_only_and_errors(tmp_path: Path) -> None:
    jpg = simplejpeg.encode_jpeg(np.full((63, 81, 3), 90, np.uint8), colorspace="RGB")  # odd size
    info = write_mp4(tmp_path / "v.mp4", [jpg] * 3, None)
    assert info["frames"] == 3 and info["audio_codec"] is None
    p = probe_mp4(tmp_path / "v.mp4")
    assert [s["type"] for s in p["streams"]] == ["video"] and p["video_frames"] == 3
    assert (p["streams"][0]["width"], p["streams"][0]["height"]) == (80, 62)
    with pytest.raises(ValueError):
        write_mp4(tmp_path / "none.mp4", [], np.zeros(100, np.float32))
    with pytest.raises(ValueError):
        write_mp4(tmp_path / "bad.mp4", [jpg], np.zeros((2, 100), np.float32))
    assert not (tmp_path / "none.mp4").exists() and not (tmp_path / "bad.mp4").exists()
