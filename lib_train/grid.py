"""Epoch × weight grids, planned without the WebUI: runs on disk, weight specs, cells, labels, and keeping a choice.

A training run leaves several files in one folder (FORMATS.md, DESIGN.md): LoRA epoch saves ``NAME-000003``, step
saves ``NAME-step00000020``, the final ``NAME``; embedding runs ``NAME-000500`` (named by step) and ``NAME``; plus
``NAME.config.json``. :func:`discover_runs` groups such files into :class:`Run` objects, in training order.

:func:`plan_grid` turns a run, the chosen files, a weight spec (``"0.2-1.0 (+0.2)"``, ``"0.2-1.0 [5]"``,
``"0.4, 0.7, 1"``) and an optional third axis (prompts or seeds) into :class:`Cell` objects: files across, weights
down, one fixed seed. A cell only rewrites the prompt: ``<lora:STEM:w>`` for a LoRA file, ``(STEM:w)`` for an
embedding, so the WebUI's normal generation applies each file exactly as a user's prompt will later. Files are
named by their **file stem**, never by the ``ss_output_name`` alias, which other trainers give every epoch of a run
(WEBUI.md §6).

:func:`keep_choice` writes the chosen weight as ``"preferred weight"`` into the LoRA's ``.json`` sidecar (the Lora
card then inserts ``<lora:NAME:w>``) and can promote the chosen file to the run's final ``NAME.safetensors``. The
file a promotion replaces is never lost (see :func:`promote_to_final`).

Every problem a user can fix raises :class:`~lib_train.errors.TrainerError` naming the field or file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from . import methods
from .atomic import atomic_write
from .errors import TrainerError
from .settings import resolve
from .train.sidecar import SD_VERSIONS, write_lora_sidecar

THIRD_AXES = ("Nothing", "Prompts", "Seeds")
MAX_VALUES = 64  # per axis
MAX_CELLS = 400
SEED_LIMIT = 4294967294  # the WebUI draws seeds from range(4294967294)
LABEL_CHARS = 80  # third-axis prompt labels are cut to this many characters

# NAME-000003 (epoch; a step count for embeddings), NAME-step00000020, NAME-previous / NAME-previous-2 (a final
# kept aside by a promotion). The digit widths are the trainer's (and kohya's), so "style-2" stays a name.
_SAVE = re.compile(r"^(?P<name>.+)-(?:step(?P<step>\d{8})|(?P<num>\d{6})|(?P<prev>previous(?:-\d+)?))$")
_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)"
_RANGE_STEP = re.compile(rf"^({_NUMBER})\s*-\s*({_NUMBER})\s*\(\s*({_NUMBER})\s*\)$")
_RANGE_COUNT = re.compile(rf"^({_NUMBER})\s*-\s*({_NUMBER})\s*\[\s*(\d+)\s*\]$")
_RANGE_BARE = re.compile(rf"^({_NUMBER})\s*-\s*({_NUMBER})$")
_SEED_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")
_NET_TAG = re.compile(r"<(?:lora|lyco):([^:>]+)(?::[^>]*)?>", re.IGNORECASE)
_TAG_WEIGHT = re.compile(r"^<(?P<kind>lora|lyco):(?P<name>[^:>]+)(?::(?P<rest>[^>]*))?>$", re.IGNORECASE)


# ---------------------------------------------------------------- files and runs

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


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data section starts."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise TrainerError(f"{path} is not a safetensors file (it is shorter than a header)")
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000 or n > path.stat().st_size - 8:
                raise TrainerError(f"{path} is not a safetensors file (bad header length)")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise TrainerError(f"{path} cannot be read: {e.strerror or e}") from e
    except (UnicodeDecodeError, ValueError) as e:
        raise TrainerError(f"{path} is not a safetensors file (its header is not JSON)") from e
    if not isinstance(header, dict):
        raise TrainerError(f"{path} is not a safetensors file (its header is not a JSON object)")
    return header, 8 + n


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A safetensors file's ``__metadata__`` ({} for other files or unreadable headers)."""
    if Path(path).suffix.lower() != ".safetensors":
        return {}
    try:
        meta = read_safetensors_header(path)[0].get("__metadata__") or {}
    except TrainerError:
        return {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


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


# ---------------------------------------------------------------- values

def format_weight(w: float) -> str:
    """``0.6000000001`` → ``0.6``, ``1.0`` → ``1``: at most 4 decimals, no trailing zeros."""
    text = f"{round(float(w), 4):.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _number(text: str, fld: str, item: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TrainerError(f"{fld}: '{item}' is not a number") from None
    if not math.isfinite(value):
        raise TrainerError(f"{fld}: '{item}' is not a finite number")
    return value


def _expand_range(item: str, fld: str) -> list[float]:
    m = _RANGE_STEP.match(item)
    if m:
        start, end, step = (_number(g, fld, item) for g in m.groups())
        if step == 0:
            raise TrainerError(f"{fld}: '{item}' has a step of 0; use e.g. 0.2-1.0 (+0.2)")
        if (end - start) * step < 0:
            raise TrainerError(f"{fld}: '{item}' steps away from its end; use "
                               f"({'+' if end > start else '-'}{format_weight(abs(step))})")
        n = int(math.floor((end - start) / step + 1e-9)) + 1
        if n > MAX_VALUES:
            raise TrainerError(f"{fld}: '{item}' gives {n} values; at most {MAX_VALUES} per axis")
        values = [start + i * step for i in range(n)]
        return [round(v, 6) for v in values]
    m = _RANGE_COUNT.match(item)
    if m:
        start, end = _number(m.group(1), fld, item), _number(m.group(2), fld, item)
        count = int(m.group(3))
        if count < 1 or count > MAX_VALUES:
            raise TrainerError(f"{fld}: '{item}' asks for {count} values; give 1 to {MAX_VALUES}")
        if count == 1:
            return [round(start, 6)]
        return [round(start + (end - start) * i / (count - 1), 6) for i in range(count)]
    if _RANGE_BARE.match(item):
        raise TrainerError(f"{fld}: '{item}' is a range without a step; write e.g. '{item} (+0.2)' or "
                           f"'{item} [5]' (5 evenly spaced values)")
    return [_number(item, fld, item)]


def parse_weights(spec: str, fld: str = "weights") -> list[float]:
    """``"0.2-1.0 (+0.2)"`` (start-end with a step), ``"0.2-1.0 [5]"`` (5 evenly spaced values), ``"0.4, 0.7, 1"``,
    or a mix separated by commas. Order is kept, repeats are dropped; negative weights are allowed."""
    items = [s.strip() for s in re.split(r"[,\n;]", spec or "")]
    values: list[float] = []
    for item in items:
        if item:
            values += _expand_range(item, fld)
    if not values:
        raise TrainerError(f"{fld}: give at least one weight, e.g. '0.2-1.0 (+0.2)' or '0.4, 0.7, 1'")
    unique = list(dict.fromkeys(round(v, 6) for v in values))
    if len(unique) > MAX_VALUES:
        raise TrainerError(f"{fld}: {len(unique)} values; at most {MAX_VALUES} per axis")
    return unique


def parse_seeds(spec: str, fld: str = "seeds") -> list[int]:
    """``"1, 2, 3"``, ``"100-103"`` (inclusive) or ``-1`` (a random seed, drawn once: :func:`fix_seeds`)."""
    seeds: list[int] = []
    for item in (s.strip() for s in re.split(r"[,\n;]", spec or "")):
        if not item:
            continue
        m = _SEED_RANGE.match(item)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if b < a or b - a + 1 > MAX_VALUES:
                raise TrainerError(f"{fld}: '{item}' must go upwards and hold at most {MAX_VALUES} seeds")
            seeds += list(range(a, b + 1))
            continue
        try:
            seed = int(item)
        except ValueError:
            raise TrainerError(f"{fld}: '{item}' is not a whole number (use -1 for a random seed)") from None
        if seed < -1 or seed >= 2 ** 32:
            raise TrainerError(f"{fld}: {seed} is out of range; use 0 to {2 ** 32 - 1}, or -1 for a random seed")
        seeds.append(seed)
    if not seeds:
        raise TrainerError(f"{fld}: give at least one seed, e.g. '1, 2, 3' or '100-103'")
    if len(seeds) > MAX_VALUES:
        raise TrainerError(f"{fld}: {len(seeds)} seeds; at most {MAX_VALUES} per axis")
    return seeds


def fix_seed(seed: int | None, draw: Callable[[], int]) -> int:
    """``-1`` (or None) → one drawn seed; anything else is kept."""
    return int(draw()) if seed is None or int(seed) == -1 else int(seed)


def fix_seeds(seeds: Sequence[int], draw: Callable[[], int]) -> list[int]:
    """Each ``-1`` is drawn once (so every cell of that row shares it)."""
    return [fix_seed(s, draw) for s in seeds]


@dataclass(frozen=True)
class ThirdValue:
    """One value of the third axis: a prompt that replaces the main one, or a seed (None: not this kind)."""

    prompt: str | None = None
    seed: int | None = None

    @property
    def label(self) -> str:
        if self.seed is not None:
            return f"seed {self.seed}"
        if self.prompt is not None:
            text = " ".join(self.prompt.split())
            return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"
        return ""


def parse_third_axis(kind: str, text: str, draw: Callable[[], int]) -> list[ThirdValue]:
    """``Nothing`` → one empty value; ``Prompts`` → one value per non-empty line; ``Seeds`` → :func:`parse_seeds`
    with ``-1`` drawn once."""
    kind = (kind or "Nothing").strip()
    if kind == "Nothing":
        return [ThirdValue()]
    if kind == "Prompts":
        lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
        if not lines:
            raise TrainerError("third axis: give one prompt per line")
        if len(lines) > MAX_VALUES:
            raise TrainerError(f"third axis: {len(lines)} prompts; at most {MAX_VALUES}")
        return [ThirdValue(prompt=ln) for ln in lines]
    if kind == "Seeds":
        return [ThirdValue(seed=s) for s in fix_seeds(parse_seeds(text, "third axis"), draw)]
    raise TrainerError(f"third axis: '{kind}' is not one of {', '.join(THIRD_AXES)}")


# ---------------------------------------------------------------- prompts

def _lora_tag(stem: str, weight: float) -> str:
    return f"<lora:{stem}:{format_weight(weight)}>"


def _tag_weight(tag: str) -> float | None:
    m = _TAG_WEIGHT.match(tag)
    first = (m.group("rest") or "").split(":")[0].strip() if m else ""
    try:
        return float(first) if first and "=" not in first else None
    except ValueError:
        return None


def set_lora_tag(prompt: str, stem: str, weight: float | None, run_stems: Iterable[str]) -> str:
    """``prompt`` with the run's LoRA tag set to ``<lora:stem:weight>``.

    The first ``<lora:…>`` (or ``<lyco:…>``) tag naming any file of the run is replaced and the run's other tags
    are removed (a LoRA applied twice is applied at twice the weight); without one the tag is appended.
    ``weight=None`` keeps the weight the replaced tag had (1 when there was none).
    """
    names = set(run_stems) | {stem}
    found: list[re.Match] = [m for m in _NET_TAG.finditer(prompt) if m.group(1).strip() in names]
    if not found:
        tag = _lora_tag(stem, 1.0 if weight is None else weight)
        return f"{prompt.rstrip()} {tag}" if prompt.strip() else tag
    if weight is None:
        weight = _tag_weight(found[0].group(0))
        weight = 1.0 if weight is None else weight
    out, pos = [], 0
    for i, m in enumerate(found):
        out.append(prompt[pos:m.start()])
        if i == 0:
            out.append(_lora_tag(stem, weight))
        pos = m.end()
    out.append(prompt[pos:])
    return re.sub(r"  +", " ", "".join(out)).strip() if len(found) > 1 else "".join(out)


def set_last_lora_weight(prompt: str, weight: float) -> str:
    """The prompt's last ``<lora:NAME:…>`` tag with its weight set to ``weight``; TrainerError without a tag."""
    tags = list(_NET_TAG.finditer(prompt))
    if not tags:
        raise TrainerError("Trainer: LoRA weight: the prompt has no <lora:NAME:w> tag to weight; add one, or use "
                           "the 'Trainer: run epoch' axis too")
    m = tags[-1]
    return prompt[:m.start()] + _lora_tag(m.group(1).strip(), weight) + prompt[m.end():]


def _embedding_token(stem: str, weight: float | None) -> str:
    return stem if weight is None or round(weight, 6) == 1 else f"({stem}:{format_weight(weight)})"


def set_embedding_token(prompt: str, stem: str, weight: float | None, run_stems: Iterable[str]) -> str:
    """``prompt`` with every use of the run's embedding (``NAME``, ``NAME-000500``, ``(NAME:0.8)``) replaced by
    ``stem`` at ``weight`` (attention syntax ``(stem:w)``; plain ``stem`` at 1). Without one, ``stem`` is put in
    front. ``weight=None`` keeps the first use's weight."""
    names = sorted(set(run_stems) | {stem}, key=len, reverse=True)
    alt = "|".join(re.escape(n) for n in names)
    use = re.compile(rf"\(\s*(?:{alt})\s*:\s*(?P<w>{_NUMBER})\s*\)|(?<![\w-])(?:{alt})(?![\w-])")
    first = use.search(prompt)
    if weight is None and first is not None and first.group("w") is not None:
        weight = float(first.group("w"))
    token = _embedding_token(stem, weight)
    if first is None:
        return f"{token}, {prompt}" if prompt.strip() else token
    return use.sub(lambda _: token, prompt)


def cell_prompt(run: Run, prompt: str, stem: str, weight: float | None) -> str:
    """The prompt of one cell: the run's tag (LoRA) or token (embedding) set to ``stem`` at ``weight`` (the run's
    method says how: ``Method.set_prompt``)."""
    return resolve(methods.get(run.kind).set_prompt)(prompt, stem, weight, run.stems)


# ---------------------------------------------------------------- the grid plan

INFO_FILE = "Trainer file"
INFO_WEIGHT = "Trainer weight"
INFO_RUN = "Trainer run"


@dataclass(frozen=True)
class Cell:
    col: int  # file index (epochs across)
    row: int  # row index: third-axis value × weights down
    file: RunFile
    weight: float
    third: ThirdValue
    prompt: str
    seed: int

    @property
    def infotext_params(self) -> dict[str, str]:
        """What the cell adds to its infotext; :func:`choice_from_infotext` reads it back."""
        return {INFO_FILE: self.file.stem, INFO_WEIGHT: format_weight(self.weight)}


@dataclass(frozen=True)
class GridPlan:
    run: Run
    files: list[RunFile]
    weights: list[float]
    third: list[ThirdValue]
    seed: int
    cells: list[Cell] = field(default_factory=list)  # in generation order: file, then third value, then weight

    @property
    def cols(self) -> int:
        return len(self.files)

    @property
    def rows(self) -> int:
        return len(self.weights) * len(self.third)

    def index(self, cell: Cell) -> int:
        """The cell's position in the grid, row-major (what ``image_grid`` expects)."""
        return cell.row * self.cols + cell.col

    def col_labels(self) -> list[list[str]]:
        return [[f.label] for f in self.files]

    def row_labels(self) -> list[list[str]]:
        rows = []
        for t in self.third:
            for w in self.weights:
                rows.append(([t.label] if t.label else []) + [f"weight {format_weight(w)}"])
        return rows


def plan_grid(run: Run, *, files: Sequence[str] | str | None, weights: str, prompt: str, seed: int,
              third_kind: str = "Nothing", third_values: str = "",
              draw: Callable[[], int] | None = None) -> GridPlan:
    """The cells of a grid: the run's chosen ``files`` (None/empty = all) across, ``weights`` down, repeated for
    each third-axis value. ``seed`` -1 is drawn once with ``draw``; a seeds axis overrides it per row block."""
    import random

    draw = draw or (lambda: random.randrange(SEED_LIMIT))
    chosen = select_files(run, files)
    ws = parse_weights(weights)
    third = parse_third_axis(third_kind, third_values, draw)
    base_seed = fix_seed(seed, draw)
    if len(chosen) * len(ws) * len(third) > MAX_CELLS:
        raise TrainerError(f"weights: {len(chosen)} files × {len(ws)} weights × {len(third)} = "
                           f"{len(chosen) * len(ws) * len(third)} images; at most {MAX_CELLS} in one grid")
    cells = []
    for col, f in enumerate(chosen):
        for k, t in enumerate(third):
            base = t.prompt if t.prompt is not None else prompt
            for j, w in enumerate(ws):
                cells.append(Cell(col=col, row=k * len(ws) + j, file=f, weight=w, third=t,
                                  prompt=cell_prompt(run, base, f.stem, w),
                                  seed=t.seed if t.seed is not None else base_seed))
    return GridPlan(run, chosen, ws, third, base_seed, cells)


def choice_from_infotext(text: str) -> tuple[str, float] | None:
    """(file stem, weight) of a cell's infotext (see :attr:`Cell.infotext_params`); None for other images."""
    def value(key: str) -> str | None:
        m = re.search(rf"(?:^|[,\n]\s*){re.escape(key)}:\s*(\"(?:[^\"\\]|\\.)*\"|[^,\n]*)", text or "")
        if not m:
            return None
        raw = m.group(1).strip()
        if raw.startswith('"'):
            try:
                return json.loads(raw)
            except ValueError:
                return None
        return raw

    stem, weight = value(INFO_FILE), value(INFO_WEIGHT)
    if not stem or weight is None:
        return None
    try:
        return stem, float(weight)
    except ValueError:
        return None


# ---------------------------------------------------------------- keeping a choice

@dataclass
class KeepResult:
    messages: list[str] = field(default_factory=list)
    sidecars: list[Path] = field(default_factory=list)
    final: Path | None = None  # the promoted final file
    kept_aside: Path | None = None  # where the replaced final went


def _family_of(sidecar: dict, meta: dict[str, str]) -> str:
    """The sidecar's ``sd version`` as a family key (kept as it is), else the version the metadata implies."""
    from .models.families import family_name_from_metadata

    reverse = {v: k for k, v in SD_VERSIONS.items()}
    if "sd version" in sidecar:
        return reverse.get(str(sidecar["sd version"]), "unknown")
    return family_name_from_metadata(meta)


def write_preferred_weight(model_file: str | os.PathLike, weight: float) -> Path:
    """Set ``"preferred weight"`` in the model's ``<stem>.json`` (the Lora card's metadata), keeping every other
    key (the user's edits, activation text, ``sd version``)."""
    model_file = Path(model_file)
    if not math.isfinite(weight):
        raise TrainerError(f"weight: {weight} is not a finite number")
    if weight == 0:
        raise TrainerError("weight: 0 cannot be a preferred weight (the Lora card reads 0 as 'use the default "
                           "multiplier'); choose a weight other than 0")
    sidecar_path = model_file.with_suffix(".json")
    try:
        existing = json.loads(sidecar_path.read_text(encoding="utf-8")) if sidecar_path.exists() else {}
    except (OSError, ValueError):
        existing = {}
    existing = existing if isinstance(existing, dict) else {}
    family = _family_of(existing, read_metadata(model_file))
    return write_lora_sidecar(model_file, family=family, preferred_weight=round(float(weight), 4))


def _data_digest(path: Path) -> str:
    """sha256 of a safetensors file's data section (other files: of the whole file)."""
    offset = read_safetensors_header(path)[1] if path.suffix.lower() == ".safetensors" else 0
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _same_tensors(a: Path, b: Path) -> bool:
    """Whether two safetensors files hold the same data section: by their ``sshs_model_hash`` (the sha256 of
    that section, which this trainer and kohya's write) when both have one, else by hashing both."""
    size_a = a.stat().st_size - read_safetensors_header(a)[1]
    size_b = b.stat().st_size - read_safetensors_header(b)[1]
    if size_a != size_b:
        return False
    hash_a, hash_b = read_metadata(a).get("sshs_model_hash"), read_metadata(b).get("sshs_model_hash")
    if hash_a and hash_b:
        return hash_a == hash_b
    return _data_digest(a) == _data_digest(b)


_NAME_KEYS = ("ss_output_name", "modelspec.title", "modelspec.trigger_phrase")


def copy_renamed(src: Path, dst: Path, stem: str) -> Path:
    """Copy a model file to ``dst`` atomically. In a safetensors file the name fields that held the old stem
    (``ss_output_name``, the WebUI's alias; ``modelspec.title``/``trigger_phrase``) are set to ``stem``; the
    tensors are copied byte for byte (so ``sshs_model_hash`` stays right)."""
    if src.suffix.lower() != ".safetensors":
        def copy_plain(tmp: str) -> None:
            shutil.copyfile(src, tmp)

        return atomic_write(dst, copy_plain)
    header, offset = read_safetensors_header(src)
    meta = header.get("__metadata__")
    if isinstance(meta, dict):
        header = dict(header)
        header["__metadata__"] = {k: (stem if k in _NAME_KEYS else v) for k, v in meta.items()}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned, as safetensors writers do

    def write(tmp: str) -> None:
        with open(src, "rb") as f_in, open(tmp, "wb") as f_out:
            f_out.write(struct.pack("<Q", len(raw)))
            f_out.write(raw)
            f_in.seek(offset)
            shutil.copyfileobj(f_in, f_out, 1 << 20)

    return atomic_write(dst, write)


def _aside_stem(run: Run, final: Path) -> str:
    """Where the current final goes when another file replaces it: its own epoch name (LoRA ``NAME-000010`` from
    its ``ss_epoch``) when that name is free, else ``NAME-previous`` (``-2``, ``-3``… if taken)."""
    method = methods.get(run.kind)
    epoch = _int_or_none(read_metadata(final).get("ss_epoch")) if method.numbered_by == "epoch" else None
    if epoch is not None and epoch > 0:
        stem = f"{run.name}-{epoch:06d}"
        if not any((run.folder / f"{stem}{ext}").exists() for ext in method.extensions):
            return stem
    stem, n = f"{run.name}-previous", 1
    while any((run.folder / f"{stem}{ext}").exists() for ext in method.extensions):
        n += 1
        stem = f"{run.name}-previous-{n}"
    return stem


def promote_to_final(run: Run, stem: str) -> KeepResult:
    """Make the run's file ``stem`` its final ``NAME.safetensors`` (an embedding's ``NAME.pt`` follows).

    The current final is never lost: when its tensors already exist in another file of the run (a former
    promotion) it is simply replaced; otherwise it is first kept under its epoch name (``NAME-000010``, LoRA) or
    ``NAME-previous`` (see :func:`_aside_stem`), with its name fields set to that stem. The copy gets the name
    fields of ``NAME`` so the Lora card's alias is the run's name.
    """
    chosen = run.file(stem)
    result = KeepResult()
    final = run.final_path
    if chosen.path == final:
        result.messages.append(f"{final.name} already is the final file; nothing to copy.")
        result.final = final
        return result
    if chosen.path.suffix.lower() != ".safetensors":
        raise TrainerError(f"files: {chosen.path.name} is not a .safetensors file; only .safetensors files can "
                           "become the final file")
    if final.exists():
        duplicate = next((f for f in run.files if f.path != final and f.path.suffix.lower() == ".safetensors"
                          and _same_tensors(f.path, final)), None)
        if duplicate is None:
            aside = _aside_stem(run, final)
            result.kept_aside = copy_renamed(final, run.folder / f"{aside}.safetensors", aside)
            old_pt = final.with_suffix(".pt")
            if old_pt.exists():
                copy_renamed(old_pt, run.folder / f"{aside}.pt", aside)
            result.messages.append(f"The previous {final.name} was kept as {result.kept_aside.name}.")
        else:
            result.messages.append(f"The previous {final.name} equals {duplicate.path.name}; it was replaced.")
    result.final = copy_renamed(chosen.path, final, run.name)
    new_pt = next((p for p in chosen.siblings if p.suffix.lower() == ".pt"), None)
    old_pt = final.with_suffix(".pt")
    if new_pt is not None:
        copy_renamed(new_pt, old_pt, run.name)
    elif old_pt.exists():
        old_pt.unlink()  # kept aside above; a stale NAME.pt would shadow the new NAME.safetensors
    result.messages.append(f"{chosen.path.name} ({chosen.label}) is now {final.name}.")
    return result


def keep_choice(run: Run, stem: str, weight: float | None, *, promote: bool = False) -> KeepResult:
    """Keep a grid's choice: the run's file ``stem`` at ``weight``.

    ``promote`` copies the file to the run's final ``NAME.safetensors`` (:func:`promote_to_final`). For a LoRA run,
    ``weight`` is written as ``"preferred weight"`` into the chosen file's ``<stem>.json`` and, when promoted, into
    ``NAME.json`` — the Lora card then inserts ``<lora:NAME:weight>``. Embedding cards have no weight: for an
    embedding run only the promotion happens and the message says how to weight it in a prompt.
    """
    chosen = run.file(stem)
    result = promote_to_final(run, chosen.stem) if promote else KeepResult()
    if weight is None:
        return result
    if methods.get(run.kind).preferred_weight:
        targets = [chosen.path] + ([result.final] if result.final and result.final != chosen.path else [])
        for target in targets:
            result.sidecars.append(write_preferred_weight(target, weight))
        names = " and ".join(p.name for p in result.sidecars)
        result.messages.append(f"Preferred weight {format_weight(weight)} written to {names}.")
    else:
        name = run.name if promote else chosen.stem
        result.messages.append(f"Embeddings have no preferred weight; write ({name}:{format_weight(weight)}) in "
                               "the prompt.")
    return result


__all__ = [
    "Cell", "GridPlan", "KeepResult", "Run", "RunFile", "ThirdValue", "THIRD_AXES", "cell_prompt",
    "choice_from_infotext", "copy_renamed", "discover_runs", "find_run", "fix_seed", "fix_seeds", "format_weight",
    "keep_choice", "parse_seeds", "parse_third_axis", "parse_weights", "plan_grid", "promote_to_final",
    "read_metadata", "read_safetensors_header", "select_files", "set_embedding_token", "set_last_lora_weight",
    "set_lora_tag", "write_preferred_weight",
]
