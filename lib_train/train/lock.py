"""One run per output name: a lock file ``<output folder>/.<name>.lock`` held for the run's lifetime.

The file holds who runs (pid, host, start time, what: the command line or a WebUI job), and the process holds an
operating-system lock on it (``flock``; ``msvcrt.locking`` on Windows) for as long as it runs, so the lock ends with
the process however it ends: a file left behind by a killed run is recognised as stale (its lock is free) and taken
over with a message. A second run on the same (folder, name) — another command line, a WebUI job, another thread —
is refused with the first run's process named.

The same thread may take a lock it holds again (the command line takes it before loading the model, the shared
training loop takes it again); it is released when the outermost holder lets go.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..errors import TrainerError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES, errno.EDEADLK)
_WIN_LOCK_OFFSET = 1 << 30  # Windows: the locked byte lies past the record, so others can still read it


def lock_path(output_dir: str | os.PathLike, name: str) -> Path:
    return Path(output_dir) / f".{name}.lock"


@dataclass(frozen=True)
class LockInfo:
    """Who holds (or held) a lock."""

    pid: int
    host: str
    started_at: float
    what: str

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        return f"process {self.pid} on {self.host} ({self.what}, started {started})"

    @staticmethod
    def parse(text: str) -> LockInfo | None:
        try:
            d = json.loads(text)
            return LockInfo(int(d["pid"]), str(d["host"]), float(d["started_at"]), str(d.get("what", "a run")))
        except (ValueError, KeyError, TypeError):
            return None


class OutputLocked(TrainerError):
    """Another run writes the same output name in the same folder."""


@dataclass
class _Held:
    thread: int
    depth: int
    fd: int
    info: LockInfo


_held: dict[str, _Held] = {}
_held_guard = threading.Lock()


def _try_lock(fd: int) -> bool | None:
    """Lock ``fd`` without waiting: True when locked, False when another holder has it, None where the file system
    cannot lock (then the record's pid decides)."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            import msvcrt

            os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError as e:
        if e.errno in _BUSY:
            return False
        return None


def _unlock(fd: int) -> None:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        else:
            import msvcrt

            os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    except OSError:
        pass


def _read(fd: int) -> LockInfo | None:
    os.lseek(fd, 0, os.SEEK_SET)
    return LockInfo.parse(os.read(fd, 4096).decode("utf-8", "replace"))


def _alive(info: LockInfo) -> bool:
    """Whether the record's process still runs (a process on another host is assumed to)."""
    if info.host != socket.gethostname():
        return True
    if info.pid == os.getpid():
        return True
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _refusal(path: Path, info: LockInfo | None) -> OutputLocked:
    who = info.describe() if info else "another process (it is starting)"
    return OutputLocked(f"Another training run is writing '{path.name[1:-5]}' in {path.parent}: {who}. Wait for it to "
                        "end or stop it, or choose another output name. (Its lock file is "
                        f"{path.name}; it goes away with that process.)")


def _acquire(path: Path, me: LockInfo) -> tuple[int, LockInfo | None]:
    """Open and lock ``path`` (created when missing) and write ``me`` into it; returns the descriptor and the record
    of a dead earlier holder found in it (None: there was none)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = _try_lock(fd)
            previous = _read(fd)
            if locked is False or (locked is None and previous is not None and _alive(previous)):
                raise _refusal(path, previous)
            try:  # a holder that let go removes the file: our lock may be on a file that is gone
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(me.__dict__).encode("utf-8"))
            os.fsync(fd)
            return fd, previous
        except BaseException:
            try:
                os.close(fd)
            except OSError:
                pass
            raise


def _release(path: Path, fd: int) -> None:
    try:
        if sys.platform != "win32":
            try:
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    os.unlink(path)
            except FileNotFoundError:
                pass
        _unlock(fd)
    finally:
        os.close(fd)
    if sys.platform == "win32":  # an open file cannot be removed there
        try:
            os.unlink(path)
        except OSError:
            pass


@contextmanager
def output_lock(output_dir: str | os.PathLike, name: str, *, what: str,
                say: Callable[[str], None] | None = None) -> Iterator[LockInfo]:
    """Hold the lock of ``name`` in ``output_dir`` (an existing folder) for the ``with`` block; raises
    :class:`OutputLocked` naming the holder when another run has it. A stale lock (its process gone) is taken over and
    ``say`` told so. ``what`` says what runs, for the other run's message."""
    path = lock_path(output_dir, name)
    key = os.path.realpath(path)
    me = threading.get_ident()
    with _held_guard:
        held = _held.get(key)
        if held is not None and held.thread == me:
            held.depth += 1
        else:
            held = None
    if held is not None:
        try:
            yield held.info
        finally:
            held.depth -= 1
        return
    info = LockInfo(os.getpid(), socket.gethostname(), time.time(), what)
    try:
        fd, previous = _acquire(path, info)
    except OutputLocked:
        raise
    except OSError as e:
        raise TrainerError(f"Cannot create the lock file {path}: {e.strerror or e}. Make {path.parent} writable or "
                           "choose another output folder.") from None
    if previous is not None and say is not None:
        say(f"Took over the lock of '{name}' in {path.parent}: {previous.describe()} is no longer running.")
    with _held_guard:
        _held[key] = _Held(me, 1, fd, info)
    try:
        yield info
    finally:
        with _held_guard:
            _held.pop(key, None)
        _release(path, fd)


def holder(output_dir: str | os.PathLike, name: str) -> LockInfo | None:
    """Who holds the lock of ``name`` in ``output_dir`` now (this process included); None when nobody does."""
    path = lock_path(output_dir, name)
    with _held_guard:
        held = _held.get(os.path.realpath(path))
    if held is not None:
        return held.info
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        locked = _try_lock(fd)
        info = _read(fd)
        if locked:
            _unlock(fd)
            return None
        if locked is None:
            return info if info is not None and _alive(info) else None
        return info or LockInfo(0, "?", time.time(), "a run that is starting")
    finally:
        os.close(fd)


def refuse_if_held(output_dir: str | os.PathLike, name: str) -> None:
    """Raise :class:`OutputLocked` naming the holder when a run (another process, or this one) holds the lock of
    ``name`` in ``output_dir``: the check a front end makes before loading anything."""
    running = holder(output_dir, name)
    if running is not None:
        raise _refusal(lock_path(output_dir, name), running)
