"""tools/render.py: an avatar speaking a WAV, rendered to MP4 through a real engine."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine.audio.speech import make_speech_wav, read_wav
from engine.cli.mp4 import probe_mp4, read_mp4_frames
from engine.cli.render import render
from engine.kernels.image import frame_index

pytestmark = pytest.mark.integration


def test_render_mp4_mouth_follows_the_audio(shared_engine, models_root, tmp_path):
    wav = make_speech_wav(tmp_path / "speech.wav", seconds=6.0, seed=3)
    info = render(shared_engine.endpoint, "demo", wav, tmp_path / "demo.mp4")
    probe = probe_mp4(tmp_path / "demo.mp4")
    assert info["frames"] == probe["video_frames"] == 150
    assert sorted(s["type"] for s in probe["streams"]) == ["audio", "video"]
    assert abs(probe["duration_s"] - 6.0) < 0.1
    pcm, _ = read_wav(wav)
    frames = read_mp4_frames(tmp_path / "demo.mp4", range(150))
    rects = json.loads((models_root / "demo" / "crop_rects.json").read_text())
    dark = []
    for k in range(150):
        x1, y1, x2, y2 = rects[frame_index(k, 12)]
        s = (x2 - x1) / 320
        dark.append(255 - frames[k][int(y1 + 165 * s):int(y1 + 225 * s), int(x1 + 110 * s):int(x1 + 210 * s)].mean())
    rms = np.array([np.sqrt(np.mean(pcm[k * 640:(k + 1) * 640] ** 2)) for k in range(150)])
    loudness = np.array([rms[max(0, k - 8):k + 8].mean() for k in range(150)])   # the network's 16-frame context
    assert np.corrcoef(dark, loudness)[0, 1] > 0.5
    assert max(dark) - min(dark) > 30          # visibly opens and closes
