"""Tests for engine.audio.speech: the deterministic speech-like signal and the WAV helpers."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from engine.audio import speech as ms


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return ms.speech_pcm(6.0, 3)


def _tone_freq(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    k = int(np.argmax(spec))
    # parabolic interpolation of the peak bin
    a, b, c = np.log(spec[k - 1:k + 2] + 1e-12)
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * sr / x.size


def test_speech_is_deterministic_16k_mono(speech: np.ndarray) -> None:
    assert speech.dtype == np.float32 and speech.shape == (96000,)
    np.testing.assert_array_equal(ms.speech_pcm(6.0, 3), speech)
    assert not np.array_equal(ms.speech_pcm(6.0, 4), speech)
    assert 0.29 <= np.abs(speech).max() <= 0.31
    assert ms.speech_pcm(1.5, 3).shape == (24000,)


def test_speech_has_pauses_and_voiced_parts(speech: np.ndarray) -> None:
    rms = np.sqrt((speech.reshape(-1, 640).astype(np.float64) ** 2).mean(axis=1))  # per 40 ms frame
    quiet, loud = rms < 1e-3, rms > 0.03
    assert quiet.mean() > 0.2 and loud.mean() > 0.4, (quiet.mean(), loud.mean())
    assert np.percentile(rms, 90) / np.percentile(rms, 10) > 100  # varies strongly
    runs, longest = 0, 0  # the long pause: >= 0.7 s of near-silence somewhere in the middle
    for q in quiet:
        runs = runs + 1 if q else 0
        longest = max(longest, runs)
    assert longest * 0.04 >= 0.7
    # Speech parts are voiced: most energy below 1 kHz at harmonics of 110..220 Hz.
    f = np.fft.rfftfreq(640, 1 / 16000)
    frames = speech.reshape(-1, 640)[rms > 0.05]
    spec = np.abs(np.fft.rfft(frames * np.hanning(640), axis=1)) ** 2
    assert (spec[:, f < 1000].sum(1) / spec.sum(1)).mean() > 0.5
    # Syllable levels differ: loud frames span more than 2x in RMS.
    assert np.percentile(rms[loud], 90) / np.percentile(rms[loud], 10) > 2


def test_wav_round_trip_16bit_mono(tmp_path: Path, speech: np.ndarray) -> None:
    p = ms.make_speech_wav(tmp_path / "s.wav", seconds=2.0, seed=3)
    with wave.open(str(p)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 16000, 32000)
    x, sr = ms.read_wav(p)
    assert sr == 16000 and x.dtype == np.float32 and x.shape == (32000,)
    np.testing.assert_allclose(x, ms.speech_pcm(2.0, 3), atol=1 / 32768 + 1e-6)
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("width", [1, 2, 4])
def test_read_wav_stereo_mixdown(tmp_path: Path, width: int) -> None:
    n = 800
    left = 0.5 * np.sin(2 * np.pi * 440 * np.arange(n) / 8000)
    right = -0.25 * np.ones(n)
    scale = {1: 127, 2: 32767, 4: 2**31 - 1}[width]
    data = np.round(np.stack([left, right], axis=1) * scale)
    raw = (data + 128).astype(np.uint8) if width == 1 else data.astype({2: "<i2", 4: "<i4"}[width])
    p = tmp_path / f"st{width}.wav"
    with wave.open(str(p), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(width)
        w.setframerate(8000)
        w.writeframes(raw.tobytes())
    x, sr = ms.read_wav(p)
    assert sr == 8000 and x.shape == (n,) and x.dtype == np.float32
    np.testing.assert_allclose(x, (left + right) / 2, atol=2.0 / scale + 1e-6)


def test_resample_44k1_to_16k(tmp_path: Path) -> None:
    sr = 44100
    t = np.arange(int(1.5 * sr)) / sr
    tone = 0.4 * np.sin(2 * np.pi * 1000.0 * t)
    alias = 0.4 * np.sin(2 * np.pi * 12000.0 * t)  # above the new Nyquist: must be removed
    p = ms.write_wav(tmp_path / "t.wav", np.stack([tone + alias, tone - alias], axis=1), sr)  # mixes to the tone
    x, got_sr = ms.read_wav(p)
    assert got_sr == sr
    y = ms.resample(tone + alias, sr, 16000)
    assert y.dtype == np.float32 and y.size == 24000
    mid = y[2000:-2000]
    assert abs(_tone_freq(mid, 16000) - 1000.0) < 1.0
    ref = 0.4 * np.sin(2 * np.pi * 1000.0 * np.arange(24000) / 16000)
    assert np.abs(mid - ref[2000:-2000]).max() < 0.01  # amplitude and phase kept, 12 kHz gone
    z = ms.resample(x, sr, 16000)
    assert z.size == round(x.size * 16000 / sr)
    assert abs(_tone_freq(z[2000:-2000], 16000) - 1000.0) < 1.0
    up = ms.resample(ref, 16000, 48000)  # upsampling keeps the tone too
    assert up.size == 72000 and abs(_tone_freq(up[6000:-6000], 48000) - 1000.0) < 1.0
    np.testing.assert_array_equal(ms.resample(ref, 16000, 16000), ref.astype(np.float32))


def test_cli(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli.wav"
    assert ms.main([str(out), "--seconds", "1.5"]) == 0
    x, sr = ms.read_wav(out)
    assert sr == 16000 and x.size == 24000
    assert "cli.wav" in capsys.readouterr().out
