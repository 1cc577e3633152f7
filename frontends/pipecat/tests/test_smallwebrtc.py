"""SmallWebRTC's voice path with and without :func:`fix_av_sync`: Pipecat's real audio track and
write method, a writer that answers a few milliseconds late (a busy event loop), and a reader that
plays the track in real time, as aiortc does. The pipeline around them is tested in the browser
(tests/frontends/test_browser_webrtc.py in the engine's suite)."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import simplejpeg
from pipecat.frames.frames import OutputAudioRawFrame
from pipecat.transports.smallwebrtc.transport import RawAudioTrack, RawVideoTrack, SmallWebRTCClient

from lipsync_pipecat import LipsyncVideoService
from lipsync_pipecat.smallwebrtc import VIDEO_QUEUE, fix_av_sync

RATE, CHUNK = 16000, 640                                     # 40 ms chunks, as the output transport writes
ORIGINAL = SmallWebRTCClient.write_audio_frame               # before any test patches it
assert not getattr(ORIGINAL, "lse_queued", False)


async def lag_of_the_voice(write, seconds: float = 4.0, late: float = 0.012, stall: int = 25) -> np.ndarray:
    """For each 40 ms chunk produced in real time: how long after it was produced it began to play.
    The writer answers ``late`` after each chunk comes, and 150 ms late once, at chunk ``stall``."""
    track = RawAudioTrack(sample_rate=RATE)
    client = SmallWebRTCClient.__new__(SmallWebRTCClient)     # the real write method, on a real track
    client._audio_output_track = track
    client._can_send = lambda: True
    n = int(seconds / 0.04)
    made: list[float] = []
    queue: asyncio.Queue = asyncio.Queue()

    async def produce() -> None:                             # the service: one chunk every 40 ms
        t0 = time.time()
        for k in range(n):
            await asyncio.sleep(max(0.0, t0 + k * 0.04 - time.time()))
            made.append(time.time())
            await queue.put(np.full(CHUNK, k + 1, np.int16))

    async def write_all() -> None:                           # the transport's audio task, answering late
        for k in range(n):
            pcm = await queue.get()
            await asyncio.sleep(0.15 if k == stall else late)
            await write(client, OutputAudioRawFrame(audio=pcm.tobytes(), sample_rate=RATE, num_channels=1))

    played: list[np.ndarray] = []

    async def play() -> None:                                # aiortc: the track's frames in real time
        for _ in range(int((seconds + 1.5) * 100)):
            played.append((await track.recv()).to_ndarray().reshape(-1))

    await asyncio.gather(produce(), write_all(), play())
    out = np.concatenate(played)
    lags = []
    for k in range(n):
        (where,) = np.nonzero(out == k + 1)
        lags.append(track._start + where[0] / RATE - made[k] if len(where) else np.inf)
    return np.array(lags)


@pytest.mark.realtime
def test_the_voice_stays_with_its_frames_when_writes_come_late():
    before = asyncio.run(lag_of_the_voice(ORIGINAL))
    fix_av_sync()
    after = asyncio.run(lag_of_the_voice(SmallWebRTCClient.write_audio_frame))
    print(f"\nvoice lag after 4 s, writes 12 ms late and once 150 ms: Pipecat's write {1000 * before[-1]:.0f} ms, "
          f"fix_av_sync's {1000 * after[-1]:.0f} ms (max {1000 * after[np.isfinite(after)].max():.0f} ms, {int((~np.isfinite(after)).sum())} of {len(after)} chunks dropped)")
    # Pipecat's own write waits for each chunk to be played: every late write puts 10 ms of silence
    # into the speech, and the voice falls behind by as much, chunk after chunk
    assert before[-1] > 0.4 and before[-1] > before[10] + 0.3
    # queued writes: the stall's backlog (150 ms) is dropped within about a second, every other chunk
    # plays, and then the voice plays a write's lateness and at most a few 10 ms frames after it came
    played = np.isfinite(after)
    assert (~played).sum() <= 4 and after[played].max() < 0.25, after
    assert np.median(after[-25:]) < 0.05, after


def test_fix_av_sync_is_idempotent():
    fix_av_sync()
    write = SmallWebRTCClient.write_audio_frame
    fix_av_sync()
    assert SmallWebRTCClient.write_audio_frame is write and write.lse_queued


def test_i420_frames_are_the_same_picture_and_the_video_track_stays_live():
    fix_av_sync()
    y, x = np.mgrid[0:720, 0:1280]
    picture = np.stack([(x * 255 // 1279), (y * 255 // 719), (x + y) % 256], -1).astype(np.uint8)
    jpeg = simplejpeg.encode_jpeg(picture, quality=90, colorsubsampling="420")
    rgb = LipsyncVideoService(avatar="demo")._image(jpeg)
    planes = LipsyncVideoService(avatar="demo", image_format="I420")._image(jpeg)
    assert (rgb.format, planes.format, planes.size) == ("RGB", "I420", (1280, 720))
    assert len(planes.image) == 1280 * 720 * 3 // 2                  # half the bytes of RGB

    async def through_the_track(frames):
        track = RawVideoTrack(1280, 720)
        for f in frames:
            track.add_video_frame(f)
        return [await track.recv() for _ in range(min(len(frames), VIDEO_QUEUE))]
    (sent,) = asyncio.run(through_the_track([planes]))
    assert sent.format.name == "yuvj420p"                            # to the encoder as it is
    again = sent.to_ndarray(format="rgb24").astype(int)
    assert np.abs(again - rgb_array(rgb)).mean() < 2.0               # the same picture as the RGB path
    burst = [LipsyncVideoService(avatar="demo", image_format="I420")._image(jpeg) for _ in range(7)]
    out = asyncio.run(through_the_track(burst))                       # 7 waiting: the oldest 4 dropped
    assert len(out) == VIDEO_QUEUE and all(f.format.name == "yuvj420p" for f in out)
    with np.testing.assert_raises(ValueError):
        LipsyncVideoService(avatar="demo", image_format="NV12")


def rgb_array(frame) -> np.ndarray:
    return np.frombuffer(frame.image, np.uint8).reshape(frame.size[1], frame.size[0], 3).astype(int)
