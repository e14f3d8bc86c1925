"""Atomic file writes and safe output paths.

A file is written to a temporary name in the same folder, flushed and fsynced, then renamed over the target, so a
crash or an interrupt never leaves a half-written model file behind under the final name.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

from .errors import TrainerError

TMP_PREFIX = ".tmp-"  # a file being written: ``.tmp-<final file name>.<random>`` (see :func:`atomic_write`)


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Temporary files are created 0600; finished files get the usual permissions (0666 minus the process umask) so a
# LoRA written into the WebUI's folders is readable like any other model file.
UMASK = _read_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` to produce the file, then move it to ``path`` atomically.

    ``write`` receives a path in the same folder (so the final rename never crosses file systems).
    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=str(path.parent))
    os.close(fd)
    try:
        try:
            write(tmp)
        except Exception as e:  # a writer's I/O failure (safetensors reports one as its own error type)
            found = os_error_of(e)
            if found is None or found is e:
                raise
            raise found from e
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


# how an operating-system error shows in the message of a library written in Rust (safetensors):
# ``IoError(Os { code: 28, kind: StorageFull, ... })`` (Debug) or ``... (os error 28)`` (Display)
_RUST_OS_ERROR = re.compile(r"Os \{ code: (\d+)|\(os error (\d+)\)")


def os_error_of(e: BaseException) -> OSError | None:
    """``e`` itself when it is an :class:`OSError`; an equivalent ``OSError(errno, strerror)`` when ``e`` is another
    library's wrapper of one (safetensors raises ``SafetensorError("... Os { code: 28 ...")`` for a full disk); else
    None."""
    if isinstance(e, OSError):
        return e
    m = _RUST_OS_ERROR.search(str(e))
    if m is None:
        return None
    code = int(m.group(1) or m.group(2))
    return OSError(code, os.strerror(code) if code in errno.errorcode else str(e))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def _w(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, _w)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


_NAME_RE = re.compile(r"^[^/\\:*?\"<>|\x00-\x1f]+$")


def check_output_name(name: str, field: str = "name") -> str | None:
    """Return a problem message if ``name`` cannot be a file stem inside the output folder, else None.

    Rejects empty names, path separators, ``..``, names that Windows cannot store and leading/trailing spaces or dots.
    """
    if not name or not name.strip():
        return f"the {field} is empty; give a short name such as 'mychar'"
    if name in (".", "..") or ".." in name.split(".") and "/" in name:
        return f"'{name}' is not a valid {field}"
    if not _NAME_RE.match(name):
        return (f"'{name}' contains a path separator or a character that file names cannot hold "
                "(/ \\ : * ? \" < > |); use letters, digits, '-' and '_'")
    if name != name.strip() or name.endswith("."):
        return f"'{name}' starts or ends with a space or ends with a dot; remove them"
    return None


def is_within(path: str | os.PathLike, roots) -> bool:
    """Whether ``path`` (links resolved) is one of ``roots`` or inside one of them."""
    real = Path(os.path.realpath(os.path.expanduser(path)))
    for root in roots:
        r = Path(os.path.realpath(os.path.expanduser(root)))
        if real == r or r in real.parents:
            return True
    return False


def safe_child(root: str | os.PathLike, name: str) -> Path:
    """``root / name`` resolved, raising :class:`TrainerError` if it would escape ``root``."""
    root_p = Path(root).resolve()
    child = (root_p / name).resolve()
    if child != root_p and root_p not in child.parents:
        raise TrainerError(f"'{name}' would write outside the output folder {root_p}; use a plain file name")
    return child
