"""The hidden folder an avatar is built in before it is renamed into place, so that an import that
fails or is stopped leaves nothing under ``models_root``.

``<models_root>/.import-<name>-<pid>`` is removed when the ``with`` block ends by any exception
(an error, a full disk, Ctrl-C's KeyboardInterrupt) and, while the block runs in the main thread,
by SIGTERM and SIGHUP too: their default action would end the process without running any cleanup,
so a handler turns them into :class:`Terminated` (a :class:`SystemExit`: Python prints its message
and exits 1 without a traceback) and the previous handlers are put back when the block ends. While
the folder is renamed into place or removed, those signals and a second Ctrl-C are held, and acted
on once that is done.
SIGKILL cannot be caught: the folder it leaves is found by :func:`remove_stale` (the process named
in the folder's name no longer runs), which the next import and ``engine-ctl avatar check`` call.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

import psutil

from engine.avatars.disk import AvatarError

_STALE = re.compile(r"^\.(import|replaced)-(.+)-(\d+)$")
_SIGNALS = tuple(getattr(signal, s) for s in ("SIGTERM", "SIGHUP") if hasattr(signal, s))
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class Terminated(SystemExit):
    """SIGTERM or SIGHUP during an import: a SystemExit, so no ``except Exception`` on the way swallows
    it, the ``with`` blocks clean up, and the process exits 1 printing the message."""


@dataclass
class StaleFolder:
    """A build folder (or a replaced avatar set aside) left by a process that no longer runs, and
    what became of it: "removed", "restored" (put back under its name) or "failed" (still there)."""
    path: Path
    pid: int
    outcome: str = "removed"

    def text(self) -> str:
        gone = f"process {self.pid} no longer runs"
        if self.outcome == "restored":
            name = _STALE.match(self.path.name).group(2)        # type: ignore[union-attr]
            return (f"put {self.path.name} back as {name}: an import with --force was killed while replacing "
                    f"that avatar ({gone})")
        if self.outcome == "failed":
            return (f"could not remove or put back {self.path}, left by an import that was killed ({gone}): "
                    "remove it by hand")
        return f"removed {self.path.name}, left by an import that was killed ({gone})"


def remove_stale(models_dir: Path) -> list[StaleFolder]:
    """Remove the ``.import-NAME-PID`` folders whose process is gone; a ``.replaced-NAME-PID`` (the old
    avatar, set aside for an instant while ``--force`` renames the new one in) is put back as NAME
    when nothing took its place, else removed. A folder whose PID runs is another import's: kept.
    Never raises: what cannot be removed is reported as "failed"."""
    found: list[StaleFolder] = []
    if not models_dir.is_dir():
        return found
    for path in sorted(models_dir.iterdir()):
        m = _STALE.match(path.name)
        if m and not psutil.pid_exists(int(m.group(3))):
            found.append(StaleFolder(path, int(m.group(3)), _clear(path, m.group(1), models_dir / m.group(2))))
    return found


def _clear(path: Path, kind: str, target: Path) -> str:
    """Put a set-aside avatar back when its place is free, else remove ``path``; the outcome."""
    try:
        if kind == "replaced" and not (target.exists() or target.is_symlink()):
            os.rename(path, target)
            return "restored"
        _remove(path)
    except OSError:
        pass
    return "failed" if path.exists() or path.is_symlink() else "removed"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class Staging:
    """A hidden folder beside the avatar's final place; renamed into place by :meth:`commit`,
    removed when the ``with`` block ends any other way (see the module doc)."""

    def __init__(self, models_dir: Path, name: str, force: bool) -> None:
        self.models_dir, self.name, self.force = models_dir, name, force
        self.target = models_dir / name
        self.folder = models_dir / f".import-{name}-{os.getpid()}"
        self.stale: list[StaleFolder] = []
        self._previous: dict[int, Any] = {}
        self._cleaning = False
        self._pending: int | None = None
        self._committed = False

    def __enter__(self) -> Self:
        self._catch_signals()
        try:
            self.models_dir.mkdir(parents=True, exist_ok=True)
            self.stale = remove_stale(self.models_dir)
            if self.folder.exists():
                shutil.rmtree(self.folder)
            (self.folder / "frames").mkdir(parents=True)
            (self.folder / "checkpoint").mkdir()
        except BaseException as e:
            self.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._hold()                                # a signal now is held until the folder is gone
        try:
            if self.folder.exists():
                shutil.rmtree(self.folder, ignore_errors=True)
        finally:
            self._restore_signals()
        if self._pending == signal.SIGINT:
            raise KeyboardInterrupt from exc
        if self._pending is not None:
            raise Terminated(self._stopped_text(self._pending)) from exc
        if isinstance(exc, OSError):
            raise AvatarError(self._os_error_text(exc)) from exc

    def _os_error_text(self, e: OSError) -> str:
        """Why the import stopped, for an error of the file system (a full disk most often)."""
        what = f"{e.filename}: " if e.filename else ""
        text = f"{what}{e.strerror or e}; the import of {self.name!r} stopped and left nothing under {self.models_dir}"
        if e.errno in _NO_SPACE:
            text += ": free some space there (the avatar takes about its frames' size plus the network) and run it again"
        return text

    def _catch_signals(self) -> None:
        """SIGTERM/SIGHUP raise :class:`Terminated` while the block runs (only the main thread may set
        handlers; elsewhere they keep their default action; one the process ignores, as ``nohup``
        makes it ignore SIGHUP, stays ignored)."""
        for sig in _SIGNALS:
            self._catch(sig)

    def _catch(self, sig: int) -> None:
        if threading.current_thread() is not threading.main_thread() or sig in self._previous:
            return
        try:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        except (ValueError, OSError):              # not the main interpreter, or a signal that cannot be caught
            pass

    def _hold(self) -> None:
        """From now on SIGTERM, SIGHUP and SIGINT (a second Ctrl-C) are held until :meth:`__exit__`
        has removed the folder (or :meth:`commit` has renamed it), then acted on."""
        self._cleaning = True
        self._catch(signal.SIGINT)

    def _restore_signals(self) -> None:
        while self._previous:
            sig, handler = self._previous.popitem()
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._cleaning:
            if self._pending is None:
                self._pending = signum
            return
        self._cleaning = True                       # later ones are held until the folder is gone (__exit__)
        raise Terminated(self._stopped_text(signum))

    def _stopped_text(self, signum: int) -> str:
        sig = signal.Signals(signum).name
        if self._committed:                         # the signal came during the last cleanup
            return f"import of {self.name!r} finished ({self.target}), then {sig} stopped the process"
        return (f"import of {self.name!r} stopped by {sig}: its build folder {self.folder} was removed; nothing "
                f"was added under {self.models_dir}")

    def commit(self) -> Path:
        """Rename the folder into place; an avatar it replaces (``force``) is set aside during the
        rename and put back if the rename fails; signals are held from here to the block's end, so
        that none lands between the two renames."""
        self._hold()
        old = None
        if self.target.exists() or self.target.is_symlink():
            if not self.force:
                raise AvatarError(f"avatar {self.name!r} appeared at {self.target} during the import; "
                                  "pass --force to replace it")
            old = self.models_dir / f".replaced-{self.name}-{os.getpid()}"
            os.rename(self.target, old)
        try:
            os.rename(self.folder, self.target)
        except BaseException:
            if old is not None:
                os.rename(old, self.target)
            raise
        self._committed = True
        if old is not None:
            _remove(old)
        return self.target
