"""An import's hidden build folder: gone after SIGTERM, SIGINT, an exception or a full disk; left by
SIGKILL and removed by the next import or ``avatar check``; the signal handlers put back after."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest

from engine.avatars.disk import AvatarError
from engine.avatars.importer import import_synctalk
from engine.avatars.staging import Staging, Terminated

from .face_videos import background
from .test_avatar_import import make_dataset


def dead_pid() -> int:
    """The PID of a process that has ended (not reused this soon)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def big_dataset(root, n=1500, w=640, h=360):
    """A SyncTalk_2D dataset long enough (n frames, one JPEG and one 98-point landmark file repeated)
    that an import of it is still running when the test signals it."""
    (root / "full_body_img").mkdir(parents=True)
    (root / "landmarks").mkdir()
    jpg = cv2.imencode(".jpg", background(w, h))[1].tobytes()
    pts = np.full((98, 2), 200.0)
    pts[1], pts[31], pts[52] = (260, 120), (380, 122), (320, 150)
    lms = "\n".join(f"{x} {y}" for x, y in pts) + "\n"
    for i in range(n):
        (root / "full_body_img" / f"{i}.jpg").write_bytes(jpg)
        (root / "landmarks" / f"{i}.lms").write_text(lms)
    return root


@pytest.fixture(scope="module")
def long_dataset(tmp_path_factory):
    return big_dataset(tmp_path_factory.mktemp("long") / "May")


def start_import(tmp_path, dataset, net):
    cfg = tmp_path / "engine.toml"
    cfg.write_text('models_root = "models"\n')
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "--config", str(cfg), "avatar", "import",
                             str(dataset), "--name", "may", "--network", str(net)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "models" / f".import-may-{proc.pid}"
    deadline = time.monotonic() + 60
    while not (folder / "frames").is_dir() or not any((folder / "frames").iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the import did not start copying frames in 60 s"
        time.sleep(0.01)
    return cfg, proc, folder


@pytest.fixture(scope="module")
def net(models_root):
    return models_root / "demo" / "checkpoint" / "model_best.onnx"


def test_sigterm_removes_the_build_folder_and_says_so(tmp_path, long_dataset, net):
    _, proc, folder = start_import(tmp_path, long_dataset, net)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, (out, err)
    assert f"import of 'may' stopped by SIGTERM: its build folder {folder} was removed; nothing was added under " \
        f"{tmp_path / 'models'}" in err
    assert "Traceback" not in err
    assert list((tmp_path / "models").iterdir()) == []


def test_sigkill_leaves_the_folder_and_avatar_check_removes_it(tmp_path, long_dataset, net):
    cfg, proc, folder = start_import(tmp_path, long_dataset, net)
    proc.kill()
    proc.communicate(timeout=60)
    assert folder.is_dir() and any((folder / "frames").iterdir())
    r = subprocess.run([sys.executable, "-m", "engine.cli", "--config", str(cfg), "avatar", "check", "may",
                        "--no-run"], capture_output=True, text=True, timeout=120, check=False)
    assert f"removed {folder.name}, left by an import that was killed (process {proc.pid} no longer runs)" in r.stdout
    assert r.returncode == 1 and "may" in r.stdout          # there is no avatar may: refused, but cleaned up
    assert list((tmp_path / "models").iterdir()) == []


def test_the_next_import_removes_what_killed_imports_left(tmp_path, net):
    root = tmp_path / "models"
    pid = dead_pid()
    (root / f".import-old-{pid}" / "frames").mkdir(parents=True)
    (root / f".import-old-{pid}" / "frames" / "frame_0000.jpg").write_bytes(b"x")
    (root / f".replaced-kept-{pid}").mkdir()            # killed between --force's two renames: put back
    (root / "dup").mkdir()
    (root / f".replaced-dup-{pid}").mkdir()             # killed after them: the old copy, removed
    running = root / f".import-other-{os.getppid()}"     # another import, still running: kept
    running.mkdir()
    res = import_synctalk(root, "may", make_dataset(tmp_path / "ds", n=5), net)
    assert sorted(p.name for p in root.iterdir()) == [running.name, "dup", "kept", "may"]
    assert f"removed .import-old-{pid}, left by an import that was killed (process {pid} no longer runs)" \
        in res.summary()                                # the import says so, as avatar check does


def test_sigterm_in_process_raises_terminated_and_puts_the_handler_back(tmp_path, net):
    root = tmp_path / "models"
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def progress(done, total):
        seen.append(signal.getsignal(signal.SIGTERM))
        if done == 3:
            os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(Terminated, match="stopped by SIGTERM"):
        import_synctalk(root, "may", make_dataset(tmp_path / "ds", n=10), net, progress=progress)
    assert list(root.iterdir()) == [] and len(seen) == 3
    assert seen[0] != before and signal.getsignal(signal.SIGTERM) == before


def test_only_the_main_thread_sets_handlers(tmp_path, net):
    before = signal.getsignal(signal.SIGTERM)
    seen = []
    t = threading.Thread(target=lambda: import_synctalk(
        tmp_path / "models", "may", make_dataset(tmp_path / "ds", n=3), net,
        progress=lambda d, n: seen.append(signal.getsignal(signal.SIGTERM))))
    t.start()
    t.join(60)
    assert seen == [before] * 3 and (tmp_path / "models" / "may").is_dir()


@pytest.mark.parametrize("error, words", [
    (OSError(errno.ENOSPC, "No space left on device"), ("No space left on device; the import of 'may' stopped and "
                                                       "left nothing under {root}: free some space there")),
    (RuntimeError("boom"), "boom"),
    (KeyboardInterrupt(), ""),
])
def test_any_exception_or_a_full_disk_leaves_nothing(tmp_path, net, monkeypatch, error, words):
    root = tmp_path / "models"
    ds = make_dataset(tmp_path / "ds", n=10)
    copies = []

    def copy(src, dst, *a, **k):
        copies.append(dst)
        if len(copies) == 4:
            raise error
        return shutil.copyfile(src, dst)
    monkeypatch.setattr("engine.avatars.importer.shutil.copyfile", copy)
    kind = AvatarError if isinstance(error, OSError) else type(error)
    with pytest.raises(kind) as got:
        import_synctalk(root, "may", ds, net)
    assert words.format(root=root) in str(got.value)
    assert list(root.iterdir()) == []


def test_staging_keeps_its_behaviour(tmp_path):
    root = tmp_path / "models"
    with Staging(root, "a", force=False) as st:
        assert st.folder == root / f".import-a-{os.getpid()}" and (st.folder / "frames").is_dir()
        (st.folder / "x").write_text("1")
        assert st.commit() == root / "a"
    (root / "a" / "old").write_text("old")
    with Staging(root, "a", force=False) as st, pytest.raises(AvatarError, match="pass --force to replace it"):
        st.commit()
    with Staging(root, "a", force=True) as st:
        st.commit()
    assert sorted(p.name for p in root.iterdir()) == ["a"] and not (root / "a" / "old").exists()


def test_a_signal_while_the_avatar_is_renamed_into_place_is_held_until_it_is(tmp_path, monkeypatch):
    """SIGTERM between --force's two renames would leave the old avatar set aside and no new one."""
    root = tmp_path / "models"
    (root / "a").mkdir(parents=True)
    (root / "a" / "old").write_text("old")
    renames = []

    def rename(src, dst):
        renames.append(dst)
        os.replace(src, dst)
        if len(renames) == 1:                           # the old avatar is set aside
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr("engine.avatars.staging.os.rename", rename)
    with pytest.raises(Terminated, match="import of 'a' finished .*, then SIGTERM stopped the process"), \
            Staging(root, "a", force=True) as st:
        (st.folder / "new").write_text("new")
        st.commit()
    assert sorted(p.name for p in root.iterdir()) == ["a"] and (root / "a" / "new").is_file()


def test_a_signal_the_process_ignores_stays_ignored(tmp_path, net):
    """nohup engine-ctl avatar import ...: closing the terminal (SIGHUP) must not stop the import."""
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        seen = []
        import_synctalk(tmp_path / "models", "may", make_dataset(tmp_path / "ds", n=3), net,
                        progress=lambda d, n: seen.append(signal.getsignal(signal.SIGHUP)))
        assert seen == [signal.SIG_IGN] * 3 and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
