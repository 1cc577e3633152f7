"""Render an avatar speaking a WAV file to an MP4 (H.264 + the audio), through the engine like any client.

    engine-ctl render --model demo --wav speech.wav --out out/demo.mp4
    python -m engine.cli.render --model demo --wav speech.wav --out out/demo.mp4 [--engine tcp://127.0.0.1:5555]

The WAV (any rate, mono or stereo, 8/16/24/32-bit PCM) is resampled to 16 kHz mono, pushed into an
engine stream in 200 ms chunks as fast as the engine takes them (``realtime=false``: no pacing),
and the frames come back in order; frame k covers audio [40k, 40k+40) ms, so the video and the
audio line up by construction.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from engine.audio.speech import SAMPLE_RATE, read_wav, resample
from engine.cli.mp4 import write_mp4
from engine.client import Client
from engine.runtime.keys import ClientKeys

CHUNK = SAMPLE_RATE // 5


def render(endpoint: str, model: str, wav: Path, out: Path, timeout: float = 120.0,
           keys: ClientKeys | None = None) -> dict[str, Any]:
    pcm, rate = read_wav(wav)
    if rate != SAMPLE_RATE:
        pcm = resample(pcm, rate, SAMPLE_RATE)
    t0 = time.perf_counter()
    frames: list[bytes] = []
    with Client(endpoint, timeout=timeout, keys=keys) as c:
        stream = c.open_stream(model, realtime=False)
        for off in range(0, len(pcm), CHUNK):
            stream.push(pcm[off:off + CHUNK])
            frames.extend(f.jpeg for f in stream.poll(0.0))
        stream.end()
        frames.extend(f.jpeg for f in stream.frames(timeout))
    engine_s = time.perf_counter() - t0
    info = write_mp4(out, frames, pcm, SAMPLE_RATE, 25)
    info.update(audio_s=round(len(pcm) / SAMPLE_RATE, 3), engine_s=round(engine_s, 3),
                engine_fps=round(len(frames) / engine_s, 1), path=str(out))
    return info


def summary_line(info: dict[str, Any]) -> str:
    return (f"{info['path']}: {info['frames']} frames, {info['duration_s']} s, {info['video_codec']} + "
            f"{info['audio_codec']}, {info['bytes'] / 1e6:.1f} MB (engine {info['engine_fps']} frames/s)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="tcp://127.0.0.1:5555")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--wav", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--server-key", type=Path, help="the engine's public certificate (an engine with CURVE)")
    ap.add_argument("--client-key", type=Path, help="this client's secret certificate, NAME.key_secret")
    args = ap.parse_args(argv)
    keys = None
    if args.server_key or args.client_key:
        if not (args.server_key and args.client_key):
            ap.error("--server-key and --client-key go together")
        keys = ClientKeys.from_files(args.server_key, args.client_key)
    info = render(args.engine, args.model, args.wav, args.out, keys=keys)
    print(summary_line(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
