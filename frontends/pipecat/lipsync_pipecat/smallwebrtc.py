"""Pipecat's SmallWebRTC transport made to carry the avatar at its own frame rate.

SmallWebRTC's video track stamps frames 1/30 s apart and paces them at 30 frames/s whatever the
frame rate, so a 25 frames/s avatar's video clock runs at 83 % of real time and drifts from its
audio. :func:`fix_video_clock` stamps each frame with the time it is sent (the service pushes frames
as the engine paces them, 40 ms apart), on the 90 kHz clock, with no pacing of its own.
Written against pipecat-ai 1.14 (``RawVideoTrack.recv``).
"""
from __future__ import annotations

import fractions
import time

import numpy as np
from av import VideoFrame

CLOCK = 90000


def fix_video_clock() -> None:
    """Make every SmallWebRTC video track of this process stamp frames by the wall clock (idempotent)."""
    from pipecat.transports.smallwebrtc.transport import RawVideoTrack
    if getattr(RawVideoTrack.recv, "lse_wallclock", False):
        return

    async def recv(self):                                       # type: ignore[no-untyped-def]
        raw = await self._video_buffer.get()
        rgb = np.frombuffer(raw.image, dtype=np.uint8).reshape((self._height, self._width, 3))
        frame = VideoFrame.from_ndarray(rgb, format="rgb24")
        now = time.monotonic()
        start = getattr(self, "_lse_start", None)
        if start is None:
            start = self._lse_start = now
        frame.pts = int((now - start) * CLOCK)
        frame.time_base = fractions.Fraction(1, CLOCK)
        return frame
    recv.lse_wallclock = True                                   # type: ignore[attr-defined]
    RawVideoTrack.recv = recv


def allow_loopback() -> None:
    """Let aioice offer 127.0.0.1 when the host has no other address (a loopback-only sandbox)."""
    import aioice.ice as ice
    original = ice.get_host_addresses
    if getattr(original, "lse_loopback", False):
        return

    def addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return original(use_ipv4, use_ipv6) or (["127.0.0.1"] if use_ipv4 else [])
    addresses.lse_loopback = True                               # type: ignore[attr-defined]
    ice.get_host_addresses = addresses
