"""lipsync-engine as a Pipecat video service: :class:`LipsyncVideoService` (put it after the TTS)."""
from lipsync_pipecat.engine_client import EngineClient, EngineError
from lipsync_pipecat.service import LipsyncVideoService

__all__ = ["EngineClient", "EngineError", "LipsyncVideoService"]
