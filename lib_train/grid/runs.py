"""Training runs on disk: a run's saved files grouped and ordered, and finding a run or a file by name.

A training run leaves several files in one folder (FORMATS.md, DESIGN.md): LoRA epoch saves ``NAME-000003``, step
saves ``NAME-step00000020``, the final ``NAME``; embedding runs ``NAME-000500`` (named by step) and ``NAME``; plus
``NAME.config.json``. :func:`discover_runs` groups such files into :class:`Run` objects, in training order. Files
are named by their **file stem**, never by the ``ss_output_name`` alias, which other trainers give every epoch of a
run (WEBUI.md §6).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .. import methods
from ..errors import TrainerError
from ..safetensors_io import read_metadata

# NAME-000003 (epoch; a step count for embeddings), NAME-step00000020, NAME-previous / NAME-previous-2 (a final
# kept aside by a promotion). The digit widths are the trainer's (and kohya's), so "style-2" stays a name.
_SAVE = re.compile(r"^(?P<name>.+)-(?:step(?P<step>\d{8})|(?P<num>\d{6})|(?P<prev>previous(?:-\d+)?))$")


@dataclass(frozen=True)
class RunFile:
    """One saved file of a run; ``stem`` is what prompts use (``<lora:STEM:w>``, or the embedding's name)."""

    stem: str
    path: Path  # the file cells use (.safetensors when there is one)
    role: str  # "epoch" | "step" | "final" | "previous"
    number: int | None = None  # epoch (LoRA epoch files) or step (step files, embedding saves)
    epoch: int | None = None  # from the metadata (ss_epoch) when known
    step: int | None = None  # from the metadata (ss_steps) or the name when known
    siblings: tuple[Path, ...] = ()  # other files of the same stem (an embedding's .pt next to its .safetensors)

    @property
    def label(self) -> str:
        """``epoch 3``, ``step 500``, ``epoch 10 (final)``, ``final``, ``previous final``."""
        if self.role == "epoch":
            return f"epoch {self.number}"
        if self.role == "step":
            return f"step {self.number}"
        if self.role == "previous":
            n = self.stem.rsplit("-", 1)[1]
            return "previous final" if n == "previous" else f"previous final {n}"
        if self.epoch is not None:
            return f"epoch {self.epoch} (final)"
        return f"step {self.step} (final)" if self.step is not None else "final"


@dataclass(frozen=True)
class Run:
    """The files of one training run in one folder, in training order (the final file last)."""

    kind: str  # "lora" | "embedding"
    name: str
    folder: Path
    root: Path  # the WebUI folder it was found in (labels are relative to it)
    files: tuple[RunFile, ...]
    config: Path | None = None  # NAME.config.json when the run wrote one

    @property
    def label(self) -> str:
        """A unique, stable name for menus and the API: ``LoRA: mychar/mychar`` (folder relative to the root)."""
        rel = os.path.relpath(self.folder, self.root)
        where = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        return f"{methods.get(self.kind).label}: {where}{self.name}"

    @property
    def stems(self) -> tuple[str, ...]:
        """Every name a prompt may use for this run: its files' stems and the run's name."""
        return tuple(dict.fromkeys([f.stem for f in self.files] + [self.name]))

    @property
    def final_path(self) -> Path:
        return self.folder / f"{self.name}.safetensors"

    def file(self, key: str) -> RunFile:
        """The file whose stem, label or path is ``key``."""
        key = key.strip()
        for f in self.files:
            if key in (f.stem, f.label, str(f.path)):
                return f
        raise TrainerError(f"files: '{key}' is not a file of the run {self.label}; its files are: "
                           + ", ".join(f"{f.stem} ({f.label})" for f in self.files))


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(str(text))
    except (TypeError, ValueError):
        return None


def _pick_file(paths: list[Path], exts: Sequence[str]) -> tuple[Path, tuple[Path, ...]]:
    ordered = sorted(paths, key=lambda p: exts.index(p.suffix.lower()))
    return ordered[0], tuple(ordered[1:])


def _make_file(kind: str, stem: str, paths: list[Path], match: re.Match | None) -> RunFile:
    method = methods.get(kind)
    path, siblings = _pick_file(paths, method.extensions)
    meta = read_metadata(path)
    epoch, step = _int_or_none(meta.get("ss_epoch")), _int_or_none(meta.get("ss_steps"))
    if match is None:
        return RunFile(stem, path, "final", None, epoch, step, siblings)
    if match.group("prev"):
        return RunFile(stem, path, "previous", None, epoch, step, siblings)
    if match.group("step"):
        number = int(match.group("step"))
        return RunFile(stem, path, "step", number, epoch, step if step is not None else number, siblings)
    number = int(match.group("num"))
    if method.numbered_by == "step":  # e.g. embedding saves are named by their step count
        return RunFile(stem, path, "step", number, epoch, number, siblings)
    return RunFile(stem, path, "epoch", number, epoch if epoch is not None else number, step, siblings)


def _training_order(files: list[RunFile]) -> list[RunFile]:
    """Intermediate saves by step when every one knows its step, else epochs then steps; then kept-aside finals;
    the final last."""
    inter = [f for f in files if f.role in ("epoch", "step")]
    if inter and all(f.step is not None for f in inter):
        inter.sort(key=lambda f: (f.step, f.epoch or 0, f.stem))
    else:
        inter.sort(key=lambda f: (f.role != "epoch", f.number or 0, f.stem))
    prev = sorted((f for f in files if f.role == "previous"), key=lambda f: (len(f.stem), f.stem))
    return inter + prev + [f for f in files if f.role == "final"]


def _runs_in_folder(kind: str, root: Path, folder: Path, names: Iterable[str]) -> list[Run]:
    exts = methods.get(kind).extensions
    by_stem: dict[str, list[Path]] = {}
    configs = set()
    for fn in names:
        if fn.startswith("."):
            continue
        if fn.endswith(".config.json"):
            configs.add(fn[: -len(".config.json")])
            continue
        stem, ext = os.path.splitext(fn)
        if ext.lower() in exts:
            by_stem.setdefault(stem, []).append(folder / fn)
    groups: dict[str, list[tuple[str, re.Match | None]]] = {}
    for stem in by_stem:
        m = _SAVE.match(stem)
        groups.setdefault(m.group("name") if m else stem, []).append((stem, m))
    runs = []
    for name, members in groups.items():
        saved_along = any(m is not None for _, m in members)
        if not saved_along and name not in configs:
            continue  # a lone model file, not a run of this trainer
        files = _training_order([_make_file(kind, stem, by_stem[stem], m) for stem, m in members])
        config = folder / f"{name}.config.json" if name in configs else None
        runs.append(Run(kind, name, folder, root, tuple(files), config))
    return runs


def discover_runs(root: str | os.PathLike, kind: str) -> list[Run]:
    """Every run under ``root`` (sub-folders included, as the WebUI lists models), sorted by label.

    A run is a group of model files in one folder named ``NAME`` plus ``NAME-000001`` / ``NAME-step00000020`` /
    ``NAME-previous`` saves, or a ``NAME`` file with a ``NAME.config.json``. Hidden folders and resume-state
    folders (``state.json``) are skipped. A missing root gives no runs.
    """
    if kind not in methods.METHODS:
        raise ValueError(f"unknown run kind {kind!r}")
    root_p = Path(root)
    if not root_p.is_dir():
        return []
    runs: list[Run] = []
    for folder, dirs, names in os.walk(root_p, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if "state.json" in names:
            continue
        runs += _runs_in_folder(kind, root_p, Path(folder), sorted(names))
    return sorted(runs, key=lambda r: r.label.lower())


def find_run(runs: Sequence[Run], key: str) -> Run:
    """The run named by ``key``: its label, its name (when only one run has it), a file's path or stem, or its
    folder."""
    key = (key or "").strip()
    if not key:
        raise TrainerError("run: choose a training run" + _available(runs))
    exact = [r for r in runs if r.label == key]
    if exact:
        return exact[0]
    for test in (lambda r: r.name == key,
                 lambda r: any(key in (f.stem, str(f.path)) for f in r.files),
                 lambda r: str(r.folder) == key.rstrip("/\\")):
        found = [r for r in runs if test(r)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise TrainerError(f"run: '{key}' matches {len(found)} runs; give one of: "
                               + ", ".join(r.label for r in found))
    raise TrainerError(f"run: no training run '{key}'" + _available(runs))


def _available(runs: Sequence[Run]) -> str:
    if not runs:
        return (". No runs were found: a run is a folder with NAME.safetensors and its epoch saves "
                "(NAME-000001.safetensors, ...) or NAME.config.json; train with output.save_every_epochs > 0.")
    labels = [r.label for r in runs]
    more = f" (and {len(labels) - 20} more)" if len(labels) > 20 else ""
    return ". Runs found: " + ", ".join(labels[:20]) + more


def select_files(run: Run, keys: Sequence[str] | str | None) -> list[RunFile]:
    """The run's files named by ``keys`` (stems, labels or paths), in training order; none named = all."""
    if isinstance(keys, str):
        keys = [k for k in re.split(r"[,\n]", keys) if k.strip()]
    if not keys:
        return list(run.files)
    chosen = {run.file(k).stem for k in keys}
    return [f for f in run.files if f.stem in chosen]
