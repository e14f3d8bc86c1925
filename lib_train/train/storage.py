"""The output folder as a place that can fail: is it writable, is there room, where the weights go when it fails,
and what a killed run left in it.

- :func:`check_writable`: before any model work, a real probe (a file created and removed), so a read-only disk, a
  missing permission or a file in the way is reported at once, naming the folder (permission bits alone would say
  nothing for root, and nothing about a read-only mount).
- :func:`ensure_space` / :func:`tensor_bytes`: a save is refused before writing when the disk lacks the room its
  tensors need (:data:`SAVE_MARGIN` extra for metadata and the file system).
- :func:`rescue_folders`: where a run's weights go when its output folder fails during a save
  (``$LIB_TRAIN_RESCUE_DIR``, then ``~/sd-webui-trainer-rescue``, then the system's temporary folder; one new subfolder
  per rescue).
- :func:`clean_stale`: hidden temporary files (``.tmp-*``) and state folders (``.NAME-state.tmp-*``) a killed run
  left, removed by the next run of the same name (it holds the name's lock, so nobody else writes them); a resume
  state left only as ``.NAME-state.old`` (a kill between the two renames of a state save) put back.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..atomic import TMP_PREFIX
from ..errors import TrainerError

SAVE_MARGIN = 256 << 10  # bytes a save needs beyond its tensors (header, metadata, sidecar, preview)
RESCUE_ENV = "LIB_TRAIN_RESCUE_DIR"


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def reason(e: OSError) -> str:
    """What went wrong, in words."""
    code = e.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        text = "the disk is full" if code == errno.ENOSPC else "the disk quota is used up"
        return f"{text} ({e.strerror})" if e.strerror and "free" in e.strerror else text
    if code == errno.EROFS:
        return "it is on a read-only file system"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if code in (errno.ENOTDIR, errno.EEXIST):
        return "a file is in the way of that folder"
    return e.strerror or str(e)


def advice(e: OSError) -> str:
    """What to do about it."""
    code = e.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return "Free some space on that disk or choose another output folder"
    if code == errno.EROFS:
        return "Choose an output folder on a writable disk (or remount that one read-write)"
    if code in (errno.EACCES, errno.EPERM):
        return "Make the folder writable for this user or choose another output folder"
    return "Choose another output folder"


def check_writable(folder: str | os.PathLike, setting: str = "output.output_dir") -> None:
    """Raise :class:`TrainerError` unless files can be created in ``folder`` (created later when missing: the probe
    then runs in its nearest existing parent, and nothing is left behind)."""
    folder = Path(folder).expanduser()
    probe_in = folder
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    try:
        if not probe_in.is_dir():
            raise OSError(errno.ENOTDIR, "not a folder")
        if probe_in == folder:
            fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX + "write-check.", dir=folder)
            os.close(fd)
            os.unlink(probe)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=TMP_PREFIX + "write-check.", dir=probe_in))
    except OSError as e:
        where = folder if probe_in == folder else f"{folder} (checked in {probe_in}, where it would be created)"
        raise TrainerError(f"Cannot write into the output folder {where}, {setting}: {reason(e)}. "
                           f"{advice(e)}.") from None


def free_bytes(folder: str | os.PathLike) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def ensure_space(folder: str | os.PathLike, need: int, what: str) -> None:
    """Raise ``OSError(ENOSPC)`` (what a write would raise, with the numbers) when ``folder``'s disk has less than
    ``need`` bytes free."""
    free = free_bytes(folder)
    if free is not None and free < need:
        raise OSError(errno.ENOSPC, f"only {mb(free)} free, {what} needs about {mb(need)}")


def tensor_bytes(tensors, dtype: torch.dtype | None = None) -> int:
    """Bytes ``tensors`` (a dict or an iterable) take on disk, stored as ``dtype`` (None: their own)."""
    values = tensors.values() if isinstance(tensors, dict) else tensors
    size = torch.empty((), dtype=dtype).element_size() if dtype is not None else None
    return sum(t.numel() * (size or t.element_size()) for t in values)


def rescue_folders(name: str, failing: str | os.PathLike) -> list[Path]:
    """New folders (not yet created) a run's weights may go to when ``failing`` cannot take them, best first; none
    inside ``failing``."""
    roots = [os.environ.get(RESCUE_ENV)]
    try:
        roots.append(str(Path.home() / "sd-webui-trainer-rescue"))
    except RuntimeError:  # no home folder
        pass
    roots.append(os.path.join(tempfile.gettempdir(), "sd-webui-trainer-rescue"))
    bad = os.path.realpath(failing)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    found = []
    for root in dict.fromkeys(r for r in roots if r):
        real = os.path.realpath(root)
        if real != bad and not real.startswith(bad.rstrip(os.sep) + os.sep):
            found.append(Path(root) / f"{name}-{stamp}")
    return found


# ---- what a killed run leaves

_EXTENSIONS = (".preview.png", ".config.json", ".safetensors", ".json", ".pt", ".png")
_SUFFIXES = (re.compile(r"^(.+)-step\d{8}$"), re.compile(r"^(.+)-\d{6}$"), re.compile(r"^(.+)-\d{6}-\d+$"))


def owners(file_name: str) -> set[str]:
    """Run names that may write ``file_name`` (``a-000001.safetensors``: run ``a``'s epoch file, or run
    ``a-000001``'s final one)."""
    stem = next((file_name[:-len(e)] for e in _EXTENSIONS if file_name.endswith(e)), None)
    if not stem:
        return set()
    found = {stem}
    for pattern in _SUFFIXES:
        m = pattern.match(stem)
        if m:
            found.add(m.group(1))
    return found


def _tmp_target(file_name: str) -> str | None:
    """``.tmp-<target>.<random>`` → ``<target>``."""
    if not file_name.startswith(TMP_PREFIX) or "." not in file_name[len(TMP_PREFIX):]:
        return None
    return file_name[len(TMP_PREFIX):].rsplit(".", 1)[0]


def clean_stale(output_dir: str | os.PathLike, name: str) -> list[str]:
    """Remove what a killed run of ``name`` left in ``output_dir`` and put back a state left as ``.old`` (call with the
    name's lock held); returns messages for the user."""
    from .lock import holder

    folder = Path(output_dir)
    notes: list[str] = []
    removed: list[str] = []
    for where in (folder, folder / "samples"):
        if not where.is_dir():
            continue
        for p in where.iterdir():
            target = _tmp_target(p.name)
            if target is None or not p.is_file():
                continue
            names = owners(target)
            if name in names and all(holder(folder, other) is None for other in names - {name}):
                try:
                    p.unlink()
                    removed.append(str(p.relative_to(folder)))
                except OSError:
                    pass
    state = folder / f".{name}-state"
    for prefix in (f"{state.name}.tmp-", f".{state.name}.tmp-"):  # the second: older versions' name
        for p in folder.glob(glob_escape(prefix) + "*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name + "/")
    if removed:
        shown = ", ".join(removed[:4]) + (f" and {len(removed) - 4} more" if len(removed) > 4 else "")
        notes.append(f"Removed {len(removed)} temporary file(s) an interrupted run of '{name}' left in {folder}: "
                     f"{shown}")
    old = state.with_name(state.name + ".old")
    if old.is_dir():
        if state.exists():  # the swap finished; only removing the old copy was left
            shutil.rmtree(old, ignore_errors=True)
        elif (old / "state.json").is_file():
            try:
                os.replace(old, state)
                notes.append(f"Recovered the resume state {state} from {old.name} (a run was stopped while it "
                             "replaced its state).")
            except OSError as e:
                notes.append(f"The resume state {old} could not be renamed to {state.name} ({e.strerror}); resume "
                             "from it directly.")
    return notes


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def recover_old_state(state_dir: Path) -> tuple[Path, str] | None:
    """``state_dir`` (``.NAME-state``) is missing but ``.NAME-state.old`` holds a state: rename it back (unless a
    running process holds the name) and return the folder and a message; None when there is nothing to recover."""
    from .lock import holder

    old = state_dir.with_name(state_dir.name + ".old")
    if state_dir.exists() or not (old / "state.json").is_file():
        return None
    name = state_dir.name[1:-len("-state")]
    running = holder(state_dir.parent, name)
    if running is not None:
        raise TrainerError(f"{state_dir} is being replaced by a running training run ({running.describe()}); wait "
                           "for it to end before resuming.")
    try:
        os.replace(old, state_dir)
    except OSError as e:
        return old, f"Resuming from {old} (it could not be renamed to {state_dir.name}: {e.strerror})."
    return state_dir, (f"Recovered the resume state {state_dir} from {old.name} (a run was stopped while it replaced "
                       "its state).")
