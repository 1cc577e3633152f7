"""fp16 networks: converted once, cached by the source's hash, their error measured against fp32.

``precision = "fp16"`` (``gpu.precision``, or ``[models.NAME] precision``) runs an avatar's
network in half precision. The conversion is onnxconverter-common's
``float16.convert_float_to_float16(keep_io_types=True)``: weights and activations become fp16,
and Cast nodes at the graph's edges keep the inputs and the output float32, so the ring, the
compositors and the protocol see the same tensors as with fp32.

Cache: ``<run_dir>/cache/fp16/<sha256 of the source file>.onnx``. The key is the source's
content, so a retrained network never meets an old conversion, and engines sharing a run_dir
convert once. It is written to a temporary file and renamed, under a file lock (two GPU workers
of one device loading the same avatar convert it once).

Error: the fp16 network against the fp32 one on the avatar's own frames (its crops, cut as the
engine cuts them) with the audio features of speech (the engine's speech signal through the
avatar's audio encoder; speech-like random features when it has none): the maximum and mean
absolute difference of the output, and the share of output values whose 8-bit pixel differs.
It is kept beside the converted file (``<sha256>.json``), one entry per ONNX Runtime provider,
since CPU and CUDA kernels round differently.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from engine.audio.speech import speech_like_features, speech_pcm

log = logging.getLogger("engine.precision")

ERROR_FRAMES = 8                  # avatar frames the error is measured on
_hashes: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path, cache_dir: Path | None = None) -> str:
    """The file's SHA-256, memoised by path, size and modification time: in this process, and with
    ``cache_dir`` also on disk (``<cache_dir>/sha256/``), so a new process need not read a large
    network again to find its cached forms."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    h = _hashes.get(key)
    if h is not None:
        return h
    memo = None
    if cache_dir is not None:
        memo = cache_dir / "sha256" / hashlib.sha1(repr(key).encode()).hexdigest()
        try:
            h = memo.read_text().strip()
        except OSError:
            h = None
        if h is not None and len(h) == 64:
            _hashes[key] = h
            return h
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    h = _hashes[key] = digest.hexdigest()
    if memo is not None:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(h)
            os.replace(tmp, memo)
        except OSError as e:
            log.debug("could not keep the hash of %s: %s", path, e)
    return h


def cache_paths(src: Path, cache_dir: Path) -> tuple[Path, Path]:
    """(converted network, error report) for ``src`` under ``cache_dir``."""
    h = file_sha256(src, cache_dir)
    d = cache_dir / "fp16"
    return d / f"{h}.onnx", d / f"{h}.json"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def convert_fp16(src: Path, dst: Path) -> None:
    """Convert ``src`` to fp16 with float32 inputs and outputs, written atomically to ``dst``."""
    import onnx
    from onnxconverter_common import float16
    model = onnx.load(str(src))
    with warnings.catch_warnings():
        # tiny weights are clamped to fp16's range; the error report measures what that costs
        warnings.simplefilter("ignore", UserWarning)
        half = float16.convert_float_to_float16(model, keep_io_types=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=dst.stem, suffix=".tmp")
    os.close(fd)
    try:
        onnx.save(half, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fp16_model(src: Path, cache_dir: Path) -> Path:
    """The cached fp16 conversion of ``src``, made now if it is not there yet."""
    dst, _ = cache_paths(src, cache_dir)
    if dst.is_file():
        return dst
    with _locked(dst.with_suffix(".lock")):
        if not dst.is_file():                   # another process may have made it while we waited
            t0 = time.perf_counter()
            convert_fp16(src, dst)
            log.info("converted %s to fp16 in %.1f s: %s", src, time.perf_counter() - t0, dst)
    return dst


# -- the error against fp32 -------------------------------------------------------------------------
def sample_inputs(avatar: Path, graph, frames: int = ERROR_FRAMES,
                  encoder: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Network inputs for ``frames`` of the avatar's own frames (spread over the clip) and speech.

    Image: each frame's crop cut as the engine cuts it (``kernels.cut_crop`` / ``fill_visual``).
    Audio: the engine's speech signal through ``encoder`` (mel windows -> encoder -> each frame's
    16-vector context), or speech-like features when there is no encoder or the shapes differ.
    """
    from engine.avatars.disk import avatar_files, read_rects
    from engine.avatars.disk import decode_frame as _decode
    from engine.kernels.image import cut_crop, fill_visual
    files = avatar_files(avatar.parent, avatar.name)
    n = len(files.frames)
    idx = np.unique(np.linspace(0, n - 1, min(frames, n)).round().astype(np.int64))
    first = _decode(files.frames[0])
    rects = read_rects(files.rects, n, first.shape[1], first.shape[0])
    crops = np.stack([cut_crop(_decode(files.frames[i]), tuple(rects[i]), graph.face) for i in idx])
    image = np.empty((len(idx), *graph.image_shape), np.float32)
    fill_visual(crops, image)
    return image, speech_features(len(idx), graph.audio_shape, encoder)


def speech_features(count: int, shape: tuple[int, ...], encoder: Path | None) -> np.ndarray:
    """``count`` frames of network audio input from speech (see :func:`sample_inputs`)."""
    if encoder is None or not encoder.is_file():
        return speech_like_features(count, 0, shape)

    from engine.audio.mel import frame_audio_features, mel_windows, melspectrogram
    pcm = speech_pcm(max(1.0, (count + 8) / 25), seed=11)
    total = int(len(pcm) // 640)
    windows = mel_windows(melspectrogram(pcm), 0, total)
    sess = _session(encoder, ["CPUExecutionProvider"])
    enc = sess.run(None, {sess.get_inputs()[0].name: windows})[0]
    frames = np.linspace(8, total - 9, count).round().astype(np.int64)
    try:
        return frame_audio_features(enc, frames, shape)
    except ValueError:                           # an encoder whose vectors do not make this input
        return speech_like_features(count, 0, shape)


def _session(path: Path, providers: list) -> Any:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=providers)


def measure_error(src: Path, half: Path, image: np.ndarray, audio: np.ndarray, providers: list,
                  graph: Any = None) -> dict[str, Any]:
    """Run both networks on the same inputs; the output's absolute differences."""
    from engine.avatars.disk import read_graph
    g = graph or read_graph(src)
    step, n = g.fixed_batch or 1, len(image)
    pad = -n % step                              # a graph exported with a fixed batch runs in whole pieces
    feeds = {g.image_input: np.concatenate([image, np.zeros((pad, *image.shape[1:]), np.float32)]),
             g.audio_input: np.concatenate([audio, np.zeros((pad, *audio.shape[1:]), np.float32)])}
    outs = []
    for path in (src, half):
        sess = _session(path, providers)
        outs.append(np.concatenate([sess.run([g.output], {k: v[i:i + step] for k, v in feeds.items()})[0]
                                    for i in range(0, n + pad, step)])[:n])
        provider = sess.get_providers()[0]
        del sess
    full, low = outs
    diff = np.abs(full.astype(np.float64) - low.astype(np.float64))
    to8 = lambda x: np.clip(np.rint(x * 255.0), 0, 255)  # noqa: E731 - the compositor's conversion
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "pixels_changed": float(np.mean(to8(full) != to8(low))),
            "frames": int(len(image)), "provider": provider,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def error_report(src: Path, cache_dir: Path, avatar: Path, encoder: Path | None, providers: list,
                 provider: str, force: bool = False, graph: Any = None) -> dict[str, Any]:
    """The fp16 conversion's error for ``provider`` (measured once, then read from the cache).
    ``graph``: the network's GraphInfo when the caller has it (read from the file otherwise)."""
    half = fp16_model(src, cache_dir)
    _, report_path = cache_paths(src, cache_dir)
    with _locked(report_path.with_suffix(".lock")):
        report = _read_json(report_path)
        if force or provider not in report:
            from engine.avatars.disk import read_graph
            g = graph or read_graph(src)
            image, audio = sample_inputs(avatar, g, encoder=encoder)
            report[provider] = measure_error(src, half, image, audio, providers, g)
            report["source"] = str(src)
            report["source_sha256"] = file_sha256(src)
            tmp = report_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(report, indent=1))
            os.replace(tmp, report_path)
    return {"file": str(half), **report[provider]}


def cached_report(src: Path, cache_dir: Path, provider: str) -> dict[str, Any] | None:
    try:
        _, report_path = cache_paths(src, cache_dir)
    except OSError:
        return None
    return _read_json(report_path).get(provider)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
