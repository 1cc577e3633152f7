"""An avatar's spliced form (engine/avatars/spliced.py): built from the frames, saved beside them,
reloaded by a file read, rebuilt when its sources change, and equal to the decoded form where it matters."""
from __future__ import annotations

import json
import logging
import os

import cv2
import numpy as np
import pytest

from engine.avatars import disk as avatar_mod
from engine.avatars.attached import attach_view
from engine.avatars.disk import avatar_files
from engine.avatars.frames import AvatarView
from engine.avatars.spliced import PREPARED_DIR, SplicedAvatarView, estimate_bytes, prepared_path, prepared_size
from engine.kernels.image import FrameCompositor
from engine.kernels.splice import FrameCodec, Settings, SpliceCompositor
from engine.runtime.shm import list_segments

from .test_avatar import copy_avatar

PREFIX = f"tavs{os.getpid()}"      # per process: the xdist workers run this module side by side


@pytest.fixture(autouse=True)
def no_leaks():
    yield
    assert list_segments(f"{PREFIX}_") == []


@pytest.fixture
def avatar(tmp_path, models_root):
    copy_avatar(models_root, tmp_path, "a", n=6)
    return avatar_files(tmp_path, "a")


def segment_bytes(view) -> bytes:
    return bytes(view.segment.buf[:view.nbytes])


def test_spliced_form_is_small_and_splices_like_the_decoded_frames(avatar):
    settings = Settings()
    view = SplicedAvatarView.create(f"{PREFIX}_s", avatar, 320, settings)
    decoded = AvatarView.create(f"{PREFIX}_d", avatar, 320)
    try:
        assert (view.n, view.height, view.width, view.face) == (6, 720, 1280, 320)
        assert np.array_equal(view.rects, decoded.rects)
        per_frame = view.nbytes / view.n
        assert per_frame <= 250_000 < 3_000_000 < decoded.nbytes / decoded.n       # target: <= 0.25 MB per frame
        mem = view.memory()
        assert mem["total"] == view.nbytes and mem["jpeg"] + mem["regions"] + mem["borders"] < view.nbytes
        codec = FrameCodec(720, 1280, settings)
        sc, fc = SpliceCompositor(codec), FrameCompositor()
        face = np.random.default_rng(0).random((3, 320, 320), np.float32)
        for k in range(6):
            # the network input cut from the region = the crop of the whole frame
            assert np.array_equal(view.crop(k), decoded.crops[k])
            # the idle frame is the background's JPEG; a pasted frame, the full-frame encode of the composite
            assert codec.header.tobytes() + view.scan(k).tobytes() + b"\xff\xd9" == codec.encode_full(decoded.frames[k])
            for mode in ("synctalk", "stretch"):
                composited = fc.composite(decoded.frames[k], face, tuple(decoded.rects[k]), decoded.crops[k], mode)
                assert sc(view.parts(k), face, mode) == codec.encode_full(composited)
        crops, idx = view.crops_for(np.array([5, 1, 5, 5]))
        assert idx.tolist() == [1, 0, 1, 1] and np.array_equal(crops[1], decoded.crops[5])
        other = attach_view(f"{PREFIX}_s")                  # what a compositor or GPU worker maps
        assert isinstance(other, SplicedAvatarView) and np.array_equal(other.region(3), view.region(3))
        other.close()
        assert isinstance(d2 := attach_view(f"{PREFIX}_d"), AvatarView)
        d2.close()
    finally:
        view.close()
        decoded.close()


def test_prepared_file_reloads_without_decoding(avatar, monkeypatch):
    settings = Settings()
    path = prepared_path(avatar, settings, 320)
    assert not path.exists() and prepared_size(avatar, settings, 320) == 0
    first = SplicedAvatarView.create(f"{PREFIX}_1", avatar, 320, settings)
    try:
        built = segment_bytes(first)
    finally:
        first.close()
    assert path.parent.name == PREPARED_DIR and path.stat().st_size == len(built)
    assert prepared_size(avatar, settings, 320) == len(built)

    def no_decoding(p):
        raise AssertionError(f"decoded {p}")
    monkeypatch.setattr("engine.avatars.spliced.decode_frame", no_decoding)
    seen = []
    again = SplicedAvatarView.create(f"{PREFIX}_2", avatar, 320, settings, progress=lambda d, n: seen.append((d, n)))
    try:
        assert segment_bytes(again) == built and seen == [(6, 6)]
    finally:
        again.close()


def test_prepared_file_is_rebuilt_when_a_frame_or_a_setting_changes(avatar, caplog):
    settings = Settings()
    v = SplicedAvatarView.create(f"{PREFIX}_1", avatar, 320, settings)
    region0 = v.region(2).copy()
    q75_bytes = v.meta["scan_bytes"]
    v.close()
    # a frame is replaced: its new pixels are served, not the stale file's
    frame = avatar.frames[2]
    img = cv2.imread(str(frame))
    img[...] = 255 - img
    cv2.imwrite(str(frame), img)
    os.utime(frame, ns=(1, 1))                       # even with an old time stamp: size and time differ
    with caplog.at_level(logging.INFO, logger="engine.avatar_splice"):
        v = SplicedAvatarView.create(f"{PREFIX}_2", avatar, 320, settings)
    try:
        assert "stale" in caplog.text
        assert np.array_equal(v.region(2), 255 - region0)
    finally:
        v.close()
    # another quality is another file; the first stays valid
    q90 = Settings(quality=90)
    assert prepared_path(avatar, q90, 320) != prepared_path(avatar, settings, 320)
    v = SplicedAvatarView.create(f"{PREFIX}_3", avatar, 320, q90)
    try:
        assert v.settings == q90 and prepared_size(avatar, settings, 320) > 0
        assert v.meta["scan_bytes"] > 1.2 * q75_bytes
    finally:
        v.close()
    # crop_rects.json changes: rebuilt with the new regions
    rects = json.loads(avatar.rects.read_text())
    rects[0] = [10, 10, 190, 190]
    avatar.rects.write_text(json.dumps(rects))
    assert prepared_size(avatar, settings, 320) == 0
    v = SplicedAvatarView.create(f"{PREFIX}_4", avatar, 320, settings)
    try:
        assert v.rects[0].tolist() == [10, 10, 190, 190] and v.boxes[0].tolist() == [0, 0, 192, 192]
    finally:
        v.close()


def test_damaged_prepared_file_is_rebuilt(avatar, caplog):
    settings = Settings()
    v = SplicedAvatarView.create(f"{PREFIX}_1", avatar, 320, settings)
    good = segment_bytes(v)
    v.close()
    path = prepared_path(avatar, settings, 320)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="engine.avatar_splice"):
        v = SplicedAvatarView.create(f"{PREFIX}_2", avatar, 320, settings)
    try:
        assert "damaged" in caplog.text and segment_bytes(v) == good
        assert path.read_bytes() == good                      # and saved again
    finally:
        v.close()
    path.write_bytes(b"{not json")
    v = SplicedAvatarView.create(f"{PREFIX}_3", avatar, 320, settings)
    try:
        assert segment_bytes(v) == good
    finally:
        v.close()


def test_read_only_avatar_folder_is_served_without_a_prepared_file(avatar, caplog):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    os.chmod(avatar.folder, 0o555)
    try:
        with caplog.at_level(logging.WARNING, logger="engine.avatar_splice"):
            v = SplicedAvatarView.create(f"{PREFIX}_1", avatar, 320, Settings())
        v.close()
        assert "could not save" in caplog.text
        assert not (avatar.folder / PREPARED_DIR).exists()
    finally:
        os.chmod(avatar.folder, 0o755)


def test_unwritable_prepared_path_is_not_an_error(avatar, caplog):
    (avatar.folder / PREPARED_DIR).write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING, logger="engine.avatar_splice"):
        v = SplicedAvatarView.create(f"{PREFIX}_1", avatar, 320, Settings())
    try:
        assert "could not save" in caplog.text and v.n == 6
    finally:
        v.close()


@pytest.mark.parametrize("shape, subsampling", [((562, 1000), "420"), ((1280, 720), "411"), ((1080, 1920), "444")])
def test_any_frame_size_and_subsampling(tmp_path, shape, subsampling):
    """Sizes that are not multiples of the MCU, rectangles on the frame's edges, every subsampling."""
    h, w = shape
    d = tmp_path / "odd"
    (d / "frames").mkdir(parents=True)
    (d / "checkpoint").mkdir()
    (d / "checkpoint" / "model_best.onnx").write_bytes(b"")
    rng = np.random.default_rng(h)
    rects = [[w - 183, h - 183, w, h], [0, 0, 183, 183], [w - 190, 3, w - 7, 186]]
    for k in range(3):
        img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 3)
        cv2.imwrite(str(d / "frames" / f"frame_{k:04d}.png"), img)
    (d / "crop_rects.json").write_text(json.dumps(rects))
    files = avatar_mod.avatar_files(tmp_path, "odd")
    settings = Settings(80, subsampling)
    view = SplicedAvatarView.create(f"{PREFIX}_o", files, 64, settings)
    try:
        assert view.nbytes <= estimate_bytes(3, h, w, 64, np.array(rects), subsampling, 24.0)
        codec = FrameCodec(h, w, settings)
        sc = SpliceCompositor(codec)
        face = np.random.default_rng(1).random((3, 64, 64), np.float32)
        for k in range(3):
            frame = cv2.imread(str(files.frames[k]))
            composited = FrameCompositor().composite(frame, face, rects[k], view.crop(k), "synctalk")
            assert sc(view.parts(k), face) == codec.encode_full(composited)
    finally:
        view.close()


def test_estimate_is_exact_for_the_regions():
    rects = np.array([[549, 300, 732, 483]] * 4)
    est = estimate_bytes(4, 720, 1280, 320, rects, "420", 0.0)
    region = (736 - 544) * (496 - 288) * 3
    assert 4 * region < est < 4 * (region + 16_000) + 20_000
