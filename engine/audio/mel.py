"""Audio features from raw PCM: the Wav2Lip / SyncTalk_2D ("ave") mel recipe, batch and streaming.

Compute kernels only (numpy; no sockets, no librosa or scipy at run time). REFERENCE.md section 5.

Recipe (Wav2Lip ``audio.melspectrogram`` as used by SyncTalk_2D ``utils.py``), 16 kHz mono:

1. pre-emphasis 0.97: ``y[0] = x[0]``, ``y[n] = x[n] - 0.97 x[n-1]`` (``scipy.signal.lfilter([1, -0.97], [1], x)``);
2. STFT: n_fft 800, hop 200, periodic Hann window of 800, centred: 400 zeros on each side
   (librosa's ``center=True, pad_mode='constant'``), so a clip of ``N > 0`` samples has
   ``T = 1 + N // 200`` columns and column ``c`` covers original samples ``[200c - 400, 200c + 400)``;
3. magnitude (not power), 80-band Slaney mel filter bank (55 .. 7600 Hz);
4. ``S = 20 log10(max(1e-5, mel)) - 20``, then ``clip(8 (S + 100) / 100 - 4, -4, 4)``.
   Silence is exactly -4.

The whole pipeline runs in float64 (as the reference does after ``lfilter``) and the result is
rounded to float32 once, at the end.

Video frame ``k`` (25 fps, 640 samples) uses the 16 mel columns starting at ``int(80 k / 25)``
(``== 16 k // 5``); see :func:`mel_windows` for the end-of-clip rule. Each window goes through the
audio encoder (``[N,1,80,16] -> [N,512]``) and frame ``i``'s network input gathers the encoder
vectors of frames ``i-8 .. i+7`` (:func:`frame_audio_features`).

Latency of the streaming path (:class:`StreamingMel`): frame ``k``'s mel window is final once
``samples_needed(k) = 200 * (16k // 5) + 3400`` samples have arrived, that is 3240 .. 3400 samples
(202.5 .. 212.5 ms) after the frame's first sample. Frame ``i``'s network input also needs the
encoder vectors up to frame ``i + 7``, so ``samples_needed(i + 7)``: about 490 ms after frame
``i``'s first sample.
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = [
    "SAMPLE_RATE",
    "FPS",
    "SAMPLES_PER_FRAME",
    "MEL_PER_SECOND",
    "WINDOW",
    "N_MELS",
    "N_FFT",
    "HOP",
    "SILENCE",
    "FEATURE_CONTEXT",
    "mel_filterbank",
    "melspectrogram",
    "mel_windows",
    "window_starts",
    "frame_count",
    "n_columns",
    "samples_needed",
    "frames_final",
    "frame_audio_features",
    "StreamingMel",
]

SAMPLE_RATE = 16000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
MEL_PER_SECOND = 80
WINDOW = 16  # mel columns per video frame window

N_MELS = 80
N_FFT = 800
HOP = 200
PAD = N_FFT // 2  # centring padding (zeros) on each side
N_BINS = N_FFT // 2 + 1  # 401
FMIN, FMAX = 55.0, 7600.0
PREEMPHASIS = 0.97
MIN_LEVEL = 1e-5  # Wav2Lip: exp(-5 ln 10)
REF_LEVEL_DB = 20.0
MIN_LEVEL_DB = -100.0
MAX_ABS = 4.0
SILENCE = -MAX_ABS  # normalised value of a silent column
FEATURE_CONTEXT = (8, 8)  # frame i uses encoder vectors of frames i-8 .. i+7

_BLOCK_COLUMNS = 2048  # columns per FFT block: bounds temporary memory for long clips


# --------------------------------------------------------------------------------------------
# Filter bank and window
# --------------------------------------------------------------------------------------------

_F_SP = 200.0 / 3  # Slaney: linear part, Hz per mel
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP  # 15
_LOGSTEP = math.log(6.4) / 27.0


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, np.float64)
    mel = f / _F_SP
    log_part = f >= _MIN_LOG_HZ
    return np.where(log_part, _MIN_LOG_MEL + np.log(np.maximum(f, 1e-300) / _MIN_LOG_HZ) / _LOGSTEP, mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    return np.where(m >= _MIN_LOG_MEL, _MIN_LOG_HZ * np.exp(_LOGSTEP * (m - _MIN_LOG_MEL)), _F_SP * m)


@functools.lru_cache(maxsize=1)
def mel_filterbank() -> np.ndarray:
    """Slaney mel filter bank ``[80, 401]`` float32 (read-only, cached).

    Equal to ``librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)``
    (``htk=False``, ``norm='slaney'``): triangles on the Slaney mel scale (linear below 1 kHz,
    logarithmic above), each scaled by ``2 / (f[i+2] - f[i])`` for unit area.
    """
    fft_freqs = np.linspace(0.0, SAMPLE_RATE / 2, N_BINS)
    mel_pts = np.linspace(_hz_to_mel(FMIN), _hz_to_mel(FMAX), N_MELS + 2)
    hz_pts = _mel_to_hz(mel_pts)
    fdiff = np.diff(hz_pts)
    ramps = hz_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (hz_pts[2:] - hz_pts[:-2]))[:, None]
    out = weights.astype(np.float32)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=1)
def _fb64_t() -> np.ndarray:
    # the float32 bank promoted to float64, transposed for [cols, 401] @ [401, 80]
    return np.ascontiguousarray(mel_filterbank().astype(np.float64).T)


@functools.lru_cache(maxsize=1)
def _hann() -> np.ndarray:
    # periodic Hann (scipy get_window('hann', 800, fftbins=True))
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)


# --------------------------------------------------------------------------------------------
# Input handling and the column kernel
# --------------------------------------------------------------------------------------------


def _as_float64(pcm: np.ndarray) -> np.ndarray:
    """Validate mono PCM and return it as float64 in [-1, 1] scale (int16 is scaled by 1/32768)."""
    a = np.asarray(pcm)
    if a.ndim != 1:
        raise ValueError(f"audio must be 1-D mono PCM, got an array of shape {a.shape}")
    if a.dtype == np.int16:
        return a.astype(np.float64) * (1.0 / 32768.0)
    if a.dtype.kind != "f":
        raise ValueError(f"audio must be float (in [-1, 1]) or int16 PCM, got dtype {a.dtype}")
    x = a.astype(np.float64)
    if x.size and not np.isfinite(x).all():
        bad = "NaN" if np.isnan(x).any() else "Inf"
        raise ValueError(f"audio contains {bad} (non-finite samples)")
    return x


def _preemphasis(x: np.ndarray, prev: float) -> np.ndarray:
    """``y[n] = x[n] - 0.97 x[n-1]`` with ``x[-1] = prev``."""
    y = x.copy()
    if x.size:
        y[1:] -= PREEMPHASIS * x[:-1]
        y[0] -= PREEMPHASIS * prev
    return y


def _columns(padded: np.ndarray, n_cols: int) -> np.ndarray:
    """Normalised mel columns ``[80, n_cols]`` float32 from pre-emphasised, padded samples.

    ``padded[200 j : 200 j + 800]`` is column ``j``'s frame; needs ``len >= 200 (n_cols-1) + 800``.
    """
    out = np.empty((N_MELS, n_cols), np.float32)
    if n_cols == 0:
        return out
    padded = np.ascontiguousarray(padded, np.float64)
    assert padded.size >= HOP * (n_cols - 1) + N_FFT
    frames_all = np.lib.stride_tricks.as_strided(
        padded, shape=(n_cols, N_FFT), strides=(HOP * padded.itemsize, padded.itemsize), writeable=False)
    win, fb_t = _hann(), _fb64_t()
    for j0 in range(0, n_cols, _BLOCK_COLUMNS):
        j1 = min(n_cols, j0 + _BLOCK_COLUMNS)
        mag = np.abs(np.fft.rfft(frames_all[j0:j1] * win, axis=1))  # [cols, 401]
        mel = mag @ fb_t  # [cols, 80]
        s = 20.0 * np.log10(np.maximum(MIN_LEVEL, mel)) - REF_LEVEL_DB
        s = np.clip(2 * MAX_ABS * ((s - MIN_LEVEL_DB) / -MIN_LEVEL_DB) - MAX_ABS, -MAX_ABS, MAX_ABS)
        out[:, j0:j1] = s.T
    return out


def n_columns(n_samples: int) -> int:
    """Mel columns of a complete clip of ``n_samples``: ``1 + n // 200`` (0 for an empty clip)."""
    return 0 if n_samples <= 0 else 1 + n_samples // HOP


def melspectrogram(pcm: np.ndarray) -> np.ndarray:
    """Normalised mel spectrogram ``[80, T]`` float32 of a whole clip (Wav2Lip recipe, module doc).

    ``pcm``: 1-D float32/float64 in [-1, 1] or int16 (scaled by 1/32768). ``T = 1 + N // 200``;
    an empty clip gives ``[80, 0]``. Raises ``ValueError`` for NaN/Inf samples, a wrong number of
    dimensions or another dtype.
    """
    x = _as_float64(pcm)
    if x.size == 0:
        return np.zeros((N_MELS, 0), np.float32)
    y = _preemphasis(x, 0.0)
    padded = np.zeros(x.size + 2 * PAD, np.float64)
    padded[PAD:PAD + x.size] = y
    return _columns(padded, n_columns(x.size))


# --------------------------------------------------------------------------------------------
# Frame windows
# --------------------------------------------------------------------------------------------


def frame_count(n_samples: int) -> int:
    """Video frames that cover ``n_samples`` of audio: ``ceil(n / 640)`` (0 for no audio).

    (SyncTalk_2D's offline ``AudDataset`` makes ``int((T - 16) / 3.2) + 2`` windows, a few fewer;
    a live engine shows one frame per started 40 ms of audio.)
    """
    return max(0, -(-int(n_samples) // SAMPLES_PER_FRAME))


def samples_needed(frame: int | np.ndarray) -> int | np.ndarray:
    """Samples that must have arrived before frame ``k``'s mel window is final (streaming).

    ``200 * (16k // 5) + 3400``: the window's last column ``16k//5 + 15`` covers original
    samples up to (excluding) ``200 (16k//5 + 15) + 400``. Works on ints and integer arrays.
    """
    k = np.asarray(frame, np.int64)
    out = HOP * ((16 * k) // 5) + HOP * (WINDOW - 1) + PAD
    return int(out) if out.ndim == 0 else out


def frames_final(n_samples: int) -> int:
    """Frames (from frame 0) whose mel window is final once ``n_samples`` have arrived, the clip
    still going on: the ``k`` with ``samples_needed(k) <= n_samples``. Equal to
    :meth:`StreamingMel.frames_ready` after pushing those samples, without computing anything."""
    if n_samples < PAD:
        return 0
    m = (n_samples - PAD) // HOP + 1 - WINDOW      # largest usable start column
    return 0 if m < 0 else (5 * (m + 1) + 15) // 16


def window_starts(frames: np.ndarray, total_columns: int | None) -> np.ndarray:
    """First mel column of each frame's window.

    ``start = int(80 k / 25)`` (computed exactly as ``16 k // 5``). With ``total_columns = T``
    known (the clip is complete) the SyncTalk_2D / Wav2Lip end-of-clip rule applies
    (``AudDataset.crop_audio_window``): if ``start + 16 > T`` then ``start = T - 16``, i.e. the
    window becomes the clip's last 16 columns. ``T < 16`` gives start 0 (the window is then
    padded, see :func:`mel_windows`).
    """
    k = np.asarray(frames, np.int64)
    starts = (16 * k) // 5
    if total_columns is not None:
        starts = np.where(starts + WINDOW > total_columns, max(0, total_columns - WINDOW), starts)
    return starts


def _gather(mel: np.ndarray, col0: int, starts: np.ndarray, total_columns: int | None) -> np.ndarray:
    """Windows ``[B,1,80,16]`` from ``mel`` whose first column has absolute index ``col0``."""
    out = np.full((starts.size, 1, N_MELS, WINDOW), SILENCE, np.float32)
    if starts.size == 0:
        return out
    idx = (starts - col0)[:, None] + np.arange(WINDOW)[None, :]  # [B, 16]
    valid = idx < mel.shape[1]
    if (idx < 0).any() or (total_columns is None and not valid.all()):
        raise RuntimeError("window columns not retained (internal error)")
    if valid.all():
        out[:, 0] = np.moveaxis(mel[:, idx], 0, 1)
    else:  # clip shorter than 16 columns: pad on the right with silence
        w = mel[:, np.minimum(idx, max(0, mel.shape[1] - 1))] if mel.shape[1] else np.zeros((N_MELS,) + idx.shape)
        out[:, 0] = np.where(valid[None], w, SILENCE).transpose(1, 0, 2)
    return out


def mel_windows(mel: np.ndarray, first_frame: int, count: int) -> np.ndarray:
    """Encoder inputs ``[count, 1, 80, 16]`` float32 for video frames ``first_frame ..``.

    Frame ``k`` takes mel columns ``[int(80k/25), int(80k/25) + 16)``. Near the end of the clip,
    where that range runs past the last column ``T - 1``, SyncTalk_2D (``utils.AudDataset.
    crop_audio_window``, taken from Wav2Lip) shifts the window back to the last 16 columns
    (``end = T; start = T - 16``), so no zero/silence padding happens; this does the same.
    Only a clip shorter than 16 columns (< 3000 samples; Wav2Lip would raise there) is padded,
    on the right, with the silence value -4. Frames past the end of the clip are allowed and get
    the last window.
    """
    mel = np.asarray(mel)
    if mel.ndim != 2 or mel.shape[0] != N_MELS:
        raise ValueError(f"mel must be [80, T], got shape {mel.shape}")
    if first_frame < 0 or count < 0:
        raise ValueError(f"first_frame and count must be >= 0, got {first_frame}, {count}")
    if count and mel.shape[1] == 0:
        raise ValueError("no mel columns: an empty clip has no frames")
    t = mel.shape[1]
    starts = window_starts(np.arange(first_frame, first_frame + count), t)
    return _gather(mel.astype(np.float32, copy=False), 0, starts, t)


# --------------------------------------------------------------------------------------------
# Network audio input from encoder vectors
# --------------------------------------------------------------------------------------------


def frame_audio_features(encoded: np.ndarray, i: int | np.ndarray,
                         out_shape: tuple[int, ...] = (32, 16, 16)) -> np.ndarray:
    """Frame ``i``'s network audio input from the encoder outputs ``encoded [N, D]`` (D = 512).

    The vectors of frames ``i-8 .. i+7`` (16 of them, in order; zero vectors for frames outside
    ``0 .. N-1``, as SyncTalk_2D's ``get_audio_features``), concatenated (16 D = 8192 values) and
    reshaped C-order to ``out_shape`` (``[32,16,16]``, the "ave" input). ``i`` an int gives
    ``out_shape``; an array of B indices gives ``[B, *out_shape]``. float32.
    """
    enc = np.asarray(encoded)
    if enc.ndim != 2:
        raise ValueError(f"encoded must be [N, D], got shape {enc.shape}")
    n, d = enc.shape
    lo, hi = FEATURE_CONTEXT
    if int(np.prod(out_shape)) != (lo + hi) * d:
        raise ValueError(f"out_shape {out_shape} does not hold {lo + hi} x {d} values")
    scalar = np.ndim(i) == 0
    idx = np.atleast_1d(np.asarray(i, np.int64))
    if idx.ndim != 1:
        raise ValueError("i must be an int or a 1-D array of frame indices")
    j = idx[:, None] + np.arange(-lo, hi)[None, :]  # [B, 16]
    valid = (j >= 0) & (j < n)
    out = np.zeros(j.shape + (d,), np.float32)
    if n:
        out[valid] = enc[j[valid]]
    out = out.reshape((idx.size,) + tuple(out_shape))
    return out[0] if scalar else out


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------


class StreamingMel:
    """Incremental :func:`melspectrogram` / :func:`mel_windows` for a live stream.

    Feed PCM with :meth:`push` in chunks of any size; :meth:`frames_ready` says how many video
    frames (from frame 0, absolute numbering) have final windows; :meth:`windows` returns them;
    :meth:`finish` marks the end of the audio (the right-hand centring padding is added and the
    last frames, up to :func:`frame_count` of the total, become ready with the batch end-of-clip
    rule). The columns are the batch ones whatever the chunking (same float64 arithmetic per
    column; pre-emphasis carries the last sample across chunks).

    Readiness: mel column ``c`` covers original samples ``[200c - 400, 200c + 400)`` and is
    computed once ``n >= 200c + 400`` samples have arrived, so ``C = (n - 400) // 200 + 1``
    columns exist. Frame ``k`` is ready when its last column ``16k//5 + 15 < C``, i.e.
    ``n >= samples_needed(k) = 200 (16k//5) + 3400``. Such a window can never change later: the
    clip will have ``T >= C >= 16k//5 + 16`` columns, so the end-of-clip rule does not touch it.

    Memory: only the pre-emphasised samples from the next column's frame start (< 800 + chunk)
    and the mel columns still needed are kept. :meth:`windows` releases frames before its
    ``first`` argument (call :meth:`release` to drop more); a released frame can no longer be
    requested. Indices stay absolute.
    """

    def __init__(self) -> None:
        self._n = 0  # samples received
        self._prev = 0.0  # last raw sample (pre-emphasis state)
        self._buf = np.zeros(PAD, np.float64)  # pre-emphasised, padded coordinates
        self._buf_start = 0  # padded index of _buf[0]
        self._cols = 0  # columns computed (absolute)
        self._mel = np.zeros((N_MELS, 256), np.float32)
        self._mel_start = 0  # absolute column of _mel[:, 0]
        self._mel_len = 0
        self._released = 0  # frames < _released are gone
        self._total_cols: int | None = None  # set by finish()

    # -- state -------------------------------------------------------------------------------
    @property
    def samples(self) -> int:
        return self._n

    @property
    def finished(self) -> bool:
        return self._total_cols is not None

    @property
    def columns(self) -> int:
        """Mel columns computed so far (absolute count)."""
        return self._cols

    @property
    def retained_columns(self) -> int:
        return self._mel_len

    @property
    def retained_samples(self) -> int:
        return self._buf.size

    def frames_ready(self) -> int:
        if self._total_cols is not None:
            return frame_count(self._n)
        m = self._cols - WINDOW  # largest usable start column
        if m < 0:
            return 0
        # count of k >= 0 with 16k//5 <= m  <=>  k < 5(m+1)/16
        return (5 * (m + 1) + 15) // 16

    # -- input -------------------------------------------------------------------------------
    def push(self, pcm_chunk: np.ndarray) -> None:
        if self._total_cols is not None:
            raise RuntimeError("push() after finish()")
        x = _as_float64(pcm_chunk)
        if x.size == 0:
            return
        y = _preemphasis(x, self._prev)
        self._prev = float(x[-1])
        self._n += x.size
        self._buf = np.concatenate([self._buf, y])
        self._compute((self._n - PAD) // HOP + 1 if self._n >= PAD else 0)

    def finish(self) -> None:
        """End of the audio: pad with 400 zeros, compute the last columns. Idempotent."""
        if self._total_cols is not None:
            return
        total = n_columns(self._n)
        if total:
            need = HOP * (total - 1) + N_FFT - self._buf_start  # samples needed in _buf
            if self._buf.size < need:
                self._buf = np.concatenate([self._buf, np.zeros(need - self._buf.size)])
            self._compute(total)
        self._total_cols = total
        self._buf = np.zeros(0, np.float64)
        self._trim()

    def _compute(self, upto: int) -> None:
        new = upto - self._cols
        if new <= 0:
            return
        off = HOP * self._cols - self._buf_start
        cols = _columns(self._buf[off:off + HOP * (new - 1) + N_FFT], new)
        self._append(cols)
        self._cols = upto
        # keep samples from the next column's frame start on
        drop = HOP * upto - self._buf_start
        self._buf = self._buf[drop:].copy()
        self._buf_start = HOP * upto

    def _append(self, cols: np.ndarray) -> None:
        self._trim()
        n = cols.shape[1]
        if self._mel_len + n > self._mel.shape[1]:
            cap = max(2 * self._mel.shape[1], self._mel_len + n)
            grown = np.zeros((N_MELS, cap), np.float32)
            grown[:, :self._mel_len] = self._mel[:, :self._mel_len]
            self._mel = grown
        self._mel[:, self._mel_len:self._mel_len + n] = cols
        self._mel_len += n

    def _trim(self) -> None:
        """Drop mel columns no frame >= _released can use (keep the last 16 for the end rule)."""
        t = self._total_cols if self._total_cols is not None else self._cols
        keep_from = max(0, min((16 * self._released) // 5, t - WINDOW))
        drop = keep_from - self._mel_start
        if drop <= 0:
            return
        drop = min(drop, self._mel_len)
        self._mel[:, :self._mel_len - drop] = self._mel[:, drop:self._mel_len]
        self._mel_len -= drop
        self._mel_start += drop

    # -- output ------------------------------------------------------------------------------
    def release(self, before_frame: int) -> None:
        """Forget everything only frames ``< before_frame`` need."""
        if before_frame > self._released:
            self._released = before_frame
            self._trim()

    def mel(self) -> tuple[int, np.ndarray]:
        """``(first_column, columns [80, n])``: a copy of the retained mel columns."""
        return self._mel_start, self._mel[:, :self._mel_len].copy()

    def windows(self, first: int, count: int) -> np.ndarray:
        """Windows ``[count, 1, 80, 16]`` of frames ``first .. first+count-1``; all must be ready.

        Releases frames before ``first``. Same values as ``mel_windows(melspectrogram(all), ...)``.
        """
        if first < 0 or count < 0:
            raise ValueError(f"first and count must be >= 0, got {first}, {count}")
        if first < self._released:
            raise ValueError(f"frame {first} was already released (frames < {self._released} are gone)")
        ready = self.frames_ready()
        if first + count > ready:
            raise ValueError(f"frames {first}..{first + count - 1} requested but only {ready} are ready")
        self.release(first)
        starts = window_starts(np.arange(first, first + count), self._total_cols)
        return _gather(self._mel[:, :self._mel_len], self._mel_start, starts, self._total_cols)
