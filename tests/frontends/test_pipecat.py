"""The Pipecat video service (frontends/pipecat, its own package and environment: pipecat-ai brings
the CPU onnxruntime, which must not replace onnxruntime-gpu here) in real Pipecat pipelines against
real engines: these tests start the engines and run frontends/pipecat/tests in .venv-pipecat,
which ./tools/dev test creates (the real-time ones as a ``realtime`` test, the others as a plain one)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from engine.audio.speech import speech_pcm, write_wav
from engine.client import Client

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

REPO = Path(__file__).resolve().parents[2]
PIPECAT_PY = REPO / ".venv-pipecat" / "bin" / "python"


def run_pipecat_tests(marks: str, expect: str, tmp_path: Path, engine, doomed=None) -> None:
    """frontends/pipecat/tests selected by ``marks`` (pytest -m), in .venv-pipecat, against ``engine``
    (and ``doomed``, one its tests may stop); ``expect``: what pytest must report ("3 passed")."""
    assert PIPECAT_PY.exists(), (f"{PIPECAT_PY} is missing: ./tools/dev test creates it (pipecat-ai and "
                                 "frontends/pipecat in their own environment)")
    for eng in (engine, doomed):                            # avatars loaded, so timings are warm ones
        if eng is not None:
            with Client(eng.endpoint, timeout=60) as c:
                c.load("demo")
    wav = write_wav(tmp_path / "speech.wav", speech_pcm(3.0, seed=2), 16000)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "LSE_"))}
    env.update(LSE_ENDPOINT=engine.endpoint, LSE_SPEECH_WAV=str(wav))
    if doomed is not None:
        env.update(LSE_DOOMED_ENDPOINT=doomed.endpoint, LSE_DOOMED_PID=str(doomed.proc.pid))
    r = subprocess.run([str(PIPECAT_PY), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marks, "tests"],
                       cwd=REPO / "frontends" / "pipecat", env=env, capture_output=True, text=True, timeout=360)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert expect in r.stdout and "skipped" not in r.stdout, r.stdout[-3000:]


@pytest.mark.realtime
def test_the_pipecat_service_keeps_time_in_real_pipelines(shared_engine, tmp_path):
    """Its tests that assert rates and lags (25 frames/s, the voice with its frames, barge-in)."""
    run_pipecat_tests("realtime", "3 passed", tmp_path, shared_engine)


def test_the_pipecat_service_errors_and_frames_in_real_pipelines(shared_engine, engine_factory, tmp_path):
    """The rest (clear errors: no engine, an unknown avatar, the engine stopping mid-stream; the
    README's pipeline; I420 frames): beside other tests."""
    doomed = engine_factory()
    run_pipecat_tests("not realtime", "6 passed", tmp_path, shared_engine, doomed)
    assert doomed.proc.wait(30) is not None                 # the engine it stopped did stop
