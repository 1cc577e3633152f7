"""Mux the engine's JPEG frames and the speech PCM into an MP4 file (PyAV), and probe MP4 files.

Video: each JPEG is decoded to RGB (simplejpeg) and encoded with PyAV's libx264 (H.264, yuv420p,
CRF 23, preset ``veryfast``); frame ``k`` has pts ``k`` in time base ``1/fps``, i.e. it shows at
``k / fps`` seconds. Audio: the PCM (mono) is encoded with the wheel's native AAC encoder (``aac``;
libopus or libmp3lame if a build lacks it), pts in samples from 0 in time base ``1/sample_rate``.
Audio is fed in step with the video (the samples up to the end of frame ``k`` after frame ``k``),
so memory stays bounded and the muxer interleaves the two streams as it goes. FFmpeg's MP4
muxer writes the AAC encoder's priming delay as an edit list, so players start both streams at 0.

The file is written to a temporary name in the same folder and renamed when complete.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import simplejpeg

__all__ = ["write_mp4", "probe_mp4", "read_mp4_frames", "VIDEO_CODECS", "AUDIO_CODECS"]

VIDEO_CODECS = ("libx264", "h264")  # the first one the PyAV build can encode with is used
AUDIO_CODECS = ("aac", "libopus", "libmp3lame")
CRF = 23
PRESET = "veryfast"


def _encoder(candidates: Iterable[str]) -> str:
    for name in candidates:
        if name in av.codecs_available:
            try:
                av.codec.Codec(name, "w")
            except Exception:  # listed but no encoder of that name
                continue
            return name
    raise RuntimeError(f"PyAV has none of the encoders {tuple(candidates)}")


def _as_float_pcm(pcm: np.ndarray | None) -> np.ndarray:
    if pcm is None:
        return np.zeros(0, np.float32)
    a = np.asarray(pcm)
    if a.ndim != 1:
        raise ValueError(f"pcm must be 1-D mono, got shape {a.shape}")
    if a.dtype == np.int16:
        return a.astype(np.float32) / 32768.0
    if a.dtype.kind != "f":
        raise ValueError(f"pcm must be float in [-1, 1] or int16, got dtype {a.dtype}")
    return np.clip(a.astype(np.float32), -1.0, 1.0)


def write_mp4(path: Path, jpeg_frames: Iterable[bytes], pcm: np.ndarray | None, sample_rate: int = 16000,
              fps: int = 25) -> dict:
    """Write ``path``: H.264 video from ``jpeg_frames`` at ``fps``, audio from mono ``pcm``.

    ``pcm``: float in [-1, 1] or int16, 1-D; ``None`` or empty writes a video-only file. Frames
    of another size than the first are scaled to it; odd sizes are cut to even (yuv420p).
    Returns ``{"frames", "duration_s", "video_codec", "audio_codec", "bytes"}`` where
    ``duration_s = max(frames / fps, samples / sample_rate)`` and ``audio_codec`` is ``None``
    without audio. Raises ``ValueError`` when there are no frames.
    """
    path = Path(path)
    audio = _as_float_pcm(pcm)
    if fps <= 0 or sample_rate <= 0:
        raise ValueError(f"fps and sample_rate must be positive, got {fps}, {sample_rate}")
    frames_iter = iter(jpeg_frames)
    try:
        first = next(frames_iter)
    except StopIteration:
        raise ValueError("no frames") from None
    rgb = simplejpeg.decode_jpeg(first, colorspace="RGB")
    height, width = rgb.shape[0] & ~1, rgb.shape[1] & ~1
    if width == 0 or height == 0:
        raise ValueError(f"frame too small for yuv420p: {rgb.shape[1]}x{rgb.shape[0]}")

    vcodec = _encoder(VIDEO_CODECS)
    acodec = _encoder(AUDIO_CODECS) if audio.size else None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix or '.mp4'}")
    n = 0
    try:
        with av.open(str(tmp), "w", format="mp4") as out:
            vs = out.add_stream(vcodec, rate=fps)
            vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
            vs.codec_context.time_base = Fraction(1, fps)
            vs.options = {"crf": str(CRF), "preset": PRESET}
            as_ = None
            if acodec:
                as_ = out.add_stream(acodec, rate=sample_rate, layout="mono")
                as_.codec_context.time_base = Fraction(1, sample_rate)
            sent = 0  # audio samples encoded so far

            def send_audio(upto: int) -> None:
                nonlocal sent
                upto = min(upto, audio.size)
                step = 4096
                while sent < upto:
                    chunk = audio[sent:min(upto, sent + step)]
                    af = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk[None, :]), format="flt", layout="mono")
                    af.sample_rate = sample_rate
                    af.pts = sent
                    af.time_base = Fraction(1, sample_rate)
                    out.mux(as_.encode(af))
                    sent += chunk.size

            def frames() -> Iterator[np.ndarray]:
                yield rgb
                for jpg in frames_iter:
                    yield simplejpeg.decode_jpeg(jpg, colorspace="RGB")

            for img in frames():
                if (img.shape[0] & ~1, img.shape[1] & ~1) == (height, width):
                    img = img[:height, :width]  # an odd size: drop the last row / column
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                if (vf.width, vf.height) != (width, height):
                    vf = vf.reformat(width=width, height=height)
                vf.pts = n
                vf.time_base = Fraction(1, fps)
                out.mux(vs.encode(vf))
                n += 1
                if as_ is not None:
                    send_audio((n * sample_rate) // fps)
            if as_ is not None:
                send_audio(audio.size)
                out.mux(as_.encode(None))
            out.mux(vs.encode(None))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "frames": n,
        "duration_s": max(n / fps, audio.size / sample_rate),
        "video_codec": vcodec,
        "audio_codec": acodec,
        "bytes": path.stat().st_size,
    }


def probe_mp4(path: Path) -> dict:
    """What an MP4 holds, read with PyAV (packets are demuxed, not decoded).

    ``{"duration_s", "bytes", "streams": [...], "video_frames", "audio_codec", "video_codec"}``;
    each stream: ``type``, ``codec``, ``packets``, ``start_s`` / ``end_s`` (first packet's start,
    last packet's end, seconds), ``duration_s`` (their difference), and ``width``/``height``/
    ``fps``/``pix_fmt`` (video) or ``sample_rate``/``channels`` (audio). An AAC stream starts at
    -0.064 s: the encoder's 1024 priming samples, which the edit list hides (decoded audio starts
    at 0), so its ``end_s`` is the audible length. ``video_frames`` counts the first video
    stream's packets (one per frame for H.264 in MP4).
    """
    path = Path(path)
    with av.open(str(path)) as c:
        streams = []
        for s in c.streams:
            d = {"index": s.index, "type": s.type, "codec": s.codec_context.name, "packets": 0,
                 "start_s": None, "end_s": None, "duration_s": 0.0}
            if s.type == "video":
                d.update(width=s.codec_context.width, height=s.codec_context.height,
                         fps=float(s.average_rate) if s.average_rate else None,
                         pix_fmt=s.codec_context.pix_fmt)
            elif s.type == "audio":
                d.update(sample_rate=s.codec_context.sample_rate, channels=s.codec_context.channels)
            streams.append(d)
        spans: dict[int, list[float]] = {}
        for pkt in c.demux():
            if pkt.size == 0 or pkt.pts is None:
                continue
            d = streams[pkt.stream.index]
            d["packets"] += 1
            tb = pkt.time_base
            t0 = float(pkt.pts * tb)
            t1 = float((pkt.pts + (pkt.duration or 0)) * tb)
            lo, hi = spans.get(pkt.stream.index, [t0, t1])
            spans[pkt.stream.index] = [min(lo, t0), max(hi, t1)]
        for i, (lo, hi) in spans.items():
            streams[i]["start_s"] = lo
            streams[i]["end_s"] = hi
            streams[i]["duration_s"] = hi - lo
        duration = c.duration / av.time_base if c.duration is not None else None
    video = [s for s in streams if s["type"] == "video"]
    audio = [s for s in streams if s["type"] == "audio"]
    return {
        "duration_s": duration,
        "bytes": path.stat().st_size,
        "streams": streams,
        "video_frames": video[0]["packets"] if video else 0,
        "video_codec": video[0]["codec"] if video else None,
        "audio_codec": audio[0]["codec"] if audio else None,
    }


def read_mp4_frames(path: Path, indices: Iterable[int] | None = None) -> dict[int, np.ndarray]:
    """Decode the first video stream; ``{frame index: RGB uint8 [H, W, 3]}`` for ``indices`` (all if None)."""
    wanted = None if indices is None else set(indices)
    got: dict[int, np.ndarray] = {}
    with av.open(str(path)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if wanted is None or i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if wanted is not None and len(got) == len(wanted):
                break
    return got
