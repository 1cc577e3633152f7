"""A deterministic speech-like test signal, and small WAV helpers (read, mix down, resample).

The signal is not speech, but it has what the audio path and the demo lip sync care about:

* voiced syllables of 150-300 ms: the harmonics of a gliding f0 (110-220 Hz) shaped by three
  formant resonances of a vowel picked per syllable, with a raised-cosine attack and release and a
  per-syllable level (0.35 .. 1.0 of full), so loudness changes syllable by syllable;
* unvoiced fricatives of 60-140 ms before some syllables: white noise band-limited (FFT mask) to
  an /s/ (3.5-7.5 kHz) or /sh/ (1.8-5 kHz) band;
* short pauses of 100-300 ms every 2-4 syllables, one long pause of 0.8 s near the middle of the
  clip, 200 ms of lead-in and at least 150 ms of tail; a pause is near-silence (a noise floor at
  -80 dBFS), so it is visibly quieter than speech in the mel spectrogram without being digital zero;
* 16 kHz mono float32, peak 0.3.

Everything comes from one seeded ``numpy.random.Generator``: same ``seconds`` and ``seed``, same
samples, bit for bit.

Command line::

    python -m engine.audio.speech OUT.wav [--seconds 6] [--seed 3]

WAV helpers: :func:`read_wav` (8/16/24/32-bit integer PCM, any channel count, mixed down to mono
float32) and :func:`resample` (windowed-sinc interpolation, see its docstring).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["SAMPLE_RATE", "PEAK", "speech_pcm", "make_speech_wav", "write_wav", "read_wav", "resample", "main"]

SAMPLE_RATE = 16000
PEAK = 0.3
NOISE_FLOOR = 1e-4  # pauses: -80 dBFS noise (about 3 LSB in 16-bit)

# (F1, F2, F3) Hz and bandwidths of a few vowels (Peterson & Barney style averages).
_VOWELS = {
    "a": (730.0, 1090.0, 2440.0),
    "e": (530.0, 1840.0, 2480.0),
    "i": (270.0, 2290.0, 3010.0),
    "o": (570.0, 840.0, 2410.0),
    "u": (300.0, 870.0, 2240.0),
}
_FORMANT_BW = (90.0, 110.0, 170.0)
_FORMANT_GAIN = (1.0, 0.55, 0.3)
_FRICATIVES = {"s": (3500.0, 7500.0), "sh": (1800.0, 5000.0)}


def _envelope(n: int, attack: int, release: int) -> np.ndarray:
    """Raised-cosine attack and release over ``n`` samples, flat in between."""
    env = np.ones(n, np.float64)
    a, r = min(attack, n // 2), min(release, n // 2)
    if a:
        env[:a] = 0.5 - 0.5 * np.cos(np.pi * (np.arange(a) + 0.5) / a)
    if r:
        env[n - r:] = 0.5 + 0.5 * np.cos(np.pi * (np.arange(r) + 0.5) / r)
    return env


def _voiced(n: int, rng: np.random.Generator, sr: int) -> np.ndarray:
    """One vowel: harmonics of a gliding f0 through three formant resonances (unit-ish peak)."""
    f0a, f0b = rng.uniform(110.0, 220.0, 2)
    f0 = np.linspace(f0a, f0b, n)
    f0 *= 1.0 + 0.01 * np.sin(2 * np.pi * 5.5 * np.arange(n) / sr + rng.uniform(0, 2 * np.pi))  # vibrato
    formants = _VOWELS[str(rng.choice(sorted(_VOWELS)))]
    phase = 2 * np.pi * np.cumsum(f0) / sr
    k_max = int(4000.0 // min(f0a, f0b))
    k = np.arange(1, k_max + 1, dtype=np.float64)[:, None]  # [K, 1]
    fk = k * f0[None, :]  # [K, n] instantaneous harmonic frequencies
    amp = np.zeros_like(fk)
    for fc, bw, g in zip(formants, _FORMANT_BW, _FORMANT_GAIN):
        amp += g / (1.0 + ((fk - fc) / bw) ** 2)
    amp *= 1.0 / np.sqrt(k)  # glottal spectral tilt
    amp[fk > 0.45 * sr] = 0.0
    y = (amp * np.sin(k * phase[None, :])).sum(axis=0)
    return y / max(1e-9, float(np.abs(y).max()))


def _fricative(n: int, rng: np.random.Generator, sr: int) -> np.ndarray:
    lo, hi = _FRICATIVES[str(rng.choice(sorted(_FRICATIVES)))]
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / sr)
    spec *= (f >= lo) & (f <= hi)
    y = np.fft.irfft(spec, n)
    return y / max(1e-9, float(np.abs(y).max()))


def speech_pcm(seconds: float = 6.0, seed: int = 3) -> np.ndarray:
    """``seconds`` of the speech-like signal (module doc), 16 kHz mono float32, peak 0.3."""
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    sr = SAMPLE_RATE
    total = int(round(seconds * sr))
    rng = np.random.default_rng(seed)
    out = np.zeros(total, np.float64)

    def ms(a: float, b: float) -> int:
        return int(rng.uniform(a, b) * sr / 1000.0)

    pos = int(0.2 * sr)  # lead-in silence
    tail = int(0.15 * sr)
    long_pause_at = int(rng.uniform(0.4, 0.55) * total)
    long_pause_done = False
    until_pause = int(rng.integers(2, 5))
    while True:
        if not long_pause_done and pos >= long_pause_at:
            pos += int(0.8 * sr)
            long_pause_done = True
            continue
        if rng.random() < 0.3:  # an unvoiced fricative leads into the syllable
            n = ms(60, 140)
            if pos + n + int(0.15 * sr) > total - tail:
                break
            out[pos:pos + n] += rng.uniform(0.15, 0.3) * _fricative(n, rng, sr) * _envelope(n, n // 4, n // 3)
            pos += n
        n = ms(150, 300)
        if pos + n > total - tail:
            break
        level = rng.uniform(0.35, 1.0)
        out[pos:pos + n] += level * _voiced(n, rng, sr) * _envelope(n, int(0.03 * sr), int(0.06 * sr))
        pos += n
        until_pause -= 1
        if until_pause == 0:
            pos += ms(100, 300)
            until_pause = int(rng.integers(2, 5))
        else:
            pos += ms(10, 40)  # the short gap between syllables of one word
    peak = float(np.abs(out).max())
    if peak > 0:
        out *= PEAK / peak
    out += NOISE_FLOOR * rng.standard_normal(total)
    return out.astype(np.float32)


# --------------------------------------------------------------------------------------------
# WAV files
# --------------------------------------------------------------------------------------------


def speech_like_features(batch: int, start: int, shape: tuple[int, ...] = (32, 16, 16), seed: int = 7) -> np.ndarray:
    """Network audio input without an audio encoder: deterministic features whose energy rises and
    falls like syllables (4 per second)."""
    rng = np.random.default_rng(seed + start)
    t = (start + np.arange(batch)) / 25.0
    envelope = 0.02 + 0.8 * np.abs(np.sin(np.pi * 4.0 * t)) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.3 * t))
    noise = rng.standard_normal((batch, *shape)).astype(np.float32)
    return (noise * envelope.reshape(-1, *([1] * len(shape)))).astype(np.float32)


def write_wav(path: Path, pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write 16-bit PCM WAV atomically. ``pcm``: float in [-1, 1] (clipped), ``[n]`` or ``[n, channels]``."""
    path = Path(path)
    a = np.asarray(pcm, np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"pcm must be [n] or [n, channels], got shape {a.shape}")
    data = np.clip(np.round(a * 32767.0), -32768, 32767).astype("<i2")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with wave.open(str(tmp), "wb") as w:
            w.setnchannels(a.shape[1])
            w.setsampwidth(2)
            w.setframerate(int(sample_rate))
            w.writeframes(data.tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def make_speech_wav(path: Path, seconds: float = 6.0, seed: int = 3) -> Path:
    """Write :func:`speech_pcm` as a 16 kHz mono 16-bit WAV file; returns ``path``."""
    return write_wav(path, speech_pcm(seconds, seed), SAMPLE_RATE)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """``(pcm, sample_rate)``: integer-PCM WAV as mono float32 in [-1, 1].

    8-bit (unsigned), 16-, 24- and 32-bit (signed) samples; several channels are averaged.
    Raises ``ValueError`` for what the stdlib ``wave`` module cannot read (e.g. float WAV).
    """
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, sr = w.getnchannels(), w.getsampwidth(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except wave.Error as e:
        raise ValueError(f"{path}: not a readable integer-PCM WAV file ({e})") from e
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        x = v.astype(np.float32) / float(1 << 23)
    elif width == 4:
        x = (np.frombuffer(raw, "<i4").astype(np.float64) / float(1 << 31)).astype(np.float32)
    else:
        raise ValueError(f"{path}: unsupported sample width {width} bytes")
    n = x.size // channels
    x = x[:n * channels].reshape(n, channels)
    mono = x[:, 0] if channels == 1 else x.mean(axis=1, dtype=np.float64).astype(np.float32)
    return np.ascontiguousarray(mono, np.float32), sr


# --------------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------------

_SINC_ZEROS = 16  # zero crossings of the low-pass kernel on each side
_CHUNK = 16384  # output samples per block (bounds the [block, taps] weight matrix)


def resample(pcm: np.ndarray, sr_from: int, sr_to: int = SAMPLE_RATE) -> np.ndarray:
    """Resample mono ``pcm`` from ``sr_from`` to ``sr_to`` Hz; float32, ``round(n * sr_to / sr_from)`` samples.

    Method: direct windowed-sinc interpolation (no scipy, no polyphase tables). Output sample
    ``m`` sits at input time ``t = m * sr_from / sr_to``; it is ``sum_j x[j] h(t - j)`` over the
    input samples within ``16 / fc`` of ``t``, where ``h(d) = fc sinc(fc d) w(d)``, ``fc =
    min(1, sr_to / sr_from)`` (so downsampling low-passes at the new Nyquist frequency, the
    anti-alias filter, and upsampling interpolates band-limited) and ``w`` is a Blackman window
    over the support. Each output's weights are normalised to sum 1 (exact DC gain; outside the
    clip counts as zeros). Cost: about ``32 / fc`` multiply-adds per output sample; 44.1 kHz to
    16 kHz runs at several hundred times real time.
    """
    x = np.asarray(pcm, np.float64)
    if x.ndim != 1:
        raise ValueError(f"pcm must be 1-D mono, got shape {x.shape}")
    if sr_from <= 0 or sr_to <= 0:
        raise ValueError(f"sample rates must be positive, got {sr_from}, {sr_to}")
    if sr_from == sr_to:
        return x.astype(np.float32)
    n_out = int(round(x.size * sr_to / sr_from))
    out = np.empty(n_out, np.float32)
    if n_out == 0:
        return out
    fc = min(1.0, sr_to / sr_from)
    half = int(math.ceil(_SINC_ZEROS / fc))
    offsets = np.arange(-half + 1, half + 1)  # [taps]
    padded = np.concatenate([np.zeros(half), x, np.zeros(half + 1)])
    ratio = sr_from / sr_to
    for m0 in range(0, n_out, _CHUNK):
        m = np.arange(m0, min(n_out, m0 + _CHUNK))
        t = m * ratio
        base = np.floor(t).astype(np.int64)
        j = base[:, None] + offsets[None, :]  # [block, taps] input indices
        d = t[:, None] - j  # distance in input samples, |d| < half + 1
        w = np.where(np.abs(d) < half, 0.42 + 0.5 * np.cos(np.pi * d / half) + 0.08 * np.cos(2 * np.pi * d / half), 0.0)
        h = fc * np.sinc(fc * d) * w
        h /= h.sum(axis=1, keepdims=True)
        out[m0:m0 + m.size] = (padded[j + half] * h).sum(axis=1)
    return out


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.audio.speech",
                                 description="Write a deterministic speech-like 16 kHz mono WAV file.")
    ap.add_argument("out", type=Path, help="output .wav path")
    ap.add_argument("--seconds", type=float, default=6.0, help="length in seconds (default: 6)")
    ap.add_argument("--seed", type=int, default=3, help="random seed (default: 3)")
    args = ap.parse_args(argv)
    if not args.seconds > 0:
        ap.error("--seconds must be > 0")
    make_speech_wav(args.out, args.seconds, args.seed)
    print(f"{args.out}: {args.seconds:g} s, {SAMPLE_RATE} Hz mono 16-bit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
