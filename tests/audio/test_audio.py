"""Audio features (engine/audio/mel.py) against librosa and the Wav2Lip / SyncTalk_2D recipe (REFERENCE.md s. 5)."""
from __future__ import annotations

import numpy as np
import pytest

from engine.audio import mel as A

SR = A.SAMPLE_RATE


# -- test signal: speech-like, deterministic ------------------------------------------------------
def _bandpass_noise(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / SR)
    spec *= ((f >= lo) & (f <= hi)).astype(float)
    y = np.fft.irfft(spec, n)
    return y / (np.abs(y).max() + 1e-12)


def speech_like(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """Gliding-f0 vowel (120 -> 220 Hz) through two formants, syllable envelope, a fricative, quiet lead-in."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    f0 = 120.0 + 100.0 * (0.5 - 0.5 * np.cos(2 * np.pi * t / seconds))  # glide up and back
    f0 *= 1 + 0.01 * np.sin(2 * np.pi * 5.5 * t)  # vibrato
    phase = 2 * np.pi * np.cumsum(f0) / SR
    formants = [(700.0, 110.0), (1220.0, 140.0)]  # /a/-like F1, F2 with bandwidths
    voiced = np.zeros(n)
    for h in range(1, 40):
        fh = h * f0
        gain = np.zeros(n)
        for fc, bw in formants:  # two-pole resonance magnitude at the harmonic's frequency
            gain += 1.0 / np.sqrt((1 - (fh / fc) ** 2) ** 2 + (fh * bw / fc**2) ** 2)
        gain *= (fh < SR / 2 - 200) / h  # source tilt, no aliasing
        voiced += gain * np.sin(h * phase + rng.uniform(0, 2 * np.pi))
    voiced /= np.abs(voiced).max()
    env = np.clip(np.sin(2 * np.pi * 3.0 * t) * 1.3, 0, 1) ** 0.7  # ~6 syllables per second
    x = 0.6 * voiced * env
    fr0, fr1 = int(0.55 * n), int(0.70 * n)  # an "s": band noise 4-7.5 kHz
    ramp = np.sin(np.linspace(0, np.pi, fr1 - fr0))
    x[fr0:fr1] = 0.25 * _bandpass_noise(rng, fr1 - fr0, 4000, 7500) * ramp
    x[: int(0.08 * SR)] *= 0.0  # leading silence
    x += 1e-4 * rng.standard_normal(n)  # room noise
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return speech_like(2.0, seed=0)


def librosa_recipe(wav: np.ndarray) -> np.ndarray:
    """SyncTalk_2D utils.melspectrogram, verbatim in substance (librosa + scipy)."""
    librosa = pytest.importorskip("librosa")
    from scipy import signal

    d = librosa.stft(y=signal.lfilter([1, -0.97], [1], wav), n_fft=800, hop_length=200, win_length=800)
    basis = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    s = 20 * np.log10(np.maximum(np.exp(-5 * np.log(10)), np.dot(basis, np.abs(d)))) - 20
    return np.clip((2 * 4.0) * ((s + 100) / 100) - 4.0, -4.0, 4.0)


# -- constants and filter bank --------------------------------------------------------------------
def test_constants():
    assert (A.SAMPLE_RATE, A.FPS, A.SAMPLES_PER_FRAME, A.MEL_PER_SECOND, A.WINDOW) == (16000, 25, 640, 80, 16)


def test_filterbank_matches_librosa():
    librosa = pytest.importorskip("librosa")
    ref = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    fb = A.mel_filterbank()
    assert fb.shape == (80, 401) and fb.dtype == np.float32
    diff = float(np.abs(fb - ref).max())
    print(f"filter bank max abs diff vs librosa: {diff:.3g}")
    np.testing.assert_allclose(fb, ref, rtol=0, atol=1e-6)
    assert A.mel_filterbank() is fb and not fb.flags.writeable


# -- melspectrogram vs the librosa recipe ---------------------------------------------------------
def test_signal_is_speech_like(clip):
    mel = A.melspectrogram(clip)
    assert mel.min() == -4.0  # leading silence clips to the floor
    assert mel.max() > 0.5  # voiced parts are loud
    assert mel.std(axis=1).mean() > 0.5  # varies over time


@pytest.mark.parametrize("n", [32000, 32123, 3001, 799, 150, 1])
def test_melspectrogram_matches_librosa(clip, n):
    pytest.importorskip("librosa")
    wav = clip[:n]
    ref = librosa_recipe(wav)
    mel = A.melspectrogram(wav)
    assert mel.dtype == np.float32 and mel.shape == ref.shape == (80, 1 + n // 200)
    diff = float(np.abs(mel - ref).max())
    print(f"n={n}: melspectrogram max abs diff vs librosa recipe: {diff:.3g}")
    assert diff < 1e-5  # float32 rounding of values in [-4, 4] is ~2.4e-7


def test_float64_and_int16_input(clip):
    mel32 = A.melspectrogram(clip)
    np.testing.assert_allclose(A.melspectrogram(clip.astype(np.float64)), mel32, atol=1e-6)
    pcm16 = np.clip(np.round(clip * 32768), -32768, 32767).astype(np.int16)
    m16 = A.melspectrogram(pcm16)
    np.testing.assert_array_equal(m16, A.melspectrogram(pcm16.astype(np.float64) / 32768.0))
    loud = mel32 > -3.0  # 16-bit quantisation noise only matters near the -100 dB floor
    np.testing.assert_allclose(m16[loud], mel32[loud], atol=0.05)


def test_int16_matches_librosa(clip):
    pytest.importorskip("librosa")
    pcm16 = np.clip(np.round(clip * 32768), -32768, 32767).astype(np.int16)
    ref = librosa_recipe(pcm16.astype(np.float32) / 32768.0)
    assert float(np.abs(A.melspectrogram(pcm16) - ref).max()) < 1e-5


# -- bad input ------------------------------------------------------------------------------------
def test_bad_input():
    x = np.zeros(1000, np.float32)
    x[10] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        A.melspectrogram(x)
    x[10] = np.inf
    with pytest.raises(ValueError, match="Inf"):
        A.melspectrogram(x)
    with pytest.raises(ValueError, match="1-D"):
        A.melspectrogram(np.zeros((2, 1000), np.float32))
    with pytest.raises(ValueError, match="1-D"):
        A.melspectrogram(np.float32(0.5))
    with pytest.raises(ValueError, match="dtype"):
        A.melspectrogram(np.zeros(100, np.int32))
    s = A.StreamingMel()
    s.push(np.ones(500, np.float32))
    bad = np.ones(700, np.float32)
    bad[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        s.push(bad)
    assert s.samples == 500  # the bad chunk changed nothing
    with pytest.raises(ValueError, match="1-D"):
        s.push(np.ones((10, 2), np.float32))


def test_empty_input():
    mel = A.melspectrogram(np.zeros(0, np.float32))
    assert mel.shape == (80, 0) and mel.dtype == np.float32
    assert A.frame_count(0) == 0
    assert A.mel_windows(mel, 0, 0).shape == (0, 1, 80, 16)
    s = A.StreamingMel()
    s.push(np.zeros(0, np.int16))
    assert s.frames_ready() == 0
    s.finish()
    assert s.frames_ready() == 0 and s.columns == 0
    assert s.windows(0, 0).shape == (0, 1, 80, 16)


# -- frame windows --------------------------------------------------------------------------------
def test_window_positions(clip):
    mel = A.melspectrogram(clip)  # 2 s: 161 columns, 50 frames
    t = mel.shape[1]
    assert t == 161 and A.frame_count(clip.size) == 50
    w = A.mel_windows(mel, 0, 50)
    assert w.shape == (50, 1, 80, 16) and w.dtype == np.float32
    for k in range(50):
        start = int(80 * k / 25)
        if start + 16 > t:  # SyncTalk_2D / Wav2Lip: the last 16 columns
            start = t - 16
        np.testing.assert_array_equal(w[k, 0], mel[:, start:start + 16])
    assert [int(s) for s in A.window_starts(np.arange(6), None)] == [0, 3, 6, 9, 12, 16]
    # last frames: k=45 starts at 144 (144 + 16 <= 161); k=46 -> 147 + 16 > 161 -> 161 - 16 = 145
    assert list(A.window_starts(np.array([45, 46, 49, 60]), t)) == [144, 145, 145, 145]
    np.testing.assert_array_equal(A.mel_windows(mel, 7, 5), w[7:12])
    np.testing.assert_array_equal(A.mel_windows(mel, 60, 1)[0, 0], mel[:, -16:])  # past the end


def test_window_start_is_exact_integer_division():
    k = np.arange(100000)
    assert np.array_equal(A.window_starts(k, None), np.array([int(80 * i / 25) for i in k]))


def test_short_clip_window_padded_with_silence(clip):
    mel = A.melspectrogram(clip[:1000])  # 6 columns < 16
    w = A.mel_windows(mel, 0, 2)
    assert mel.shape[1] == 6
    for k in range(2):
        np.testing.assert_array_equal(w[k, 0, :, :6], mel)
        assert (w[k, 0, :, 6:] == A.SILENCE).all()


def test_window_bad_args(clip):
    mel = A.melspectrogram(clip[:8000])
    with pytest.raises(ValueError):
        A.mel_windows(mel, -1, 2)
    with pytest.raises(ValueError):
        A.mel_windows(mel.T, 0, 2)
    with pytest.raises(ValueError):
        A.mel_windows(np.zeros((80, 0), np.float32), 0, 1)


# -- frame_audio_features -------------------------------------------------------------------------
def test_frame_audio_features_padding_and_order():
    n = 20
    enc = (np.arange(n)[:, None] * 1000 + np.arange(512)[None, :] + 1).astype(np.float32)  # no zeros
    f0 = A.frame_audio_features(enc, 0)
    assert f0.shape == (32, 16, 16) and f0.dtype == np.float32
    rows = f0.reshape(16, 512)
    assert (rows[:8] == 0).all()
    np.testing.assert_array_equal(rows[8:], enc[0:8])
    rows = A.frame_audio_features(enc, n - 1).reshape(16, 512)
    np.testing.assert_array_equal(rows[:9], enc[n - 9:n])
    assert (rows[9:] == 0).all()
    rows = A.frame_audio_features(enc, 10).reshape(16, 512)
    np.testing.assert_array_equal(rows, enc[2:18])  # frames i-8 .. i+7, in order
    # flat order: vector 0 fills the first 512 values = channels 0 and 1 of [32,16,16]
    np.testing.assert_array_equal(A.frame_audio_features(enc, 10)[:2].ravel(), enc[2])
    idx = np.array([0, 3, 10, 19, 25, -3])
    batch = A.frame_audio_features(enc, idx)
    assert batch.shape == (6, 32, 16, 16)
    for b, i in enumerate(idx):
        np.testing.assert_array_equal(batch[b], A.frame_audio_features(enc, int(i)))
    assert (A.frame_audio_features(enc, 40) == 0).all()
    with pytest.raises(ValueError):
        A.frame_audio_features(enc[:, :500], 0)
    assert A.frame_audio_features(enc[:, :256], 3, out_shape=(16, 16, 16)).shape == (16, 16, 16)


# -- streaming ------------------------------------------------------------------------------------
def _random_chunks(x: np.ndarray, n_chunks: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, x.size), n_chunks - 1, replace=False))
    return np.split(x, cuts)


def _stream(chunks, consume: bool = True):
    s = A.StreamingMel()
    out, got = [], 0
    for c in chunks:
        s.push(c)
        r = s.frames_ready()
        if consume and r > got:
            out.append(s.windows(got, r - got))
            got = r
    s.finish()
    r = s.frames_ready()
    out.append(s.windows(got, r - got))
    return s, np.concatenate(out)


@pytest.mark.parametrize("n", [32000, 12345, 5000, 2999, 450, 399])
def test_streaming_chunking_invariance(clip, n):
    x = clip[:n]
    mel = A.melspectrogram(x)
    nf = A.frame_count(n)
    ref = A.mel_windows(mel, 0, nf)
    # whole clip in one push, nothing consumed: all columns retained
    s = A.StreamingMel()
    s.push(x)
    s.finish()
    c0, cols = s.mel()
    assert c0 == 0 and cols.shape == mel.shape
    np.testing.assert_allclose(cols, mel, atol=1e-5, rtol=0)
    assert s.frames_ready() == nf
    np.testing.assert_allclose(s.windows(0, nf), ref, atol=1e-5, rtol=0)
    # 37 random chunks (or fewer for tiny clips), consuming windows as they become ready
    _, w = _stream(_random_chunks(x, min(37, n - 1), seed=n))
    assert w.shape == ref.shape
    np.testing.assert_allclose(w, ref, atol=1e-5, rtol=0)


def test_streaming_one_sample_chunks(clip):
    x = clip[:4800]
    ref = A.mel_windows(A.melspectrogram(x), 0, A.frame_count(x.size))
    _, w = _stream(list(x.reshape(-1, 1)))
    np.testing.assert_allclose(w, ref, atol=1e-5, rtol=0)


def test_streaming_int16_chunks(clip):
    pcm16 = np.clip(np.round(clip * 32768), -32768, 32767).astype(np.int16)
    ref = A.mel_windows(A.melspectrogram(pcm16), 0, A.frame_count(pcm16.size))
    _, w = _stream(_random_chunks(pcm16, 37, seed=5))
    np.testing.assert_allclose(w, ref, atol=1e-5, rtol=0)


def test_frames_ready_never_claims_a_changing_window(clip):
    """Every window handed out early equals the final one, and frames_ready is exactly tight."""
    x = clip
    final = A.mel_windows(A.melspectrogram(x), 0, A.frame_count(x.size))
    rng = np.random.default_rng(11)
    s = A.StreamingMel()
    pos, prev_ready = 0, 0
    for c in _random_chunks(x, 37, seed=3):
        s.push(c)
        pos += c.size
        r = s.frames_ready()
        assert r >= prev_ready
        # the formula: frame k is ready iff samples_needed(k) <= samples so far
        assert r == int((A.samples_needed(np.arange(200)) <= pos).sum())
        if r > prev_ready:
            np.testing.assert_allclose(s.windows(prev_ready, r - prev_ready), final[prev_ready:r], atol=1e-5)
        # tight: frame r (the first not ready) does depend on audio not yet received
        if r < final.shape[0] and pos + 4000 < x.size:
            tail = np.concatenate([x[:pos], 0.9 * rng.standard_normal(4000).astype(np.float32)])
            alt = A.mel_windows(A.melspectrogram(tail), r, 1)[0]
            cut = A.mel_windows(A.melspectrogram(np.concatenate([x[:pos], np.zeros(4000, np.float32)])), r, 1)[0]
            assert np.abs(alt - cut).max() > 0  # (the first missing sample has Hann weight ~1.5e-5)
        prev_ready = r
    s.finish()
    assert s.frames_ready() == final.shape[0]
    np.testing.assert_allclose(s.windows(prev_ready, final.shape[0] - prev_ready), final[prev_ready:], atol=1e-5)


def test_samples_needed():
    # frame 0: columns 0..15, column 15 covers samples up to 200*15 + 400 = 3400
    assert A.samples_needed(0) == 3400
    assert A.samples_needed(1) == 200 * 3 + 3400
    assert A.samples_needed(5) == 200 * 16 + 3400
    s = A.StreamingMel()
    s.push(np.zeros(3399, np.float32))
    assert s.frames_ready() == 0
    s.push(np.zeros(1, np.float32))
    assert s.frames_ready() == 1


def test_streaming_memory_bounded_and_absolute_indices():
    rng = np.random.default_rng(7)
    s = A.StreamingMel()
    got = 0
    max_cols = max_samples = 0
    x = speech_like(1.0, seed=2)
    for rep in range(30):  # 30 s of audio in 640-sample pushes
        for c in np.split(x, x.size // 640):
            s.push(c + 0.01 * rng.standard_normal(c.size).astype(np.float32))
            r = s.frames_ready()
            if r > got:
                w = s.windows(got, r - got)
                assert w.shape[0] == r - got
                got = r
            max_cols = max(max_cols, s.retained_columns)
            max_samples = max(max_samples, s.retained_samples)
    n = 30 * 16000
    assert s.columns == (n - 400) // 200 + 1 and got == int((A.samples_needed(np.arange(800)) <= n).sum()) > 740
    assert max_cols <= 24 and max_samples <= 1500
    with pytest.raises(ValueError, match="released"):
        s.windows(got - 10, 1)
    with pytest.raises(ValueError, match="ready"):
        s.windows(got, 50)
    s.finish()
    assert s.frames_ready() == A.frame_count(30 * 16000)
    assert s.windows(got, s.frames_ready() - got).shape[0] == s.frames_ready() - got
    with pytest.raises(RuntimeError):
        s.push(np.zeros(10, np.float32))
