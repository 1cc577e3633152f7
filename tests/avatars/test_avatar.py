"""Avatar folders (the seed's layout, PNG or JPEG, either frame naming) and the shared-memory store."""
from __future__ import annotations

import json
import os
import shutil

import cv2
import numpy as np
import pytest

from engine.avatars.disk import AvatarError, UnknownAvatar, avatar_files, discover, read_graph
from engine.avatars.frames import AvatarView
from engine.avatars.store import AvatarStore
from engine.kernels.image import cut_crop
from engine.runtime.config import config_from_dict
from engine.runtime.shm import list_segments

PREFIX = f"tav{os.getpid()}"      # per process: the xdist workers run this module side by side


@pytest.fixture(autouse=True)
def no_leaks():
    yield
    assert list_segments(f"{PREFIX}_") == []


def copy_avatar(models_root, dst_root, name, jpeg=False, plain_names=False, n=6):
    src = models_root / "demo"
    d = dst_root / name
    (d / "frames").mkdir(parents=True)
    (d / "checkpoint").mkdir()
    shutil.copy(src / "checkpoint" / "model_best.onnx", d / "checkpoint" / "model_best.onnx")
    rects = json.loads((src / "crop_rects.json").read_text())[:n]
    (d / "crop_rects.json").write_text(json.dumps(rects))
    for k in range(n):
        img = cv2.imread(str(src / "frames" / f"frame_{k:04d}.png"))
        stem = f"frame_{k}" if plain_names else f"frame_{k:04d}"
        cv2.imwrite(str(d / "frames" / (stem + (".jpg" if jpeg else ".png"))), img)
    return d


def test_graph_names_and_shapes_come_from_the_onnx_file(models_root):
    g = read_graph(models_root / "demo" / "checkpoint" / "model_best.onnx")
    assert (g.image_input, g.audio_input, g.output) == ("input", "audio", "output")
    assert g.image_shape == (6, 320, 320) and g.audio_shape == (32, 16, 16) and g.output_shape == (3, 320, 320)
    assert g.fixed_batch is None and g.face == 320


@pytest.mark.parametrize("jpeg, plain", [(False, False), (True, True)])
def test_seed_layout_loads_png_or_jpeg(tmp_path, models_root, jpeg, plain):
    copy_avatar(models_root, tmp_path, "a", jpeg=jpeg, plain_names=plain, n=11)
    files = avatar_files(tmp_path, "a")
    assert [p.name for p in files.frames][:3] == ([f"frame_{k}.jpg" for k in range(3)] if plain
                                                   else [f"frame_{k:04d}.png" for k in range(3)])
    assert [int(p.stem.split("_")[1]) for p in files.frames] == list(range(11))   # numeric, not text order
    view = AvatarView.create(f"{PREFIX}_x", files, 320)
    try:
        assert view.frames.shape == (11, 720, 1280, 3) and view.crops.shape == (11, 328, 328, 3)
        img = cv2.imread(str(files.frames[7]))
        assert np.array_equal(view.frames[7], img)
        assert np.array_equal(view.crops[7], cut_crop(img, tuple(view.rects[7]), 320))
        other = AvatarView.attach(f"{PREFIX}_x")
        assert np.array_equal(other.frames[3], view.frames[3])
        other.close()
    finally:
        view.close()
    assert discover(tmp_path) == ["a"]


def test_broken_avatars_are_named(tmp_path, models_root):
    with pytest.raises(UnknownAvatar, match="nobody"):
        avatar_files(tmp_path, "nobody")
    with pytest.raises(UnknownAvatar):
        avatar_files(tmp_path, "../etc")
    d = copy_avatar(models_root, tmp_path, "b")
    (d / "crop_rects.json").write_text(json.dumps([[0, 0, 5000, 10]] * 6))
    with pytest.raises(AvatarError, match="outside"):
        AvatarView.create(f"{PREFIX}_b", avatar_files(tmp_path, "b"), 320)
    (d / "crop_rects.json").write_text("[[1, 2, 3]")
    with pytest.raises(AvatarError, match="JSON"):
        AvatarView.create(f"{PREFIX}_b", avatar_files(tmp_path, "b"), 320)
    (d / "checkpoint" / "model_best.onnx").write_bytes(b"not onnx")
    with pytest.raises(AvatarError, match="ONNX"):
        read_graph(d / "checkpoint" / "model_best.onnx")


@pytest.mark.parametrize("encoder", ["splice", "full"])
def test_store_budget_evicts_least_recently_used(tmp_path, models_root, encoder):
    for name in ("a", "b", "c"):
        copy_avatar(models_root, tmp_path, name)

    def make_store(budget):
        cfg = config_from_dict({"models_root": str(tmp_path), "server": {"instance": PREFIX},
                                "capacity": {"background_bytes": budget}, "output": {"encoder": encoder}})
        return AvatarStore(cfg, woken.append, lambda name, seg: evicted.append(name))

    evicted: list[str] = []
    woken: list[str] = []
    got: dict[str, str] = {}

    def load(store, name):
        got.pop(name, None)
        store.acquire(name, lambda e: got.__setitem__(name, e.state))
        while name not in got:                         # the loader thread checks, then decodes
            store.pool.submit(lambda: None).result()
            while woken:
                store.finish(woken.pop(0))
        assert got[name] == "loaded", store.entries[name].error
        store.entries[name].last_used = len(got) + len(evicted)

    # the real size of one avatar (and, for splice, its prepared file: later loads reserve it exactly)
    probe = make_store(1 << 40)
    try:
        for name in ("a", "b", "c"):
            load(probe, name)
        one = probe.entries["a"].nbytes
        assert probe.describe()[0]["memory_bytes"]["backgrounds"] == one
        if encoder == "full":
            assert one == 6 * 720 * 1280 * 3 + 6 * 328 * 328 * 3 + 8192
        else:
            assert one < 6 * 250_000                       # target: <= 0.25 MB per 1280x720 frame
    finally:
        probe.close()
    evicted.clear()
    store = make_store(int(2.5 * one))
    try:
        load(store, "a")
        load(store, "b")
        store.entries["a"].last_used = 100                # a used more recently than b
        load(store, "c")                                  # over budget: b goes
        assert evicted == ["b"] and sorted(store.entries) == ["a", "c"]
        assert store.used_bytes() == 2 * one
        assert len(list_segments(f"{PREFIX}_av_")) == 2
        store.entries["a"].inflight = 1                   # a batch in flight pins a
        store.entries["c"].inflight = 1
        got.pop("b", None)
        store.acquire("b", lambda e: got.__setitem__("b", e))             # no room: b fails, for want of room
        while "b" not in got:
            store.pool.submit(lambda: None).result()
            while woken:
                store.finish(woken.pop(0))
        assert got["b"].state == "failed" and got["b"].capacity_error and "in flight" in got["b"].error
        store.entries["a"].inflight = store.entries["c"].inflight = 0
        tiny = config_from_dict({"models_root": str(tmp_path), "server": {"instance": PREFIX},
                                 "capacity": {"background_bytes": 1 << 20}, "output": {"encoder": encoder}})
        small = AvatarStore(tiny, woken.append, lambda *a: None)
        try:
            small.acquire("a", lambda e: got.__setitem__("tiny", e))
            while "tiny" not in got:
                small.pool.submit(lambda: None).result()
                while woken:
                    small.finish(woken.pop(0))
            assert got["tiny"].capacity_error and "background_bytes" in got["tiny"].error
        finally:
            small.close()
    finally:
        store.close()
