"""A stream's state on its own (engine/front/streams.py): lazy mel, per-frame silence, bounds, lag."""
from __future__ import annotations

import numpy as np
import pytest

from engine.audio.mel import StreamingMel, mel_windows, melspectrogram
from engine.audio.speech import speech_pcm
from engine.front.streams import AudioFull, Stream, StreamStateError


def stream(realtime: bool = True) -> Stream:
    s = Stream("s", [b"c"], "demo", 0, "pingpong", realtime, True, n_avatar=12)
    s.opened = 0.0
    return s


def test_a_push_keeps_pcm_and_computes_nothing_until_frames_are_taken():
    s = stream()
    s.push(speech_pcm(30.0, seed=1), end=False)
    assert s.mel.samples == 0 and s.received == 480000            # a copy, no spectrogram yet
    assert s.schedulable() == s.frames_final() - 7 > 700
    b = s.take(8, now=0.0)
    assert b.count == 8 and b.win_first == 0 and len(b.windows) == 15
    assert s.mel.samples < 16000                                  # only what frames 0..14 need


def test_windows_equal_the_whole_clip_recipe_whatever_the_takes():
    pcm = speech_pcm(3.0, seed=2)
    s = stream()
    s.push(pcm[:10000], end=False)
    s.push(pcm[10000:], end=True)
    ref = mel_windows(melspectrogram(pcm), 0, 75)
    got = []
    while s.schedulable():
        b = s.take(min(s.schedulable(), 11), now=0.0)
        got.append((b.win_first, b.windows))
    for first, w in got:
        np.testing.assert_array_equal(w, ref[first:first + len(w)])


def test_silence_is_decided_per_frame_from_its_whole_context():
    sp = speech_pcm(1.0, seed=3)
    pcm = np.concatenate([sp, np.zeros(32000, np.float32), sp])   # 25 + 50 + 25 frames
    idle = {}
    for size in (1, 5, 8, 24):
        s = stream()
        s.push(pcm, end=True)
        flags = []
        while s.schedulable():
            flags += s.take(min(size, s.schedulable()), now=0.0).idle
        idle[size] = flags
    assert idle[1] == idle[5] == idle[8] == idle[24]              # not a matter of batching
    flags = idle[8]
    assert not any(flags[:26]) and not any(flags[-26:])           # speech and its context
    assert all(flags[36:60]) and not all(flags[26:66])            # deep in the pause, not at its edges
    s = stream()
    s.idle_frames = False
    s.push(pcm, end=True)
    assert not any(s.take(100, now=0.0).idle)


def test_audio_ahead_is_bounded_and_nothing_is_kept_beyond():
    s = stream()
    s.push(np.zeros(16000 * 30, np.float32), end=False, max_ahead_s=40)
    with pytest.raises(AudioFull, match="max_audio_ahead_s"):
        s.push(np.zeros(16000 * 30, np.float32), end=False, max_ahead_s=40)
    assert s.received == 16000 * 30
    s.next_out = 25 * 25                                          # 25 s played out: room again
    s.push(np.zeros(16000 * 30, np.float32), end=True, max_ahead_s=40)
    with pytest.raises(StreamStateError, match="already ended"):
        s.push(np.zeros(10, np.float32), end=False)


def test_lag_tells_how_late_the_stream_is_now():
    s = stream()
    s.push(speech_pcm(2.0, seed=4), end=True)
    b = s.take(8, now=0.0)
    for k in range(8):
        s.ready[k] = (b"", {})
    s.inflight = 0
    assert [k for k, *_ in s.deliverable(1.0)] == [0]             # t0 = 1.0; frame 1 due at 1.04
    assert s.lag_ms(1.02) == 0.0
    assert s.deliverable(1.5) and s.next_out == 8                 # frames 1..7 went out late
    assert s.lag_ms(1.5) == pytest.approx(1000 * (1.5 - 1.32))    # frame 8 is owed and overdue
    assert stream(realtime=False).lag_ms(100.0) == 0.0
    assert b.count == 8


def test_a_dry_spell_restarts_the_clock_when_the_next_frame_is_ready():
    s = stream()
    pcm = speech_pcm(3.0, seed=5)
    s.push(pcm[:16000], end=False)
    n = s.schedulable()
    b = s.take(n, now=0.0)
    for k in range(n):
        s.ready[k] = (b"", {})
    s.inflight = 0
    out = s.deliverable(0.5) + s.deliverable(0.5 + n / 25)
    assert len(out) == n and s.dry()
    s.push(pcm[16000:], end=True)
    b = s.take(8, now=5.0)
    assert s.resume_from == n
    for k in range(n, n + 8):
        s.ready[k] = (b"", {})
    s.inflight = 0
    first = s.deliverable(5.2)
    assert first and first[0][2]["late_ms"] == 0                  # the pause is not lateness
    assert isinstance(s.mel, StreamingMel) and b.count == 8


def test_audio_that_comes_in_time_never_moves_the_clock():
    """Audio pushed as it is spoken leaves the stream dry between frames; a frame whose audio came
    before its due time must not restart the clock, or every slow job would add latency for good."""
    s = stream()
    pcm = speech_pcm(3.0, seed=6)
    s.push(pcm[:16000], end=False)
    n = s.schedulable()
    s.take(n, now=0.0)
    for k in range(n):
        s.ready[k] = (b"", {})
    s.inflight = 0
    s.deliverable(0.5)
    t0 = s.t0
    s.deliverable(t0 + (n - 1) / 25)
    assert s.dry()
    s.push(pcm[16000:17280], end=False)                          # the next 80 ms, in time
    s.take(s.schedulable(), now=t0 + (n - 1) / 25 + 0.01)        # frame n is due later than now
    assert s.resume_from is None and s.t0 == t0
