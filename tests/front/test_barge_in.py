"""Barge-in: stream_flush drops what a stream has not sent and shows the avatar's own (idle) frames
from the next frame on, at once, until audio comes again (docs/protocol.md 7.7)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from engine.audio.speech import speech_pcm
from engine.client import Client, EngineError


def idle_jpegs(c: Client) -> dict[int, bytes]:
    """The demo avatar's idle frame JPEG for each of its frames (a stream of silence)."""
    s = c.open_stream("demo", realtime=False)
    s.push(np.zeros(16000, np.int16), end=True)
    frames = list(s.frames(60))
    assert all(f.idle for f in frames)
    return {f.avatar_frame: f.jpeg for f in frames}


def first_frames(s, n: int) -> list:
    """At least ``n`` frames of stream ``s``, as they come."""
    got = []
    while len(got) < n:
        got += s.poll(1.0)
    return got


def test_flush_drops_unsent_frames_and_idle_frames_follow_at_once(shared_engine):
    with Client(shared_engine.endpoint, timeout=60) as c:
        idle = idle_jpegs(c)
        s = c.open_stream("demo", realtime=True)
        s.push(speech_pcm(3.0, seed=1))
        got = first_frames(s, 10)
        r = s.flush()
        n = r["next_frame"]
        assert r["frames_dropped"] > 0 and 0 < r["audio_dropped_s"] <= 3.0 and n >= got[-1].number + 1
        after = []
        deadline = time.monotonic() + 30
        while len([f for f in after if f.number >= n]) < 10:    # idle frames come without any audio
            assert time.monotonic() < deadline, "no idle frames after the flush"
            after += s.poll(0.1)
        got += [f for f in after if f.number < n]     # sent before the flush, read after it
        after = [f for f in after if f.number >= n]
        assert all(f.idle for f in after)
        for f in after:                               # the avatar's own frame, byte for byte
            assert f.jpeg == idle[f.avatar_frame]
        s.push(speech_pcm(1.0, seed=2), end=True)     # the next utterance
        rest = list(s.frames(60))
        numbers = [f.number for f in got + after + rest]
        assert numbers == list(range(len(numbers))), "frames skipped or repeated around the flush"
        assert sum(not f.idle for f in rest) >= 10 and rest[-1].last


def test_flush_after_end_ends_the_stream_at_the_next_frame(shared_engine):
    with Client(shared_engine.endpoint, timeout=60) as c:
        s = c.open_stream("demo", realtime=True)
        s.push(speech_pcm(2.0, seed=3), end=True)
        got = first_frames(s, 5)
        r = s.flush()
        got += list(s.frames(30))                     # until stream_end
        assert [f.number for f in got] == list(range(r["next_frame"]))
        assert s.finished


def test_a_flushed_stream_that_is_not_real_time_waits_for_audio(shared_engine):
    with Client(shared_engine.endpoint, timeout=60) as c:
        s = c.open_stream("demo", realtime=False)
        s.push(speech_pcm(2.0, seed=4))
        got = first_frames(s, 3)
        r = s.flush()
        time.sleep(0.5)
        got += s.poll(0.0)
        assert [f.number for f in got] == list(range(r["next_frame"]))      # nothing after the flush point
        s.push(np.zeros(16000, np.int16), end=True)
        rest = list(s.frames(60))
        assert [f.number for f in rest] == list(range(r["next_frame"], r["next_frame"] + 25))


def test_flush_of_an_unknown_stream(shared_engine):
    with Client(shared_engine.endpoint, timeout=60) as c:
        with pytest.raises(EngineError) as info:
            c.call("stream_flush", {"stream": "nope"})
        assert info.value.code == "unknown_stream"


# -- the stream's own bookkeeping around a flush (no engine) -----------------------------------------
def stream(realtime: bool = True):
    from engine.front.streams import Stream
    return Stream("s1", [b"c"], "demo", 0, "pingpong", realtime, True)


def test_a_busy_push_after_a_flush_changes_nothing():
    from engine.front.streams import AudioFull
    s = stream()
    s.flush()
    with pytest.raises(AudioFull):
        s.push(np.zeros(16000 * 10, np.float32), False, max_ahead_s=5)
    assert s.fill_until is None and s.received == 0            # still filling, nothing kept
    s.push(np.zeros(16000 * 4, np.float32), False, max_ahead_s=5)   # the gap is not counted as audio
    assert s.fill_until == s.base > s.next_frame


def test_audio_dropped_is_never_more_than_received():
    s = stream()
    s.flush()
    s.push(np.zeros(16000, np.float32), False)
    assert s.flush()["audio_dropped_s"] <= 1.0


def test_a_flush_before_any_frame_starts_the_clock_instead_of_a_burst():
    import time
    s = stream()
    s.opened -= 5.0                                            # opened 5 s ago, nothing sent yet
    s.flush()
    assert s.t0 is not None and s.schedulable() <= 5           # the next few frames, not 125 at once
    s.push(np.zeros(640, np.float32), False)
    assert s.base - s.next_frame <= int(0.55 * 25) + 2         # the utterance starts ~550 ms from now
    assert s.clock(s.base) - time.monotonic() < 0.65


def test_a_flush_after_end_leaves_nothing_to_schedule():
    s = stream()
    s.push(np.zeros(16000, np.float32), True)
    s.flush()
    assert s.total == 0 and s.schedulable() == 0 and s.finished


def test_a_flushed_stream_without_audio_times_out(engine_factory):
    eng = engine_factory("[streams]\nidle_timeout_s = 1\n")
    with Client(eng.endpoint, timeout=60) as c:
        s = c.open_stream("demo", realtime=True)
        s.push(np.zeros(640, np.int16))
        s.flush()
        with pytest.raises(Exception) as info:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                s.poll(0.2)
        assert "stream_timeout" in str(info.value)
