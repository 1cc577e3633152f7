"""A voice-agent bot with no API keys: the browser's microphone, echoed back through the avatar.

    .venv-pipecat/bin/python frontends/pipecat/examples/echo_bot.py --engine tcp://127.0.0.1:5555 --port 7860
    # open http://127.0.0.1:7860/ , press "speak (microphone)" ("demo speech" needs --speech FILE.wav)

Pipecat's SmallWebRTC transport carries it: the microphone comes in as the transport's input audio,
stands in for a TTS's speech, goes through LipsyncVideoService, and the avatar's video and the same
voice, in step, go back out. A real agent puts speech-to-text, an LLM and a TTS where MicAsSpeech is.
The page is the web gateway's WebRTC page (frontends/web/static), which speaks the same
``POST /api/offer`` exchange. H.264 is encoded by x264 at its ultrafast preset
(frontends/web/webrtc_codecs.py) when the browser offers it first (the page's codec choice).
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from aiohttp import web
from pipecat.frames.frames import Frame, InputAudioRawFrame, TTSAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner

from lipsync_pipecat import LipsyncVideoService
from lipsync_pipecat.smallwebrtc import allow_loopback, fix_av_sync

REPO = Path(__file__).resolve().parents[3]
STATIC = REPO / "frontends" / "web" / "static"


class MicAsSpeech(FrameProcessor):
    """The user's audio as if a TTS had said it."""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            await self.push_frame(TTSAudioRawFrame(audio=frame.audio, sample_rate=frame.sample_rate,
                                                   num_channels=frame.num_channels))
        else:
            await self.push_frame(frame, direction)


async def run_bot(conn: SmallWebRTCConnection, args: argparse.Namespace) -> None:
    transport = SmallWebRTCTransport(conn, TransportParams(
        audio_in_enabled=True, audio_out_enabled=True, audio_out_sample_rate=16000,
        video_out_enabled=True, video_out_is_live=True, video_out_width=args.width, video_out_height=args.height,
        video_out_framerate=25))
    worker = PipelineWorker(Pipeline([transport.input(), MicAsSpeech(),
                                      LipsyncVideoService(avatar=args.avatar, endpoint=args.engine,
                                                          image_format="I420"),          # for SmallWebRTC
                                      transport.output()]), enable_rtvi=False, idle_timeout_secs=None)

    @transport.event_handler("on_client_disconnected")
    async def on_disconnected(_t, _c):
        await worker.cancel()
    await WorkerRunner(handle_sigint=False).run(worker)


def make_app(args: argparse.Namespace) -> web.Application:
    app = web.Application()
    bots: dict[asyncio.Task, SmallWebRTCConnection] = {}

    async def offer(request: web.Request) -> web.Response:
        body = await request.json()
        conn = SmallWebRTCConnection()
        await conn.initialize(sdp=body["sdp"], type=body["type"])
        task = asyncio.create_task(run_bot(conn, args))
        bots[task] = conn
        task.add_done_callback(lambda t: bots.pop(t, None))
        return web.json_response(conn.get_answer())

    async def stop_bots(_app: web.Application) -> None:
        """On SIGTERM/Ctrl-C: hang up every peer (its pipeline ends), then cancel what is left."""
        async def hang_up(conn: SmallWebRTCConnection) -> None:
            try:
                await asyncio.wait_for(conn.disconnect(), 3)
            except Exception:                          # noqa: BLE001 (going away either way)
                pass
        await asyncio.gather(*(hang_up(c) for c in list(bots.values())))
        if bots:
            await asyncio.wait(list(bots), timeout=3)
        for task in list(bots):
            task.cancel()
    app.on_shutdown.append(stop_bots)

    async def avatars(_r: web.Request) -> web.Response:
        return web.json_response({"engine": args.engine, "avatars": [{"name": args.avatar}]})

    async def speech(_r: web.Request) -> web.StreamResponse:
        return web.FileResponse(args.speech) if args.speech else web.HTTPNotFound()

    app.router.add_get("/", lambda _r: web.FileResponse(STATIC / "webrtc.html"))
    app.router.add_get("/static/speech.wav", speech)
    app.router.add_static("/static", STATIC)
    app.router.add_get("/api/avatars", avatars)
    app.router.add_post("/api/offer", offer)
    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", default="tcp://127.0.0.1:5555")
    ap.add_argument("--avatar", default="demo")
    ap.add_argument("--width", type=int, default=1280, help="the avatar's frame width (the demo's: 1280)")
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--speech", type=Path, default=None, help="a WAV the page's 'demo speech' button plays")
    args = ap.parse_args(argv)
    allow_loopback()
    fix_av_sync()
    sys.path.insert(0, str(REPO))
    from frontends.web import webrtc_codecs             # x264 at ultrafast for H.264 (needs only aiortc, av)
    webrtc_codecs.install()
    print(f"echo bot: http://{args.host}:{args.port}/ (engine {args.engine}, avatar {args.avatar})", flush=True)
    web.run_app(make_app(args), host=args.host, port=args.port, print=None, shutdown_timeout=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
