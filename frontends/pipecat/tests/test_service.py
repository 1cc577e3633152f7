"""The video service in real Pipecat pipelines against a real engine (started by the engine's own test
suite, tests/frontends/test_pipecat.py, which runs this file in the Pipecat environment):
a WAV-reading source stands in for the TTS, the service, and a recorder at the end.

Environment: LSE_ENDPOINT (an engine with the demo avatar), LSE_SPEECH_WAV (speech, 16 kHz mono),
LSE_DOOMED_ENDPOINT and LSE_DOOMED_PID (an engine this test may stop).
"""
from __future__ import annotations

import asyncio
import os
import signal
import time
import wave

import numpy as np
import pytest
from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from lipsync_pipecat import LipsyncVideoService

TTS_RATE = 24000                # the source speaks at a TTS's rate, not the engine's


def speech() -> np.ndarray:
    with wave.open(os.environ["LSE_SPEECH_WAV"]) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    t = np.arange(int(len(pcm) * TTS_RATE / 16000)) * 16000 / TTS_RATE           # to 24 kHz
    return np.interp(t, np.arange(len(pcm)), pcm.astype(np.float64)).astype(np.int16)


class TTSStandIn(FrameProcessor):
    """Speaks ``pcm`` (24 kHz int16) after ``delay`` s, in 20 ms frames at real time, like a TTS;
    then, after ``interrupt_after`` s of speech (if set), an InterruptionFrame and no more speech."""

    def __init__(self, pcm: np.ndarray, delay: float, interrupt_after: float | None = None) -> None:
        super().__init__()
        self.pcm, self.delay, self.interrupt_after = pcm, delay, interrupt_after
        self.interrupted_at: float | None = None
        self.spoke_at: float | None = None

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, StartFrame):
            self.create_task(self._speak())

    async def _speak(self) -> None:
        await asyncio.sleep(self.delay)
        await self.push_frame(TTSStartedFrame())
        n = TTS_RATE // 50
        start = time.monotonic()
        self.spoke_at = start
        for i in range(0, len(self.pcm), n):
            if self.interrupt_after is not None and time.monotonic() - start >= self.interrupt_after:
                self.interrupted_at = time.monotonic()
                await self.push_frame(InterruptionFrame())
                return
            await self.push_frame(TTSAudioRawFrame(audio=self.pcm[i:i + n].tobytes(), sample_rate=TTS_RATE,
                                                   num_channels=1))
            await asyncio.sleep(max(0.0, start + (i + n) / TTS_RATE - time.monotonic()))
        await self.push_frame(TTSStoppedFrame())


class Recorder(FrameProcessor):
    """What leaves the service: (time, frame) for images and audio, and errors seen going upstream."""

    def __init__(self) -> None:
        super().__init__()
        self.out: list[tuple[float, Frame]] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, (OutputImageRawFrame, TTSAudioRawFrame)):
            self.out.append((time.monotonic(), frame))
        await self.push_frame(frame, direction)


def run(service: LipsyncVideoService, source: FrameProcessor, seconds: float) -> tuple[Recorder, list[ErrorFrame]]:
    rec = Recorder()
    worker = PipelineWorker(Pipeline([source, service, rec]), enable_rtvi=False, idle_timeout_secs=None)
    errors: list[ErrorFrame] = []

    @worker.event_handler("on_pipeline_error")
    async def on_error(_w, frame):
        errors.append(frame)

    async def main() -> None:
        runner = WorkerRunner(handle_sigint=False)

        async def stop_later() -> None:
            await asyncio.sleep(seconds)
            await worker.queue_frame(EndFrame())
        stopper = asyncio.create_task(stop_later())
        await asyncio.wait_for(runner.run(worker), seconds + 30)
        stopper.cancel()
    asyncio.run(main())
    return rec, errors


def images(rec: Recorder) -> list[tuple[float, OutputImageRawFrame]]:
    return [(t, f) for t, f in rec.out if isinstance(f, OutputImageRawFrame)]


def audios(rec: Recorder) -> list[tuple[float, TTSAudioRawFrame]]:
    return [(t, f) for t, f in rec.out if isinstance(f, TTSAudioRawFrame)]


@pytest.mark.realtime
def test_speech_in_synchronised_audio_and_video_out_idle_frames_around_it():
    pcm = speech()
    service = LipsyncVideoService(avatar="demo", endpoint=os.environ["LSE_ENDPOINT"])
    rec, errors = run(service, TTSStandIn(pcm, delay=1.5), seconds=1.5 + len(pcm) / TTS_RATE + 2.5)
    assert not errors, errors
    imgs, auds = images(rec), audios(rec)
    assert imgs[0][1].format == "RGB" and len(imgs[0][1].image) == imgs[0][1].size[0] * imgs[0][1].size[1] * 3
    # 25 frames/s all along: before, during and after the speech
    t = np.array([ts for ts, _ in imgs])
    steady = t[(t > t[0] + 1.0)]
    assert abs((len(steady) - 1) / (steady[-1] - steady[0]) - 25) < 1.5
    # idle frames before the speech carry no audio; the speech comes out whole, 40 ms per frame
    assert rec.out[0][1] is imgs[0][1] and all(f.sample_rate == 16000 and len(f.audio) == 1280 for _, f in auds)
    assert abs(len(auds) * 0.04 - len(pcm) / TTS_RATE) <= 0.08
    # each 40 ms of audio leaves right before its frame: never more than one frame apart
    order = [type(f).__name__ for _, f in rec.out]
    for i, (ts, f) in enumerate(rec.out):
        if isinstance(f, TTSAudioRawFrame):
            assert order[i + 1] == "OutputImageRawFrame" and rec.out[i + 1][0] - ts < 0.04
    # frames with the voice and frames without it: the idle ones around the speech
    talking = {id(rec.out[i + 1][1]) for i, (_, f) in enumerate(rec.out) if isinstance(f, TTSAudioRawFrame)}
    assert len(talking) == len(auds) and len(imgs) - len(talking) > 50


@pytest.mark.realtime
def test_barge_in_stops_the_voice_at_once_and_idle_frames_go_on():
    pcm = speech()
    source = TTSStandIn(pcm, delay=0.5, interrupt_after=1.5)
    service = LipsyncVideoService(avatar="demo", endpoint=os.environ["LSE_ENDPOINT"])
    rec, errors = run(service, source, seconds=5.0)
    assert not errors, errors
    auds = audios(rec)
    assert source.interrupted_at is not None and auds
    # no voice after the interruption (what was queued is dropped), frames go on at 25 frames/s
    assert auds[-1][0] <= source.interrupted_at + 0.08
    after = [ts for ts, _ in images(rec) if ts > source.interrupted_at + 0.5]
    assert len(after) >= 25 * 2 and abs((len(after) - 1) / (after[-1] - after[0]) - 25) < 2


def test_an_engine_that_is_not_there_is_a_clear_error_not_a_hang():
    service = LipsyncVideoService(avatar="demo", endpoint="tcp://127.0.0.1:9", connect_timeout=1.0)
    t0 = time.monotonic()
    rec, errors = run(service, TTSStandIn(np.zeros(4800, np.int16), delay=0.1), seconds=3.0)
    assert time.monotonic() - t0 < 20
    assert errors and "did not answer within 1 s" in errors[0].error and "tcp://127.0.0.1:9" in errors[0].error
    assert images(rec) == []


def test_an_unknown_avatar_is_a_clear_error():
    service = LipsyncVideoService(avatar="nobody", endpoint=os.environ["LSE_ENDPOINT"])
    rec, errors = run(service, TTSStandIn(np.zeros(4800, np.int16), delay=0.1), seconds=2.0)
    assert errors and "has no avatar 'nobody'" in errors[0].error


@pytest.mark.skipif("LSE_DOOMED_PID" not in os.environ, reason="needs an engine it may stop (LSE_DOOMED_PID)")
def test_the_engine_stopping_mid_stream_is_a_clear_error_not_a_hang():
    pcm = speech()
    service = LipsyncVideoService(avatar="demo", endpoint=os.environ["LSE_DOOMED_ENDPOINT"])

    class Stopper(TTSStandIn):
        async def _speak(self) -> None:
            await asyncio.sleep(2.0)
            os.kill(int(os.environ["LSE_DOOMED_PID"]), signal.SIGTERM)
            await super()._speak()
    t0 = time.monotonic()
    rec, errors = run(service, Stopper(pcm, delay=0.0), seconds=12.0)
    assert time.monotonic() - t0 < 45
    assert errors and "lipsync engine" in errors[0].error, errors
    assert images(rec)                      # frames came before the stop


def test_the_readme_pipeline_builds():
    """The README's 20-line pipeline, with pass-through processors for STT, LLM, TTS and the
    aggregators, builds its transport, service and pipeline (it is not run: no browser here)."""
    import re
    from pathlib import Path

    from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", readme, re.S) if "LipsyncVideoService" in c]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    built = {}

    class Aggregators:
        def user(self):
            return FrameProcessor()

        def assistant(self):
            return FrameProcessor()

    class NoRun:                                    # stands in for WorkerRunner: keeps the worker, runs nothing
        async def run(self, worker):
            built["worker"] = worker
    scope["WorkerRunner"] = NoRun
    asyncio.run(scope["run_bot"](SmallWebRTCConnection(), FrameProcessor(), FrameProcessor(), FrameProcessor(),
                                 Aggregators()))
    assert isinstance(built["worker"], PipelineWorker)
