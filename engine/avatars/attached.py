"""A worker's or compositor's view of the avatar segments: attached on first use, in either layout
(:mod:`engine.avatars.frames`, :mod:`engine.avatars.spliced`), dropped when the front says so."""
from __future__ import annotations

import json
from typing import Any

from engine.avatars.frames import HEADER_BYTES, AvatarView
from engine.avatars.spliced import SplicedAvatarView
from engine.runtime.shm import Segment


def attach_view(segment_name: str) -> Any:
    """Attach an avatar segment of either layout (its JSON header says which)."""
    seg = Segment(segment_name)
    try:
        meta = json.loads(bytes(seg.buf[:HEADER_BYTES]).rstrip(b"\0"))
        if meta.get("layout") == "splice":
            return SplicedAvatarView(seg)
        return AvatarView(seg)
    except BaseException:
        seg.close()
        raise


class AttachedAvatars:
    """The avatar segments a worker process has mapped: attached on first use, dropped on request
    (the front evicted or unloaded that avatar)."""

    def __init__(self) -> None:
        self.views: dict[str, Any] = {}

    def get(self, segment: str) -> Any:
        """The segment's view: :class:`AvatarView` or :class:`SplicedAvatarView`."""
        view = self.views.get(segment)
        if view is None:
            view = self.views[segment] = attach_view(segment)
        return view

    def drop(self, segment: str) -> None:
        view = self.views.pop(segment, None)
        if view is not None:
            view.close()

    def close(self) -> None:
        for segment in list(self.views):
            self.drop(segment)
