"""The Pipecat video service (frontends/pipecat, its own package and environment: pipecat-ai brings
the CPU onnxruntime, which must not replace onnxruntime-gpu here) in real Pipecat pipelines against
real engines: this test starts the engines and runs frontends/pipecat/tests in .venv-pipecat,
which ./tools/dev test creates."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from engine.audio.speech import speech_pcm, write_wav
from engine.client import Client

pytestmark = [pytest.mark.integration, pytest.mark.realtime, pytest.mark.timeout(400)]

REPO = Path(__file__).resolve().parents[2]
PIPECAT_PY = REPO / ".venv-pipecat" / "bin" / "python"


def test_the_pipecat_service_in_real_pipelines(shared_engine, engine_factory, tmp_path):
    assert PIPECAT_PY.exists(), (f"{PIPECAT_PY} is missing: ./tools/dev test creates it (pipecat-ai and "
                                 "frontends/pipecat in their own environment)")
    doomed = engine_factory()
    for eng in (shared_engine, doomed):                     # avatars loaded, so timings are warm ones
        with Client(eng.endpoint, timeout=60) as c:
            c.load("demo")
    wav = write_wav(tmp_path / "speech.wav", speech_pcm(3.0, seed=2), 16000)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "LSE_"))}
    env.update(LSE_ENDPOINT=shared_engine.endpoint, LSE_SPEECH_WAV=str(wav),
               LSE_DOOMED_ENDPOINT=doomed.endpoint, LSE_DOOMED_PID=str(doomed.proc.pid))
    r = subprocess.run([str(PIPECAT_PY), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                       cwd=REPO / "frontends" / "pipecat", env=env, capture_output=True, text=True, timeout=360)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert "9 passed" in r.stdout, r.stdout[-3000:]
    assert doomed.proc.wait(30) is not None                 # the engine it stopped did stop
